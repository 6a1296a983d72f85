"""Linear probe on a frozen backbone (the paper's linear evaluation), for any checkpoint.

    # the paper's protocol on ImageNet: 100 epochs, LARS lr 1.0, global batch 2048 (the default:
    # 8 processes x 128 images x 2 accumulation steps)
    torchrun --nproc_per_node=8 linear_eval.py --pretrained_weights carp_r50.pth --dataset imagefolder \
        --data_path /imagenet --output_dir runs/linear_carp_r50
    # the same global batch of 2048 on one GPU: 128 images x 16 accumulation steps, derived by default
    python linear_eval.py --pretrained_weights carp_r50.pth --dataset imagefolder --data_path /imagenet \
        --output_dir runs/linear_carp_r50
    # DINO/SwAV-style SGD instead: lr 0.3 x global batch / 256, cosine
    python linear_eval.py --pretrained_weights runs/demo/checkpoint.pth --dataset mnist5k --image_size 32 \
        --optimizer sgd --epochs 10 --output_dir runs/demo_linear
    # fast, NOT the paper's protocol: the classifier trained on cached eval-transform features
    python linear_eval.py --pretrained_weights random --arch resnet18 --dataset synthetic --image_size 32 \
        --cached_features true --dump_features runs/random_features --output_dir runs/random_linear

Protocol (docs/protocols.md): the teacher backbone is frozen and kept in eval()
mode; a single nn.Linear(D, C) (weights N(0, 0.01), bias 0) is trained on the pooled features of
augmented train images (RandomResizedCrop, bilinear as torchvision's default, + horizontal flip)
with cross-entropy, its learning rate following a per-step cosine from the peak to 0. Val images get
the evaluation transform (short side resized bicubic, as DINO's eval_linear.py, centre crop). Top-1
and top-5 on the val split are reported for the last epoch and for the best epoch (the anchors
report the best, which is optimistic: it is chosen on val).
NOTE(authors' code): their script steps the cosine once per epoch (CosineAnnealingLR); we step it
per optimizer step, as DINO's schedules. Their global batch is 4 GPUs x 128 x 4 accumulation steps
= 2048 (eval_script.sh), and with LARS the default --global_batch is 2048: the accumulation steps
are derived, 2048 / (processes x --batch_size_per_gpu), e.g. 16 on one process of 128 images, 2 on
8. LARS at lr 1.0 is not rescaled with the batch, so another batch changes the protocol and the
script warns (lars_batch_warning); the SGD lr is rescaled. Every such combination makes 626
optimizer steps per ImageNet epoch (train_one_epoch explains how the last, shorter group of an
epoch is handled).

--output_dir receives linear_checkpoint.pth (every epoch, atomically) and log.jsonl; running the
same command again resumes from the checkpoint, or only re-reports a finished run.
"""
import argparse
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
from cli import HelpFormatter, bool_flag
from data import build_dataset, eval_transform, train_transform
from distributed import all_reduce, destroy, init_distributed
from durable import check_output_dir, check_output_file
from features import add_eval_args, backbone_from_args, check_frozen, extract_features, follow_checkpoint, frozen_features
from optim import build_optimizer, cosine_schedule
from run_folder import JsonLog, check_resume_flags, flags_digest, read_run_checkpoint, save_checkpoint, write_json

DEFAULT_LR = {"lars": 1.0, "sgd": 0.3}
# The authors' global batch (4 GPUs x 128 x 4 accumulation steps), for which LARS at lr 1.0 is tuned.
PAPER_GLOBAL_BATCH = 2048
CACHED_WARNING = "cached-features protocol (no augmentation): not the paper's protocol"


