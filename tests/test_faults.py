"""Faults at the edges of a run: a full disk, a refused write, torch.save stopping half-way, an output
folder that cannot be used, a loss that diverges. Each ends the script with one line (exit code 74
for a write that failed, 1 for a bad --output_dir), leaves the previous file byte for byte as it was
and no temporary file, says the truth about the last checkpoint, and the same command, once the
fault is gone, resumes exactly.

The faults are injected, not waited for: durable.open is replaced by FaultyDisk, whose files fail
at a chosen write (after writing half of its bytes, as a disk that fills up does) or at opening.
Runs are tiny (test_resume's SmallCNN on 32 synthetic 16-pixel images, 8 steps an epoch).
"""
import errno
import io
import json
import os
import re
import types

import pytest
import torch

import cli
import durable
import features
import knn_eval
import linear_eval
import plot_log
import pretrain
import run_folder
from test_linear_eval import TINY as LINEAR_TINY
from test_resume import SMALL, assert_same_weights

RUN = SMALL + ["--num_workers", "0"]  # 2 epochs of 8 optimizer steps, a checkpoint after every step


class FaultyFile(io.FileIO):
    """A file of FaultyDisk: its write number `fail_at` writes half of its bytes and raises `error`."""

    def __init__(self, path, mode, disk, fail_at):
        super().__init__(path, mode)
        self.disk, self.fail_at, self.writes = disk, fail_at, 0

    def write(self, data):
        self.writes += 1
        self.disk.writes += 1
        if self.writes == self.fail_at:
            super().write(bytes(data)[:len(data) // 2])
            raise OSError(self.disk.error, os.strerror(self.disk.error))
        return super().write(data)


class FaultyDisk:
    """Stands in for durable.open. The `opening`-th file opened whose name ends with `name` fails: at
    its write number `write` (None: at opening); opening=0: none fails. `before` holds the bytes of
    the file that the failing write was to replace or extend (None if there was none); `writes`
    counts the writes of the files of `name`."""

    def __init__(self, name, write=None, opening=1, error=errno.ENOSPC):
        self.name, self.write, self.opening, self.error = name, write, opening, error
        self.opened, self.writes, self.before, self.failed = 0, 0, None, False

    def open(self, path, mode):
        if not str(path).endswith(self.name):
            return open(path, mode)
        self.opened += 1
        if self.opened != self.opening:
            return FaultyFile(path, mode, self, fail_at=None)
        final = str(path).removesuffix(".tmp")
        self.before = open(final, "rb").read() if os.path.exists(final) else None
        self.failed = True
        if self.write is None:
            raise OSError(self.error, os.strerror(self.error), path)
        return FaultyFile(path, mode, self, self.write)


def use(monkeypatch, disk):
    monkeypatch.setattr(durable, "open", disk.open, raising=False)
    return disk


def leftovers(folder):
    return sorted(str(p) for p in folder.rglob("*.tmp"))


def script_error(capsys, main, exit_code):
    """Run `main` as a script does (cli.run): the exit code, and the last line of stderr, which must be
    its only message (no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run(main)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(stop.value.code, str):  # sys.exit("error: ...") prints it and exits with 1
        assert exit_code == 1, stop.value.code
        return stop.value.code
    assert stop.value.code == exit_code, err[-2000:]
    # What a terminal shows last: a progress bar that was cleared ("\r") is overwritten; one left open
    # would run into the message.
    return err.rstrip("\n").split("\n")[-1].split("\r")[-1]


# ---------------------------------------------------------------- every write of a save -------

@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The checkpoint of a tiny run that met no fault: the weights a rerun must end with, and a real
    state to save (student, teacher, optimizer, RNG states)."""
    out = tmp_path_factory.mktemp("straight")
    pretrain.main(RUN + ["--output_dir", str(out)])
    return torch.load(out / "checkpoint.pth", weights_only=True)


def test_a_checkpoint_save_that_fails_at_any_of_its_writes_leaves_the_previous_file(tmp_path, monkeypatch, straight):
    """ENOSPC at write n of the save, for every n from the first to the last write torch.save makes
    (several hundred for this checkpoint; most come back from torch's zip writer as a RuntimeError
    whose context is the OSError): one WriteError naming the file, the reason in words and the space
    needed, the previous checkpoint.pth byte for byte, no checkpoint.pth.tmp. One write more: the
    save succeeds."""
    state, path = straight, str(tmp_path / "checkpoint.pth")
    counting = use(monkeypatch, FaultyDisk("checkpoint.pth.tmp", opening=0))
    run_folder.save_checkpoint(state, path)
    total = counting.writes
    assert total > 100
    run_folder.save_checkpoint(dict(state, step=12), path)  # the previous checkpoint, of step 12
    before = open(path, "rb").read()
    for n in range(1, total + 1):
        use(monkeypatch, FaultyDisk("checkpoint.pth.tmp", write=n))
        with pytest.raises(cli.WriteError) as error:
            run_folder.save_checkpoint(state, path, checkpoint=path)
        assert re.fullmatch(rf"cannot write {re.escape(path)}: no space left on the device \(it needs about 4\.\d MB, "
                            rf"[\d.]+ [KMG]?B are free there\); {re.escape(path)} holds optimizer step 12 \(4 of 8 "
                            rf"steps of epoch 1\) and is intact; free some space there, then run the same command to "
                            rf"resume", str(error.value)), (n, str(error.value))
        assert open(path, "rb").read() == before, n
        assert not leftovers(tmp_path), n
    use(monkeypatch, FaultyDisk("checkpoint.pth.tmp", write=total + 1))
    run_folder.save_checkpoint(state, path, checkpoint=path)
    assert torch.load(path, weights_only=True)["step"] == 16


def test_a_torch_save_that_raises_half_way_is_one_write_error(tmp_path, monkeypatch):
    """torch.save writing part of the file, then raising a RuntimeError of its own (no OSError
    behind it): the same single error, the previous file kept, no temporary file."""
    path = str(tmp_path / "checkpoint.pth")
    run_folder.save_checkpoint({"epoch": 3, "w": torch.ones(3)}, path)
    before = open(path, "rb").read()

    def half_a_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + bytes(1000))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1004 vs 0")

    monkeypatch.setattr(torch, "save", half_a_save)
    with pytest.raises(cli.WriteError) as error:
        run_folder.save_checkpoint({"epoch": 4, "w": torch.zeros(3)}, path, checkpoint=path)
    assert str(error.value) == (f"cannot write {path}: torch.save stopped half-way ([enforce fail at "
                                f"inline_container.cc:672] . unexpected pos 1004 vs 0); {path} holds the first 3 "
                                f"epochs and is intact; check the disk and its free space, then run the same command "
                                f"to resume")
    assert open(path, "rb").read() == before and not leftovers(tmp_path)


@pytest.mark.parametrize("step, error, words", [
    ("open", errno.EACCES, "permission denied; the previous {path} is as it was; make the folder writable"),
    ("fsync", errno.EIO, "an input/output error (a failing disk or a lost network mount); the previous {path} is "
                         "as it was; check the disk"),
    ("replace", errno.EROFS, "the file system is read-only; the previous {path} is as it was; write to a file "
                             "system that is not read-only"),
], ids=["open EACCES", "fsync EIO", "rename EROFS"])
def test_each_step_of_a_write_that_fails_leaves_the_previous_file(tmp_path, monkeypatch, step, error, words):
    """The other steps of durable_write failing: opening the temporary file, flushing it to the disk,
    renaming it: one line with the OS's reason in words, the previous file, no temporary file."""
    path = str(tmp_path / "results.json")
    run_folder.write_json({"top1": 1.0}, path)
    before = open(path, "rb").read()
    if step == "open":
        use(monkeypatch, FaultyDisk("results.json.tmp", write=None, error=error))
    else:
        def fails(*args):
            raise OSError(error, os.strerror(error))
        monkeypatch.setattr(durable.os, step, fails)
    with pytest.raises(cli.WriteError) as raised:
        run_folder.write_json({"top1": 2.0}, path)
    monkeypatch.undo()
    assert str(raised.value) == f"cannot write {path}: {words.format(path=path)}, then run the same command again"
    assert open(path, "rb").read() == before and not leftovers(tmp_path)


def plot_run(folder):
    """A run folder of 4 logged steps, for plot_log."""
    folder.mkdir(exist_ok=True)
    lines = [{"step": s, "epoch": 0, "loss": 4.0 - s / 4, "consistency": 3.5, "uniformity": 0.5, "prototypes_used": 20,
              "block_entropy": 1.5, "lr": 0.01, "grad_norm": 1.0} for s in (1, 2, 3, 4)]
    (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def small_figure(path):
    """A figure of one line, 20 x 20 pixels, saved as plot_log.py saves its figures."""
    plt = plot_log.pyplot()
    fig = plt.figure(figsize=(1, 1))
    fig.gca().plot([0, 1])
    plot_log.save_png(plt, fig, str(path), dpi=20)


WRITERS = {  # name: (the file it writes, a function that writes it into a folder)
    "checkpoint": ("checkpoint.pth", lambda folder: run_folder.save_checkpoint(
        {"step": 3, "w": torch.randn(100)}, str(folder / "checkpoint.pth"))),
    "JSON record": ("summary.json", lambda folder: run_folder.write_json({"top1": 50.0}, str(folder / "summary.json"))),
    "log line": ("log.jsonl", lambda folder: run_folder.JsonLog(str(folder / "log.jsonl"))({"step": 3})),
    "feature cache": ("val_features.pth", lambda folder: features.save_features(
        str(folder), {"val": (torch.randn(10, 4), torch.arange(10))})),
    "figure": ("curves.png", lambda folder: small_figure(folder / "curves.png")),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_goes_through_the_one_write_path(tmp_path, monkeypatch, capsys, writer):
    """Each kind of file the scripts write, written over an earlier one with ENOSPC at each of its
    writes in turn: a WriteError every time, the earlier file byte for byte (a log cut back to its
    last whole line), no temporary file; without the fault the write goes through."""
    name, write = WRITERS[writer]
    opened = name if writer == "log line" else name + ".tmp"  # a log line is appended in place
    write(tmp_path)
    counting = use(monkeypatch, FaultyDisk(opened, opening=0))
    write(tmp_path)
    total, before = counting.writes, (tmp_path / name).read_bytes()
    assert total >= 1
    for n in range(1, total + 1):
        use(monkeypatch, FaultyDisk(opened, write=n))
        with pytest.raises(cli.WriteError, match=f"cannot write {re.escape(str(tmp_path / name))}: no space left"):
            write(tmp_path)
        assert (tmp_path / name).read_bytes() == before, n
        assert not leftovers(tmp_path), n
    capsys.readouterr()


def test_a_log_line_that_fails_leaves_no_half_line_and_a_new_log_no_file(tmp_path, monkeypatch):
    """An append that fails half-way is cut back to the previous length; one that fails on a log it
    was creating removes it. The message says what the run's checkpoint holds (here: nothing yet)."""
    log_path, checkpoint = tmp_path / "log.jsonl", str(tmp_path / "checkpoint.pth")
    log = run_folder.JsonLog(str(log_path), checkpoint=checkpoint)
    use(monkeypatch, FaultyDisk("log.jsonl", write=1))
    with pytest.raises(cli.WriteError) as error:
        log({"step": 1})
    assert not log_path.exists()
    assert re.fullmatch(rf"cannot write {re.escape(str(log_path))}: no space left on the device \(it needs about "
                        rf"{len(json.dumps({'step': 1, 'time': run_folder.timestamp()})) + 1} bytes, [\d.]+ [KMG]?B "
                        rf"are free there\); no part of it was left behind; no checkpoint has been written yet; free "
                        rf"some space there, then run the same command to start again", str(error.value)), error.value
    monkeypatch.undo()
    log({"step": 1})
    before = log_path.read_bytes()
    use(monkeypatch, FaultyDisk("log.jsonl", write=1))
    with pytest.raises(cli.WriteError):
        log({"step": 2, "loss": 3.25})
    assert log_path.read_bytes() == before


# ---------------------------------------------------------------- pretrain.py, end to end ------

PRETRAIN_FAULTS = {
    # name: (FaultyDisk arguments, the message after "cannot write <out>/")
    "disk full in a step checkpoint": (
        dict(name="checkpoint.pth.tmp", opening=3, write=200),
        r"checkpoint\.pth: no space left on the device \(it needs about 4\.\d MB, [\d.]+ [KMG]?B are free there\); "
        r"OUT/checkpoint\.pth holds optimizer step 2 \(2 of 8 steps of epoch 0\) and is intact; free "
        r"some space there, then run the same command to resume"),
    "disk full in the first checkpoint": (
        dict(name="checkpoint.pth.tmp", opening=1, write=5),
        r"checkpoint\.pth: no space left on the device \(it needs about 4\.\d MB, [\d.]+ [KMG]?B are free there\); no "
        r"checkpoint has been written yet; free some space there, then run the same command to start again"),
    "permission denied for the epoch's checkpoint": (
        dict(name="checkpoint.pth.tmp", opening=8, error=errno.EACCES),
        r"checkpoint\.pth: permission denied; OUT/checkpoint\.pth holds optimizer step 7 \(7 of 8 steps of epoch 0\) "
        r"and is intact; make the folder writable, then run the same command to resume"),
    "quota exceeded in a log line": (
        dict(name="log.jsonl", opening=10, write=1, error=errno.EDQUOT),
        r"log\.jsonl: the disk quota is exceeded \(it needs about \d+ bytes\); the previous OUT/log\.jsonl is as it "
        r"was; OUT/checkpoint\.pth holds the first epoch \(optimizer step 8\) and is intact; free some space within "
        r"the quota, then run the same command to resume"),
    "disk full in an epoch's copy": (
        dict(name="checkpoint0001.pth.tmp", opening=1, write=300),
        r"checkpoint0001\.pth: no space left on the device \(it needs about 4\.\d MB, [\d.]+ [KMG]?B are free "
        r"there\); no part of it was left behind; OUT/checkpoint\.pth holds optimizer step 7 \(7 of 8 steps of "
        r"epoch 0\) and is intact; free some space there, then run the same command to resume"),
    "a failing disk under settings.json": (
        dict(name="settings.json.tmp", opening=1, error=errno.EIO),
        r"settings\.json: an input/output error \(a failing disk or a lost network mount\); no part of it was left "
        r"behind; no checkpoint has been written yet; check the disk, then run the same command to start again"),
}


@pytest.mark.parametrize("fault", PRETRAIN_FAULTS)
def test_a_write_that_fails_stops_pretraining_in_one_line_and_the_rerun_resumes_exactly(
        tmp_path, monkeypatch, capsys, straight, fault):
    """pretrain.py with a fault injected into one of its writes: exit code 74 and one line that names
    the file, the reason, the space, and what checkpoint.pth holds (read from the file); the file it
    was replacing or extending byte for byte as it was; no temporary file. The same command, the
    fault gone, ends with the weights of the run that met no fault."""
    disk_args, message = PRETRAIN_FAULTS[fault]
    out = tmp_path / "run"
    argv = RUN + ["--output_dir", str(out), "--saveckp_freq", "1"]
    disk = use(monkeypatch, FaultyDisk(**disk_args))
    line = script_error(capsys, lambda: pretrain.main(argv), cli.WRITE_ERROR_EXIT_CODE)
    assert disk.failed
    assert re.fullmatch("error: cannot write OUT/" + message, line.replace(str(out), "OUT")), line
    target = out / disk_args["name"].removesuffix(".tmp")
    assert (target.read_bytes() if target.exists() else None) == disk.before
    assert not leftovers(tmp_path)
    held = torch.load(out / "checkpoint.pth", weights_only=True)["step"] if (out / "checkpoint.pth").exists() else 0
    monkeypatch.undo()
    pretrain.main(argv)
    resumed = f"resuming from {out / 'checkpoint.pth'} at epoch {held // 8}, step {held}"
    assert (resumed in capsys.readouterr().out) == (held > 0)
    assert_same_weights(straight, torch.load(out / "checkpoint.pth", weights_only=True))
    assert torch.load(out / "checkpoint0001.pth", weights_only=True)["step"] == 8  # the copy of epoch 1: made


def test_a_summary_whose_write_failed_is_written_by_the_rerun_and_kept_after(tmp_path, monkeypatch, capsys):
    """A full disk at the run's very last write (summary.json): exit 74, the finished checkpoint kept.
    The same command again trains nothing and writes summary.json from the log's last epoch line (the
    epoch's statistics the run printed; its training time unknown); once written, a third start
    leaves it as it is."""
    out = tmp_path / "run"
    argv = RUN + ["--output_dir", str(out)]
    use(monkeypatch, FaultyDisk(name="summary.json.tmp", write=1))
    capsys.readouterr()
    line = script_error(capsys, lambda: pretrain.main(argv), cli.WRITE_ERROR_EXIT_CODE)
    assert line.startswith(f"error: cannot write {out / 'summary.json'}: no space left on the device"), line
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 16 and not (out / "summary.json").exists()
    monkeypatch.undo()
    pretrain.main(argv)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = json.loads((out / "summary.json").read_text())
    last_epoch = json.loads([line for line in (out / "log.jsonl").read_text().splitlines() if "epoch_summary" in line][-1])
    assert summary["final_epoch"] == {k: v for k, v in last_epoch.items() if k not in ("epoch_summary", "time")}
    assert summary["final_epoch"]["epoch"] == 1 and summary["final_epoch"]["loss"] > 0
    assert summary["training_seconds"] is None and summary["epochs"] == 2 and not printed  # nothing trained again
    (out / "summary.json").write_text('{"kept": true}')  # a summary.json that exists is the run's own
    pretrain.main(argv)
    assert (out / "summary.json").read_text() == '{"kept": true}'


def test_an_output_dir_under_a_file_is_one_line_before_any_work(tmp_path, capsys):
    """--output_dir under a path that is a file: exit code 1 (change the flag) and one line naming the
    file, before the data is read."""
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run"
    line = script_error(capsys, lambda: pretrain.main(RUN + ["--output_dir", str(out)]), 1)
    assert line == (f"error: --output_dir {out} cannot be used: {tmp_path / 'a_file'} is a file, not a folder; pass "
                    f"--output_dir DIR, a folder you can write to")


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """A folder this user may not write to (the test file is refused: EACCES): exit code 1, one line."""
    def refused(dir, prefix):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix))

    monkeypatch.setattr(durable.tempfile, "mkstemp", refused)
    line = script_error(capsys, lambda: pretrain.main(RUN + ["--output_dir", str(tmp_path)]), 1)
    assert line == (f"error: --output_dir {tmp_path} cannot be used: permission denied; pass --output_dir DIR, a "
                    f"folder you can write to")


def test_a_folder_short_of_space_gets_a_one_line_warning_with_the_checkpoints_size(tmp_path, monkeypatch, capsys):
    """Less free space than a checkpoint and its temporary copy: one warning line before training,
    with the size computed from the tensors (student, teacher, LARS's momentum: one tensor per
    parameter), within 2 % of the file torch.save then writes; the run goes on."""
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=2 ** 20))
    pretrain.main(RUN + ["--output_dir", str(tmp_path), "--epochs", "1"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    found = re.fullmatch(rf"warning: {re.escape(str(tmp_path))} has 1\.0 MB free, less than the ([\d.]+) MB that "
                         rf"checkpoint\.pth of this model \(([\d.]+) MB\) and its temporary copy need: the run will "
                         rf"stop at the first write that fails, its last checkpoint kept; free some space or pass "
                         rf"another --output_dir", warnings[0])
    assert found, warnings[0]
    need, size = float(found.group(1)), float(found.group(2))
    assert need == pytest.approx(2 * size, abs=0.1)
    assert size * 2 ** 20 == pytest.approx((tmp_path / "checkpoint.pth").stat().st_size, rel=0.02)


# ---------------------------------------------------------------- a diverging run ---------------

def nan_from_call(monkeypatch, first_bad):
    """carp_loss returns NaN from its call number `first_bad` on (one call a step here)."""
    original, calls = pretrain.carp_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        consistency, uniformity = original(*args, **kwargs)
        return consistency * (float("nan") if len(calls) >= first_bad else 1.0), uniformity
    monkeypatch.setattr(pretrain, "carp_loss", loss)


def test_a_loss_that_diverges_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, monkeypatch, capsys):
    """NaN from the first step, no step checkpoints: the line says no checkpoint was written (there is
    none) and to start again; exit code 1."""
    nan_from_call(monkeypatch, 1)
    out = tmp_path / "run"
    line = script_error(capsys, lambda: pretrain.main(RUN + ["--output_dir", str(out), "--checkpoint_every_steps", "0",
                                                             "--log_every", "4"]), 1)
    assert line.startswith("error: the loss became NaN or infinite at optimizer step 0 (epoch 0). Nothing was saved "
                           "after it: no checkpoint has been written yet. Try a lower --lr")
    assert line.endswith("then run the same command to start again.")
    assert not (out / "checkpoint.pth").exists()


def test_a_loss_that_diverges_between_log_lines_never_reaches_the_checkpoint(tmp_path, monkeypatch, capsys):
    """NaN from step 5 (0-based), a checkpoint every 2 steps, a log line every 4: the checkpoint of step
    6 would hold NaN weights; it is not written, and the line names what the file holds, step 4,
    whose weights are finite."""
    nan_from_call(monkeypatch, 6)
    out = tmp_path / "run"
    line = script_error(capsys, lambda: pretrain.main(RUN + ["--output_dir", str(out), "--checkpoint_every_steps", "2",
                                                             "--log_every", "4"]), 1)
    assert line.startswith(f"error: the loss became NaN or infinite at optimizer step 5 (epoch 0). Nothing was saved "
                           f"after it: {out / 'checkpoint.pth'} holds optimizer step 4 (4 of 8 steps of epoch 0). "
                           f"Try a lower --lr"), line
    assert line.endswith("then run the same command to resume.")
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["student"].values() if v.is_floating_point())


