"""The CARP objective (loss.py), rule by rule, as its docstring states it; and the memory-efficient
carp_loss that training runs against carp_objective, the plain definition.

Shapes: student logits (V, B, K), teacher logits (V_t, B, K), partition (N_P, N_B).
Every expected number is either derived by hand in the test's docstring or computed by the
straightforward float64 reference below (loops over view pairs, no einsum, no masks).
"""
import math

import pytest
import torch
import torch.distributed as dist

import loss
from distributed import device_type

EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- helpers -------------------------

def reference_pair_loss(student_logits, teacher_logits, partition, u, v):
    """l(u, v): mean over images and blocks of -log clamp(<p_b(z^u), q_b(w^v)>, eps, 1 - eps)."""
    p = student_logits[u][:, partition].softmax(dim=-1)  # (B, N_P, N_B)
    q = teacher_logits[v][:, partition].softmax(dim=-1)  # (B, N_P, N_B)
    return -(p * q).sum(dim=-1).clamp(EPS, 1 - EPS).log().mean()


def reference_consistency(student_logits, teacher_logits, partition):
    """L_c: mean of l(u, v) over the pairs u != v; also returns the pairs used."""
    pairs = [(u, v) for u in range(student_logits.shape[0]) for v in range(teacher_logits.shape[0])
             if u != v]
    values = [reference_pair_loss(student_logits, teacher_logits, partition, u, v) for u, v in pairs]
    return torch.stack(values).mean(), pairs


def reference_uniformity(student_logits, teacher_logits, partition):
    """L_H: mean over blocks of log N_B + sum_k pbar log clamp(pbar), pbar over all views and images."""
    all_logits = torch.cat([student_logits, teacher_logits.detach()])  # (V + V_t, B, K)
    p_bar = all_logits[..., partition].softmax(dim=-1).mean(dim=(0, 1))  # (N_P, N_B)
    block_size = partition.shape[1]
    return (math.log(block_size) + (p_bar * p_bar.clamp(EPS, 1 - EPS).log()).sum(dim=-1)).mean()


def one_hot_logits(choice, partition, n_prototypes, value=50.0):
    """Logits (V, B, K) with `value` on prototype partition[b, choice[v, n]] of every block b, else 0:
    a near one-hot assignment inside every block."""
    n_views, batch_size = choice.shape
    logits = torch.zeros(n_views, batch_size, n_prototypes)
    for v in range(n_views):
        for n in range(batch_size):
            logits[v, n, partition[:, choice[v, n]]] = value
    return logits


def random_case(n_views=4, batch_size=3, n_prototypes=16, partition_size=4, seed=0):
    torch.manual_seed(seed)
    student = 2 * torch.randn(n_views, batch_size, n_prototypes)
    teacher = 2 * torch.randn(2, batch_size, n_prototypes)
    partition = loss.random_partition(n_prototypes, partition_size)
    return student, teacher, partition


# ---------------------------------------------------------------- partition -----------------------

def test_partition_has_k_over_nb_blocks_of_nb_prototypes():
    """K = 64, N_B = 16: the partition is (N_P, N_B) = (4, 16)."""
    torch.manual_seed(0)
    assert loss.random_partition(64, 16).shape == (4, 16)


def test_partition_blocks_are_disjoint_and_cover_all_prototypes():
    """K = 64, N_B = 8: the 8 blocks hold 64 distinct prototype indices, all in [0, 64)."""
    torch.manual_seed(0)
    partition = loss.random_partition(64, 8)
    flat = partition.flatten()
    assert partition.dtype == torch.long
    assert flat.unique().numel() == 64
    assert flat.min() >= 0 and flat.max() < 64


def test_partition_drops_the_remainder_when_nb_does_not_divide_k():
    """K = 50, N_B = 16: N_P = 50 // 16 = 3 blocks, 48 distinct prototypes; 2 sit out this step."""
    torch.manual_seed(0)
    partition = loss.random_partition(50, 16)
    assert partition.shape == (3, 16)
    assert partition.flatten().unique().numel() == 48
    assert partition.min() >= 0 and partition.max() < 50


@pytest.mark.parametrize("block_size", [0, 65])
def test_block_size_outside_1_to_k_raises(block_size):
    """N_B must be in [1, K]: 0 and K + 1 = 65 are rejected with a message naming --block_size."""
    with pytest.raises(ValueError, match="--block_size"):
        loss.random_partition(64, block_size)


