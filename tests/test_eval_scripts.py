"""What a user meets in every evaluation script: data flags that follow the checkpoint, one-line
errors for a file that is not a checkpoint, --help with the defaults, one boolean-flag style, and
evaluation state kept out of the current folder."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import features
import fewshot_eval
import kmeans_eval
import knn_eval
import linear_eval
import pretrain
import retrieval_eval

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"knn_eval": knn_eval, "linear_eval": linear_eval, "kmeans_eval": kmeans_eval,
           "fewshot_eval": fewshot_eval, "retrieval_eval": retrieval_eval}
# The flags each script needs besides --pretrained_weights.
REQUIRED = {"knn_eval": [], "linear_eval": [], "kmeans_eval": [], "fewshot_eval": ["--protocol", "nshot_logreg"],
            "retrieval_eval": ["--data_path", "DATA"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 1-epoch SmallCNN pretraining on 40 synthetic 24-px images (not the evaluations' defaults
    of 5000 images at 224 px), with the k-NN monitor on."""
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    pretrain.main(["--dataset", "synthetic", "--synthetic_images", "40", "--arch", "small_cnn",
                   "--global_crops_size", "24", "--local_crops_size", "12", "--local_crops_number", "1",
                   "--out_dim", "32", "--block_size", "8", "--hidden_dim", "32", "--bottleneck_dim", "16",
                   "--batch_size_per_gpu", "8", "--num_workers", "0", "--epochs", "1", "--knn_every", "1",
                   "--output_dir", str(out)])
    return out / "checkpoint.pth"


def test_data_flags_left_out_follow_the_checkpoint_and_the_number_matches_the_monitor(checkpoint, capsys):
    """knn_eval.py --pretrained_weights CKPT alone evaluates on the data and image size the run was
    trained on, says so, and prints the training monitor's k-NN number."""
    capsys.readouterr()
    results = knn_eval.main(["--pretrained_weights", str(checkpoint), "--nb_knn", "20", "--num_workers", "0"])
    out = capsys.readouterr().out
    assert f"as {checkpoint} was trained: --arch small_cnn --dataset synthetic --image_size 24 --synthetic_images 40" in out
    log = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
    monitor = [r["knn_top1"] for r in log if r.get("epoch_summary")][-1]
    assert results["top1_k20"] == pytest.approx(monitor)