# ---------------------------------------------------------------- the evaluation scripts ------

def test_a_full_disk_in_a_linear_probe_checkpoint_is_one_line_and_the_rerun_resumes_exactly(tmp_path, monkeypatch,
                                                                                              capsys):
    """linear_eval.py, ENOSPC in the checkpoint of epoch 2 of 3: exit 74, one line that says
    linear_checkpoint.pth holds the first epoch; the file as it was, no temporary file; the same
    command then ends with the results of a run that met no fault."""
    def run(folder):
        return linear_eval.main(["--pretrained_weights", "random", *LINEAR_TINY, "--epochs", "3",
                                 "--output_dir", str(folder)])

    clean = run(tmp_path / "clean")
    out = tmp_path / "run"
    disk = use(monkeypatch, FaultyDisk("linear_checkpoint.pth.tmp", opening=2, write=3))
    line = script_error(capsys, lambda: run(out), cli.WRITE_ERROR_EXIT_CODE)
    path = out / "linear_checkpoint.pth"
    assert re.fullmatch(rf"error: cannot write {re.escape(str(path))}: no space left on the device \(it needs about "
                        rf"[\d.]+ [KMG]?B, [\d.]+ [KMG]?B are free there\); {re.escape(str(path))} holds the first "
                        rf"epoch and is intact; free some space there, then run the same command to resume", line), line
    assert path.read_bytes() == disk.before and not leftovers(tmp_path)
    monkeypatch.undo()
    assert run(out) == pytest.approx(clean)
    assert "resuming at epoch 1" in capsys.readouterr().out


