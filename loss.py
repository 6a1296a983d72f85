"""The CARP objective: consistent assignment of views over random partitions.

Notation (the paper's, arXiv:2310.12692), and the flag that sets each size:

    K    prototypes                                        --out_dim (paper 65536)
    N_B  prototypes per block                              --block_size (paper 512; the authors' --partition_size)
    N_P  blocks of a partition, N_P = K // N_B             (paper 128)
    V    student views per image: 2 global + M local       --local_crops_number M (paper 6, so V = 8)
    V_t  teacher views per image: the 2 global views
    B    images per process                                --batch_size_per_gpu

One word per concept, here and in every file:
    view       an augmented crop of an image (data.py); the student sees all V, the teacher the 2 global
    prototype  one of the K rows c_k of the head's last layer; a view's logit for it is <c_k / ||c_k||, z>
               (the prototypes' norm is fixed to 1 by default: model.CARPHead)
    block      a group of N_B prototypes (`block_size` = N_B and `n_blocks` = N_P in the code)
    partition  a random split of the K prototypes into N_P disjoint blocks, drawn anew for every forward
               pass: every optimizer step, and every micro-step of one under gradient accumulation
    student    the network trained by gradient; teacher: its exponential moving average (model.py)

Inside every block b a view is softly assigned to one of the block's prototypes, with a softmax over
the block's N_B logits: p_b(z) for the student's view z, q_b(w) for the teacher's view w. The
objective asks two things of these assignments:

    consistency  L_c = mean over pairs (u, v) of a student view u and a teacher view v, u != v, over
                       images n and blocks b, of  -log clamp( <p_b(z_n^u), q_b(w_n^v)>, eps, 1 - eps )
                 <p, q> is the probability that the two views pick the same prototype of block b.
                 Global view 0 meets teacher view 1 and vice versa; every local view meets both:
                 2V - 2 pairs. The teacher is a target: no gradient flows into it.

    uniformity   L_H = mean over blocks b of  log N_B + sum_k pbar_b,k log clamp(pbar_b,k, eps, 1 - eps)
                     = mean over b of KL(pbar_b || uniform(N_B))
                 pbar_b is the block's assignment averaged over every view (student and teacher) of
                 every image of the forward pass on every process (the global batch; under gradient
                 accumulation one micro-step's): 0 when all prototypes of a block are used equally.
                 NOTE(authors' code): they call this term "entropy"; it is log N_B minus the entropy
                 of pbar_b, which the log shows as `block_entropy` (in nats) and, divided by log N_B,
                 as `normalised_block_entropy` (a run that collapses warns below COLLAPSE_THRESHOLD).

    loss = L_c + L_H        (pretrain.py's --uniformity_weight lambda gives L_c + lambda L_H, an ablation)

Why blocks: a batch cannot estimate a uniform use of 65536 prototypes, but it can of 512; a fresh
random partition at every forward pass turns the prototypes into many small random assignment tasks. With
N_B = K there is one block: the objective of CARL, the authors' earlier method.

The file reads in that order: the partition, the block softmax, `carp_objective` (the definition,
written as the equations read), then `carp_loss`, the same numbers with a fraction of the memory,
which training runs (tests/test_loss.py checks that the two agree in value and gradient).

How the two terms balance against collapse (tested in tests/test_loss.py). Shift the logits of
every view of every image by the same small vector, the first step of a collapse onto the same
prototypes for all images. L_c pulls the student further along the shift in proportion to the
teacher's shift; L_H pushes it back in proportion to the marginal's shift, of which the student
views are V / (V + 2) (the teacher views count in the marginal but take no gradient). With the
teacher equal to the student the pull is (V + 2) / V times the push: 2 with 2 views, 1.25 with the
paper's 2 + 6. The shared shift grows unless the teacher lags enough (teacher shift below
V^2 / (V^2 + 2V + 4) of the student's: 1/3 with 2 views, 0.76 with 8), which is what multi-crop
and a slow teacher (momentum 0.99 -> 1) buy.

Everything here is plain tensor code; under torchrun the loss makes two collectives (the whole
step's are listed in pretrain.train_one_epoch), both in global_mean, the identity when no process
group is initialised (so the loss runs and tests the same in one process): the forward pass
all-reduces the block sums into the global marginal pbar_b, and the backward pass all-reduces the
gradient of those sums. Both run at every forward pass, micro-steps of gradient accumulation
included (DDP's no_sync holds back only its own averaging). Why the second makes the step exact:
every process computes the same L_H from the same pbar_b, and DDP averages the parameter gradients
over the W processes, i.e. divides their sum by W. L_c is a mean over each process's own images, so
that average is the mean over the global batch. L_H is one term of the global batch: the gradient
that reaches a process's assignments must be the sum over processes of dL_H / dpbar_b (W times one
process's), so that DDP's division by W leaves it once. Together the W processes take exactly the
gradient of one process on the concatenated batch (tests/test_distributed.py), given BatchNorm
layers that normalise over it too: SyncBatchNorm on GPUs; on CPUs each process normalises its own.
"""
import math