def test_partition_for_step_depends_only_on_seed_and_step():
    """Every process (and a resumed run) draws the same partition for the same (seed, step);
    the next step draws a different one."""
    torch.manual_seed(0)
    first = loss.partition_for_step(64, 16, seed=3, forward_pass=7)
    torch.manual_seed(123)  # the global RNG state must not matter
    again = loss.partition_for_step(64, 16, seed=3, forward_pass=7)
    next_step = loss.partition_for_step(64, 16, seed=3, forward_pass=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, next_step)
    assert next_step.flatten().unique().numel() == 64


def test_a_partition_for_a_gpu_is_copied_from_pinned_memory_without_waiting(monkeypatch):
    """partition_for_step(..., device): the same partition, drawn on the CPU, then copied to the
    device from pinned memory with non_blocking (a copy from pageable memory would make the CPU wait
    for the GPU at every forward pass). Shown with the meta device, which needs no GPU; on the CPU
    nothing is pinned or copied."""
    calls, to = [], torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin_memory") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: calls.append(("to", args, kwargs))
                        or to(self, *args, **kwargs))
    on_device = loss.partition_for_step(64, 16, seed=3, forward_pass=7, device=torch.device("meta"))
    assert on_device.device.type == "meta" and on_device.shape == (4, 16)
    assert calls == ["pin_memory", ("to", (torch.device("meta"),), {"non_blocking": True})]
    calls.clear()
    on_cpu = loss.partition_for_step(64, 16, seed=3, forward_pass=7, device="cpu")
    assert calls == [] and torch.equal(on_cpu, loss.partition_for_step(64, 16, seed=3, forward_pass=7))


def test_partitions_of_two_seeds_differ():
    """--seed 1 draws other partitions than --seed 0 at every step (torch's CPU generator reads only
    the low 32 bits of its seed: a seed placed above them would be lost), and --seed 0 draws the
    permutation of a generator seeded with the step itself."""
    for step in (0, 1, 1000):
        seed_0 = loss.partition_for_step(64, 16, seed=0, forward_pass=step)
        assert not torch.equal(seed_0, loss.partition_for_step(64, 16, seed=1, forward_pass=step))
        assert torch.equal(seed_0.flatten(), torch.randperm(64, generator=torch.Generator().manual_seed(step)))
    seed_1 = {tuple(loss.partition_for_step(64, 16, seed=1, forward_pass=s).flatten().tolist()) for s in range(50)}
    seed_0 = {tuple(loss.partition_for_step(64, 16, seed=0, forward_pass=s).flatten().tolist()) for s in range(50)}
    assert len(seed_1) == 50 and not seed_0 & seed_1


def test_random_partition_is_reproducible_with_a_seeded_generator():
    """Two generators seeded with the same value give the same partition."""
    a = loss.random_partition(64, 16, generator=torch.Generator().manual_seed(5))
    b = loss.random_partition(64, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- block softmax -------------------

def test_block_softmax_normalises_inside_each_block_only():
    """Block [0, 1] with logits (0, log 3) gives (1/4, 3/4); block [2, 3] with (5, 5) gives (1/2, 1/2)."""
    logits = torch.tensor([[0.0, math.log(3.0), 5.0, 5.0]])  # (B=1, K=4)
    partition = torch.tensor([[0, 1], [2, 3]])  # (N_P=2, N_B=2)
    p = loss.block_softmax(logits, partition)
    assert p.shape == (1, 2, 2)
    torch.testing.assert_close(p, torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))


def test_block_softmax_follows_the_partition_order_and_is_float32():
    """Block [3, 0] reads logits 3 then 0: (0, log 3) -> (1/4, 3/4), in float32 from bf16 input."""
    logits = torch.tensor([math.log(3.0), 7.0, 7.0, 0.0]).to(torch.bfloat16)  # (K=4,)
    partition = torch.tensor([[3, 0], [1, 2]])
    p = loss.block_softmax(logits, partition)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p[0], torch.tensor([0.25, 0.75]), atol=2e-3, rtol=0)
    torch.testing.assert_close(p[1], torch.tensor([0.5, 0.5]))


# ---------------------------------------------------------------- hand-derived loss values --------

