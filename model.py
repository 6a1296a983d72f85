"""The CARP networks: projector + prototypes head, multi-crop wrapper, teacher update.

    image view --backbone f--> h (D)  --projector g--> z (256)  --prototypes--> logits (K)

The backbone f (a torchvision ResNet, or the SmallCNN of the CPU recipe) is in backbones.py: any
network that maps images to pooled features; CARP adds everything after it, here.

The student and the teacher are two `MultiCropWrapper(backbone, CARPHead)` of identical
architecture; the teacher is an exponential moving average (EMA) of the student and is what the
evaluation scripts use (its backbone). State-dict keys are `backbone.*` and `head.*`, as in the
authors' release and in DINO, so checkpoints load both ways.
"""
import torch
import torch.nn as nn

# Also importable from here (`from model import build_backbone`), beside the head they go with.
from backbones import ARCHS, SMALL_CNN, SmallCNN, build_backbone  # noqa: F401


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