def get_args(argv=None):
    parser = argparse.ArgumentParser("Linear probe on a frozen backbone", formatter_class=HelpFormatter)
    add_eval_args(parser, resize_interpolation="bicubic")  # the val images, as DINO's eval_linear.py
    g = parser.add_argument_group("linear")
    g.add_argument("--epochs", type=int, default=100, help="training epochs of the linear classifier (paper: 100)")
    g.add_argument("--optimizer", default="lars", choices=["lars", "sgd"],
                   help="lars: the authors' protocol (momentum 0.9, trust coefficient 0.001, no weight decay, the "
                        "bias excluded from adaptation); sgd: momentum SGD as in DINO and SwAV. LARS moves the "
                        "weight by ~0.1%% of its norm per step (~1%% with momentum), so it needs thousands of steps "
                        "(ImageNet: 62,500) to leave the random initialisation: with small data or few epochs, "
                        "use sgd")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, reached at step 0 and decayed to 0 with a per-step cosine. Default "
                        "1.0 with lars, used as is (the authors do not scale it with the batch); default 0.3 with "
                        "sgd, multiplied by global batch / 256 (DINO's linear scaling rule; 0.3 at 256 is SwAV's)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum of lars or sgd")
    g.add_argument("--weight_decay", type=float, default=0.0,
                   help="weight decay of the linear weights, never of the bias (paper: 0)")
    g.add_argument("--cached_features", type=bool_flag, default=False,
                   help="fast mode: compute the eval-transform features of the train split once (see "
                        "--dump_features / --load_features) and train on them, with no augmentation. NOT the "
                        "paper's protocol: use it to compare checkpoints quickly, not to report numbers")
    g.add_argument("--global_batch", type=int, default=None,
                   help="images per optimizer step over all processes: processes x --batch_size_per_gpu x "
                        "--gradient_accumulation_steps, the accumulation steps being derived from it. Default: "
                        f"{PAPER_GLOBAL_BATCH} with lars (the paper's; LARS at another batch prints a warning), "
                        "with sgd processes x --batch_size_per_gpu (no accumulation; the lr scales with it)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None,
                   help="one optimizer step every this many batches, on the mean loss over all their images, so "
                        "that few GPUs reproduce a large batch. The learning-rate schedule counts optimizer steps, "
                        "ceil(batches per epoch / this) per epoch. Default: --global_batch / (processes x "
                        f"--batch_size_per_gpu), so {PAPER_GLOBAL_BATCH // 128} on one process of 128 images with "
                        "lars; 1 with sgd")
    g.add_argument("--crop_interpolation", default="bilinear", choices=["bilinear", "bicubic"],
                   help="kernel of the RandomResizedCrop train views: bilinear, torchvision's default, which the "
                        "authors' and DINO's probes use")
    g.add_argument("--val_freq", type=int, default=1, help="evaluate on the val split every this many epochs "
                                                           "(and always after the last one)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the classifier's initialisation, the data order and the augmentations, so a "
                        "resumed run repeats an uninterrupted one ('random' weights are always the same)")
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", default=None,
                   help="linear_checkpoint.pth and log.jsonl go here; a run resumes from here. Default: a folder "
                        "of its own next to the evaluated checkpoint, named after it, the dataset and the mode "
                        "(runs/demo/checkpoint.pth -> runs/demo/checkpoint_linear_mnist5k[_cached]/), so probes "
                        "of different checkpoints never share one; runs/random_<arch>_linear_<dataset> for random "
                        "weights; runs/... for a checkpoint that lies in the repository's own folder")
    g.add_argument("--output_json", default=None,
                   help="write {top1, top5 (last epoch), best_top1, best_top5 (best epoch), cached_features (1 "
                        "in the fast mode, else 0)} as a flat JSON object here")
    args = follow_checkpoint(parser.parse_args(argv))
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs} must be at least 1 (paper: 100)")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr} must be > 0 (defaults: 1.0 with lars, 0.3 with sgd)")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum {args.momentum} must be in [0, 1) (paper: 0.9)")
    if args.weight_decay < 0:
        parser.error(f"--weight_decay {args.weight_decay} must be >= 0 (paper: 0)")
    if args.val_freq < 1:
        parser.error(f"--val_freq {args.val_freq} must be at least 1")
    if args.batch_size_per_gpu < 1:
        parser.error(f"--batch_size_per_gpu {args.batch_size_per_gpu} must be at least 1")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group does not exist yet
    args.global_batch, args.gradient_accumulation_steps = resolve_global_batch(
        args.optimizer, world_size, args.batch_size_per_gpu, args.global_batch, args.gradient_accumulation_steps,
        parser.error)
    if not args.cached_features and (args.dump_features or args.load_features):
        parser.error("--dump_features and --load_features apply to --cached_features only: the paper's protocol "
                     "runs the backbone on new augmented views at every epoch")
    if args.output_dir is None:
        args.output_dir = default_output_dir(args)
    return args