def test_identical_one_hot_views_give_zero_consistency():
    """Every student and teacher view puts all its mass on the same prototype of each block:
    agreement = 1 -> -log(1 - eps) ~ 1.2e-7 ~ 0."""
    torch.manual_seed(0)
    partition = loss.random_partition(16, 4)
    choice = torch.zeros(4, 3, dtype=torch.long)  # V = 4, B = 3, all on the block's first prototype
    logits = one_hot_logits(choice, partition, 16)
    consistency, _ = loss.carp_loss(logits, logits[:2].clone(), partition)
    assert consistency.item() < 1e-5


def test_collapsed_marginal_gives_uniformity_log_nb():
    """All images and views on one prototype per block: pbar = (1, 0, 0, 0), L_H = log N_B = log 4."""
    torch.manual_seed(0)
    partition = loss.random_partition(16, 4)
    logits = one_hot_logits(torch.zeros(4, 3, dtype=torch.long), partition, 16)
    _, uniformity = loss.carp_loss(logits, logits[:2].clone(), partition)
    assert uniformity.item() == pytest.approx(math.log(4), abs=1e-4)


def test_uniform_prototype_usage_gives_zero_uniformity():
    """Image n picks prototype n mod N_B of each block, B = 2 N_B = 8: pbar = 1/4 each, L_H = 0
    (and the views agree, so L_c = 0 too)."""
    torch.manual_seed(0)
    partition = loss.random_partition(16, 4)
    choice = (torch.arange(8) % 4).expand(4, 8)  # (V=4, B=8): same prototype for all views of an image
    logits = one_hot_logits(choice, partition, 16)
    consistency, uniformity = loss.carp_loss(logits, logits[:2].clone(), partition)
    assert abs(uniformity.item()) < 1e-5
    assert consistency.item() < 1e-5


def test_zero_logits_give_consistency_log_nb_and_zero_uniformity():
    """All logits 0: every block softmax is uniform, agreement = N_B * (1/N_B)^2 = 1/N_B,
    so L_c = log N_B = log 8; pbar is uniform, so L_H = 0."""
    partition = loss.random_partition(64, 8, generator=torch.Generator().manual_seed(0))
    consistency, uniformity = loss.carp_loss(torch.zeros(4, 2, 64), torch.zeros(2, 2, 64), partition)
    assert consistency.item() == pytest.approx(math.log(8), abs=1e-6)
    assert abs(uniformity.item()) < 1e-6


def test_teacher_views_count_in_the_marginal():
    """V = 2 student views on prototype 0, V_t = 2 teacher views on prototype 1 of each block:
    pbar = (1/2, 1/2, 0, 0), L_H = log 4 - log 2 = log 2."""
    torch.manual_seed(0)
    partition = loss.random_partition(16, 4)
    student = one_hot_logits(torch.zeros(2, 3, dtype=torch.long), partition, 16)
    teacher = one_hot_logits(torch.ones(2, 3, dtype=torch.long), partition, 16)
    _, uniformity = loss.carp_loss(student, teacher, partition)
    assert uniformity.item() == pytest.approx(math.log(2), abs=1e-4)


# ---------------------------------------------------------------- pairing rule ----------------------

@pytest.mark.parametrize("n_views", [2, 3, 8])
def test_consistency_is_the_mean_over_the_2v_minus_2_pairs_u_ne_v(n_views):
    """L_c = mean of l(u, v) over u in 0..V-1, v in {0, 1}, u != v: 2V - 2 pairs (2 when V = 2)."""
    student, teacher, partition = random_case(n_views=n_views)
    expected, pairs = reference_consistency(student.double(), teacher.double(), partition)
    assert len(pairs) == 2 * n_views - 2
    consistency, _ = loss.carp_loss(student, teacher, partition)
    assert consistency.item() == pytest.approx(expected.item(), abs=1e-5)


