"""The optimisation maths of pretrain.py (optim.py and its optimizer_step), each against a computation a reader can do by hand: the
LARS step, which parameters it leaves alone, the schedules, the linear learning-rate scaling,
gradient clipping, and the teacher's EMA."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import optim
import model
import pretrain
from backbones import SmallCNN
from model import CARPHead, MultiCropWrapper


def one_weight(value, grad):
    w = nn.Parameter(torch.tensor(value))
    w.grad = torch.tensor(grad)
    return w


def test_lars_step_is_the_trust_ratio_times_the_decayed_gradient_with_momentum():
    """w = (3, 4), g = (1, 0), wd = 0.1, eta = 0.001, lr = 2, momentum 0.9:
    d = g + wd w = (1.3, 0.4); trust = eta ||w|| / ||d|| = 0.005 / sqrt(1.85); mu = trust d;
    w <- w - lr mu. A second step with the same gradient adds momentum: mu <- 0.9 mu + trust' d'."""
    w = one_weight([3.0, 4.0], [1.0, 0.0])
    optimizer = optim.LARS([w], lr=2.0, weight_decay=0.1, momentum=0.9, eta=0.001)
    optimizer.step()
    trust = 0.001 * 5 / math.sqrt(1.3 ** 2 + 0.4 ** 2)
    mu = [trust * 1.3, trust * 0.4]
    expected = [3 - 2 * mu[0], 4 - 2 * mu[1]]
    assert w.detach().tolist() == pytest.approx(expected, rel=1e-6)

    w.grad = torch.tensor([1.0, 0.0])
    optimizer.step()
    d = [1 + 0.1 * expected[0], 0.1 * expected[1]]
    trust = 0.001 * math.hypot(*expected) / math.hypot(*d)
    mu = [0.9 * mu[0] + trust * d[0], 0.9 * mu[1] + trust * d[1]]
    assert w.detach().tolist() == pytest.approx([expected[0] - 2 * mu[0], expected[1] - 2 * mu[1]], rel=1e-6)


def test_lars_excluded_group_is_plain_momentum_sgd_without_weight_decay():
    """lars_exclude: w <- w - lr g on the first step (no decay, no trust ratio), then momentum."""
    w = one_weight([3.0, 4.0], [1.0, 2.0])
    optimizer = optim.LARS([{"params": [w], "lars_exclude": True, "weight_decay": 0.0}], lr=0.5,
                              weight_decay=0.1, momentum=0.9)
    optimizer.step()
    assert w.detach().tolist() == pytest.approx([2.5, 3.0])
    optimizer.step()  # mu = 0.9 g + g = 1.9 g
    assert w.detach().tolist() == pytest.approx([2.5 - 0.5 * 1.9, 3.0 - 0.5 * 3.8])


def test_lars_leaves_a_zero_weight_to_a_trust_ratio_of_one():
    """||w|| = 0 (a layer initialised at zero) would give a zero step: LARS uses trust 1 instead."""
    w = one_weight([0.0, 0.0], [1.0, 2.0])
    optim.LARS([w], lr=0.5, weight_decay=0.1, momentum=0.9).step()
    assert w.detach().tolist() == pytest.approx([-0.5, -1.0])


def test_param_groups_exclude_biases_norms_and_the_prototype_norm():
    """Weight decay and LARS for conv, linear and prototype-direction weights only; biases, BatchNorm
    parameters and the prototype norm g of the weight-normalised layer go to the excluded group."""
    model = MultiCropWrapper(SmallCNN(), CARPHead(256, n_prototypes=16, use_bn=True, norm_last_layer=False,
                                                  hidden_dim=32, bottleneck_dim=8))
    regularized, excluded = optim.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    regularized = {names[id(p)] for p in regularized["params"]}
    excluded_names = {names[id(p)] for p in excluded["params"]}
    assert excluded["lars_exclude"] and excluded["weight_decay"] == 0.0
    assert regularized | excluded_names == set(names.values()) and not regularized & excluded_names
    assert all(model.get_parameter(n).ndim > 1 for n in regularized)
    assert any("bn" in n or "norm" in n or n.endswith(".bias") for n in excluded_names)
    prototypes = [n for n in names.values() if "parametrizations.weight" in n]
    assert {n for n in prototypes if n.endswith("original0")} <= excluded_names  # g, the norm
    assert {n for n in prototypes if n.endswith("original1")} <= regularized  # v, the direction
    assert len(prototypes) == 2


def test_cosine_schedule_values_at_known_steps():
    """10 epochs x 4 steps, 2 warm-up epochs: step 0 is the warm-up start, step 7 the peak, then a
    half cosine over the 32 remaining steps: its step 16 of 32 is halfway between peak and end."""
    schedule = optim.cosine_schedule(1.0, 0.2, epochs=10, steps_per_epoch=4, warmup_epochs=2,
                                        start_warmup_value=0.0)
    assert len(schedule) == 40
    assert schedule[0] == 0.0 and schedule[7] == pytest.approx(1.0)
    assert schedule[3] == pytest.approx(3 / 7)  # linear warm-up: 8 points from 0 to 1
    assert schedule[8] == pytest.approx(1.0)  # the cosine starts at the peak
    assert schedule[8 + 16] == pytest.approx(0.6)  # 0.2 + 0.5 * 0.8 * (1 + cos(pi / 2))
    assert schedule[8 + 8] == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi / 4)))
    assert np.all(np.diff(schedule[8:]) < 0) and schedule[-1] > 0.2


def test_a_warm_up_longer_than_the_run_is_cut_where_the_run_ends():
    """2 epochs x 5 steps with 3 warm-up epochs (the CPU recipe's warm-up, --epochs 2): 10 values, one
    per step (pretrain.py counts an epoch's steps from the schedule's length), on the 15-point ramp
    from 0 to 1 that the longer run would have: step 9 is at 9 / 14."""
    schedule = optim.cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=5, warmup_epochs=3)
    assert len(schedule) == 10
    assert schedule[9] == pytest.approx(9 / 14) and np.all(np.diff(schedule) > 0)


def test_teacher_momentum_schedule_rises_from_m_to_one():
    """The teacher's momentum: m at step 0, rising to 1 by a half cosine, as in the paper and DINO.
    Like DINO's, the last of the 500 steps is 1 - 0.005 (1 + cos(pi 499 / 500)), 1e-7 short of 1."""
    momentum = optim.cosine_schedule(0.99, 1.0, epochs=5, steps_per_epoch=100)
    assert momentum[0] == pytest.approx(0.99) and momentum[250] == pytest.approx(0.995)
    assert np.all(np.diff(momentum) > 0)
    assert momentum[-1] == pytest.approx(1 - 0.005 * (1 + math.cos(math.pi * 499 / 500)), abs=1e-12)


@pytest.mark.parametrize("batch, processes, accumulation, expected", [
    (64, 8, 1, 0.45 * 2), (256, 1, 1, 0.45), (32, 2, 4, 0.45), (128, 1, 1, 0.225)])
def test_learning_rate_scales_linearly_with_batch_processes_and_accumulation(batch, processes, accumulation,
                                                                              expected):
    """--lr 0.45 is for 256 images per optimizer step: lr x batch_size_per_gpu x processes x accumulation / 256."""
    assert optim.scaled_lr(0.45, batch, processes, accumulation) == pytest.approx(expected)


def tiny_student_and_teacher():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    model.start_teacher(student, teacher)
    return student, teacher


def step(student, teacher, grads, clip_grad=0.0, momentum=0.5, lr=1.0):
    """One optimizer_step with plain SGD (no momentum, no decay): w <- w - lr * (clipped) g."""
    optimizer = torch.optim.SGD(optim.param_groups(student), lr=0.0, momentum=0.0)
    for p, g in zip(student.parameters(), grads):
        p.grad = g.clone()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return pretrain.optimizer_step(student, teacher, optimizer, scaler, lr, 0.0, momentum, clip_grad)


def test_clip_grad_bounds_the_global_norm_of_all_gradients_together():
    """Gradients of norms 3 and 4 (global norm 5) with --clip_grad 1: both are scaled by 1/5, so the
    step has global norm 1 and the weight's part of it norm 0.6; per-parameter clipping (DINO's)
    would give 1 and 1. The returned norm is the one before clipping."""
    student, teacher = tiny_student_and_teacher()
    before = [p.detach().clone() for p in student.parameters()]
    grads = [torch.full((2, 3), 3 / math.sqrt(6)), torch.full((2,), 4 / math.sqrt(2))]
    grad_norm = step(student, teacher, grads, clip_grad=1.0)
    moves = [b - p.detach() for b, p in zip(before, student.parameters())]
    assert grad_norm.item() == pytest.approx(5.0)
    assert [m.norm().item() for m in moves] == pytest.approx([0.6, 0.8], rel=1e-5)
    assert torch.allclose(moves[0], grads[0] / 5, atol=1e-6)  # the direction is kept


@pytest.mark.parametrize("clip_grad", [0.0, 10.0])
def test_no_clipping_when_clip_grad_is_zero_or_the_norm_is_below_it(clip_grad):
    """Gradients of global norm sqrt(6 x 0.01 + 2 x 0.04) = sqrt(0.14): applied as they are, and
    that norm is returned (the log's grad_norm) whether or not clipping is on."""
    student, teacher = tiny_student_and_teacher()
    before = [p.detach().clone() for p in student.parameters()]
    grads = [torch.full((2, 3), 0.1), torch.full((2,), 0.2)]
    grad_norm = step(student, teacher, grads, clip_grad=clip_grad)
    assert grad_norm.item() == pytest.approx(math.sqrt(0.14))
    for b, p, g in zip(before, student.parameters(), grads):
        assert torch.allclose(b - p.detach(), g, atol=1e-6)


def test_teacher_is_the_ema_of_the_student_after_one_step():
    """After one step with momentum m: teacher = m * old teacher + (1 - m) * new student, for every
    parameter (a teacher that never moved, or copied the student, fails this)."""
    student, teacher = tiny_student_and_teacher()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)  # a teacher that differs from the student, as after some training
    old_teacher = [p.detach().clone() for p in teacher.parameters()]
    step(student, teacher, [torch.ones(2, 3), torch.ones(2)], momentum=0.9, lr=0.5)
    for t, old, s in zip(teacher.parameters(), old_teacher, student.parameters()):
        assert torch.allclose(t, 0.9 * old + 0.1 * s.detach(), atol=1e-6)
        assert not torch.allclose(t, old) and not torch.allclose(t, s)
