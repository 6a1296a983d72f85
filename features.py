"""Frozen backbone features of any checkpoint, on one process or many: what every evaluation
script (knn_eval, linear_eval, kmeans_eval, fewshot_eval, retrieval_eval) starts from.

- load_backbone: a torchvision ResNet (or our SmallCNN) with the weights of any checkpoint that holds
  one (ours, the authors' CARP release, other methods' and libraries' files: the backbone is found
  under any prefix or nesting, find_backbones, and picked by choose_backbone's rules; the named
  layouts of MODEL_FORMATS can be forced), or 'random' weights for the baseline. Files are read
  with `torch.load(weights_only=True)`.
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

from cli import auto_flag, bool_flag
from data import DATASET_NAMES, INTERPOLATIONS, DataError, build_dataset, default_num_workers, eval_transform
from distributed import all_gather, gather, is_initialized, is_main_process
from durable import check_output_dir
from backbones import build_backbone, use_small_image_stem
from run_folder import checkpoint_args, read_checkpoint, save_checkpoint


# What the model and data flags of the evaluations mean when neither the user nor the checkpoint says.
DEFAULT_ARCH, DEFAULT_DATASET, DEFAULT_IMAGE_SIZE, DEFAULT_SYNTHETIC_IMAGES = "resnet50", "imagefolder", 224, 5000


# ============ checkpoints: ours and other methods' ============

# The layouts a user can force with --model_format (the default, auto, finds the backbone wherever
# it is: find_backbones). For every format: the entries of the file that may hold the network's
# state dict (tried in order; () = the file is the state dict itself) and the prefix of the backbone
# keys once the DDP `module.` prefix is stripped. Keys outside the prefix (projectors, predictors,
# prototypes, momentum encoders, queues) and the `fc.` classifier or projector of the torchvision
# ResNet are left out.
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

# Besides torchvision's own names, two ways of wrapping a ResNet in an nn.Sequential name its modules
# by index (index -> torchvision module). `nn.Sequential(*resnet.children())` of a torchvision ResNet
# (lightly's examples, its SMoG among them; SeLa v1's `features`): 2 (ReLU), 3 (max-pool) and 8
# (average pool) hold no tensor. lightly's own ResNetGenerator wrapped the same way: a CIFAR ResNet
# (3x3 stride-1 stem without max-pool, which is our small-image stem) whose blocks call their
# downsample branch `shortcut`.
SEQUENTIAL_LAYOUTS = {
    "children": {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4", "9": "fc"},
    "resnet_generator": {"0": "conv1", "1": "bn1", "2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4",
                         "6": "fc"},
}
LAYOUT_NOTES = {
    "torchvision": "",
    "children": " (an nn.Sequential of resnet.children(): 0 = conv1, 1 = bn1, 4-7 = layer1-4)",
    "resnet_generator": " (lightly's ResNetGenerator in an nn.Sequential: 0 = conv1, 1 = bn1, 2-5 = layer1-4, "
                        "shortcut = downsample)",
}

# Words of a key path that mark a momentum (EMA, target, key) copy of the online network: MoCo's
# momentum_encoder and encoder_k, solo-learn's momentum_backbone, lightly's backbone_momentum, BYOL's
# target_encoder, InfoMin's model_ema. --model_format auto never takes one unless asked
# (--checkpoint_key) or unless the file holds nothing else.
MOMENTUM_WORDS = {"momentum", "ema", "target", "k"}


def backbone_weights(checkpoint, model_format, checkpoint_key="teacher"):
    """The backbone state dict inside `checkpoint` laid out as the named `model_format`, with
    torchvision ResNet key names, or {} when the layout does not fit."""
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


def tensors_by_path(tree, prefix=""):
    """{path: tensor} of every tensor in nested dicts, the levels joined by '.':
    {'state_dict': {'module.encoder.conv1.weight': w}} -> {'state_dict.module.encoder.conv1.weight': w}.
    Lists (optimizer and RNG states) are not searched."""
    found = {}
    for key, value in tree.items():
        if torch.is_tensor(value):
            found[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            found.update(tensors_by_path(value, f"{prefix}{key}."))
    return found


def torchvision_name(key, layout):
    """The torchvision name of a state-dict `key` written in `layout` ('4.0.conv1.weight' in
    'children' is 'layer1.0.conv1.weight'), or None when the layout has no such module."""
    if layout == "torchvision":
        return key
    index, _, rest = key.partition(".")
    module = SEQUENTIAL_LAYOUTS[layout].get(index)
    if module is None or not rest:
        return None
    name = f"{module}.{rest}"
    return name.replace(".shortcut.", ".downsample.") if layout == "resnet_generator" else name


def find_backbones(tensors, expected):
    """Every set of tensors of `tensors` ({path: tensor}) named like the backbone whose state-dict
    names are `expected`: {(prefix, layout): {torchvision name: path}}, path = prefix + key in layout.

    Every split of every path into prefix + key is tried in every layout, so any prefix (DDP's
    `module.`, Lightning's `state_dict` and `model.`, `backbone.`, `encoder_q.`) is found without being
    listed anywhere. Per prefix the layout that names the most tensors is kept. A set must hold a
    tensor beyond the stem (for a ResNet, one of layer1-4): an MLP whose Linear and BatchNorm sit at
    Sequential indices 0 and 1 names a 'conv1' and a 'bn1', and is not a ResNet."""
    found = {}
    for path in tensors:
        parts = path.split(".")
        for i in range(len(parts)):
            prefix, key = "".join(part + "." for part in parts[:i]), ".".join(parts[i:])
            for layout in LAYOUT_NOTES:
                name = torchvision_name(key, layout)
                if name in expected:
                    found.setdefault((prefix, layout), {})[name] = path
    best = {}  # prefix -> (layout, names)
    for (prefix, layout), names in found.items():
        if prefix not in best or len(names) > len(best[prefix][1]):
            best[prefix] = (layout, names)
    return {(prefix, layout): names for prefix, (layout, names) in best.items()
            if any(not name.startswith(("conv1.", "bn1.")) for name in names)}


def shown(prefix):
    """How messages name the backbone under `prefix`."""
    return f"'{prefix}*'" if prefix else "the file's top level"


def is_momentum_copy(prefix):
    return any(word in MOMENTUM_WORDS for part in prefix.split(".") for word in part.lower().split("_"))


def named_by_key(prefix, checkpoint_key):
    """--checkpoint_key names a backbone by one entry of its path ('student', 'momentum_backbone') or
    by the start of its path ('state_dict.module.encoder_k'); '' names the file's top level."""
    key = checkpoint_key.strip(".*")
    return key in prefix.rstrip(".").split(".") or prefix.startswith(key + ".")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def choose_backbone(candidates, tensors, checkpoint_key, path, arch):
    """The (prefix, layout) of `candidates` (find_backbones) to load, by these rules in turn:
    1. --checkpoint_key: the backbones it names, if any (the default, 'teacher', takes the teacher
       of our and DINO's checkpoints; in a file without one it names nothing and the rules go on;
       any other key that names nothing is an error);
    2. not a momentum copy (is_momentum_copy), unless only momentum copies are left: the online
       network is the one the method trains and reports;
    3. the backbones that fill the most tensors of `arch` (a complete one over a partial one);
    4. what is left must be one set of weights (copies of it may sit under several prefixes), else
       the file is ambiguous: an error listing the backbones and the flag that picks one.
    Each backbone is one prefix's tensors: two are never mixed."""
    chosen = list(candidates)
    keyed = [c for c in chosen if named_by_key(c[0], checkpoint_key)]
    if not keyed and checkpoint_key != "teacher":
        raise DataError(f"--checkpoint_key {checkpoint_key} names none of the {arch} backbones in {path}: "
                        f"{', '.join(shown(prefix) for prefix, _ in chosen)}; pass one of these paths or one "
                        f"entry of it (e.g. --checkpoint_key {chosen[0][0].rstrip('.') or repr('')})")
    chosen = keyed or chosen
    chosen = [c for c in chosen if not is_momentum_copy(c[0])] or chosen
    most = max(len(candidates[c]) for c in chosen)
    chosen = [c for c in chosen if len(candidates[c]) == most]

    def weights(c):
        return {name: tensors[p] for name, p in candidates[c].items()}

    if any(not same_weights(weights(chosen[0]), weights(c)) for c in chosen[1:]):
        raise DataError(f"{path} holds {len(chosen)} different {arch} backbones and no rule picks one (the "
                        f"teacher, else the online network rather than a momentum copy): "
                        f"{', '.join(shown(prefix) for prefix, _ in chosen)}. Choose one with --checkpoint_key "
                        f"and its path or one entry of it (e.g. --checkpoint_key {chosen[0][0].rstrip('.') or repr('')})")
    return chosen[0]


def format_of(prefix, checkpoint_key):
    """The first name of MODEL_FORMATS whose layout puts the backbone (torchvision names) under
    `prefix`, or None: what the auto search found, told in the words of --model_format."""
    for name, (containers, inner) in MODEL_FORMATS.items():
        for container in containers or ((),):
            outer = "" if container == () else container.format(checkpoint_key=checkpoint_key) + "."
            if prefix in (outer + inner, outer + "module." + inner):
                return name
    return None


def preactivation_block(weights):
    """The first `layerN.M.bn1.weight` of `weights` (torchvision names) that normalises its block's
    input rather than conv1's output (as many channels as conv1 takes in, not as it gives out), or
    None. Such a block belongs to a pre-activation ResNet (BatchNorm and ReLU before each conv, as
    SeLa v1's models/resnetv2.py); torchvision's blocks apply them after their convs, so no renaming
    of the keys makes a torchvision ResNet compute its features."""
    for name, bn in weights.items():
        conv = weights.get(name.removesuffix("bn1.weight") + "conv1.weight")
        if name.endswith(".bn1.weight") and conv is not None and conv.ndim == 4:
            if bn.shape[0] == conv.shape[1] != conv.shape[0]:
                return name
    return None


def load_backbone(path, arch="resnet50", small_image_stem="auto", checkpoint_key="teacher", model_format="auto",
                  verbose=True, image_size=224, allow_partial=False):
    """A backbone with the weights of the checkpoint at `path`, or randomly initialised when
    path == 'random'.

    model_format 'auto' finds the backbone wherever the file keeps it (find_backbones: any nesting
    of dicts, any key prefix, torchvision names or a ResNet wrapped in an nn.Sequential) and picks
    one by choose_backbone's rules (the teacher, else the online network, never a momentum copy;
    --checkpoint_key picks another); it prints which one it took and which it left. A name of
    MODEL_FORMATS forces that release's layout. Architecture options stored in our (or the
    authors') checkpoints' `args` override the given ones so the weights fit. small_image_stem
    'auto' follows the checkpoint (its args, else the size of its first conv: 3 x 3 is the
    small-image stem) and, for 'random', the evaluation `image_size` (backbones.use_small_image_stem).
    Missing and unexpected keys are printed; a file from which not a single backbone weight loads
    is an error, and so is a pre-activation ResNet.
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
    with torch.device("meta"):  # the names and shapes alone, without allocating or initialising weights
        names = build_backbone(arch).state_dict().keys()

    # ============ which tensors of the file are the backbone ============
    not_taken, origin = [], {}  # origin: torchvision name -> the tensor's path in the file
    if model_format == "auto":
        tensors = tensors_by_path(checkpoint)
        candidates = find_backbones(tensors, names)
        if not candidates:
            raise DataError(f"no {arch} backbone weight found in {path}: none of its tensors are named like a "
                            f"{arch}'s, under any prefix or nesting, with torchvision's names or as an nn.Sequential "
                            f"of a ResNet; its top-level keys are {sorted(checkpoint)[:8]}. Check --arch")
        prefix, layout = choose_backbone(candidates, tensors, checkpoint_key, path, arch)
        origin = candidates[prefix, layout]
        weights = {name: tensors[p] for name, p in origin.items()}
        # the other entries under the prefix (projection_head, prototypes, ...), the classifier fc left out
        ignored = sorted({p.removeprefix(prefix).split(".")[0] for p in tensors if p.startswith(prefix)
                          and p not in origin.values()
                          and not (torchvision_name(p.removeprefix(prefix), layout) or "").startswith("fc.")})
        known = format_of(prefix, checkpoint_key) if layout == "torchvision" else None
        source = f"from {shown(prefix)}{LAYOUT_NOTES[layout]}" + (f" (format {known})" if known else "")
        not_taken = [shown(p) + (" (a momentum copy)" if is_momentum_copy(p) else "")
                     for p, _ in candidates if p != prefix]
    else:
        weights = backbone_weights(checkpoint, model_format, checkpoint_key)
        if not any(name in names for name in weights):
            hint = (f" (it has no {checkpoint_key!r} entry: use --checkpoint_key teacher or student)"
                    if model_format in ("carp", "dino") and checkpoint_key not in checkpoint else "")
            raise DataError(f"no {arch} backbone weight found in {path} as --model_format {model_format}{hint}; "
                            f"its top-level keys are {sorted(checkpoint)[:8]}. Check --arch and --model_format "
                            f"(auto, {', '.join(MODEL_FORMATS)})")
        ignored = sorted({k.split(".")[0] for k in weights if k not in names})  # e.g. projection_head, prototypes
        weights = {k: v for k, v in weights.items() if k in names}
        source = f"(format {model_format}{', ' + checkpoint_key if model_format in ('carp', 'dino') else ''})"

    # ============ a torchvision ResNet that computes what the file's network computed ============
    preactivation = preactivation_block(weights)
    if preactivation:
        raise DataError(f"{path} holds a pre-activation ResNet ({origin.get(preactivation, preactivation)} normalises "
                        f"its block's input: BatchNorm and ReLU come before each conv, as in SeLa v1's "
                        f"models/resnetv2.py), which no torchvision ResNet computes; evaluate a release saved as a "
                        f"torchvision ResNet instead")
    if small_image_stem == "auto":
        # The first conv of the file tells: 3 x 3 is the small-image stem, 7 x 7 the ImageNet one.
        first_conv = weights.get("conv1.weight")
        small_image_stem = (first_conv.shape[-1] == 3 if torch.is_tensor(first_conv) and first_conv.ndim == 4
                            else use_small_image_stem("auto", image_size))
    backbone = build_backbone(arch, small_image_stem)
    expected = backbone.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in {arch}"
                  for k, v in weights.items() if expected[k].shape != v.shape]
    if mismatched:
        raise DataError(f"{path} does not fit a {arch} (small_image_stem={small_image_stem}): "
                        f"{'; '.join(mismatched[:3])}. Pass the --arch / --small_image_stem it was trained with")
    missing, _ = backbone.load_state_dict(weights, strict=False)
    # A partly filled network is mostly the sign of a wrong --arch (a ResNet-18 file read as a
    # ResNet-34 fills 136 of its 216 tensors). BatchNorm's num_batches_tracked, which older files
    # lack and evaluation never reads, does not count.
    missing_weights = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing_weights and not allow_partial:
        raise DataError(f"{path} fills {len(expected) - len(missing)} of the {len(expected)} tensors of a {arch} "
                        f"{source} (missing: {', '.join(missing_weights[:3])}{', ...' if len(missing_weights) > 3 else ''}"
                        f"): the rest would stay random. Pass the --arch it was trained with, or --allow_partial_load "
                        f"true to evaluate it so")
    if verbose and is_main_process():
        print(f"loaded {len(expected) - len(missing)}/{len(expected)} backbone tensors of {path} {source}"
              + (f"; ignored the non-backbone entries {ignored}" if ignored else ""))
        if not_taken:
            print(f"  not taken: {', '.join(not_taken)}; --checkpoint_key picks another")
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
def extract_features(backbone, dataset, batch_size=128, num_workers=4, device="cpu", progress=True, main_only=False):
    """Features (N, D) and labels (N,) of every image of `dataset`, in dataset order, on the CPU.

    Under a process group each process computes a shard and the shards are all-gathered; the
    DistributedSampler pads the last shard with repeated images, which simply land in their own
    rows again. main_only: the shards are gathered to the main process alone, and the others return
    (None, None) (ImageNet's train features are 10 GB: a k-NN that runs on the main process alone
    need not hold them in every process). The backbone is used in eval() mode (BatchNorm running
    statistics).
    """
    distributed = is_initialized()
    sampler = (torch.utils.data.DistributedSampler(dataset, shuffle=False) if distributed
               else torch.utils.data.SequentialSampler(dataset))
    loader = torch.utils.data.DataLoader(WithIndex(dataset), batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    was_training = backbone.training
    backbone.eval()
    keeps = is_main_process() or not main_only  # this process holds the (N, D) features
    features, labels = None, torch.zeros(len(dataset), dtype=torch.long) if keeps else None
    for images, targets, index in tqdm(loader, desc="features", disable=not (progress and is_main_process()),
                                       leave=False):
        feats = backbone(images.to(device, non_blocking=True)).float()  # (b, D)
        index, targets = index.to(device), torch.as_tensor(targets).to(device)
        if distributed:  # every rank runs the same number of equal-sized batches
            shards = [gather(t) if main_only else all_gather(t) for t in (feats, index, targets)]
            if not keeps:
                continue
            feats, index, targets = (torch.cat(shard) for shard in shards)
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
                   help="which backbone to read from a file that holds several: 'teacher' (the paper's choice for "
                        "CARP and DINO checkpoints; a file without a teacher gives its online network, never a "
                        "momentum copy), 'student', or any entry or path the loader prints (e.g. momentum_backbone, "
                        "state_dict.module.encoder_k)")
    g.add_argument("--model_format", default="auto", choices=["auto", *MODEL_FORMATS],
                   help="key layout of the checkpoint; 'auto' finds the backbone under any prefix or nesting "
                        "(torchvision names, or a ResNet wrapped in an nn.Sequential) and prints which one it "
                        "took; a name forces that release's layout")
    g.add_argument("--arch", default=None,
                   help=f"torchvision ResNet, or small_cnn (the CPU recipe's). Default: the checkpoint's (our "
                        f"checkpoints and the authors' record it; a flag that disagrees with it is overridden, "
                        f"and the script says so), else {DEFAULT_ARCH}")
    g.add_argument("--allow_partial_load", type=bool_flag, default=False,
                   help="evaluate a backbone that the file fills only in part (the other tensors random); by "
                        "default that is an error naming what is missing, as it usually means a wrong --arch")
    g.add_argument("--small_image_stem", type=auto_flag, default="auto",
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
    g.add_argument("--num_workers", type=int, default=None,
                   help="data-loading processes per process. Default: the cores this process may use, shared "
                        "among the processes torchrun starts on the machine, at most 4")
    g = parser.add_argument_group("features cache")
    g.add_argument("--dump_features", default=None, help="save the extracted features to this folder")
    g.add_argument("--load_features", default=None,
                   help="read features saved by --dump_features instead of running the backbone")
    return parser


def follow_checkpoint(args, follow_dataset=True):
    """Fill the data flags the user left out (None) from the flags the checkpoint was trained with,
    and say so: evaluated at another image size than it was trained on, a network measures
    something else (docs/protocols.md). An explicit flag always wins. follow_dataset=False: --dataset falls back to
    its default only. With --load_features the checkpoint is not read (the features are there)."""
    saved = {} if args.load_features else checkpoint_args(args.pretrained_weights)
    followed = follow_arch(args, saved)
    if args.num_workers is None:
        args.num_workers = default_num_workers(cap=4)
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


def follow_arch(args, saved):
    """--arch: the checkpoint's (`saved`: the flags it was trained with) whatever the flag says, since
    no other network fits its weights; said in one line when the flag asked for another. Returns
    ["--arch A"] when the checkpoint's architecture was taken for a flag left out, else []."""
    saved_arch = saved.get("arch")
    if saved_arch and args.arch not in (None, saved_arch) and is_main_process():
        print(f"--arch {args.arch} overridden: {args.pretrained_weights} holds a {saved_arch} (the flags it was "
              f"trained with)")
    followed = [f"--arch {saved_arch}"] if saved_arch and args.arch is None else []
    args.arch = saved_arch or args.arch or DEFAULT_ARCH
    return followed


def backbone_from_args(args, image_size=None):
    """load_backbone as the model flags of add_model_args say, at `image_size` (default --image_size)."""
    return load_backbone(args.pretrained_weights, args.arch, args.small_image_stem, args.checkpoint_key,
                         args.model_format, image_size=image_size or args.image_size,
                         allow_partial=args.allow_partial_load)


def features_file(folder, split):
    return os.path.join(folder, f"{split}_features.pth")


def frozen_features(args, device, splits=("train", "val"), subsets=None, main_only=False):
    """{split: (features (N, D), labels (N,))} of the teacher backbone on the evaluation transform,
    read from --load_features when given, saved to --dump_features when given. main_only: extracted
    features are gathered to the main process alone; the others get (None, None) (extract_features).

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
    if args.dump_features and is_main_process():  # before the backbone runs over every image
        check_output_dir(args.dump_features, "--dump_features")
    transform = eval_transform(args.image_size, args.resize_interpolation)
    datasets = {split: build_dataset(args.dataset, split, transform, args.data_path, args.download,
                                     args.synthetic_images, args.image_size) for split in splits}
    for split, select in (subsets or {}).items():
        datasets[split] = torch.utils.data.Subset(datasets[split], select(datasets[split]))
    if is_main_process():
        print(", ".join(f"{len(d)} {split} images" for split, d in datasets.items()) + f" of {args.dataset}")
    backbone = backbone_from_args(args).to(device)
    out = {split: extract_features(backbone, d, args.batch_size_per_gpu, args.num_workers, device, main_only=main_only)
           for split, d in datasets.items()}
    if args.dump_features:
        save_features(args.dump_features, out)
    return out


def save_features(folder, features):
    """{split: (features, labels)} to folder/<split>_features.pth, atomically, on the main process (a
    write that fails leaves the previous file of that split as it was: run_folder.save_checkpoint)."""
    if not is_main_process():
        return
    for split, (feats, labels) in features.items():
        save_checkpoint({"features": feats, "labels": labels}, features_file(folder, split))
    print(f"features saved to {folder}")