def test_consistency_excludes_same_view_pairs():
    """Student view 0 = teacher view 0 (one-hot), student view 1 = teacher view 1 = uniform (zero logits).
    Cross pairs: one-hot vs uniform agree with prob 1/4 -> L_c = log 4. Including (0,0) (~0) and
    (1,1) (log 4) would give 3/4 log 4 instead."""
    torch.manual_seed(0)
    partition = loss.random_partition(16, 4)
    one_hot = one_hot_logits(torch.zeros(1, 3, dtype=torch.long), partition, 16)[0]  # (B=3, K=16)
    uniform = torch.zeros(3, 16)
    student = torch.stack([one_hot, uniform])  # (V=2, B, K)
    teacher = torch.stack([one_hot, uniform])  # (V_t=2, B, K)
    consistency, _ = loss.carp_loss(student, teacher, partition)
    assert consistency.item() == pytest.approx(math.log(4), abs=1e-5)
    assert consistency.item() != pytest.approx(0.75 * math.log(4), abs=1e-2)


# ---------------------------------------------------------------- uniformity reference ---------------

def test_uniformity_is_the_kl_of_the_all_views_marginal_to_uniform():
    """L_H = mean_b [log N_B + sum_k pbar log pbar], pbar over all V + V_t views and B images."""
    student, teacher, partition = random_case(n_views=5, batch_size=4, n_prototypes=32, partition_size=8)
    _, uniformity = loss.carp_loss(student, teacher, partition)
    expected = reference_uniformity(student.double(), teacher.double(), partition)
    assert uniformity.item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------------------------------------------------------- precision -----------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_logits_are_upcast_to_float32(dtype):
    """bf16/fp16 logits: both terms are float32 and equal the float32 loss of the upcast values."""
    student, teacher, partition = random_case()
    student, teacher = student.to(dtype), teacher.to(dtype)
    low = loss.carp_loss(student, teacher, partition)
    full = loss.carp_loss(student.float(), teacher.float(), partition)
    for got, want in zip(low, full):
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == pytest.approx(want.item(), abs=1e-5)


def test_called_inside_autocast_the_loss_stays_float32():
    """Inside a bf16 autocast region (CPU) the view-pair products still run in float32: the loss
    equals the one computed outside autocast to float32 rounding, not to bf16 rounding."""
    student, teacher, partition = random_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss.carp_loss(student, teacher, partition)
    outside = loss.carp_loss(student, teacher, partition)
    for got, want in zip(inside, outside):
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), abs=1e-6)


# ---------------------------------------------------------------- gradients -----------------------

def test_no_gradient_flows_into_the_teacher():
    """Stop-gradient: teacher logits get no gradient from L_c + L_H; student logits do."""
    student, teacher, partition = random_case()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    consistency, uniformity = loss.carp_loss(student, teacher, partition)
    (consistency + uniformity).backward()
    assert teacher.grad is None or torch.count_nonzero(teacher.grad) == 0
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_student_gradient_matches_a_float64_reference():
    """d(L_c + L_H)/d(student logits) equals the autograd gradient of the float64 reference."""
    student, teacher, partition = random_case(n_views=4, batch_size=3, n_prototypes=16, partition_size=4)
    student32 = student.clone().requires_grad_(True)
    sum(loss.carp_loss(student32, teacher, partition)).backward()

    student64 = student.double().requires_grad_(True)
    expected = (reference_consistency(student64, teacher.double(), partition)[0]
                + reference_uniformity(student64, teacher.double(), partition))
    expected.backward()
    torch.testing.assert_close(student32.grad.double(), student64.grad, atol=1e-6, rtol=1e-4)


def test_zero_logits_are_a_stationary_point():
    """At zero logits the teacher is uniform, so <p, q> = 1/N_B whatever p (dL_c = 0), and the
    marginal is uniform, the minimum of L_H (dL_H = 0): the student gradient is 0."""
    partition = loss.random_partition(16, 4, generator=torch.Generator().manual_seed(0))
    student = torch.zeros(3, 2, 16, requires_grad=True)
    sum(loss.carp_loss(student, torch.zeros(2, 2, 16), partition)).backward()
    assert student.grad.abs().max().item() < 1e-7


def shared_mode_forces(n_views, student_shift, teacher_shift):
    """Gradients of L_c and of L_H along a direction a of the logits shared by every view of every
    image (an image-independent component: the start of a collapse), for student logits
    student_shift * a and teacher logits teacher_shift * a. Negative = pushes further along a."""
    a = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    partition = loss.random_partition(64, 16, generator=torch.Generator().manual_seed(0))
    forces = []
    for term in (0, 1):  # consistency, uniformity
        student = (student_shift * a).expand(n_views, 8, 64).clone().requires_grad_(True)
        teacher = (teacher_shift * a).expand(2, 8, 64).clone()
        grad, = torch.autograd.grad(loss.carp_loss(student, teacher, partition)[term], student)
        forces.append((grad.double() * a).sum().item())
    return forces


