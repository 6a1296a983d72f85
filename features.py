"""Frozen backbone features of any checkpoint, on one process or many: what every evaluation
script (knn_eval, linear_eval, kmeans_eval, fewshot_eval, retrieval_eval) starts from.

- load_backbone: a torchvision ResNet (or our SmallCNN) with the weights of our checkpoints, the authors' released
  CARP checkpoints, or the ResNet-50 releases of other self-supervised methods (MODEL_FORMATS),
  or 'random' weights for the baseline. Files are read with `torch.load(weights_only=True)`.
- extract_features: features (N, D) in dataset order, sharded over the processes of a torchrun
  launch and gathered back.
- add_eval_args / frozen_features: the flags and the train/val feature pipeline the classification
  protocols share, with --dump_features / --load_features to reuse features between runs.
"""
import argparse
import os
import warnings

import torch
from tqdm import tqdm

from cli import bool_flag, stem_flag
from data import DATASET_NAMES, INTERPOLATIONS, DataError, build_dataset, default_num_workers, eval_transform
from distributed import all_gather, is_initialized, is_main_process
from model import build_backbone, use_small_image_stem
from run_folder import checkpoint_args, read_checkpoint


# What the data flags of the evaluations mean when neither the user nor the checkpoint says.
DEFAULT_DATASET, DEFAULT_IMAGE_SIZE, DEFAULT_SYNTHETIC_IMAGES = "imagefolder", 224, 5000


# ============ checkpoints: ours and other methods' ============

# Where each method's release keeps the ResNet-50 weights. For every format: the entries of the file
# that may hold the network's state dict (tried in order; () = the file is the state dict itself) and
# the prefix of the backbone keys once the DDP `module.` prefix is stripped. Keys outside the prefix
# (projectors, predictors, prototypes, momentum encoders, queues) and the `fc.` classifier or
# projector of the torchvision ResNet are left out.
MODEL_FORMATS = {
    # ours and the authors' CARP, DINO's full checkpoints: {'teacher': {'backbone.*', 'head.*'}, 'student': ...}
    "carp": (("{checkpoint_key}",), "backbone."),
    "dino": (("{checkpoint_key}",), "backbone."),
    # a plain torchvision state dict: DINO's, Barlow Twins' and VICReg's torch.hub ResNet-50 releases
    "torchvision": ((), ""),
    # SwAV-repo releases (SwAV, DeepCluster-v2, SeLa-v2): {'module.conv1.weight', ..., 'module.projection_head.*',
    # 'module.prototypes.*'}, or their training checkpoints with the same keys under 'state_dict'
    "swav": (("state_dict", ()), ""),
    "deepclusterv2": (("state_dict", ()), ""),
    "selav2": (("state_dict", ()), ""),
    # MoCo-v3: {'state_dict': {'module.base_encoder.*', 'module.momentum_encoder.*', 'module.predictor.*'}}
    "mocov3": (("state_dict",), "base_encoder."),
    # PCL-v2 (MoCo-v2 code base): {'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', 'module.queue'}}
    "pclv2": (("state_dict",), "encoder_q."),
    # Barlow Twins / VICReg training checkpoints: {'model': {'module.backbone.*', 'module.projector.*'}}
    "barlowtwins": (("model", ()), "backbone."),
    "vicreg": (("model", ()), "backbone."),
    # InfoMin (PyContrast): {'model': {'module.encoder.*', 'module.head.*'}, 'model_ema': ...}
    "infomin": (("model",), "encoder."),
    # OBoW: {'network': {'conv1.weight', ...}} (its torchvision-format release is a plain state dict)
    "obow": (("network", ()), ""),
}


def backbone_weights(checkpoint, model_format, checkpoint_key="teacher"):
    """The backbone state dict inside `checkpoint` laid out as `model_format`, with torchvision
    ResNet key names, or {} when the layout does not fit."""
    containers, prefix = MODEL_FORMATS[model_format]
    state_dict = None
    for container in containers or ((),):
        if container == ():  # the file itself is the state dict
            candidate = checkpoint
        else:
            candidate = checkpoint.get(container.format(checkpoint_key=checkpoint_key))
        if isinstance(candidate, dict) and any(torch.is_tensor(v) for v in candidate.values()):
            state_dict = candidate
            break
    if state_dict is None:
        return {}
    weights = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(prefix) and torch.is_tensor(value):
            key = key.removeprefix(prefix)
            if not key.startswith("fc."):
                weights[key] = value
    return weights


