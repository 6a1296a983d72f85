"""The CARP networks (model.py): projector + prototypes head, multi-crop wrapper and teacher
update, as the paper describes them (arXiv:2310.12692, and model.py's docstrings).

Kept tiny for CPU: ResNet-18 on 16x16 / 32x32 views, batch <= 4 per view, K = 64 prototypes.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import backbones
import model

K = 64  # prototypes


# ---------------------------------------------------------------- helpers -------------------------

def tiny_head(in_dim=32, use_bn=True, norm_last_layer=True):
    """Projector in_dim -> 48 -> 48 -> 16, then K = 64 prototypes."""
    return model.CARPHead(in_dim=in_dim, n_prototypes=K, use_bn=use_bn, norm_last_layer=norm_last_layer,
                          hidden_dim=48, bottleneck_dim=16)


def tiny_wrapper():
    """ResNet-18 (standard stem) + tiny head: student/teacher network for 16x16 and 32x32 views."""
    return model.MultiCropWrapper(backbones.build_backbone("resnet18"), tiny_head(in_dim=512))


def row_norms(head):
    """Norms of the prototypes, the rows of the effective (K, bottleneck) prototype weight."""
    return head.last_layer.weight.norm(dim=1)


# ---------------------------------------------------------------- head ----------------------------

def test_head_maps_features_to_k_logits():
    """(B, in_dim) = (4, 32) -> (B, K) = (4, 64)."""
    torch.manual_seed(0)
    assert tiny_head()(torch.randn(4, 32)).shape == (4, K)


def test_prototypes_are_unit_norm_at_init_and_after_a_step():
    """norm_last_layer: g is fixed to 1, so every prototype row has norm 1 before and after an
    SGD step (lr 1.0) on the head."""
    torch.manual_seed(0)
    head = tiny_head(norm_last_layer=True)
    torch.testing.assert_close(row_norms(head), torch.ones(K), atol=1e-5, rtol=0)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    head(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    assert head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0  # directions moved
    torch.testing.assert_close(row_norms(head), torch.ones(K), atol=1e-5, rtol=0)


def test_prototype_norms_move_when_norm_last_layer_is_off():
    """norm_last_layer=False: g is learned, so the same SGD step changes the prototype norms."""
    torch.manual_seed(0)
    head = tiny_head(norm_last_layer=False)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    head(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    assert (row_norms(head) - 1).abs().max() > 1e-2


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_prototype_norm_is_frozen_only_with_norm_last_layer(norm_last_layer):
    """The norm g (original0, shape (K, 1), all 1 at init) is trainable iff norm_last_layer is off."""
    torch.manual_seed(0)
    g = tiny_head(norm_last_layer=norm_last_layer).last_layer.parametrizations.weight.original0
    assert g.shape == (K, 1) and torch.all(g == 1)
    assert g.requires_grad is (not norm_last_layer)


def test_logits_are_raw_dot_products_with_normalised_prototypes():
    """s_k(z) = <v_k / ||v_k||, z> with z = mlp(h): z is not L2-normalised, no temperature."""
    torch.manual_seed(0)
    head = tiny_head().eval()
    h = torch.randn(4, 32)
    z = head.mlp(h)  # (B, 16)
    v = head.last_layer.parametrizations.weight.original1  # (K, 16)
    expected = z @ (v / v.norm(dim=1, keepdim=True)).T  # (B, K)
    torch.testing.assert_close(head(h), expected, atol=1e-6, rtol=1e-5)
    assert (z.norm(dim=1) - 1).abs().max() > 1e-2  # z really is not unit-norm here


def test_projector_biases_start_at_zero():
    """Projector Linear biases start at 0 (weights trunc-normal, std 0.02): all 3 biases are 0."""
    torch.manual_seed(0)
    linears = [m for m in tiny_head().mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for linear in linears:
        assert torch.all(linear.bias == 0)


def test_use_bn_false_has_no_batchnorm():
    """use_bn=False: the projector is Linear -> GELU -> Linear -> GELU -> Linear, no BatchNorm1d."""
    head = tiny_head(use_bn=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]


def test_head_loads_old_weight_g_weight_v_checkpoints():
    """A state dict with last_layer.weight_g / weight_v (deprecated nn.utils.weight_norm, as in the
    authors' release) loads into CARPHead and gives the same prototype weights."""
    torch.manual_seed(0)
    old = tiny_head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old.last_layer = nn.utils.weight_norm(nn.Linear(16, K, bias=False))
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(old.state_dict())

    new = tiny_head()
    new.load_state_dict(old.state_dict())  # strict: every key is matched
    torch.testing.assert_close(new.last_layer.weight, old.last_layer.weight)
    torch.testing.assert_close(new.mlp[0].weight, old.mlp[0].weight)


# ---------------------------------------------------------------- multi-crop wrapper --------------

def mixed_views(batch_size=4):
    """2 global views of 32x32 then 3 local views of 16x16, B = 4 images."""
    return [torch.randn(batch_size, 3, 32, 32) for _ in range(2)] + \
           [torch.randn(batch_size, 3, 16, 16) for _ in range(3)]


def test_multicrop_output_equals_running_every_view_alone():
    """Eval mode (BN on running stats): logits (V, B, K) = (5, 4, 64), view v = head(backbone(view v))."""
    torch.manual_seed(0)
    wrapper = tiny_wrapper().eval()
    views = mixed_views()
    with torch.no_grad():
        logits = wrapper(views)
        expected = torch.stack([wrapper.head(wrapper.backbone(view)) for view in views])
    assert logits.shape == (5, 4, K)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_multicrop_runs_the_backbone_once_per_resolution_and_the_head_once():
    """Train mode: the backbone sees 2 batches, 2 x 4 = 8 global then 3 x 4 = 12 local views; the
    head sees one batch of 5 x 4 = 20 features."""
    torch.manual_seed(0)
    wrapper = tiny_wrapper().train()
    backbone_batches, head_batches = [], []
    wrapper.backbone.register_forward_hook(lambda m, args, out: backbone_batches.append(args[0].shape[0]))
    wrapper.head.register_forward_hook(lambda m, args, out: head_batches.append(args[0].shape[0]))
    logits = wrapper(mixed_views())
    assert backbone_batches == [8, 12]
    assert head_batches == [20]
    assert logits.shape == (5, 4, K)


# ---------------------------------------------------------------- teacher update ------------------

def student_and_teacher():
    """Two tiny heads with different weights, and different BN running stats."""
    torch.manual_seed(0)
    student = tiny_head(in_dim=8)
    student(torch.randn(4, 8))  # train-mode forward: moves the student's BN running stats
    teacher = tiny_head(in_dim=8)
    return student, teacher


@pytest.mark.parametrize("momentum", [1.0, 0.0, 0.5])
def test_teacher_is_the_ema_of_the_student(momentum):
    """xi <- m xi + (1 - m) theta: m = 1 keeps the teacher, m = 0 copies the student, m = 0.5 averages."""
    student, teacher = student_and_teacher()
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    model.update_teacher(student, teacher, momentum)
    for (name, xi), (_, theta) in zip(teacher.named_parameters(), student.named_parameters()):
        torch.testing.assert_close(xi, momentum * before[name] + (1 - momentum) * theta,
                                   atol=1e-7, rtol=0)
    if momentum == 1.0:
        assert all(torch.equal(xi, before[name]) for name, xi in teacher.named_parameters())
    if momentum == 0.0:
        assert all(torch.equal(xi, theta) for xi, theta in zip(teacher.parameters(), student.parameters()))


def test_teacher_update_leaves_bn_buffers_alone():
    """The teacher's BatchNorm keeps its own running statistics: buffers are not averaged (m = 0)."""
    student, teacher = student_and_teacher()
    before = {name: b.clone() for name, b in teacher.named_buffers()}
    assert not torch.equal(student.mlp[1].running_mean, teacher.mlp[1].running_mean)
    model.update_teacher(student, teacher, 0.0)
    for name, buffer in teacher.named_buffers():
        assert torch.equal(buffer, before[name]), name
