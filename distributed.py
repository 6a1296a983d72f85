"""The process group: one code path for a single process (CPU or one GPU) and for torchrun.

Under torchrun (RANK in the environment) every script joins a process group: NCCL on GPUs, gloo on
CPUs. Without it nothing is initialised and every collective below is a no-op, so the same code runs
and is tested in one plain Python process.

The device: CUDA where a GPU is visible, else the CPU. CARP_DEVICE=cpu (or cuda) in the environment
chooses it for every script, bench.py and the tests (tests/conftest.py makes the tests' default the
CPU, so the suite passes on a GPU machine; CARP_DEVICE=cuda runs them on the GPU). On CUDA, cuDNN
picks its fastest algorithms (torch.backends.cudnn.benchmark) unless the run asks for deterministic
ones (pretrain.py --deterministic: docs/running.md, *Stopping and resuming*).
"""
import os

import torch
import torch.distributed as dist

from cli import UserError

DEVICE_TYPES = ("cpu", "cuda")


def device_type():
    """"cpu" or "cuda": CARP_DEVICE when it is set, else CUDA where a GPU is visible."""
    wanted = os.environ.get("CARP_DEVICE", "").strip().lower()
    if wanted and wanted not in DEVICE_TYPES:
        raise UserError(f"CARP_DEVICE={os.environ['CARP_DEVICE']} is not a device: set it to cpu or cuda, or unset it")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("CARP_DEVICE=cuda but no GPU is visible: set CARP_DEVICE=cpu, or unset it")
    return wanted or ("cuda" if torch.cuda.is_available() else "cpu")


def choose_device(kind, local_rank, n_gpus):
    """The device of the process with `local_rank` on its machine, which sees `n_gpus` GPUs.

    One GPU visible: that one (device 0), also for local rank 3 (launchers such as SLURM's give each
    process only its own GPU, through CUDA_VISIBLE_DEVICES). More: GPU number local_rank, which must
    exist."""
    if kind == "cpu":
        return torch.device("cpu")
    if n_gpus == 1:
        return torch.device("cuda", 0)
    if local_rank >= n_gpus:
        raise UserError(f"LOCAL_RANK {local_rank} but this process sees {n_gpus} GPUs: start at most {n_gpus} "
                         f"processes on this machine (torchrun --nproc_per_node {n_gpus}), or CARP_DEVICE=cpu")
    return torch.device("cuda", local_rank)


def set_cudnn(deterministic=False):
    """cuDNN's choice of algorithms on CUDA: the fastest for each shape, found by timing at its first
    use (benchmark), or deterministic ones (the same bits at every run, at a cost not yet measured)."""
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:  # (without the flag, a setting the caller made is left as it is)
        torch.backends.cudnn.deterministic = True
        # cuBLAS needs a fixed workspace to be deterministic; set before the first matrix product.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def init_distributed(deterministic=False):
    """(rank, world_size, device). Under torchrun: this process's GPU (choose_device) or the CPU.
    deterministic: cuDNN's deterministic algorithms on CUDA (set_cudnn), else its fastest."""
    kind = device_type()
    if kind == "cuda":
        set_cudnn(deterministic)
    if "RANK" not in os.environ:
        return 0, 1, torch.device(kind)
    device = choose_device(kind, int(os.environ["LOCAL_RANK"]), torch.cuda.device_count() if kind == "cuda" else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
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


def to_device(tensor, device):
    """A tensor made on the CPU (random draws, a partition, indices), copied to `device` without making
    the CPU wait for the GPU: a copy from pageable memory would wait for the GPU's whole queue, one
    from pinned (page-locked) memory is queued behind it. On the CPU: the tensor itself."""
    if torch.device(device).type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def gather(tensor):
    """[tensor of rank 0, tensor of rank 1, ...] on the main process, None on the others (every process
    passes a tensor of the same shape): what only the main process reads need not fill the others' memory."""
    if not is_initialized():
        return [tensor]
    tensors = [torch.empty_like(tensor) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather(tensor.contiguous(), tensors, dst=0)
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