def test_a_full_disk_in_a_feature_cache_keeps_the_previous_cache(tmp_path, monkeypatch, capsys):
    """knn_eval.py --dump_features, ENOSPC in the val cache: exit 74, one line; both earlier caches byte
    for byte, no temporary file; the same command then writes the same caches."""
    cache = tmp_path / "cache"
    argv = ["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "synthetic", "--synthetic_images",
            "20", "--image_size", "16", "--num_workers", "0", "--nb_knn", "2", "--dump_features", str(cache)]
    knn_eval.main(argv)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    use(monkeypatch, FaultyDisk("val_features.pth.tmp", write=3))
    line = script_error(capsys, lambda: knn_eval.main(argv), cli.WRITE_ERROR_EXIT_CODE)
    assert line.startswith(f"error: cannot write {cache / 'val_features.pth'}: no space left on the device") and \
        line.endswith(f"the previous {cache / 'val_features.pth'} is as it was; free some space there, then run the "
                      f"same command again"), line
    assert (cache / "val_features.pth").read_bytes() == before["val_features.pth"]
    assert sorted(p.name for p in cache.iterdir()) == sorted(before)  # no temporary file
    monkeypatch.undo()
    knn_eval.main(argv)
    for name, data in before.items():
        assert torch.equal(torch.load(cache / name, weights_only=True)["features"],
                           torch.load(io.BytesIO(data), weights_only=True)["features"])


