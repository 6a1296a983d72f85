"""The numeric precision of a pretraining run: the paper's fp16 autocast with a gradient scaler, bf16
autocast, or float32. The loss is computed in float32 in every case (loss.carp_loss).

--use_fp16 auto (the default) is fp16 on CUDA and float32 on a CPU; true forces fp16 on a CPU too,
where most processors have no fp16 arithmetic (slow, but it runs the GPU's precision path, scaler
included, on any machine: tests/test_precision.py); --use_bf16 true takes bf16 instead, and --use_bf16
auto (the CPU demo's recipe) takes it on a CPU with bf16 arithmetic (AVX512-BF16 or AMX on x86), where
it runs the SmallCNN's step about 1.8 times faster than float32; elsewhere auto is --use_bf16 false.
"""
import contextlib

import torch

PRECISION_NAMES = {None: "float32", torch.float16: "fp16 autocast with a gradient scaler",
                   torch.bfloat16: "bf16 autocast"}


def cpu_has_bf16():
    """Whether this CPU computes in bf16 natively (oneDNN's check: AVX512-BF16 or AMX on x86)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch build without the check: as if it had none
        return False


def autocast_dtype(args, device):
    """The precision of the forward passes on `device`: torch.bfloat16 (--use_bf16 true, or auto on a
    CPU with bf16 arithmetic), torch.float16 (--use_fp16 true, or auto on CUDA: the paper's, with the
    gradient scaler), or None (float32)."""
    if args.use_bf16 is True or (args.use_bf16 == "auto" and device.type == "cpu" and cpu_has_bf16()):
        return torch.bfloat16
    if args.use_fp16 is True or (args.use_fp16 == "auto" and device.type == "cuda"):
        return torch.float16
    return None


def autocast_for(args, device):
    """The autocast region of the forward passes (autocast_dtype); none for float32."""
    dtype = autocast_dtype(args, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def gradient_scaler(args, device):
    """fp16's gradient scaler, disabled (a pass-through) in float32 and bf16. Gradients below fp16's
    smallest number would vanish, so the loss is multiplied by a scale (65536 at first) before the
    backward pass; a step whose scaled gradients overflowed is skipped (scaler.step) and the scale
    halved (scaler.update). bf16 has float32's range and needs no scaler."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(args, device) == torch.float16)
