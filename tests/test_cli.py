"""cli.py: one boolean-flag style, renamed flags that keep working for one release, and one place
that turns a user's error or Ctrl-C into one line and an exit code, in every script."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import bench
import cli
import pretrain
import retrieval_eval

ROOT = Path(__file__).resolve().parents[1]


def test_bool_flag_takes_true_and_false_and_names_anything_else():
    assert [cli.bool_flag(s) for s in ("true", "1", "Yes", "on")] == [True] * 4
    assert [cli.bool_flag(s) for s in ("false", "0", "NO", "off")] == [False] * 4
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false, got 'maybe'"):
        cli.bool_flag("maybe")


@pytest.mark.parametrize("get_args, old, new, value", [
    (lambda argv: pretrain.get_args(argv)[1], "--knn_k", "nb_knn", 7),
    (lambda argv: retrieval_eval.get_args(["--pretrained_weights", "random", "--data_path", "d", *argv]), "--imsize",
     "image_size", 96),
    (lambda argv: bench.get_args(argv), "--step_out_dim", "out_dim", 2048),
    (lambda argv: bench.get_args(argv), "--step_partition_size", "block_size", 128),
    (lambda argv: pretrain.get_args(argv)[1], "--partition_size", "block_size", 64),
    (lambda argv: bench.get_args(argv), "--partition_size", "block_size", 32),
], ids=["pretrain --knn_k", "retrieval --imsize", "bench --step_out_dim", "bench --step_partition_size",
        "pretrain --partition_size", "bench --partition_size"])
def test_a_renamed_flag_still_sets_the_new_one(get_args, old, new, value):
    """Flags renamed for one word per concept keep their old name for one release."""
    assert getattr(get_args([old, str(value)]), new) == value


@pytest.mark.parametrize("script, old", [("pretrain.py", "--knn_k"), ("retrieval_eval.py", "--imsize"),
                                         ("bench.py", "--step_out_dim")])
def test_help_names_the_old_name_of_a_renamed_flag(script, old):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert f"the old name {old} still works for one release" in " ".join(result.stdout.split())


def test_run_prints_a_user_error_as_one_line_and_ctrl_c_as_130(capsys):
    def bad_input():
        raise cli.DataError("--data_path /nowhere does not exist; pass a folder of images")

    def interrupted():
        raise cli.Interrupted("interrupted at epoch 2; run the same command to resume")

    with pytest.raises(SystemExit) as stop:
        cli.run(bad_input)
    assert stop.value.code == "error: --data_path /nowhere does not exist; pass a folder of images"  # exit status 1
    with pytest.raises(SystemExit) as stop:
        cli.run(interrupted)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted at epoch 2; run the same command to resume\n"


def test_an_error_raised_in_a_dataloader_worker_keeps_only_its_message():
    """A worker re-raises in the main process with its traceback inside the message; the last line is
    the user's message."""
    wrapped = cli.DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                            "last):\n  File \"x.py\", line 1\ncli.DataError: cannot read image a/b.png: truncated. "
                            "Remove or replace the file.")
    assert cli.one_line(wrapped) == "cannot read image a/b.png: truncated. Remove or replace the file."


def test_an_unreadable_image_in_an_evaluation_worker_is_one_line(tmp_path):
    """knn_eval.py with a DataLoader worker on a folder holding a broken image: one line that names
    the file, no traceback (every script ends through cli.run)."""
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (80 * i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "val" / "b" / "broken.png").write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "knn_eval.py", "--pretrained_weights", "random", "--arch", "small_cnn",
                             "--dataset", "imagefolder", "--data_path", str(tmp_path), "--image_size", "16",
                             "--num_workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot read image ") and "broken.png" in last_line, last_line