def load_backbone(path, arch="resnet50", small_image_stem="auto", checkpoint_key="teacher", model_format="auto",
                  verbose=True, image_size=224):
    """A backbone with the weights of the checkpoint at `path`, or randomly initialised when
    path == 'random'.

    model_format 'auto' tries every layout of MODEL_FORMATS and keeps the one that fills the most
    backbone weights. Architecture options stored in our (or the authors') checkpoints' `args`
    override the given ones so the weights fit. small_image_stem 'auto' follows the checkpoint (its
    args, else the size of its first conv: 3 x 3 is the small-image stem) and, for 'random', the
    evaluation `image_size` (model.use_small_image_stem). Missing and unexpected keys are printed;
    a file from which not a single backbone weight loads is an error.
    """
    if path == "random":
        small_image_stem = use_small_image_stem(small_image_stem, image_size)
        warnings.warn(f"--pretrained_weights random: evaluating a randomly initialised {arch} "
                      f"(small_image_stem={small_image_stem}), the baseline")
        # A fixed seed: the same random weights on every process of a torchrun launch and in every run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build_backbone(arch, small_image_stem)
    if model_format != "auto" and model_format not in MODEL_FORMATS:
        raise DataError(f"unknown --model_format {model_format!r}; choose auto or one of {', '.join(MODEL_FORMATS)}")
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    saved_args = checkpoint.get("args", {})
    saved_args = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else saved_args
    if isinstance(saved_args, dict):
        arch = saved_args.get("arch", arch)
        small_image_stem = saved_args.get("small_image_stem", small_image_stem)
    formats = list(MODEL_FORMATS) if model_format == "auto" else [model_format]
    candidates = {f: backbone_weights(checkpoint, f, checkpoint_key) for f in formats}
    if small_image_stem == "auto":
        # The first conv of the file tells: 3 x 3 is the small-image stem, 7 x 7 the ImageNet one.
        first_convs = [w["conv1.weight"] for w in candidates.values()
                       if torch.is_tensor(w.get("conv1.weight")) and w["conv1.weight"].ndim == 4]
        small_image_stem = (first_convs[0].shape[-1] == 3 if first_convs
                            else use_small_image_stem("auto", image_size))
    backbone = build_backbone(arch, small_image_stem)
    expected = backbone.state_dict()

    def n_matching(weights):
        return sum(k in expected and expected[k].shape == v.shape for k, v in weights.items())

    scores = {f: n_matching(weights) for f, weights in candidates.items()}
    best = max(formats, key=lambda f: scores[f])  # ties: the first in table order
    if scores[best] == 0:
        top = sorted(checkpoint)[:8]
        hint = (f" (it has no {checkpoint_key!r} entry: use --checkpoint_key teacher or student)"
                if model_format in ("carp", "dino") and checkpoint_key not in checkpoint else "")
        raise DataError(f"no {arch} backbone weight found in {path} as --model_format {model_format}{hint}; "
                        f"its top-level keys are {top}. Check --arch and --model_format "
                        f"({', '.join(MODEL_FORMATS)})")
    weights = candidates[best]
    mismatched = [f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in {arch}"
                  for k, v in weights.items() if k in expected and expected[k].shape != v.shape]
    if mismatched:
        raise DataError(f"{path} does not fit a {arch} (small_image_stem={small_image_stem}): "
                        f"{'; '.join(mismatched[:3])}. Pass the --arch / --small_image_stem it was trained with")
    ignored = sorted({k.split(".")[0] for k in weights if k not in expected})  # e.g. projection_head, prototypes
    missing, _ = backbone.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False)
    if verbose and is_main_process():
        print(f"loaded {len(expected) - len(missing)}/{len(expected)} backbone tensors of {path} "
              f"(format {best}{', ' + checkpoint_key if best in ('carp', 'dino') else ''})"
              + (f"; ignored the non-backbone entries {ignored}" if ignored else ""))
        if missing:
            print(f"  missing keys: {missing}")
    return backbone


def check_frozen(backbone, reference, training):
    """SimSiam's sanity check of a frozen backbone after `training` (the linear probe, a low-shot
    classifier): every parameter and buffer (BatchNorm statistics included) must still equal
    `reference`, a copy of its state dict taken before; a backbone that moved makes every number
    of the protocol invalid, so this raises."""
    changed = [name for name, value in backbone.state_dict().items() if not torch.equal(value, reference[name])]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during {training} ({len(changed)} tensors, e.g. "
                           f"{changed[:3]}): the results are invalid. The backbone must stay in eval() mode with "
                           f"requires_grad False")