@pytest.mark.parametrize("n_views", [2, 4, 8])
def test_shared_component_is_pulled_by_consistency_more_than_uniformity_pushes_it_back(n_views):
    """Near uniform assignments, for a shift shared by all images: L_c pulls the student along the
    teacher's shift and L_H pushes back along the marginal's shift, of which the student views are
    V / (V + 2). With the teacher equal to the student the pull is (V + 2) / V times the push (2 for
    2 views, 1.25 for 2 + 6: why 2-view runs collapse first); with an unshifted teacher there is no
    pull and the push is V / (V + 2) of the former one. docs/experiments.md uses this (the CPU recipe's
    local views, the two-view ablation)."""
    pull, push = shared_mode_forces(n_views, 1e-3, 1e-3)
    assert pull < 0 < push
    assert -pull / push == pytest.approx((n_views + 2) / n_views, rel=1e-3)
    pull_0, push_0 = shared_mode_forces(n_views, 1e-3, 0.0)
    assert abs(pull_0) < 1e-3 * push  # float32 round-off
    assert push_0 / push == pytest.approx(n_views / (n_views + 2), rel=1e-3)


# ---------------------------------------------------------------- one block (CARL) -----------------

def test_single_block_gives_carl_values():
    """N_B = K = 8 (one block): half the images on prototype 0, half on prototype 1 of all 8:
    pbar = (1/2, 1/2, 0, ...), L_H = log 8 - log 2 = log 4; views agree, L_c ~ 0."""
    partition = loss.random_partition(8, 8, generator=torch.Generator().manual_seed(0))
    assert partition.shape == (1, 8)
    logits = torch.zeros(3, 4, 8)  # V = 3, B = 4
    logits[:, :2, 0] = 50.0
    logits[:, 2:, 1] = 50.0
    consistency, uniformity = loss.carp_loss(logits, logits[:2].clone(), partition)
    assert uniformity.item() == pytest.approx(math.log(4), abs=1e-4)
    assert consistency.item() < 1e-5


def test_single_block_uniformity_is_kl_of_full_marginal_to_uniform_over_k():
    """N_B = K: L_H = KL(pbar || U(K)) with pbar the mean of full K-way softmaxes."""
    student, teacher, _ = random_case(n_views=3, batch_size=4, n_prototypes=8, partition_size=8)
    partition = torch.arange(8).view(1, 8)
    _, uniformity = loss.carp_loss(student, teacher, partition)
    p_bar = torch.cat([student, teacher]).double().softmax(dim=-1).mean(dim=(0, 1))  # (K,)
    kl = (p_bar * (p_bar * 8).log()).sum()
    assert uniformity.item() == pytest.approx(kl.item(), abs=1e-5)


# ---------------------------------------------------------------- single process ------------------