def test_an_unwritable_dump_features_folder_is_refused_before_extraction(tmp_path, monkeypatch, capsys):
    """--dump_features under a file: one line before the backbone runs over any image."""
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(features, "extract_features", lambda *args, **kwargs: pytest.fail("features were extracted"))
    folder = tmp_path / "a_file" / "cache"
    line = script_error(capsys, lambda: knn_eval.main(
        ["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "synthetic", "--image_size", "16",
         "--num_workers", "0", "--dump_features", str(folder)]), 1)
    assert line == (f"error: --dump_features {folder} cannot be used: {tmp_path / 'a_file'} is a file, not a folder; "
                    f"pass --dump_features DIR, a folder you can write to")


EVAL_ARGS = ["--pretrained_weights", "random", "--arch", "small_cnn", "--image_size", "16", "--num_workers", "0"]
SYNTHETIC = ["--dataset", "synthetic", "--synthetic_images", "20"]


@pytest.mark.parametrize("script, argv", [
    ("knn_eval", EVAL_ARGS + SYNTHETIC + ["--nb_knn", "2"]),
    ("kmeans_eval", EVAL_ARGS + SYNTHETIC),
    ("fewshot_eval", EVAL_ARGS + SYNTHETIC + ["--protocol", "nshot_logreg"]),
    ("linear_eval", EVAL_ARGS + SYNTHETIC),
    ("retrieval_eval", EVAL_ARGS + ["--dataset", "copydays", "--data_path", "no_such_folder"])])
