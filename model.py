"""The CARP networks: backbone, projector + prototypes head, multi-crop wrapper, teacher update.

    image view --backbone f--> h (D)  --projector g--> z (256)  --prototypes--> logits (K)

The student and the teacher are two `MultiCropWrapper(backbone, CARPHead)` of identical
architecture; the teacher is an exponential moving average (EMA) of the student and is what the
evaluation scripts use (its backbone). State-dict keys are `backbone.*` and `head.*`, as in the
authors' release and in DINO, so checkpoints load both ways.
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


class CARPHead(nn.Module):
    """Projector g (an MLP) followed by the K prototypes. The sizes are pretrain.py's flags (paper
    values in brackets): n_prototypes K --out_dim (65536), hidden_dim --hidden_dim (2048),
    bottleneck_dim --bottleneck_dim (256), use_bn --use_bn_in_head (true), norm_last_layer
    --norm_last_layer (true).

    mlp:        Linear(D, 2048) -> BN -> GELU -> Linear(2048, 2048) -> BN -> GELU -> Linear(2048, 256)
    last_layer: weight-normalised Linear(256, K, bias=False); row k is prototype c_k, and with the
                norm g fixed to 1 the logit of prototype k is s_k(z) = <c_k / ||c_k||, z>. With
                norm_last_layer false g is learned too (its own norm per prototype).
    NOTE(paper): unlike DINO, z is NOT L2-normalised before the prototypes and there is no
    temperature: the loss takes a softmax of these raw logits inside each block.
    """

    def __init__(self, in_dim, n_prototypes, use_bn, norm_last_layer, hidden_dim, bottleneck_dim, nlayers=3):
        super().__init__()
        layers = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1)
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out)] + ([nn.BatchNorm1d(d_out)] if use_bn else []) + [nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        # Prototypes. parametrizations.weight_norm stores weight = g * v / ||v|| as `original0` (g,
        # shape (K, 1)) and `original1` (v, shape (K, 256)); it also loads the older
        # `weight_g` / `weight_v` keys of checkpoints made with nn.utils.weight_norm.
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1)
        if norm_last_layer:
            # Fixed norm 1: only the prototype directions are learned (g takes no gradient and is in
            # no optimizer group), so the logits' scale comes from z alone and no prototype can win
            # the softmaxes by growing (DINO reports a learned norm less stable).
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, h):
        z = self.mlp(h)  # (B, 256)
        return self.last_layer(z)  # (B, K)


class MultiCropWrapper(nn.Module):
    """Backbone and head over a list of views of mixed resolutions.

    The backbone runs once per group of consecutive views of equal resolution (the global views
    together, then the local views together), so BatchNorm sees one batch per resolution as in the
    authors' code; the head runs once on all the features.
    Input: a list of V tensors (B, 3, H_v, W_v). Output: logits (V, B, K).
    """

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views):
        if torch.is_tensor(views):
            views = [views]
        # Boundaries between groups of equal resolution, e.g. [2, 8] for 2 x 224 + 6 x 96.
        sizes = [v.shape[-1] for v in views]
        ends = [i for i in range(1, len(views) + 1) if i == len(views) or sizes[i] != sizes[i - 1]]
        features, start = [], 0
        for end in ends:
            features.append(self.backbone(torch.cat(views[start:end])))  # ((end - start) * B, D)
            start = end
        logits = self.head(torch.cat(features))  # (V * B, K)
        return logits.view(len(views), views[0].shape[0], -1)  # (V, B, K)


def start_teacher(student, teacher):
    """The teacher starts as a copy of the student and never takes a gradient (it follows the
    student by EMA only, update_teacher). Like the student it stays in train() mode: its BatchNorm
    layers normalise with the statistics of the batch it sees, the 2 global views."""
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False


@torch.no_grad()
def update_teacher(student, teacher, momentum):
    """EMA of the weights: xi <- m * xi + (1 - m) * theta, over all parameters (not BN buffers:
    the teacher's BatchNorm keeps its own running statistics, as in DINO). m = 1 leaves the
    teacher unchanged, m = 0 copies the student.

    pretrain.py calls it once per optimizer step, just after the student's update (not after every
    micro-step of gradient accumulation), with m from a cosine schedule that starts at
    --momentum_teacher and approaches --momentum_teacher_end (the paper's 0.99 -> 1; optim.cosine_schedule
    says how close the last step comes)."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)
