"""torch.hub entry points: a CARP backbone in your own code, trained or randomly initialised.

    import torch
    backbone = torch.hub.load("path/to/this/repository", "carp_resnet50", source="local",
                              weights="runs/carp_r50_100ep/checkpoint.pth")
    features = backbone(images)  # (B, 2048): the pooled features every evaluation script uses

`weights` is any checkpoint the evaluation scripts load (features.load_backbone): a pretrain.py
checkpoint.pth, whose teacher backbone is taken as in every evaluation (checkpoint_key="student"
for the other), the authors' released CARP checkpoints, and other methods' ResNets (the loader
prints which backbone of the file it took). Without `weights` the backbone is randomly initialised:
the network of the evaluations' `--pretrained_weights random` baseline (seed 0). The network comes
back in eval() mode (BatchNorm uses its running statistics, as in the evaluations); its forward
takes images as the evaluations feed them (RGB, ImageNet mean and std: data.eval_transform) at the
size it was trained at, and returns the globally pooled features (B, D): D = 2048 for a ResNet-50,
256 for the SmallCNN of the CPU demo.

The repository's modules have plain names (data, model, features, ...): in a program that has
already imported modules of the same names, load the backbone before them or in a fresh process.
"""
import argparse
import os
import warnings
import zipfile

dependencies = ["torch", "torchvision"]

# What a user can do about a weights file that does not load (the evaluation scripts say the same
# with their flag's name).
WHAT_TO_DO = "Pass weights=PATH to a checkpoint (.pth) file, or no weights for a randomly initialised backbone"


def carp_backbone(arch=None, weights=None, checkpoint_key="teacher", model_format="auto", small_image_stem="auto",
                  image_size=224, verbose=True):
    """A backbone (a torchvision ResNet without its classifier, or the SmallCNN) in eval() mode:
    (B, 3, H, W) -> pooled features (B, D).

    arch: the architecture; None takes the checkpoint's (recorded in ours and the authors'), else
    resnet50. A checkpoint that records another architecture than `arch` is an error naming it.
    weights: a checkpoint file, or None for random weights. checkpoint_key, model_format,
    small_image_stem: as the evaluation scripts' flags of the same names (`knn_eval.py --help`).
    image_size: for random weights only, the images' size, which decides small_image_stem 'auto'.
    verbose: print which tensors of the file were loaded.
    """
    from cli import DataError
    from features import DEFAULT_ARCH, load_backbone
    from run_folder import read_checkpoint

    if weights is None:
        with warnings.catch_warnings():  # load_backbone warns that a random network is the baseline
            warnings.simplefilter("ignore")
            backbone = load_backbone("random", arch or DEFAULT_ARCH, small_image_stem, image_size=image_size)
        return backbone.eval()
    weights = os.fspath(weights)
    # Read once here for the hub's own message on a missing or unreadable file, and for the
    # architecture the file records (mapped, not read, where the file allows it).
    checkpoint = read_checkpoint(weights, WHAT_TO_DO, mmap=os.path.isfile(weights) and zipfile.is_zipfile(weights))
    saved = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved  # the authors' checkpoints: a Namespace
    saved_arch = saved.get("arch") if isinstance(saved, dict) else None
    if arch and saved_arch and saved_arch != arch:
        raise DataError(f"{weights} holds a {saved_arch} backbone, not a {arch}: load it with "
                        f"carp_backbone(arch={saved_arch!r}, weights=...)"
                        + {"small_cnn": " or carp_small_cnn", "resnet50": " or carp_resnet50"}.get(saved_arch, ""))
    backbone = load_backbone(weights, arch or saved_arch or DEFAULT_ARCH, small_image_stem, checkpoint_key,
                             model_format, verbose=verbose, image_size=image_size)
    return backbone.eval()


def carp_resnet50(weights=None, **kwargs):
    """A ResNet-50 backbone (the paper's), pooled features (B, 2048); `weights` and the other
    arguments as carp_backbone's."""
    return carp_backbone("resnet50", weights, **kwargs)


def carp_small_cnn(weights=None, **kwargs):
    """The SmallCNN of the CPU demo (`pretrain.py --recipe cpu_small`), pooled features (B, 256);
    `weights` (e.g. runs/demo/checkpoint.pth) and the other arguments as carp_backbone's."""
    return carp_backbone("small_cnn", weights, **kwargs)
