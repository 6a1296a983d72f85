"""A user's own data and runs: unlabelled folders train, results that would be wrong without a word
are errors (or correct), recipes set groups of flags, and no run writes into the current folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import features
import knn_eval
import plot_log
import pretrain
from cli import DataError

ROOT = Path(__file__).resolve().parents[1]
# A SmallCNN on 16-pixel views, K = 32 prototypes in 4 blocks of 8, batches of 4: seconds a run.
SMALL = ["--arch", "small_cnn", "--global_crops_size", "16", "--local_crops_size", "8", "--local_crops_number", "1",
         "--out_dim", "32", "--block_size", "8", "--hidden_dim", "16", "--bottleneck_dim", "8",
         "--batch_size_per_gpu", "4", "--num_workers", "0", "--epochs", "1"]


def images(folder, n, size=20, colour=(200, 30, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), tuple((c + 20 * i) % 256 for c in colour)).save(folder / f"{i}.png")


# ---------------------------------------------------------------- unlabelled folders ------------

def test_a_flat_folder_of_unlabelled_images_trains_and_says_why_the_monitor_is_off(tmp_path, capsys):
    """Images with no class folders (the usual case for self-supervision) train; --knn_every 1 then
    says in one line that the monitor needs labelled splits, the log records why, and plot_log's
    summary gives that reason, not --knn_every 0."""
    images(tmp_path / "photos", 12)
    out = tmp_path / "run"
    pretrain.main(SMALL + ["--dataset", "imagefolder", "--data_path", str(tmp_path / "photos"), "--knn_every", "1",
                           "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "data: 12 images of imagefolder" in printed
    assert "k-NN monitor off: --knn_every needs labelled train/ and val/ splits" in printed
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 3
    series = plot_log.read_log(out / "log.jsonl")
    assert "the monitor was off: --knn_every needs labelled" in plot_log.summary_line(series, {})


def test_images_nested_in_folders_of_any_depth_all_train(tmp_path):
    """A folder of images kept in dated sub-folders, some directly in the root too: every image
    under it is a training image (16 here)."""
    images(tmp_path / "photos" / "2024" / "may", 6)
    images(tmp_path / "photos" / "2025", 6)
    images(tmp_path / "photos", 4)
    dataset = data.build_dataset("imagefolder", "pretrain", data_path=str(tmp_path / "photos"))
    assert len(dataset) == 16 and dataset[0][1] == 0


# ---------------------------------------------------------------- silent wrong results ----------

def test_train_and_val_class_folders_that_differ_are_an_error_naming_them(tmp_path):
    """train {cat, dog} and val {bird, cats, dogs}: labels are class indices, so they would be matched
    by position (cat = bird). Refused, listing what differs, by every reader of the val split."""
    for split, classes in (("train", ("cat", "dog")), ("val", ("bird", "cats", "dogs"))):
        for cls in classes:
            images(tmp_path / split / cls, 2)
    with pytest.raises(DataError, match=r"only in train: \['cat', 'dog'\]; only in val: \['bird', 'cats', 'dogs'\]"):
        data.build_dataset("imagefolder", "val", data_path=str(tmp_path))
    with pytest.raises(DataError, match="differ"):
        knn_eval.main(["--pretrained_weights", "random", "--arch", "small_cnn", "--dataset", "imagefolder",
                       "--data_path", str(tmp_path), "--image_size", "16", "--num_workers", "0"])


def test_a_16_bit_png_keeps_its_grey_levels(tmp_path):
    """A 16-bit greyscale PNG (0..65535) is scaled to 8 bits, not clipped: a ramp stays a ramp
    (65535 -> 255, 32896 -> 128, 0 -> 0) where Pillow's own conversion turns 99 % of it white."""
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = np.asarray(data.load_image(tmp_path / "deep.png"))
    assert pixels.shape == (4, 4, 3) and pixels[0, :, 0].tolist() == [0, 1, 128, 255]