def resolve_global_batch(optimizer, world_size, batch_size_per_gpu, global_batch, accumulation_steps, error):
    """(global batch, gradient accumulation steps) from the flags, the ones left out (None) derived:
    global batch = processes x batch_size_per_gpu x accumulation steps. Neither given: the paper's
    2048 with lars, no accumulation with sgd. `error(message)` stops on values that cannot fit."""
    per_step = world_size * batch_size_per_gpu  # images of one forward pass over all processes
    if accumulation_steps is not None and accumulation_steps < 1:
        error(f"--gradient_accumulation_steps {accumulation_steps} must be at least 1 (1: no accumulation)")
    if global_batch is None:
        if accumulation_steps is not None:
            return per_step * accumulation_steps, accumulation_steps
        if optimizer == "sgd":
            return per_step, 1
        global_batch = PAPER_GLOBAL_BATCH
    if global_batch % per_step or global_batch < per_step:
        error(f"--global_batch {global_batch} is not a multiple of {world_size} process"
              f"{'es' if world_size > 1 else ''} x --batch_size_per_gpu {batch_size_per_gpu} = {per_step}: choose a "
              f"--batch_size_per_gpu such that processes x it divides {global_batch} (128 or 256 for 2048 on 1, 2, 4 "
              f"or 8 processes), or pass --gradient_accumulation_steps N for a global batch of {per_step} x N")
    derived = global_batch // per_step
    if accumulation_steps is not None and accumulation_steps != derived:
        error(f"--global_batch {global_batch} and --gradient_accumulation_steps {accumulation_steps} disagree: "
              f"{world_size} x {batch_size_per_gpu} x {accumulation_steps} = {per_step * accumulation_steps}; pass "
              f"only one of them")
    return global_batch, derived


def lars_batch_warning(optimizer, lr, global_batch):
    """The warning of a LARS probe at another global batch than the paper's 2048, or None: LARS's lr
    is not rescaled with the batch, so the number is not the paper's protocol."""
    if optimizer != "lars" or global_batch == PAPER_GLOBAL_BATCH:
        return None
    return (f"LARS at lr {lr:g} with a global batch of {global_batch}, not the paper's {PAPER_GLOBAL_BATCH}: its lr "
            f"is not rescaled with the batch, so this is not the paper's protocol. Leave --global_batch and "
            f"--gradient_accumulation_steps out for {PAPER_GLOBAL_BATCH}, or use --optimizer sgd, whose lr scales")


def default_output_dir(args):
    """Where a probe keeps its state when --output_dir is not given: its own folder next to the
    evaluated weights, never the current folder nor the source files' folder, named after the
    dataset, the optimizer, the mode and 8 hex digits of every flag that defines the probe
    (RESUME_ARGS): the same command resumes there, a probe with other flags gets a folder of its own."""
    name = (f"linear_{args.dataset}_{args.optimizer}" + ("_cached" if args.cached_features else "")
            + f"_{flags_digest({k: getattr(args, k) for k in RESUME_ARGS})}")
    if args.pretrained_weights == "random":
        return os.path.join("runs", f"random_{args.arch}_{name}")
    folder, file = os.path.split(os.path.abspath(args.pretrained_weights))
    if folder == os.path.dirname(os.path.abspath(__file__)):
        folder = "runs"
    return os.path.join(folder, f"{os.path.splitext(file)[0]}_{name}")


# ============ the probe: train view, classifier, optimizer ============

def build_linear(dim, n_classes):
    """nn.Linear(D, C) with weights N(0, 0.01) and a zero bias, as in the paper's protocol."""
    linear = nn.Linear(dim, n_classes)
    nn.init.normal_(linear.weight, mean=0.0, std=0.01)
    nn.init.zeros_(linear.bias)
    return linear