import torch
import torch.distributed as dist

from distributed import to_device

EPS = torch.finfo(torch.float32).eps  # NOTE(paper): eps is float32 machine epsilon, ~1.19e-7

# Collapse: the views of all images assigned to the same few prototypes. It shows in the normalised
# block entropy, H(pbar_b) / log N_B averaged over the blocks = (log N_B - L_H) / log N_B, from the L_H
# of every forward pass since the last log line (the pbar_b above: all views, all processes; 1: every
# prototype of a block used equally by the batch; 0: one prototype takes every view). Below this
# threshold a block's batch marginal is as concentrated as an even use of N_B ** 0.5 of its N_B
# prototypes (8 of 64, 23 of 512): the uniformity term has lost. The healthy CPU demo stays above 0.96;
# its --uniformity_weight 0 ablation, which collapses onto 2 to 16 of its 1,024 prototypes, falls to
# 0.15-0.35. train_stats.py logs it with every log line, warns and logs a `collapse` event below this;
# plot_log.py draws it.
COLLAPSE_THRESHOLD = 0.5


# ============ the random partition ============

def random_partition(n_prototypes, block_size, generator=None):
    """Split the prototype indices 0..K-1 into N_P = K // N_B random disjoint blocks of N_B.

    Returns a LongTensor of shape (N_P, N_B). When N_B does not divide K, the K - N_P * N_B
    prototypes that fall off the end of the permutation take no part in this step's loss
    (a different set each step).
    """
    if not 1 <= block_size <= n_prototypes:
        raise ValueError(
            f"--block_size {block_size} must be between 1 and the number of prototypes "
            f"(--out_dim {n_prototypes}); the paper uses 512 of 65536."
        )
    n_blocks = n_prototypes // block_size  # N_P
    permutation = torch.randperm(n_prototypes, generator=generator)  # (K,)
    return permutation[: n_blocks * block_size].view(n_blocks, block_size)  # (N_P, N_B)


def partition_for_step(n_prototypes, block_size, seed, forward_pass, device="cpu"):
    """The partition of forward pass number `forward_pass`, identical on every process and after a resume.
    pretrain.py numbers its forward passes optimizer step x gradient accumulation + micro-step, so
    every forward pass draws its own partition (--fixed_partition, an ablation, keeps number 0's).
    On `device`: drawn on the CPU, then copied to a GPU from pinned memory without waiting for it.

    NOTE(authors' code): the authors draw the permutation on rank 0 and broadcast it. A generator
    seeded from (seed, step) gives every rank the same partition with no communication, and a run
    resumed from a checkpoint draws exactly the partitions it would have drawn.
    """
    # torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so seed and forward pass
    # share them: forward_pass + seed x 0x9E3779B9 (2**32 / golden ratio) mod 2**32. Seed 0 draws
    # permutation `forward_pass`; two seeds below 100 share no partition within their first 21 million
    # forward passes (below 1000: 1.9 million; a paper run makes 125,000 x its accumulation steps).
    generator = torch.Generator().manual_seed((forward_pass + seed * 0x9E3779B9) % 2 ** 32)
    return to_device(random_partition(n_prototypes, block_size, generator), device)  # (N_P, N_B)


