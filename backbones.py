"""The backbones f of CARP's networks: (B, 3, H, W) images -> pooled features h (B, D).

Any torchvision ResNet without its classifier (the paper's is ResNet-50, D = 2048), optionally with a
small-image stem, or the SmallCNN of the CPU recipe. model.py puts a CARP head on top of one; the
evaluation scripts rebuild one from a checkpoint's `backbone.*` weights (features.py).
"""
import torch
import torch.nn as nn
import torchvision


RESNET_ARCHS = sorted(name for name in torchvision.models.list_models(module=torchvision.models)
                      if name.startswith(("resnet", "resnext", "wide_resnet")))
SMALL_CNN = "small_cnn"  # the 4-stage CNN below, for CPU runs, tests and teaching
ARCHS = RESNET_ARCHS + [SMALL_CNN]


SMALL_IMAGE_MAX_SIZE = 64  # 'auto' gives images of at most this many pixels the small-image stem


def use_small_image_stem(flag, image_size):
    """Resolve a --small_image_stem flag: True / False as given; 'auto' -> True when the images
    the network sees are at most SMALL_IMAGE_MAX_SIZE pixels. The ImageNet stem divides the
    resolution by 4 before the first residual block, so a 16 x 16 view would reach the last block
    as 1 x 1; solo-learn and most CIFAR recipes swap the stem for such images."""
    if flag == "auto":
        return image_size <= SMALL_IMAGE_MAX_SIZE
    return bool(flag)


class SmallCNN(nn.Module):
    """A plain 4-stage CNN for images of at most 64 pixels: (B, 3, H, W) -> pooled features (B, 256).

    Each stage is one 3x3 conv + BatchNorm + ReLU, at 32, 64, 128 and 256 channels with strides 1,
    2, 2, 2 (a 32 x 32 view ends at 4 x 4), then global average pooling: 0.39 M parameters. Small
    enough that a laptop CPU runs the thousand-odd optimizer steps a CARP run needs to show what it
    learns (README, *The demo*). Not a paper network: the paper's is ResNet-50.
    """

    def __init__(self, widths=(32, 64, 128, 256), strides=(1, 2, 2, 2)):
        super().__init__()
        layers, in_channels = [], 3
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(in_channels, width, 3, stride, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            in_channels = width
        self.stages = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.embed_dim = in_channels

    def forward(self, x):
        return self.stages(x).mean(dim=(2, 3))  # (B, 256)


def preferred_memory_format(arch, device):
    """The memory layout pretrain.py gives the networks and views: channels_last on CUDA (tensor
    cores want it) and for the SmallCNN on a CPU, where oneDNN's convolutions run faster that way;
    the ResNets keep the default layout on a CPU, where channels_last did not pay."""
    if device.type == "cuda" or arch == SMALL_CNN:
        return torch.channels_last
    return torch.contiguous_format


def check_arch(arch):
    """Raise a ValueError naming the choices when `arch` is not a backbone build_backbone knows."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose {SMALL_CNN} (small images, CPU) or a torchvision "
                         f"ResNet: {', '.join(RESNET_ARCHS)}")


def build_backbone(arch, small_image_stem=False, zero_init_residual=True):
    """A torchvision ResNet without its classifier, or the SmallCNN: (B, 3, H, W) -> pooled features (B, D).

    small_image_stem: for 32x32-pixel data (CIFAR), replace the 7x7 stride-2 conv + max-pool,
    which would shrink a 32x32 image to 8x8 before the first block, by a 3x3 stride-1 conv.
    zero_init_residual: the last BN of every residual block starts at 0, so every block starts as
    the identity (NOTE(paper): on in the recipe, as in DINO's ResNet runs).
    The feature dimension is stored in `backbone.embed_dim` (2048 for ResNet-50, 512 for ResNet-18,
    256 for the SmallCNN). The two flags above concern the ResNets only.
    """
    check_arch(arch)
    if arch == SMALL_CNN:
        return SmallCNN()
    backbone = torchvision.models.get_model(arch, weights=None, zero_init_residual=zero_init_residual)
    if small_image_stem:
        backbone.conv1 = nn.Conv2d(3, backbone.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    backbone.embed_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return backbone