def optimizer_steps_per_epoch(n_batches, accumulation_steps):
    """ceil(batches / N): every N consecutive batches of an epoch make one optimizer step, and the
    last group, shorter when N does not divide the batches, makes one too (as in the authors'
    script), so every image of the epoch counts."""
    return -(-n_batches // accumulation_steps)


def peak_lr(args, global_batch):
    """LARS: --lr as is (the authors' 1.0 for a batch of 2048); SGD: --lr x global batch / 256."""
    return args.lr if args.optimizer == "lars" else args.lr * global_batch / 256


def number_of_classes(dataset, val_labels):
    """C, the classes of the train split, read from the dataset's metadata without loading images
    (the class list, or the labels torchvision keeps), and at least max(val label) + 1."""
    n = int(val_labels.max()) + 1
    if hasattr(dataset, "classes"):
        return max(n, len(dataset.classes))
    for name in ("targets", "_labels"):  # CIFAR, ImageFolder; Flowers102, Food101, DTD
        if hasattr(dataset, name):
            return max(n, int(torch.as_tensor(getattr(dataset, name)).max()) + 1)
    if hasattr(dataset, "_samples"):  # GTSRB: (path, label) pairs
        return max(n, max(label for _, label in dataset._samples) + 1)
    return n


def feature_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """Index batches of this process for one epoch over N cached features.

    The same shuffled order on every process (a generator seeded with seed + epoch, as
    DistributedSampler does), padded by repeating its start to a multiple of the processes, and
    dealt out like DistributedSampler: process r takes positions r, r + W, r + 2W, ... So every
    process runs the same number of steps, and one process sees the whole split every epoch.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))  # (N,)
    order = torch.cat([order, order[:(-n) % world_size]])  # (W * ceil(N / W),)
    return order[rank::world_size].split(batch_size)


# ============ one epoch and the evaluation ============

def groups_of(items, n):
    """Consecutive groups of n items; the last group is shorter when the items run out."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(linear, optimizer, batches, lr_schedule, first_step, device, backbone=None,
                    accumulation_steps=1):
    """One pass over the train split; returns the mean loss and top-1 (%) over all processes.

    `batches` yields (inputs, labels): images when a backbone is given (the paper's protocol,
    features computed here under no_grad), features (b, D) otherwise (the cached mode).

    Gradient accumulation: every `accumulation_steps` consecutive batches make one optimizer step
    (optimizer_steps_per_epoch), on the gradient of the mean cross-entropy over all the images of
    the group, which is the step a single batch of those images would make. The backbone is
    frozen, so accumulating the gradients of N batches is the same as keeping their features
    (N x b, D), a few MB, and running the classifier once on all of them: exact, one forward and
    backward per step, and DDP all-reduces once per step without no_sync. lr_schedule is indexed
    by optimizer steps. NOTE(authors' code): they divide every batch's loss by N, so the last,
    shorter group of an epoch (3 batches of 4 on ImageNet) steps on 3/4 of its mean gradient and
    a short last batch weighs as much as a full one; here that group's step uses its mean.
    """
    linear.train()
    sums = torch.zeros(3, device=device)  # summed loss, correct predictions, images

    def features_of(batches):
        for inputs, labels in batches:
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if backbone is not None:
                with torch.no_grad():
                    inputs = backbone(inputs)  # (b, D): frozen features of the augmented images
            yield inputs, labels

    for step, group in enumerate(groups_of(features_of(batches), accumulation_steps)):
        for param_group in optimizer.param_groups:
            param_group["lr"] = float(lr_schedule[first_step + step])
        inputs = torch.cat([x for x, _ in group])  # (N b, D)
        labels = torch.cat([y for _, y in group])  # (N b,)
        logits = linear(inputs)  # (N b, C)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach() * len(labels), (logits.argmax(dim=1) == labels).sum(),
                                 torch.tensor(len(labels), device=device)])
    loss_sum, correct, count = all_reduce(sums).tolist()  # the whole train split, over every process
    return loss_sum / count, 100.0 * correct / count


@torch.no_grad()
def evaluate(linear, features, labels, device, chunk_size=4096):
    """Top-1 and top-5 accuracy (%) of the classifier on features (N, D) with labels (N,)."""
    linear.eval()
    hits = torch.zeros(2, dtype=torch.float64)  # top-1, top-5
    for start in range(0, len(labels), chunk_size):
        logits = linear(features[start:start + chunk_size].to(device))  # (c, C)
        targets = labels[start:start + chunk_size].to(device)  # (c,)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (c, 5)
        correct = ranked == targets[:, None]  # (c, 5)
        hits += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()]).cpu()
    return (100.0 * hits / len(labels)).tolist()


# ============ checkpoints ============

# Flags that define the run: resuming with another value would mix two experiments.
RESUME_ARGS = ("pretrained_weights", "checkpoint_key", "arch", "dataset", "image_size", "cached_features",
               "optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size_per_gpu",
               "gradient_accumulation_steps", "seed")
# Flags added after checkpoints were written: their value in a checkpoint without them.
RESUME_DEFAULTS = {"gradient_accumulation_steps": 1}