# ============ the objective, as the equations read ============

def block_softmax(logits, partition):
    """Softmax inside every block of the partition, in float32.

    logits: (..., K) raw prototype scores <c_k / ||c_k||, z> (no temperature, as in the paper).
    partition: (N_P, N_B) prototype indices.
    Returns (..., N_P, N_B): one distribution over N_B prototypes per block.
    """
    # Indexing the last axis with an (N_P, N_B) index tensor gathers all blocks at once.
    return logits.float()[..., partition].softmax(dim=-1)  # (..., N_P, N_B)


def carp_objective(student_logits, teacher_logits, partition, teacher_views=(0, 1)):
    """The two terms of the CARP objective, straight from their definitions (module docstring).

    student_logits: (V, B, K) logits of every student view.
    teacher_logits: (V_t, B, K) logits of the teacher's views, V_t = 2.
    partition:      (N_P, N_B) prototype indices of this forward pass's blocks.
    teacher_views:  which student view each teacher view is: teacher view v is the view
                    student_logits[teacher_views[v]] (the 2 global views, which data.py puts first):
                    the pairs (teacher_views[v], v), a view with itself, are those L_c leaves out.
    Returns (consistency, uniformity), 0-dim float32 tensors; the training loss is their sum.
    Training runs carp_loss, which returns the same numbers and gradients with less memory.
    """
    block_size = partition.shape[1]  # N_B
    p = block_softmax(student_logits, partition)  # (V, B, N_P, N_B): p_b(z_n^u)
    q = block_softmax(teacher_logits.detach(), partition)  # (V_t, B, N_P, N_B): q_b(w_n^v), a target

    # ---- L_c: the student view u and the teacher view v, u != v, pick the same prototype of a block ----
    pair_losses = [-(p[u] * q[v]).sum(dim=-1).clamp(EPS, 1 - EPS).log().mean()  # l(u, v): mean over n and b
                   for u in range(len(p)) for v in range(len(q)) if u != teacher_views[v]]  # 2V - 2 pairs
    consistency = torch.stack(pair_losses).mean()  # L_c

    # ---- L_H: every prototype of a block used equally over the global batch ----
    assignments = torch.cat([p, q])  # (V + V_t, B, N_P, N_B): teacher entries count, without gradient
    p_bar = global_mean(assignments.sum(dim=(0, 1)), assignments.shape[0] * assignments.shape[1])  # (N_P, N_B)
    uniformity = (math.log(block_size) + (p_bar * p_bar.clamp(EPS, 1 - EPS).log()).sum(dim=-1)).mean()  # L_H
    return consistency, uniformity


# ============ the same objective with a fraction of the memory: what training runs ============
#
# At the paper's sizes the block assignments of one step are (V + V_t) * B * K = 10 * 64 * 65536
# floats (160 MiB), but the loss needs of them only the agreements (V, V_t, B, N_P) and the block
# sums (N_P, N_B). `_BlockAssignments` computes the assignments view by view into one buffer, returns
# these statistics, and has a hand-written backward that overwrites the buffer with the gradient of
# the logits, so the objective's peak memory is the assignments themselves plus one view of scratch.
# Autograd through carp_objective holds the indexed logits, the softmax, their gradients and the
# gradient of the logits at once (bench.py, section objective, measures both).