def test_global_mean_is_a_plain_mean_without_a_process_group():
    """No process group: the gather is the identity and global_mean(x, n) = x / n."""
    assert not (dist.is_available() and dist.is_initialized())
    x = torch.tensor([3.0, 6.0, 9.0])
    torch.testing.assert_close(loss.global_mean(x, 3), torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("objective", [loss.carp_objective, loss.carp_loss], ids=["objective", "loss"])
def test_teacher_views_name_the_pair_left_out(objective):
    """teacher_views says which student view each teacher view is: the teacher's logits given in the
    other order with teacher_views=(1, 0) are the same objective; with (0, 1) kept they pair each
    global view with itself (a different, lower L_c when the teacher is the student)."""
    student, teacher, partition = random_case(n_views=4, batch_size=3, n_prototypes=16, partition_size=4)
    expected = objective(student, teacher, partition)
    swapped = objective(student, teacher[[1, 0]], partition, teacher_views=(1, 0))
    assert [t.item() for t in swapped] == pytest.approx([t.item() for t in expected], abs=1e-6)
    itself = student[:2]  # the teacher equal to the student on the global views
    pairs_of_different_views = objective(student, itself, partition)[0]
    pairs_with_itself = objective(student, itself[[1, 0]], partition)[0]  # teacher view 0 is student view 1
    assert pairs_with_itself.item() < pairs_of_different_views.item()


def test_loss_and_gradient_on_the_training_device_equal_the_cpu_ones():
    """The same logits on the training device (the GPU under CARP_DEVICE=cuda; else a second CPU copy)
    and the CPU: the same two terms and the same gradient (float32). Each device gets its own leaf
    tensor, so neither gradient can be the other's."""
    student, teacher, partition = random_case(n_views=4, batch_size=8, n_prototypes=64, partition_size=16)
    results = {}
    for name, device in (("cpu", "cpu"), ("device", device_type())):
        s = student.detach().clone().to(device).requires_grad_(True)
        consistency, uniformity = loss.carp_loss(s, teacher.to(device), partition.to(device))
        (consistency + uniformity).backward()
        results[name] = (consistency.item(), uniformity.item(), s.grad.cpu())
    assert results["device"][0] == pytest.approx(results["cpu"][0], abs=1e-5)
    assert results["device"][1] == pytest.approx(results["cpu"][1], abs=1e-5)
    assert torch.allclose(results["device"][2], results["cpu"][2], atol=1e-6)
    assert results["cpu"][2].abs().max() > 1e-3  # a gradient to compare


# ---------------------------------------------------------------- the two implementations --------

@pytest.mark.parametrize("n_views, n_prototypes, block_size", [(2, 64, 16), (4, 256, 16), (8, 256, 32), (4, 50, 16)],
                         ids=["2 views", "4 views", "8 views", "N_B does not divide K"])
def test_carp_loss_equals_the_plain_objective_in_value_and_gradient(n_views, n_prototypes, block_size):
    """loss.carp_loss (one buffer, hand-written backward) computes loss.carp_objective (the equations
    as written, autograd): the same L_c, L_H and gradient of the student logits, also when K = 50
    leaves 2 prototypes out of the N_P = 3 blocks of 16 (their gradient is 0 in both)."""
    generator = torch.Generator().manual_seed(n_views)
    student = 3 * torch.randn(n_views, 8, n_prototypes, generator=generator)  # (V, B, K)
    teacher = 3 * torch.randn(2, 8, n_prototypes, generator=generator)  # (V_t, B, K)
    partition = loss.random_partition(n_prototypes, block_size, generator)  # (N_P, N_B)
    results = {}
    for name, objective in (("plain", loss.carp_objective), ("fast", loss.carp_loss)):
        logits = student.clone().requires_grad_(True)
        consistency, uniformity = objective(logits, teacher, partition)
        (consistency + uniformity).backward()
        results[name] = (consistency.item(), uniformity.item(), logits.grad)
    plain, fast = results["plain"], results["fast"]
    assert fast[0] == pytest.approx(plain[0], abs=1e-6) and fast[1] == pytest.approx(plain[1], abs=1e-6)
    torch.testing.assert_close(fast[2], plain[2], rtol=1e-4, atol=1e-8)
    assert plain[0] > 0.1 and plain[2].abs().max() > 1e-4  # a case with something to compare
    left_out = torch.ones(n_prototypes, dtype=torch.bool)
    left_out[partition.flatten()] = False
    assert left_out.sum().item() == n_prototypes % block_size
    if left_out.any():
        assert fast[2][..., left_out].abs().max().item() == 0 and plain[2][..., left_out].abs().max().item() == 0


def test_plain_objective_matches_the_float64_reference():
    """carp_objective is the definition: it equals the loop-over-pairs float64 reference above."""
    student, teacher, partition = random_case(n_views=4, n_prototypes=16, partition_size=4, seed=2)
    consistency, uniformity = loss.carp_objective(student, teacher, partition)
    expected, _ = reference_consistency(student.double(), teacher.double(), partition)
    assert consistency.item() == pytest.approx(expected.item(), abs=1e-5)
    assert uniformity.item() == pytest.approx(reference_uniformity(student.double(), teacher.double(), partition).item(),
                                              abs=1e-5)


def test_carp_loss_backward_runs_once():
    """The backward overwrites the block assignments with the gradient: a second backward through
    the same graph (retain_graph) raises an error that says so instead of returning a wrong gradient."""
    student, teacher, partition = random_case()
    student.requires_grad_(True)
    consistency, uniformity = loss.carp_loss(student, teacher, partition)
    (consistency + uniformity).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        (consistency + uniformity).backward()
