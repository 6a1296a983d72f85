"""run_folder.py: the files of a run are written atomically (a crash leaves the previous file whole),
a resume is refused when it would mix two experiments, and the JSON records say what they hold."""
import argparse
import json
import math
import re

import pytest
import torch

import run_folder
from cli import DataError, WriteError


def test_a_checkpoint_write_that_fails_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    """save_checkpoint writes a temporary file and renames it: when torch.save fails half-way (a full
    disk), the checkpoint at the path is still the previous one, byte for byte, the temporary file
    is gone, and the error says why in words."""
    path = str(tmp_path / "checkpoint.pth")
    run_folder.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    before = open(path, "rb").read()
    real_save = torch.save

    def save_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)  # what a full disk leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(WriteError, match="no space left on the device"):
        run_folder.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert open(path, "rb").read() == before
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_resume_flags_that_changed_are_named_with_both_values():
    """--out_dim 32 saved, 64 now: one message naming the flag, the saved value and the new one; a flag
    the checkpoint predates takes its default (hidden_dim 2048), and other differences are appended."""
    args = argparse.Namespace(out_dim=64, hidden_dim=2048, arch="resnet18")
    with pytest.raises(DataError) as error:
        run_folder.check_resume_flags("run/checkpoint.pth", {"out_dim": 32, "arch": "resnet18"}, args,
                                      ("out_dim", "hidden_dim", "arch"), {"hidden_dim": 2048}, ["2 processes (now 1)"])
    assert str(error.value) == ("run/checkpoint.pth was trained with --out_dim 32 (now 64), 2 processes (now 1); use "
                                "the same flags to resume, or another --output_dir to start a new run")
    run_folder.check_resume_flags("p", {"out_dim": 64, "arch": "resnet18"}, args, ("out_dim", "hidden_dim", "arch"),
                                  {"hidden_dim": 2048})  # the same run: no error


def test_json_records_turn_nan_into_null_and_log_lines_carry_their_time(tmp_path):
    """write_json: a metric with nothing to average (NaN) is written as null, nested lists included.
    JsonLog: one object a line with its wall-clock time; a log of another process writes nothing."""
    run_folder.write_json({"map": math.nan, "runs": [1.0, math.nan], "k": 20}, str(tmp_path / "results.json"))
    assert json.loads((tmp_path / "results.json").read_text()) == {"map": None, "runs": [1.0, None], "k": 20}
    assert not list(tmp_path.glob("*.tmp"))
    log = run_folder.JsonLog(str(tmp_path / "log.jsonl"))
    log({"step": 1})
    log({"step": 2})
    run_folder.JsonLog(str(tmp_path / "log.jsonl"), enabled=False)({"step": 3})
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", line["time"]) for line in lines)


def test_rng_state_round_trips():
    """set_rng_state(rng_state()) replays the same random numbers: what makes a resume exact."""
    state = run_folder.rng_state()
    first = torch.rand(3)
    run_folder.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


class FakeCuda:
    """torch.cuda's generator functions on a machine without a GPU: `n_gpus` GPUs, this process's
    being `current`; every state set is recorded as (state, device)."""

    def __init__(self, monkeypatch, n_gpus, current=0, available=True):
        self.set_calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus if available else 0)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([100 + current],
                                                                                            dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.set_calls.append(
            (int(state[0]), device)))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.refused)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.refused)

    @staticmethod
    def refused(*args, **kwargs):
        raise AssertionError("one CUDA state per process: never every GPU's")


def eight_gpus_state():
    """An RNG state as a process of an 8-GPU node saved it: its CPU state and 8 CUDA states (0..7)."""
    return {"cpu": torch.get_rng_state(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}


@pytest.mark.parametrize("current", [0, 3])
def test_a_state_saved_with_eight_cuda_states_resumes_where_the_process_sees_one_gpu(monkeypatch, current):
    """A checkpoint written by a process that saw 8 GPUs, resumed by one that sees 1 (device `current`
    of its machine): the state of the GPU with its device number goes to its GPU, the others are left
    out (no IndexError), and the CPU state is restored."""
    state = eight_gpus_state()
    first = torch.rand(3)
    cuda = FakeCuda(monkeypatch, n_gpus=1, current=current)
    run_folder.set_rng_state(state)
    assert cuda.set_calls == [(current, current)]
    assert torch.equal(torch.rand(3), first)


def test_one_saved_cuda_state_goes_to_this_process_gpu(monkeypatch):
    """rng_state() keeps the state of this process's GPU only (a list of one), and set_rng_state puts
    it back on this process's GPU, whatever its device number."""
    cuda = FakeCuda(monkeypatch, n_gpus=8, current=5)
    state = run_folder.rng_state()
    assert [int(s[0]) for s in state["cuda"]] == [105]
    run_folder.set_rng_state(state)
    assert cuda.set_calls == [(105, 5)]


def test_without_cuda_the_rng_state_calls_no_cuda_function(monkeypatch):
    """Without a GPU the state holds no CUDA state, and a state with 8 of them restores the CPU's
    alone: no torch.cuda generator function is called."""
    cuda = FakeCuda(monkeypatch, n_gpus=0, available=False)
    for name in ("get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, cuda.refused)
    assert run_folder.rng_state()["cuda"] == []
    state = eight_gpus_state()
    first = torch.rand(3)
    run_folder.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