# ============ feature extraction ============

class WithIndex(torch.utils.data.Dataset):
    """(image, label, index) so that every feature lands in the row of its image."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, index


@torch.no_grad()
def extract_features(backbone, dataset, batch_size=128, num_workers=4, device="cpu", progress=True):
    """Features (N, D) and labels (N,) of every image of `dataset`, in dataset order, on the CPU.

    Under a process group each process computes a shard and the shards are all-gathered; the
    DistributedSampler pads the last shard with repeated images, which simply land in their own
    rows again. The backbone is used in eval() mode (BatchNorm running statistics).
    """
    distributed = is_initialized()
    sampler = (torch.utils.data.DistributedSampler(dataset, shuffle=False) if distributed
               else torch.utils.data.SequentialSampler(dataset))
    loader = torch.utils.data.DataLoader(WithIndex(dataset), batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    was_training = backbone.training
    backbone.eval()
    features, labels = None, torch.zeros(len(dataset), dtype=torch.long)
    for images, targets, index in tqdm(loader, desc="features", disable=not (progress and is_main_process()),
                                       leave=False):
        feats = backbone(images.to(device, non_blocking=True)).float()  # (b, D)
        index, targets = index.to(device), torch.as_tensor(targets).to(device)
        if distributed:  # every rank runs the same number of equal-sized batches
            feats, index, targets = (torch.cat(all_gather(t)) for t in (feats, index, targets))
        if features is None:
            features = torch.zeros(len(dataset), feats.shape[1])
        features[index.cpu()] = feats.cpu()
        labels[index.cpu()] = targets.cpu()
    backbone.train(was_training)
    return features, labels


# ============ the flags and the pipeline the classification protocols share ============

def add_model_args(parser):
    """The flags that choose the backbone and its weights, the same in every evaluation script."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_weights", required=True,
                   help="checkpoint (ours, the authors' CARP release or another method's ResNet), or 'random' "
                        "for a randomly initialised backbone: the baseline every table needs")
    g.add_argument("--checkpoint_key", default="teacher",
                   help="network to read from CARP/DINO checkpoints: 'teacher' (the paper) or 'student'")
    g.add_argument("--model_format", default="auto", choices=["auto", *MODEL_FORMATS],
                   help="key layout of the checkpoint; 'auto' picks the layout that loads the most backbone weights")
    g.add_argument("--arch", default="resnet50",
                   help="torchvision ResNet, or small_cnn (the CPU recipe's); our checkpoints' args override it")
    g.add_argument("--small_image_stem", type=stem_flag, default="auto",
                   help="3x3 stride-1 stem for small images (true / false); 'auto' follows the checkpoint, "
                        "and for 'random' is on when --image_size is at most 64")
    return parser


def add_eval_args(parser, resize_interpolation="bicubic"):
    """Model, data and feature-cache flags of the classification protocols (k-NN, linear, k-means,
    few-shot), with the same names in every script. The data flags left out follow the checkpoint
    (follow_checkpoint). resize_interpolation: the default of --resize_interpolation, the script's
    protocol's (None: the script resolves it after parsing, from its --protocol)."""
    add_model_args(parser)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=DATASET_NAMES,
                   help="imagefolder: --data_path holds train/ and val/ class folders (the ImageNet layout). "
                        "Default: with neither --dataset nor --data_path, the data the checkpoint was trained on "
                        f"(its --dataset and --data_path); else {DEFAULT_DATASET}")
    g.add_argument("--data_path", default=None, help="folder that holds (or, with --download true, will hold) the data")
    g.add_argument("--download", type=bool_flag, default=False,
                   help="let torchvision download the dataset into --data_path (true / false)")
    g.add_argument("--synthetic_images", type=int, default=None,
                   help=f"synthetic only: train images (val gets a fifth as many). Default: the checkpoint's, "
                        f"else {DEFAULT_SYNTHETIC_IMAGES}")
    g.add_argument("--image_size", type=int, default=None,
                   help=f"centre-crop size after resizing the short side to image_size / 0.875. Default: the size "
                        f"the checkpoint was trained on (its --global_crops_size), else {DEFAULT_IMAGE_SIZE}")
    g.add_argument("--resize_interpolation", default=resize_interpolation, choices=list(INTERPOLATIONS),
                   help="kernel of the evaluation resize (short side to image_size / 0.875, antialiased). Default: "
                        "the protocol's, bicubic for DINO's k-NN and the linear probe's val images (and our "
                        "nshot_logreg), bilinear (torchvision's Resize(256) default) for the authors' k-means, "
                        "VOC07 and iNat low-shot scripts")
    g.add_argument("--batch_size_per_gpu", type=int, default=128, help="images per process for feature extraction")
    g.add_argument("--num_workers", type=int, default=default_num_workers(cap=4),
                   help="data-loading processes per process (default: this machine's cores shared among the "
                        "processes torchrun starts on it, at most 4)")
    g = parser.add_argument_group("features cache")
    g.add_argument("--dump_features", default=None, help="save the extracted features to this folder")
    g.add_argument("--load_features", default=None,
                   help="read features saved by --dump_features instead of running the backbone")
    return parser


