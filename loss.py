"""The CARP objective: consistent assignment of views over random partitions.

Notation (as in ../shared/docs/carp-method.md and the paper, arXiv:2310.12692):

    K    number of prototypes (--out_dim, paper 65536)
    N_B  prototypes per block (--partition_size, paper 512)
    N_P  blocks per partition, N_P = K // N_B (paper 128)
    V    student views per image (2 global + M local, paper 8)
    V_t  teacher views per image (the 2 global views)
    B    images per process

Each training step draws a *partition*: a random split of the K prototypes into N_P disjoint
*blocks* of N_B prototypes. Inside every block, a view is softly assigned to one of the block's
prototypes with a softmax over the block's logits. The loss asks two things of these assignments:

    consistency  L_c = mean over pairs (u, v), u != v, images n and blocks b of
                       -log clamp( <p_b(z_n^u), q_b(w_n^v)>, eps, 1 - eps )
                 the student view u and the teacher view v pick the same prototype of block b;

    entropy      L_H = mean over blocks b of  log N_B + sum_k pbar_b,k log clamp(pbar_b,k, eps, 1 - eps)
                     = mean over b of KL(pbar_b || uniform(N_B))
                 where pbar_b is the block's assignment averaged over every view (student and
                 teacher) of every image of the global batch: all prototypes of a block get used.

The training loss is L_c + L_H. ("entropy" is the authors' name for the second term, kept so that
logs compare; it is a KL divergence to the uniform distribution and is 0 at uniform usage.)

Everything here is plain tensor code. The only collective is the all-reduce of the block marginal,
which is the identity when no process group is initialised, so the loss runs and tests the same in
one process.
"""
import math

import torch
import torch.distributed as dist

EPS = torch.finfo(torch.float32).eps  # NOTE(paper): eps is float32 machine epsilon, ~1.19e-7


def random_partition(n_prototypes, partition_size, generator=None):
    """Split the prototype indices 0..K-1 into N_P = K // N_B random disjoint blocks of N_B.

    Returns a LongTensor of shape (N_P, N_B). When N_B does not divide K, the K - N_P * N_B
    prototypes that fall off the end of the permutation take no part in this step's loss
    (a different set each step).
    """
    if not 1 <= partition_size <= n_prototypes:
        raise ValueError(
            f"partition_size={partition_size} must be between 1 and the number of prototypes "
            f"(out_dim={n_prototypes}); the paper uses 512 of 65536. Choose a partition_size "
            f"that divides out_dim."
        )
    n_blocks = n_prototypes // partition_size  # N_P
    permutation = torch.randperm(n_prototypes, generator=generator)  # (K,)
    return permutation[: n_blocks * partition_size].view(n_blocks, partition_size)  # (N_P, N_B)


def partition_for_step(n_prototypes, partition_size, seed, step):
    """The partition of training step `step`, identical on every process and after a resume.

    NOTE(authors' code): the authors draw the permutation on rank 0 and broadcast it. A generator
    seeded from (seed, step) gives every rank the same partition with no communication, and a run
    resumed from a checkpoint draws exactly the partitions it would have drawn.
    """
    generator = torch.Generator().manual_seed((seed << 32) + step)  # distinct for every (seed, step < 2**32)
    return random_partition(n_prototypes, partition_size, generator)


def block_softmax(logits, partition):
    """Softmax inside every block of the partition, in float32.

    logits: (..., K) raw prototype scores <c_k / ||c_k||, z> (no temperature, as in the paper).
    partition: (N_P, N_B) prototype indices.
    Returns (..., N_P, N_B): one distribution over N_B prototypes per block.
    """
    # Indexing the last axis with an (N_P, N_B) index tensor gathers all blocks at once.
    return logits.float()[..., partition].softmax(dim=-1)  # (..., N_P, N_B)


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


def carp_loss(student_logits, teacher_logits, partition):
    """The two terms of the CARP objective for one step.

    student_logits: (V, B, K) logits of every student view (2 global first, then the locals).
    teacher_logits: (V_t, B, K) logits of the teacher's global views, V_t = 2.
    partition:      (N_P, N_B) prototype indices of this step's blocks.
    Returns (consistency, entropy), 0-dim float32 tensors; the training loss is their sum.
    Computed in float32 whatever the input dtype (bf16/fp16 softmaxes over 512 logits are too coarse).
    """
    n_views, batch_size, _ = student_logits.shape  # V, B
    n_teacher_views = teacher_logits.shape[0]  # V_t
    n_blocks, block_size = partition.shape  # N_P, N_B

    # Block assignments. The teacher is a target: stop-gradient.
    p = block_softmax(student_logits, partition)  # (V, B, N_P, N_B)
    q = block_softmax(teacher_logits.detach(), partition)  # (V_t, B, N_P, N_B)

    # ---- L_c: consistency of student view u with teacher view v, u != v -------------------------
    # agreement[u, v, n, b] = sum_k p_b(z_n^u)_k q_b(w_n^v)_k, the probability that the two views
    # pick the same prototype of block b. einsum because it reads like the equation.
    agreement = torch.einsum("ubpk,vbpk->uvbp", p, q)  # (V, V_t, B, N_P)
    nll = -agreement.clamp(EPS, 1 - EPS).log().mean(dim=(2, 3))  # (V, V_t): l(u, v)
    # Pairs u != v: global view 0 meets teacher view 1 and vice versa, every local view meets
    # both teacher views, 2V - 2 pairs in all.
    same_view = torch.eye(n_views, n_teacher_views, dtype=torch.bool, device=nll.device)  # (V, V_t)
    consistency = nll[~same_view].mean()  # L_c

    # ---- L_H: every prototype of a block used equally over the global batch ----------------------
    # Marginal over all student and teacher views of all images of all processes. Teacher entries
    # carry no gradient but count in the mean. Summing locally before the all-reduce sends N_P * N_B
    # numbers per process instead of the (V + V_t) * B * N_P * N_B assignments.
    local_sum = p.sum(dim=(0, 1)) + q.sum(dim=(0, 1))  # (N_P, N_B)
    p_bar = global_mean(local_sum, (n_views + n_teacher_views) * batch_size)  # (N_P, N_B)
    neg_entropy = (p_bar * p_bar.clamp(EPS, 1 - EPS).log()).sum(dim=-1)  # (N_P,): -H(pbar_b)
    entropy = (math.log(block_size) + neg_entropy).mean()  # L_H = mean_b KL(pbar_b || U(N_B))

    return consistency, entropy