def load_checkpoint(path, args, linear, optimizer, world_size):
    """Restore the classifier and optimizer from `path`; returns the checkpoint's other entries."""
    what_to_do = "It was left as it is: move it away (or pass another --output_dir) to train this probe from the start"
    checkpoint = read_run_checkpoint(path, ("linear", "optimizer", "args", "world_size"), "linear_eval.py", what_to_do)
    other = ([f"{checkpoint['world_size']} processes (now {world_size})"] if checkpoint["world_size"] != world_size
             else [])
    check_resume_flags(path, checkpoint["args"], args, RESUME_ARGS, RESUME_DEFAULTS, other)
    linear.load_state_dict(checkpoint["linear"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint


def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = init_distributed()
    check_output_dir(args.output_dir)  # e.g. the default folder, next to a checkpoint in a read-only place
    check_output_file(args.output_json)
    checkpoint_path = os.path.join(args.output_dir, "linear_checkpoint.pth")
    protocol = (CACHED_WARNING if args.cached_features
                else "the paper's protocol: RandomResizedCrop + flip through the frozen backbone")
    source = (f"the features in {args.load_features}" if args.load_features
              else f"{args.pretrained_weights} on {args.dataset}")
    if rank == 0:
        print(f"linear probe of {source}, {protocol}; state in {args.output_dir}")

    # ============ preparing data and the frozen backbone ... ============
    if args.cached_features:
        features = frozen_features(args, device)  # the shared eval-transform pipeline and its cache
        train_features, train_labels = features["train"]  # (N, D), (N,)
        val_features, val_labels = features["val"]  # (M, D), (M,)
        dim = train_features.shape[1]
        n_classes = int(max(train_labels.max(), val_labels.max())) + 1
        batches_per_epoch = len(feature_batches(len(train_labels), args.batch_size_per_gpu, args.seed, 0,
                                                rank, world_size))
        backbone = None
    else:
        train_set = build_dataset(args.dataset, "train", train_transform(args.image_size, args.crop_interpolation),
                                  args.data_path, args.download, args.synthetic_images, args.image_size)
        val_set = build_dataset(args.dataset, "val", eval_transform(args.image_size, args.resize_interpolation),
                                args.data_path, args.download, args.synthetic_images, args.image_size)
        backbone = backbone_from_args(args).to(device)
        # Frozen: eval() so that BatchNorm normalises with its stored running statistics and never
        # updates them (in train() mode it would use batch statistics and overwrite the running ones
        # at every forward pass, even under no_grad): the probe then sees exactly the features that
        # k-NN and the val evaluation see. No gradients: nothing of the backbone is trained.
        backbone.eval()
        backbone.requires_grad_(False)
        reference = {name: value.clone() for name, value in backbone.state_dict().items()}
        # The val features never change (frozen backbone, deterministic transform): computed once.
        val_features, val_labels = extract_features(backbone, val_set, args.batch_size_per_gpu, args.num_workers,
                                                    device)  # (M, D), (M,)
        dim, n_classes = backbone.embed_dim, number_of_classes(train_set, val_labels)
        # DistributedSampler also in one process: a seeded, per-epoch shuffle that a resume repeats.
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                                      seed=args.seed)
        loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
        batches_per_epoch = len(loader)
        if rank == 0:
            print(f"{len(train_set)} train and {len(val_set)} val images of {args.dataset}")

    # ============ building the linear classifier and its optimizer ... ============
    torch.manual_seed(args.seed)
    linear_module = build_linear(dim, n_classes).to(device)
    linear = linear_module
    if world_size > 1:
        linear = nn.parallel.DistributedDataParallel(linear_module,
                                                     device_ids=[device.index] if device.type == "cuda" else None)
    # The weight gets --weight_decay (and LARS adaptation), the bias neither, as in pretraining.
    optimizer = build_optimizer(args.optimizer, linear_module, args.momentum, args.weight_decay)
    # The batch of one optimizer step: what the SGD learning rate scales with and what the paper fixes (2048).
    global_batch = args.batch_size_per_gpu * world_size * args.gradient_accumulation_steps
    steps_per_epoch = optimizer_steps_per_epoch(batches_per_epoch, args.gradient_accumulation_steps)
    lr_schedule = cosine_schedule(peak_lr(args, global_batch), 0.0, args.epochs, steps_per_epoch)  # (E * steps,)
    if rank == 0:
        print(f"nn.Linear({dim}, {n_classes}), {args.optimizer} with peak learning rate "
              f"{peak_lr(args, global_batch):.4g} (global batch {global_batch} = {world_size} process"
              f"{'es' if world_size > 1 else ''} x {args.batch_size_per_gpu} x {args.gradient_accumulation_steps} "
              f"accumulation step{'s' if args.gradient_accumulation_steps > 1 else ''}), cosine to 0 "
              f"over {args.epochs} epochs of {steps_per_epoch} optimizer steps ({batches_per_epoch} batches)")
        warning = lars_batch_warning(args.optimizer, args.lr, global_batch)
        if warning:
            warnings.warn(warning)

    # ============ optionally resuming a run ... ============
    start_epoch, history, best = 0, [], {"top1": 0.0, "top5": 0.0, "epoch": 0}
    if os.path.isfile(checkpoint_path):
        checkpoint = load_checkpoint(checkpoint_path, args, linear_module, optimizer, world_size)
        start_epoch, history, best = checkpoint["epoch"], checkpoint["history"], checkpoint["best"]
        if rank == 0:
            state = "finished: re-reporting it" if start_epoch >= args.epochs else f"resuming at epoch {start_epoch}"
            print(f"{checkpoint_path} holds {start_epoch}/{args.epochs} epochs, {state}")

    # ============ training ... ============
    for epoch in range(start_epoch, args.epochs):
        # Seeded per epoch (and process), so augmentations after a resume are those of an
        # uninterrupted run; DataLoader workers draw their seeds from this state.
        torch.manual_seed(args.seed + 1000 * epoch + rank)
        if args.cached_features:
            batches = ((train_features[index], train_labels[index]) for index in
                       feature_batches(len(train_labels), args.batch_size_per_gpu, args.seed, epoch, rank, world_size))
        else:
            sampler.set_epoch(epoch)
            batches = loader
        train_loss, train_top1 = train_one_epoch(linear, optimizer, batches, lr_schedule, epoch * steps_per_epoch,
                                                 device, backbone, args.gradient_accumulation_steps)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_top1": train_top1, "top1": None, "top5": None}
        if (epoch + 1) % args.val_freq == 0 or epoch + 1 == args.epochs:
            record["top1"], record["top5"] = evaluate(linear_module, val_features, val_labels, device)
            if record["top1"] > best["top1"] or best["epoch"] == 0:
                best = {"top1": record["top1"], "top5": record["top5"], "epoch": epoch + 1}
        history.append(record)
        if backbone is not None:
            # After every epoch and before the checkpoint is written, so a checkpoint never holds a
            # classifier trained on a backbone that moved.
            check_frozen(backbone, reference, "linear training")
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, train top-1 {train_top1:.2f}"
                  + (f", val top-1 {record['top1']:.2f}, top-5 {record['top5']:.2f}" if record["top1"] is not None
                     else ""))
            JsonLog(os.path.join(args.output_dir, "log.jsonl"), checkpoint=checkpoint_path)(
                {k: v for k, v in record.items() if v is not None})
            save_checkpoint({"linear": linear_module.state_dict(), "optimizer": optimizer.state_dict(),
                             "epoch": epoch + 1, "best": best, "history": history, "world_size": world_size,
                             "args": vars(args)}, checkpoint_path, checkpoint=checkpoint_path)

    # ============ reporting ... ============
    last = [r for r in history if r["top1"] is not None][-1]
    results = {"top1": last["top1"], "top5": last["top5"], "best_top1": best["top1"], "best_top5": best["top5"],
               "cached_features": float(args.cached_features)}
    if rank == 0:
        print(f"\nlinear probe of {source}: {protocol}")
        print(f"{'epoch':>5} {'train loss':>10} {'train top-1':>11} {'val top-1':>9} {'val top-5':>9}")
        for r in history:
            val = f"{r['top1']:>9.2f} {r['top5']:>9.2f}" if r["top1"] is not None else f"{'-':>9} {'-':>9}"
            print(f"{r['epoch']:>5} {r['train_loss']:>10.4f} {r['train_top1']:>11.2f} {val}")
        print(f"last epoch ({last['epoch']}): top-1 {results['top1']:.2f}, top-5 {results['top5']:.2f}")
        print(f"best epoch ({best['epoch']}): top-1 {best['top1']:.2f}, top-5 {best['top5']:.2f} "
              f"(optimistic: the epoch is chosen on the val split)")
        if args.cached_features:
            print(CACHED_WARNING)
        if args.output_json:
            write_json(results, args.output_json)
    destroy()
    return results


if __name__ == "__main__":
    cli.run(main)
