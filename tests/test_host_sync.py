"""No host-device synchronisation in a training step, outside fp16's gradient scaler.

A GPU runs ahead of the Python process only while the process never waits for it: an `.item()`, a
`bool()` of a tensor, a boolean-mask index or `nonzero` (the GPU must count before the output's shape
is known), a copy to the host, or a copy to the GPU from pageable memory (`.to(device)` without
non_blocking) each make it wait for the GPU's whole queue. On CUDA, torch.cuda.set_sync_debug_mode
finds them; on the CPU nothing waits, so SyncFinder finds them by construction: it records every
such operation (torch's dispatcher sees the aten operations, and the few tensor methods that copy
are wrapped) while pretrain.py's train_one_epoch runs, outside what may wait: the log line's and
the epoch's statistics, the checkpoint, fetching the next batch (data loading, on the CPU) and the
batched views' choices, made on the CPU from CPU tensors.
"""
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import checkpointing
import data
import loss
import pretrain
import train_stats
from distributed import device_type

ROOT = Path(__file__).resolve().parents[1]
TORCH = Path(torch.__file__).resolve().parent
WRAPPERS = ("record", "__torch_dispatch__", "checked_to", "wrapped", "checked_tensor")  # this file's, below
aten = torch.ops.aten

# aten operations that make the host wait for the device
WAITING = {aten._local_scalar_dense.default: ".item() / bool() / float() of a tensor", aten.nonzero.default: "nonzero",
           aten.masked_select.default: "masked_select", aten.is_nonzero.default: "bool() of a tensor"}
INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


class SyncFinder(TorchDispatchMode):
    """Records, while `active`, every operation that would make the host wait for a GPU."""

    def __init__(self, cuda=False):
        super().__init__()
        self.found, self.cuda, self._active = [], cuda, False

    @property
    def active(self):
        return self._active

    @active.setter
    def active(self, value):
        """On CUDA, its sync debug mode raises at any synchronisation while the finder is active."""
        self._active = value
        if self.cuda:
            torch.cuda.set_sync_debug_mode("error" if value else "default")

    def record(self, what, repository_only=False):
        """Record `what` with the repository's line that led to it; `repository_only`: not when PyTorch
        calls it itself (its own copies within one device, as in clip_grad, stay on the device)."""
        if not self.active:
            return
        stack = [f for f in traceback.extract_stack() if f.name not in WRAPPERS]  # ... the caller
        if repository_only and Path(stack[-1].filename).resolve().is_relative_to(TORCH):
            return
        ours = [f for f in stack if Path(f.filename).resolve().parent in (ROOT, ROOT / "tests")]
        where = ours[-1] if ours else stack[-1]
        self.found.append(f"{what} at {Path(where.filename).name}:{where.lineno}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in WAITING:
            self.record(WAITING[func])
        elif func in INDEXING and any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
                                      if i is not None):
            self.record("a boolean-mask index")
        return func(*args, **(kwargs or {}))


