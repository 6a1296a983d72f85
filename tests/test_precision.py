"""The paper's precision on any machine: fp16 autocast with the gradient scaler (and bf16 autocast),
which pretrain.py runs by default on CUDA, exercised on the CPU with --use_fp16 true / --use_bf16 true.

Every test runs on the CPU; the ones parametrised by device run again on the GPU when the tests run
there (CARP_DEVICE=cuda: tests/conftest.py; their ids end in [cuda]). Tolerances are in units of the format's rounding: u = 2^-11 for fp16
(11 significant bits), 2^-8 for bf16 (8).
"""
import argparse
import json

import pytest
import torch

import backbones
import loss
import model
import optim
import precision
import pretrain
from distributed import device_type
from precision import autocast_dtype, autocast_for, gradient_scaler
from backbones import SmallCNN
from model import CARPHead, MultiCropWrapper
from train_stats import TrainStats

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(device_type() != "cuda",
                                                                 reason="needs CARP_DEVICE=cuda and a CUDA GPU"))]
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
PRECISION_FLAGS = {None: dict(use_fp16=False, use_bf16=False), torch.float16: dict(use_fp16=True, use_bf16=False),
                   torch.bfloat16: dict(use_fp16=False, use_bf16=True)}


def networks(n_prototypes, device, logit_scale=1.0):
    """Student and teacher: SmallCNN + a narrow CARP head (hidden 64, z of 32) with K prototypes, the
    teacher a copy of the student. logit_scale multiplies the projector's output layer, so that the
    logits span what training gives them (|s_k| up to tens) rather than the < 1 of initialisation."""
    torch.manual_seed(0)

    def network():
        head = CARPHead(256, n_prototypes, use_bn=True, norm_last_layer=True, hidden_dim=64, bottleneck_dim=32)
        with torch.no_grad():
            head.mlp[-1].weight.mul_(logit_scale)
        return MultiCropWrapper(SmallCNN(), head)

    memory_format = backbones.preferred_memory_format("small_cnn", device)  # channels_last, as pretrain.py
    student = network().to(device, memory_format=memory_format)
    teacher = network().to(device, memory_format=memory_format)
    model.start_teacher(student, teacher)
    return student, teacher


def random_views(batch_size, device, seed=0):
    """2 global views of 8 x 8 pixels and 2 local views of 6 x 6: (B, 3, H, W) each, channels_last."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [8, 8, 6, 6]
    return [torch.randn(batch_size, 3, s, s, generator=generator).to(device, memory_format=torch.channels_last)
            for s in sizes]


def test_use_fp16_auto_is_fp16_on_a_gpu_and_float32_on_a_cpu():
    """--use_fp16 auto (the default): fp16 autocast and the scaler on CUDA, float32 on CPU; true: fp16
    on both; false: float32 on both; --use_bf16 true: bf16 on both, without a scaler."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    expected = {(): (torch.float16, None), ("--use_fp16", "true"): (torch.float16, torch.float16),
                ("--use_fp16", "false"): (None, None), ("--use_bf16", "true"): (torch.bfloat16, torch.bfloat16),
                ("--use_fp16", "true", "--use_bf16", "true"): (torch.bfloat16, torch.bfloat16)}
    for flags, (on_cuda, on_cpu) in expected.items():
        _, args = pretrain.get_args(list(flags))
        assert (autocast_dtype(args, cuda), autocast_dtype(args, cpu)) == (on_cuda, on_cpu), flags
        assert gradient_scaler(args, cpu).is_enabled() == (on_cpu == torch.float16)
    assert pretrain.get_args([])[1].use_fp16 == "auto"