def test_a_partial_load_is_an_error_unless_allowed(tmp_path):
    """A ResNet-18 file read as a ResNet-34 fills 136 of its 216 tensors: an error naming the counts
    and the fix, not a k-NN score of a half-random network; --allow_partial_load true evaluates it."""
    torch.save(features.build_backbone("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(DataError, match=r"fills 136 of the 216 tensors of a resnet34 .*--allow_partial_load true"):
        features.load_backbone(str(tmp_path / "r18.pth"), "resnet34")
    backbone = features.load_backbone(str(tmp_path / "r18.pth"), "resnet34", allow_partial=True)
    assert backbone.embed_dim == 512


def test_an_arch_flag_that_the_checkpoint_overrides_is_said(tmp_path, capsys):
    """--arch resnet18 on a small_cnn checkpoint: the checkpoint's architecture is used (no other fits
    its weights) and the script says so; left out, --arch follows the checkpoint and is listed."""
    pretrain.main(SMALL + ["--dataset", "synthetic", "--synthetic_images", "8", "--output_dir", str(tmp_path)])
    path = str(tmp_path / "checkpoint.pth")
    capsys.readouterr()
    assert knn_eval.get_args(["--pretrained_weights", path, "--arch", "resnet18"]).arch == "small_cnn"
    assert f"--arch resnet18 overridden: {path} holds a small_cnn" in capsys.readouterr().out
    knn_eval.get_args(["--pretrained_weights", path])
    assert f"as {path} was trained: --arch small_cnn" in capsys.readouterr().out


def test_resuming_with_another_epochs_says_what_it_does_to_the_schedules(tmp_path, capsys):
    """A 1-epoch run resumed with --epochs 2: the schedules are recomputed for 2 epochs, and the run
    says so instead of silently warming the learning rate back up."""
    run = SMALL + ["--dataset", "synthetic", "--synthetic_images", "8", "--output_dir", str(tmp_path)]
    pretrain.main(run)
    capsys.readouterr()
    pretrain.main(run + ["--epochs", "2"])
    assert "resuming with --epochs 2 (was 1): the learning rate, weight decay and teacher momentum schedules" \
        in capsys.readouterr().out


def test_resuming_with_another_objective_says_so(tmp_path, capsys):
    """A run resumed with other objective flags (--uniformity_weight, --fixed_partition, ...) trains
    on, and says that its weights from then on belong to neither objective; with the same flags it
    says nothing."""
    run = SMALL + ["--dataset", "synthetic", "--synthetic_images", "8", "--output_dir", str(tmp_path)]
    pretrain.main(run)
    capsys.readouterr()
    pretrain.main(run + ["--epochs", "2", "--uniformity_weight", "0.5", "--fixed_partition", "true"])
    out = capsys.readouterr().out
    assert ("resuming with --fixed_partition True (was False), --uniformity_weight 0.5 (was 1.0): from step 2 on "
            "the run optimizes an objective other than that of its first 2 steps") in out, out
    pretrain.main(run + ["--epochs", "3", "--uniformity_weight", "0.5", "--fixed_partition", "true"])
    assert "objective other" not in capsys.readouterr().out


# ---------------------------------------------------------------- run folders and recipes -------

def test_no_output_dir_never_writes_into_the_current_folder(tmp_path, monkeypatch):
    """Without --output_dir a run goes to runs/<dataset>_<arch>_<digits of its training flags>: the
    same command resumes there, other training flags start a folder of their own, and nothing lands
    in the current folder (often the repository) but runs/."""
    monkeypatch.chdir(tmp_path)
    run = SMALL + ["--dataset", "synthetic", "--synthetic_images", "8"]
    pretrain.main(run)
    assert os.listdir(tmp_path) == ["runs"]
    (first,) = os.listdir(tmp_path / "runs")
    assert first.startswith("synthetic_small_cnn_") and len(first) == len("synthetic_small_cnn_") + 8
    _, again = pretrain.get_args(run + ["--num_workers", "1", "--knn_every", "5"])  # not training flags
    assert again.output_dir == os.path.join("runs", first)
    _, other = pretrain.get_args(run + ["--lr", "0.1"])
    assert other.output_dir != os.path.join("runs", first)


def test_a_recipe_sets_its_flags_and_a_flag_given_wins(tmp_path):
    """--recipe cpu_small is the flags of pretrain.CPU_RECIPE; a flag on the command line wins over the
    recipe's (here --epochs 3 and --lr); settings.json records the recipe."""
    _, recipe = pretrain.get_args(["--recipe", "cpu_small", "--dataset", "mnist5k"])
    _, spelled = pretrain.get_args(["--dataset", "mnist5k", *pretrain.CPU_RECIPE.split()])
    assert {**vars(recipe), "recipe": None, "output_dir": None} == {**vars(spelled), "recipe": None, "output_dir": None}
    _, mixed = pretrain.get_args(["--epochs", "3", "--recipe", "cpu_small", "--lr", "0.01"])
    assert (mixed.epochs, mixed.lr, mixed.arch, mixed.recipe) == (3, 0.01, "small_cnn", "cpu_small")
    _, paper = pretrain.get_args([])
    assert (paper.recipe, paper.arch, paper.epochs) == ("paper", "resnet50", 100)
    pretrain.main(SMALL + ["--recipe", "cpu_small", "--dataset", "synthetic", "--synthetic_images", "8",
                           "--batched_views", "false", "--output_dir", str(tmp_path)])
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["args"]["recipe"] == "cpu_small" and settings["args"]["epochs"] == 1  # SMALL's --epochs 1 won


# ---------------------------------------------------------------- messages ----------------------

def test_a_folder_given_as_pretrained_weights_is_named_as_a_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path} is a folder, not a checkpoint file: pass the file in it"):
        features.load_backbone(str(tmp_path), "resnet18")


@pytest.mark.parametrize("script", ["pretrain.py", "knn_eval.py", "retrieval_eval.py"])
def test_num_workers_help_names_one_default(script):
    """--help once said "(default: this machine's cores ...) (default: 2)": now one default, in words."""
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    text = " ".join(result.stdout.split())
    start = text.index("--num_workers NUM_WORKERS", text.index("options:"))
    entry = text[start:text.index(" --", start + 10)]
    assert entry.count("efault") == 1, entry