def test_a_legacy_format_checkpoint_is_followed_too(checkpoint, tmp_path):
    """Files saved before torch 1.6's zip format (older releases) cannot be memory-mapped: their
    args are read all the same."""
    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(checkpoint, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    args = knn_eval.get_args(["--pretrained_weights", str(legacy)])
    assert (args.dataset, args.image_size, args.synthetic_images) == ("synthetic", 24, 40)


def test_load_features_never_reads_the_checkpoint(tmp_path):
    """--load_features: the features are already there, the checkpoint may be gone."""
    args = knn_eval.get_args(["--pretrained_weights", str(tmp_path / "gone.pth"), "--load_features", str(tmp_path)])
    assert args.image_size == 224 and args.dataset == "imagefolder"


def test_a_foreign_file_as_linear_checkpoint_is_one_line(checkpoint, tmp_path):
    """A linear_checkpoint.pth that linear_eval.py did not write (here a pretraining checkpoint):
    one line naming it, and the file stays."""
    out = tmp_path / "probe"
    out.mkdir()
    (out / "linear_checkpoint.pth").write_bytes(checkpoint.read_bytes())
    run = subprocess.run([sys.executable, "linear_eval.py", "--pretrained_weights", str(checkpoint),
                          "--cached_features", "true", "--num_workers", "0", "--output_dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: {out / 'linear_checkpoint.pth'} is not a checkpoint of linear_eval.py (no linear, world_size)")
    assert (out / "linear_checkpoint.pth").read_bytes() == checkpoint.read_bytes()


def test_an_explicit_data_flag_wins_over_the_checkpoint(checkpoint):
    parser = features.add_eval_args(argparse.ArgumentParser())
    args = features.follow_checkpoint(parser.parse_args(
        ["--pretrained_weights", str(checkpoint), "--image_size", "32", "--synthetic_images", "10"]))
    assert (args.dataset, args.image_size, args.synthetic_images) == ("synthetic", 32, 10)
    args = features.follow_checkpoint(parser.parse_args(
        ["--pretrained_weights", str(checkpoint), "--dataset", "cifar10", "--data_path", "/data/cifar"]))
    assert (args.dataset, args.data_path, args.image_size) == ("cifar10", "/data/cifar", 24)
    # Random weights have no training flags: the protocol's defaults.
    args = features.follow_checkpoint(parser.parse_args(["--pretrained_weights", "random"]))
    assert (args.dataset, args.image_size, args.synthetic_images) == ("imagefolder", 224, 5000)


@pytest.mark.parametrize("script, content", [
    ("knn_eval", b""), ("knn_eval", b"a text file\n"), ("knn_eval", "TRUNCATED"), ("linear_eval", "TRUNCATED"),
    ("kmeans_eval", "TRUNCATED"), ("fewshot_eval", "TRUNCATED")])
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(checkpoint, tmp_path, script, content):
    """An empty file, a text file or a checkpoint cut short, given to an evaluation: exit code 1 and
    one line naming the file and saying it is not a readable checkpoint, no traceback."""
    bad = tmp_path / "bad.pth"
    bad.write_bytes(checkpoint.read_bytes()[:1000] if content == "TRUNCATED" else content)
    run = subprocess.run([sys.executable, f"{script}.py", "--pretrained_weights", str(bad), *REQUIRED[script]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"error: {bad} ({bad.stat().st_size} bytes) is not a readable checkpoint: torch.load failed with "
        + run.stderr.split("torch.load failed with ", 1)[1].strip()]
    assert "Pass --pretrained_weights PATH" in run.stderr


@pytest.mark.parametrize("script, flag, default", [
    ("knn_eval", "--temperature", "0.07"), ("linear_eval", "--epochs", "100"), ("kmeans_eval", "--n_init", "10"),
    ("fewshot_eval", "--cost", "0.5"), ("retrieval_eval", "--crop_query_bbox", "False"),
    ("knn_eval", "--resize_interpolation", "bicubic"), ("kmeans_eval", "--resize_interpolation", "bilinear"),
    ("linear_eval", "--crop_interpolation", "bilinear"),
    ("knn_eval", "--batch_size_per_gpu", "128")])
def test_help_shows_the_defaults(script, flag, default, capsys):
    with pytest.raises(SystemExit):
        SCRIPTS[script].get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    after_flag = text.split("options:", 1)[1].split(f"{flag} ", 1)[1]  # the flag's entry, not the usage line
    assert f"(default: {default})" in after_flag.split(" --", 1)[0]
    assert "(default: None)" not in text  # a None default is explained by the flag's help instead


def test_every_boolean_flag_takes_true_or_false(checkpoint):
    """One convention for all scripts: --flag true / false (DINO's), never a bare switch."""
    assert pretrain.get_args(["--download", "true"])[1].download is True
    args = linear_eval.get_args(["--pretrained_weights", "random", "--download", "false", "--cached_features", "true"])
    assert args.download is False and args.cached_features is True
    for argv in (["--download"], ["--cached_features"]):
        with pytest.raises(SystemExit):
            linear_eval.get_args(["--pretrained_weights", "random", *argv])
    for script in ("pretrain", "features", "knn_eval", "linear_eval", "kmeans_eval", "fewshot_eval", "retrieval_eval"):
        source = (ROOT / f"{script}.py").read_text()
        assert 'action="store_true"' not in source and "nargs=\"?\", const=True" not in source, script


def test_worker_defaults_never_exceed_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert linear_eval.get_args(["--pretrained_weights", "random"]).num_workers == min(4, cores)
    assert data.default_num_workers(cap=4) == min(4, cores)


def test_linear_probe_state_goes_to_a_folder_of_its_own(checkpoint, tmp_path, monkeypatch):
    """No --output_dir: next to the checkpoint, named after it, the dataset, the optimizer, the mode and
    8 hex digits of the probe's defining flags, so probes of two checkpoints of one run never meet,
    the same command finds its own folder again and a probe with other flags (here --optimizer sgd)
    gets another; random weights under runs/ of the current folder; a checkpoint in the repository's
    own folder also under runs/, never among the source files."""
    monkeypatch.chdir(tmp_path)
    folder = linear_eval.get_args(["--pretrained_weights", str(checkpoint), "--cached_features", "true"]).output_dir
    assert re.fullmatch(re.escape(str(checkpoint.parent / "checkpoint_linear_synthetic_lars_cached_")) + "[0-9a-f]{8}",
                        folder), folder
    assert linear_eval.get_args(["--pretrained_weights", str(checkpoint), "--cached_features", "true"]).output_dir \
        == folder
    sgd = linear_eval.get_args(["--pretrained_weights", str(checkpoint), "--cached_features", "true",
                                "--optimizer", "sgd"]).output_dir
    assert os.path.basename(sgd).startswith("checkpoint_linear_synthetic_sgd_cached_") and sgd != folder
    other = checkpoint.parent / "checkpoint0001.pth"
    other.write_bytes(checkpoint.read_bytes())
    assert os.path.basename(linear_eval.get_args(["--pretrained_weights", str(other)]).output_dir).startswith(
        "checkpoint0001_linear_synthetic_lars_")
    random_args = linear_eval.get_args(["--pretrained_weights", "random", "--arch", "resnet18", "--dataset", "cifar10"])
    assert random_args.output_dir.startswith(os.path.join("runs", "random_resnet18_linear_cifar10_lars_"))
    in_repo = ROOT / "test_eval_scripts_tmp.pth"
    in_repo.write_bytes(checkpoint.read_bytes())
    try:
        assert linear_eval.get_args(["--pretrained_weights", str(in_repo)]).output_dir.startswith(os.path.join(
            "runs", "test_eval_scripts_tmp_linear_synthetic_lars_"))
    finally:
        in_repo.unlink()