@pytest.mark.parametrize("has_bf16", [True, False], ids=["a CPU with bf16", "a CPU without"])
def test_use_bf16_auto_is_bf16_only_on_a_cpu_with_bf16_arithmetic(monkeypatch, has_bf16):
    """--use_bf16 auto (the CPU demo's recipe): bf16 on a CPU that computes in bf16, float32 on one that
    does not (emulated bf16 would be slower), and on CUDA what --use_fp16 auto gives (fp16)."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    _, args = pretrain.get_args(["--use_bf16", "auto"])
    assert autocast_dtype(args, torch.device("cpu")) == (torch.bfloat16 if has_bf16 else None)
    assert autocast_dtype(args, torch.device("cuda")) == torch.float16
    assert not gradient_scaler(args, torch.device("cpu")).is_enabled()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_step_in_fp16_or_bf16_has_the_float32_loss_at_the_paper_sizes(device, dtype):
    """K = 65536 prototypes in blocks of N_B = 512 (the paper's), 2 + 2 views of 8 images, logits up
    to ~20: pretrain.forward_backward under autocast makes the logits in fp16 (bf16) and the loss in
    float32 from them; the loss and each of its terms equal the float32 ones to 2u of the loss
    (fp16: 2 x 2^-11 x ~7.3 = 0.007), and the unscaled gradients are finite."""
    device = torch.device(device)
    student, teacher = networks(65536, device, logit_scale=30.0)
    views = random_views(8, device)
    partition = loss.partition_for_step(65536, 512, seed=0, forward_pass=0).to(device)  # (128, 512)
    results = {}
    for precision in (None, dtype):
        args = argparse.Namespace(**PRECISION_FLAGS[precision])
        scaler = gradient_scaler(args, device)
        logits, total, consistency, uniformity = pretrain.forward_backward(
            student, teacher, views, partition, autocast_for(args, device), scaler)
        assert logits.dtype == (precision or torch.float32) and total.dtype == torch.float32
        scaler.unscale_(torch.optim.SGD(student.parameters(), lr=0.0))  # the true gradients, as optimizer_step
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
        student.zero_grad(set_to_none=True)
        results[precision] = torch.stack([total, consistency, uniformity]).detach().cpu()
    reference = results[None]
    assert reference[0] > 6.0  # about log N_B = 6.24 of consistency plus a uniformity term of ~1
    tolerance = 2 * UNIT_ROUNDOFF[dtype] * reference[0].item()
    assert (results[dtype] - reference).abs().max().item() <= tolerance


@pytest.mark.parametrize("device", DEVICES)
def test_an_overflowed_fp16_step_is_skipped_and_left_out_of_the_grad_norm(device):
    """fp16 with the scaler: a step whose gradients hold an inf (an overflow) is skipped by
    pretrain.optimizer_step (the student's weights stay exactly as they were), the scale halves
    (65536 -> 32768), and the log's grad_norm is the mean of the finite steps only (here the one
    good step before it)."""
    device = torch.device(device)
    student, teacher = networks(64, device)
    args = argparse.Namespace(use_fp16=True, use_bf16=False, out_dim=64, block_size=16,
                              gradient_accumulation_steps=1, batch_size_per_gpu=8)
    scaler = gradient_scaler(args, device)
    optimizer = optim.build_optimizer("lars", student, momentum=0.9, weight_decay=0.0)
    stats = TrainStats(args, 1, device, show_progress=False)
    stats.start_epoch(0, 2)
    norms, weights = [], []
    for step in range(2):
        partition = loss.partition_for_step(64, 16, seed=0, forward_pass=step).to(device)
        logits, total, consistency, uniformity = pretrain.forward_backward(
            student, teacher, random_views(8, device, seed=step), partition, autocast_for(args, device), scaler)
        stats.add_forward(step, total, consistency, uniformity, logits)
        if step == 1:
            student.head.mlp[0].weight.grad[0, 0] = float("inf")  # an overflow in one gradient
        scale = scaler.get_scale()
        weights.append([p.detach().clone() for p in student.parameters()])
        norms.append(pretrain.optimizer_step(student, teacher, optimizer, scaler, lr=0.1, weight_decay=1e-6,
                                             teacher_momentum=0.99))
        stats.add_optimizer_step(norms[-1])
        after = list(student.parameters())
        if step == 0:  # a good step: it moves the weights, and the scale stays
            assert torch.isfinite(norms[0]) and scaler.get_scale() == scale == 65536.0
            assert any(not torch.equal(w, p) for w, p in zip(weights[0], after))
        else:  # the overflowed step: skipped, and the scale halved
            assert not torch.isfinite(norms[1]) and scaler.get_scale() == scale / 2 == 32768.0
            assert all(torch.equal(w, p) for w, p in zip(weights[1], after))
    record = stats.interval(epoch=0, lr=0.1, wd=1e-6, momentum=0.99)
    assert record["grad_norm"] == pytest.approx(norms[0].item(), rel=1e-6)


# A short pretrain.py run: the SmallCNN on synthetic images, 16 / 8-pixel views drawn per batch,
# K = 256 in blocks of 16, 200 images in 10 steps of 20 (5 when resumed below: 100 images).
SHORT_RUN = ["--dataset", "synthetic", "--synthetic_images", "200", "--arch", "small_cnn", "--hidden_dim", "64",
             "--bottleneck_dim", "32", "--out_dim", "256", "--block_size", "16", "--global_crops_size", "16",
             "--local_crops_number", "2", "--local_crops_size", "8", "--batched_views", "true",
             "--batch_size_per_gpu", "20", "--optimizer", "adamw", "--lr", "0.004", "--momentum_teacher", "0.9",
             "--num_workers", "0", "--log_every", "1"]


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_a_short_run_in_fp16_or_bf16_follows_the_float32_run(tmp_path, capsys):
    """pretrain.py on the CPU with --use_fp16 true (the scaler on) and --use_bf16 true (no scaler)
    follows the float32 run of the same seed for its 10 steps: each step's loss equals float32's to
    2u of the loss, as a single step does (test above); no step was skipped (the scale stays 65536);
    and the weights moved the way float32's did: the two runs' weights are less than half as far
    apart as float32's moved from their start (measured: 0.18 for fp16, 0.27 for bf16; AdamW's
    normalised steps turn rounding-sized gradient differences into step-sized ones where a gradient
    is near 0; a run that took no step would be 1.0). Whether fp16 and bf16 also reach
    float32's k-NN on the digits is measured by `bench.py --sections precision` (docs/performance.md,
    *The paper's precision on a CPU*): too slow on a CPU for the tests."""
    losses, weights = {}, {}
    for name, flags in (("float32", ["--use_fp16", "false"]), ("fp16", ["--use_fp16", "true"]),
                        ("bf16", ["--use_bf16", "true"])):
        pretrain.main(SHORT_RUN + ["--epochs", "1", "--output_dir", str(tmp_path / name), *flags])
        losses[name] = torch.tensor([r["loss"] for r in read_log(tmp_path / name) if "step" in r])
        checkpoint = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)
        assert checkpoint["args"]["use_fp16"] == (name == "fp16")  # stored resolved: what the run computed in
        assert (checkpoint["scaler"].get("scale") == 65536.0) if name == "fp16" else checkpoint["scaler"] == {}
        weights[name] = checkpoint["student"]
    assert "fp16 autocast with a gradient scaler" in capsys.readouterr().out
    assert len(losses["float32"]) == 10 and losses["float32"][0] > 2.7  # about log N_B = log 16 = 2.77

    parser, args = pretrain.get_args(SHORT_RUN)
    pretrain.check_args(parser, args)
    start, _ = pretrain.student_and_teacher(args, torch.device("cpu"), torch.channels_last, 1)  # the seed's weights
    names = [k for k, v in start.state_dict().items() if v.is_floating_point() and "running" not in k]

    def flat(state):  # every learned weight as one vector
        return torch.cat([state[k].flatten().float() for k in names])

    moved = (flat(weights["float32"]) - flat(start.state_dict())).norm()
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        tolerance = 2 * UNIT_ROUNDOFF[dtype] * losses["float32"]
        assert ((losses[name] - losses["float32"]).abs() <= tolerance).all(), name
        assert (flat(weights[name]) - flat(weights["float32"])).norm() < 0.5 * moved, name


def test_a_run_resumes_in_another_precision(tmp_path, capsys):
    """Precision may change at a resume (NonFiniteLoss suggests --use_fp16 false): a float32 epoch
    resumed in fp16 starts a fresh scaler (the checkpoint's scaler state is empty), and an fp16
    epoch resumed in float32 ignores the scaler's state; the 3 epochs of 5 steps end at step 15."""
    run = SHORT_RUN + ["--synthetic_images", "100", "--output_dir", str(tmp_path)]
    pretrain.main(run + ["--epochs", "1"])
    pretrain.main(run + ["--epochs", "2", "--use_fp16", "true"])
    assert "was trained without fp16: the gradient scaler starts afresh" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["scaler"]["scale"] == 65536.0
    pretrain.main(run + ["--epochs", "3"])
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["step"] == 15 and checkpoint["scaler"] == {}
    assert [r["epoch"] for r in read_log(tmp_path) if r.get("epoch_summary")] == [0, 1, 2]