@pytest.mark.parametrize("bad", ["under a file", "a folder"])
def test_an_unusable_output_json_is_one_line_before_any_image_is_read(tmp_path, monkeypatch, capsys, script, argv, bad):
    """--output_json is written at an evaluation's end: a path under a file, or a folder, stops the
    script at its start in one line naming the flag's value (exit 1), before any image is read."""
    module = __import__(script)
    monkeypatch.setattr(features, "extract_features", lambda *args, **kwargs: pytest.fail("features were extracted"))
    (tmp_path / "a_file").write_text("x")
    results = tmp_path / "a_file" / "results.json" if bad == "under a file" else tmp_path
    extra = ["--output_dir", str(tmp_path / "probe")] if script == "linear_eval" else []
    line = script_error(capsys, lambda: module.main(argv + extra + ["--output_json", str(results)]), 1)
    why = f"{tmp_path / 'a_file'} is a file, not a folder" if bad == "under a file" else "it is a folder"
    advice = "FILE in a folder you can write to" if bad == "under a file" else "FILE, a file name"
    assert line == f"error: --output_json {results} cannot be used: {why}; pass --output_json {advice}"


def test_a_refused_results_file_and_figure_are_one_line_each(tmp_path, monkeypatch, capsys):
    """knn_eval.py --output_json where the file cannot be made (EACCES), plot_log.py on a full disk:
    exit 74, one line; the earlier figure kept, no temporary file."""
    results = tmp_path / "results.json"
    use(monkeypatch, FaultyDisk("results.json.tmp", error=errno.EACCES))
    line = script_error(capsys, lambda: knn_eval.main(
        ["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "synthetic", "--synthetic_images", "20",
         "--image_size", "16", "--num_workers", "0", "--nb_knn", "2", "--output_json", str(results)]),
        cli.WRITE_ERROR_EXIT_CODE)
    assert line == (f"error: cannot write {results}: permission denied; no part of it was left behind; make the "
                    f"folder writable, then run the same command again")
    assert not results.exists() and not leftovers(tmp_path)

    run = plot_run(tmp_path / "run")
    plot_log.main([str(run)])
    before = (run / "curves.png").read_bytes()
    use(monkeypatch, FaultyDisk("curves.png.tmp", write=1))
    line = script_error(capsys, lambda: plot_log.main([str(run)]), cli.WRITE_ERROR_EXIT_CODE)
    assert line.startswith(f"error: cannot write {run / 'curves.png'}: no space left on the device; the previous "
                           f"{run / 'curves.png'} is as it was"), line
    assert (run / "curves.png").read_bytes() == before and not leftovers(tmp_path)


def test_a_write_error_exits_with_its_own_code(capsys):
    """cli.run: a write that failed exits with 74 (EX_IOERR) and its line, distinct from a bad argument
    (1), a stop to resume (75) and Ctrl-C (130)."""
    def fails():
        raise cli.WriteError("cannot write x: permission denied")

    with pytest.raises(SystemExit) as stop:
        cli.run(fails)
    assert stop.value.code == cli.WRITE_ERROR_EXIT_CODE == 74
    assert capsys.readouterr().err == "error: cannot write x: permission denied\n"
    assert len({1, cli.WRITE_ERROR_EXIT_CODE, cli.STOPPED_EXIT_CODE, 130}) == 4