def follow_checkpoint(args, follow_dataset=True):
    """Fill the data flags the user left out (None) from the flags the checkpoint was trained with,
    and say so: evaluated at another image size than it was trained on, a network measures
    something else (README, *Evaluation*). An explicit flag always wins. follow_dataset=False: --dataset falls back to
    its default only. With --load_features the checkpoint is not read (the features are there)."""
    saved = {} if args.load_features else checkpoint_args(args.pretrained_weights)
    followed = []
    if follow_dataset and args.dataset is None and args.data_path is None and saved.get("dataset") in DATASET_NAMES:
        args.dataset, args.data_path = saved["dataset"], saved.get("data_path")
        followed.append(f"--dataset {args.dataset}" + (f" --data_path {args.data_path}" if args.data_path else ""))
    if args.dataset is None:
        args.dataset = DEFAULT_DATASET
    if args.image_size is None:
        args.image_size = saved.get("global_crops_size", DEFAULT_IMAGE_SIZE)
        if "global_crops_size" in saved:
            followed.append(f"--image_size {args.image_size}")
    if args.synthetic_images is None:
        args.synthetic_images = saved.get("synthetic_images", DEFAULT_SYNTHETIC_IMAGES)
        if args.dataset == "synthetic" and "synthetic_images" in saved:
            followed.append(f"--synthetic_images {args.synthetic_images}")
    if followed and os.environ.get("RANK", "0") == "0":
        print(f"as {args.pretrained_weights} was trained: {' '.join(followed)} (pass a flag to choose another value)")
    return args


def features_file(folder, split):
    return os.path.join(folder, f"{split}_features.pth")


def frozen_features(args, device, splits=("train", "val"), subsets=None):
    """{split: (features (N, D), labels (N,))} of the teacher backbone on the evaluation transform,
    read from --load_features when given, saved to --dump_features when given.

    subsets: {split: function(dataset) -> indices}: only those images of the split are extracted
    (k-means fits on 10 % of ImageNet: the other 90 % are never run through the backbone), in the
    order of the indices; --dump_features then saves the features of those images only."""
    if args.load_features:
        if subsets:
            raise DataError(f"cannot select {', '.join(subsets)} images among the features in {args.load_features}: "
                            f"they are used as they were dumped")
        out = {}
        for split in splits:
            path = features_file(args.load_features, split)
            if not os.path.isfile(path):
                raise DataError(f"{path} does not exist; write it first with --dump_features {args.load_features}")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            out[split] = (saved["features"], saved["labels"])
        return out
    transform = eval_transform(args.image_size, args.resize_interpolation)
    datasets = {split: build_dataset(args.dataset, split, transform, args.data_path, args.download,
                                     args.synthetic_images, args.image_size) for split in splits}
    for split, select in (subsets or {}).items():
        datasets[split] = torch.utils.data.Subset(datasets[split], select(datasets[split]))
    if is_main_process():
        print(", ".join(f"{len(d)} {split} images" for split, d in datasets.items()) + f" of {args.dataset}")
    backbone = load_backbone(args.pretrained_weights, args.arch, args.small_image_stem, args.checkpoint_key,
                             args.model_format, image_size=args.image_size).to(device)
    out = {split: extract_features(backbone, d, args.batch_size_per_gpu, args.num_workers, device)
           for split, d in datasets.items()}
    if args.dump_features:
        save_features(args.dump_features, out)
    return out


def save_features(folder, features):
    """{split: (features, labels)} to folder/<split>_features.pth, atomically, on the main process."""
    if not is_main_process():
        return
    os.makedirs(folder, exist_ok=True)
    for split, (feats, labels) in features.items():
        tmp = features_file(folder, split) + ".tmp"
        torch.save({"features": feats, "labels": labels}, tmp)
        os.replace(tmp, features_file(folder, split))
    print(f"features saved to {folder}")
