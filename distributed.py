"""The process group: one code path for a single process (CPU or one GPU) and for torchrun.

Under torchrun (RANK in the environment) every script joins a process group: NCCL on GPUs, gloo on
CPUs. Without it nothing is initialised and every collective below is a no-op, so the same code runs
and is tested in one plain Python process.
"""
import os

import torch
import torch.distributed as dist


def init_distributed():
    """(rank, world_size, device). Under torchrun: this process's GPU (LOCAL_RANK) or the CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend)
    else:
        # torchrun keeps one key-value store for every restart of the group (--max_restarts). Keys
        # that the processes of an earlier attempt wrote there (their addresses) would send the new
        # processes to peers that are gone ("Connection refused"): each attempt gets keys of its own.
        store, rank, world_size = next(dist.rendezvous("env://"))
        dist.init_process_group(backend, store=dist.PrefixStore(f"carp_attempt_{restart}", store), rank=rank,
                                world_size=world_size)
    return dist.get_rank(), dist.get_world_size(), device


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def is_main_process():
    """Rank 0, or the only process: the one that prints and writes files."""
    return not is_initialized() or dist.get_rank() == 0


def rank():
    return dist.get_rank() if is_initialized() else 0


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def all_reduce(tensor, op=None):
    """In-place all-reduce (sum by default) over the processes; the identity in a single process."""
    if is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor):
    """[tensor of rank 0, tensor of rank 1, ...] (every process passes a tensor of the same shape)."""
    if not is_initialized():
        return [tensor]
    tensors = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(tensors, tensor.contiguous())
    return tensors


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] for any picklable object (e.g. every process's RNG state)."""
    if not is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def destroy():
    """Leave the process group at the end of a script (nothing to do in a single process)."""
    if is_initialized():
        dist.destroy_process_group()