def copies_that_wait(finder, monkeypatch):
    """Wrap the tensor methods that copy between host and device: a copy to a device without
    non_blocking=True, .cpu(), .tolist() and .numpy(), and torch.tensor(data, device=...)."""
    to, tensor = torch.Tensor.to, torch.tensor

    def checked_to(self, *args, **kwargs):
        moves = "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args)
        if moves and not kwargs.get("non_blocking", False):
            finder.record(".to(device) without non_blocking", repository_only=True)
        return to(self, *args, **kwargs)

    def waiting(name):
        method = getattr(torch.Tensor, name)

        def wrapped(self, *args, **kwargs):
            finder.record(f".{name}()", repository_only=True)
            return method(self, *args, **kwargs)
        return wrapped

    def checked_tensor(data, *args, **kwargs):
        if kwargs.get("device") is not None:
            finder.record("torch.tensor(data, device=...), a copy from pageable memory", repository_only=True)
        return tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", checked_to)
    for name in ("cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, waiting(name))
    monkeypatch.setattr(torch, "tensor", checked_tensor)


def paused(finder, function):
    """`function` with the finder off: code that may wait for the GPU."""
    def wrapped(*args, **kwargs):
        active, finder.active = finder.active, False
        try:
            return function(*args, **kwargs)
        finally:
            finder.active = active
    return wrapped


def run_watched(tmp_path, monkeypatch, *flags):
    """A 1-epoch tiny pretrain.py run (4 optimizer steps of 2 forward passes: gradient accumulation)
    with SyncFinder active in train_one_epoch outside what may wait; returns what it found."""
    finder = SyncFinder(cuda=device_type() == "cuda")
    for owner, name in ((train_stats.TrainStats, "log_interval"), (train_stats.TrainStats, "end_epoch"),
                        (train_stats.TrainStats, "start_epoch"), (checkpointing.RunCheckpoint, "save"),
                        (data.BatchedMultiCrop, "draws"), (data.BatchedMultiCrop, "photometric_choices"),
                        (torch.utils.data.DataLoader, "__iter__"), (torch.utils.data.dataloader._BaseDataLoaderIter, "__next__")):
        monkeypatch.setattr(owner, name, paused(finder, getattr(owner, name)))
    train_one_epoch = pretrain.train_one_epoch

    def watched(*args, **kwargs):
        finder.active = True
        try:
            return train_one_epoch(*args, **kwargs)
        finally:
            finder.active = False

    monkeypatch.setattr(pretrain, "train_one_epoch", watched)
    partition_for_step = pretrain.partition_for_step

    def partition_for_the_device(*args, **kwargs):  # the CPU cannot show a copy from pageable memory
        if len(args) + len(kwargs) < 5:
            finder.record("a partition left on the CPU, for carp_loss to copy from pageable memory")
        return partition_for_step(*args, **kwargs)

    monkeypatch.setattr(pretrain, "partition_for_step", partition_for_the_device)
    copies_that_wait(finder, monkeypatch)
    flags = ["--dataset", "synthetic", "--synthetic_images", "32", "--arch", "resnet18", "--global_crops_size", "16",
             "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "32", "--block_size", "8",
             "--batch_size_per_gpu", "4", "--num_workers", "0", "--gradient_accumulation_steps", "2",
             "--log_every", "100", "--checkpoint_every_steps", "0", "--epochs", "1", "--output_dir", str(tmp_path),
             *flags]
    with finder:
        pretrain.main(flags)
    monkeypatch.undo()
    return finder.found


@pytest.mark.parametrize("flags", [[], ["--skip_bad_images", "true", "--clip_grad", "1.0"], ["--batched_views", "true"]],
                         ids=["paper", "bad images counted, clipped", "views per batch"])
def test_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch, flags):
    """pretrain.py's training step (views to the device, the partition, both networks, the CARP loss
    and its backward, LARS, the teacher's EMA, the statistics) makes no operation that waits for a
    GPU, in float32 (no scaler): the partition is made for the training device (copied from pinned
    memory: tests/test_loss.py), L_c's pairs are picked by position, the count of bad images stays on
    the device, the views' sizes are read from their shapes; views drawn per batch on the device take
    their random numbers and which view gets which operation from the CPU (BatchedMultiCrop.draws and
    photometric_choices, CPU work by construction, as data loading). On CUDA the same run also goes through
    CUDA's sync debug mode, which raises at any synchronisation."""
    assert run_watched(tmp_path, monkeypatch, "--use_fp16", "false", *flags) == []


def test_sync_finder_finds_what_waits(monkeypatch):
    """The finder is not blind: .item(), bool(), a boolean-mask index (the form L_c's pairs once had),
    nonzero, .to(device) without non_blocking, .cpu() and torch.tensor(..., device=...) are each found."""
    finder = SyncFinder()
    copies_that_wait(finder, monkeypatch)
    x = torch.arange(6.0).view(3, 2)
    with finder:
        finder.active = True
        x.sum().item()
        bool(x[0, 0] > 0)
        x[torch.tensor([[True, False], [False, True], [True, True]])].mean()
        x.nonzero()
        loss.partition_for_step(8, 4, 0, 0).to("cpu")
        x.to("cpu", non_blocking=True)  # not found: it does not wait
        x.cpu()
        torch.tensor([1, 2], device="cpu")
    monkeypatch.undo()
    assert [f.split(" at ")[0] for f in finder.found] == [
        ".item() / bool() / float() of a tensor", ".item() / bool() / float() of a tensor", "a boolean-mask index",
        "nonzero", ".to(device) without non_blocking", ".cpu()", "torch.tensor(data, device=...), a copy from pageable memory"]