class _BlockAssignments(torch.autograd.Function):
    """Block assignments of the student and teacher views, reduced to what the loss needs.

    Forward: p = block softmax of the student logits (V, B, N_P, N_B), q = the same for the teacher
    (V_t, B, N_P, N_B), and returns
        agreement[u, v, n, b] = sum_k p_b(z_n^u)_k q_b(w_n^v)_k      (V, V_t, B, N_P)
        student_sum[b, k]     = sum_{u, n} p_b(z_n^u)_k               (N_P, N_B)
        teacher_sum[b, k]     = sum_{v, n} q_b(w_n^v)_k               (N_P, N_B), no gradient
    Backward, with A = dL/d agreement and S = dL/d student_sum, for every student view u:
        dL/dp_k = sum_v A_uv q_v,k + S_k                              (the k-th prototype of block b)
        dL/dz_k = p_k (dL/dp_k - c),  c = sum_k' p_k' dL/dp_k' = sum_v A_uv agreement_uv + sum_k' p_k' S_k'
    (the softmax Jacobian), written back in prototype order over p's own memory, which is then
    returned as the gradient of the student logits. So the graph can be run backward only once.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, partition):
        n_views, batch_size, n_prototypes = student_logits.shape  # V, B, K
        n_blocks, block_size = partition.shape  # N_P, N_B
        kept = n_blocks * block_size  # K, or less when N_B does not divide K
        # (B, N_P * N_B), block after block. pretrain.py passes the partition on the device already
        # (partition_for_step); one on the CPU is copied here.
        index = partition.to(student_logits.device, non_blocking=True).flatten().expand(batch_size, kept)
        blocks = student_logits.new_empty(batch_size, kept)  # one view's logits in block order, reused

        def assign(logits, out):  # block softmax of every view of `logits` into `out`, one view at a time
            for view_logits, view_out in zip(logits, out):
                torch.gather(view_logits, -1, index, out=blocks)
                torch.softmax(blocks.view(batch_size, n_blocks, block_size), -1, dtype=torch.float32, out=view_out)

        q = torch.empty(teacher_logits.shape[0], batch_size, n_blocks, block_size, device=student_logits.device)
        assign(teacher_logits, q)  # (V_t, B, N_P, N_B)
        p = torch.empty(n_views, batch_size, n_blocks, block_size, device=student_logits.device)
        assign(student_logits, p)  # (V, B, N_P, N_B)
        # All view pairs (u, v) of every image and block in one batched product over k.
        agreement = torch.matmul(p.permute(1, 2, 0, 3), q.permute(1, 2, 3, 0))  # (B, N_P, V, V_t)
        agreement = agreement.permute(2, 3, 0, 1)  # (V, V_t, B, N_P)
        ctx.saved = (p, q, agreement, index, n_prototypes)
        teacher_sum = q.sum(dim=(0, 1))  # (N_P, N_B)
        ctx.mark_non_differentiable(teacher_sum)
        return agreement, p.sum(dim=(0, 1)), teacher_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_agreement, grad_student_sum, grad_teacher_sum):
        if ctx.saved is None:
            raise RuntimeError("carp_loss supports one backward pass per forward pass (no retain_graph): "
                               "its backward overwrites the block assignments with the gradient")
        p, q, agreement, index, n_prototypes = ctx.saved
        ctx.saved = None
        n_views, batch_size, n_blocks, block_size = p.shape  # V, B, N_P, N_B
        # c[u, n, b] = sum_v A_uv agreement_uv + sum_k p_k S_k, one number per view, image and block
        p_dot_s = torch.matmul(p.flatten(0, 1).transpose(0, 1), grad_student_sum.unsqueeze(-1))  # (N_P, V * B, 1)
        c = (grad_agreement * agreement).sum(dim=1) + p_dot_s.view(n_blocks, n_views, batch_size).permute(1, 2, 0)  # (V, B, N_P)
        # When the blocks cover every prototype, the gradient takes p's memory; otherwise the
        # prototypes outside the partition get a zero gradient.
        full = n_blocks * block_size == n_prototypes
        grad = p.view(n_views, batch_size, n_prototypes) if full else p.new_zeros(n_views, batch_size, n_prototypes)
        g = torch.empty_like(p[0])  # (B, N_P, N_B), reused for every view
        for u in range(n_views):
            torch.sub(grad_student_sum, c[u].unsqueeze(-1), out=g)  # S_k - c
            for v in range(q.shape[0]):
                g.addcmul_(q[v], grad_agreement[u, v].unsqueeze(-1))  # + A_uv q_v,k
            g.mul_(p[u])  # dL/dz in block order
            grad[u].scatter_(-1, index, g.view(batch_size, -1))  # in prototype order, over p[u]
        return grad, None, None


def carp_loss(student_logits, teacher_logits, partition, teacher_views=(0, 1)):
    """carp_objective's (consistency, uniformity), computed through _BlockAssignments.

    Same inputs and outputs as carp_objective. Computed in float32 whatever the input dtype
    (bf16/fp16 softmaxes over 512 logits are too coarse), also when called inside autocast.
    """
    # Autocast off: called inside an autocast region, the products below would run in fp16/bf16.
    with torch.autocast(student_logits.device.type, enabled=False):
        n_views, batch_size, _ = student_logits.shape  # V, B
        n_teacher_views = teacher_logits.shape[0]  # V_t
        n_blocks, block_size = partition.shape  # N_P, N_B

        # Block assignments, reduced to the agreement of every (student view, teacher view) pair and
        # the sums of the assignments over views and images. The teacher is a target: stop-gradient.
        agreement, student_sum, teacher_sum = _BlockAssignments.apply(student_logits, teacher_logits.detach(), partition)

        # ---- L_c: consistency of student view u with teacher view v, u != v -------------------------
        # agreement[u, v, n, b] = sum_k p_b(z_n^u)_k q_b(w_n^v)_k, the probability that the two views
        # pick the same prototype of block b.
        nll = -agreement.clamp(EPS, 1 - EPS).log().mean(dim=(2, 3))  # (V, V_t): l(u, v)
        # Pairs of different views: global view 0 meets teacher view 1 and vice versa, every local view
        # meets both teacher views, 2V - 2 pairs in all. Picked by position (no mask: a boolean index
        # would wait for the GPU to count the pairs).
        pairs = [nll[u, v] for u in range(n_views) for v, t in enumerate(teacher_views) if u != t]  # 2V - 2 of ()
        consistency = torch.stack(pairs).mean()  # L_c

        # ---- L_H: every prototype of a block used equally over the global batch ----------------------
        # Marginal over all student and teacher views of all images of all processes. Teacher entries
        # carry no gradient but count in the mean. Summing locally before the all-reduce sends N_P * N_B
        # numbers per process instead of the (V + V_t) * B * N_P * N_B assignments.
        local_sum = student_sum + teacher_sum  # (N_P, N_B)
        p_bar = global_mean(local_sum, (n_views + n_teacher_views) * batch_size)  # (N_P, N_B)
        neg_entropy = (p_bar * p_bar.clamp(EPS, 1 - EPS).log()).sum(dim=-1)  # (N_P,): -H(pbar_b)
        uniformity = (math.log(block_size) + neg_entropy).mean()  # L_H = mean_b KL(pbar_b || U(N_B))

        return consistency, uniformity


# ============ the marginal over processes ============

class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all processes, and pass gradients back to every process's own summand.

    Forward: y = sum_r x_r, the same on every rank. Every rank then computes the same loss from y,
    so the gradient of the *sum of all ranks' losses* with respect to x_r is sum_r' dL_r'/dy:
    backward all-reduces the incoming gradient. Combined with DDP's averaging of parameter
    gradients over ranks, this makes a W-process step take exactly the gradient of one process on
    the concatenated batch (tests/test_distributed.py checks it).
    """

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad_output):
        grad_output = grad_output.clone()
        dist.all_reduce(grad_output, op=dist.ReduceOp.SUM)
        return grad_output


def global_mean(x, n_local):
    """Mean over the global batch of a per-process sum `x` of `n_local` terms.

    In a single process this is x / n_local. Under a process group, it is the sum of the
    x of every rank divided by the total count, with gradients flowing to the local x.
    Every rank must contribute the same n_local (the training sampler drops the last batch).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(x) / (n_local * dist.get_world_size())
    return x / n_local
