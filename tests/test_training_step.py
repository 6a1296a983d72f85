"""One optimizer step of pretrain.py against a reference step written from the paper's equations.

The reference below uses none of pretrain.py's functions (nor loss.py's, optim.py's or the schedule
code). From the networks' state before optimizer step s it draws the step's views from its images,
the partition of every forward pass, the teacher and student logits, the two terms of the loss and
the gradient (summed over the micro-steps of gradient accumulation, each loss divided by their
number), clips it, and applies the optimizer's update at the step's learning rate and weight decay
and the teacher's EMA with the step's momentum. The real training loop runs the same step, and the
test compares them value for value: the views, the loss terms of every forward pass, the gradient
the optimizer applied, and every tensor of the student, the teacher and the optimizer after the
step. Step s is in the second epoch (the schedules have moved) and the teacher has moved away from
the student (momentum 0.5 at the start), so a step that used the student as its own target, the
first step's momentum or learning rate, one partition for both micro-steps or undivided gradients
gives other numbers.
"""
import copy
import json
import math

import pytest
import torch

import checkpointing
import data
import pretrain
import train_stats
from backbones import SmallCNN
from model import CARPHead, MultiCropWrapper

EPS = torch.finfo(torch.float32).eps
K, N_B, IMAGES, BATCH, SIZE, LOCAL_SIZE, M = 32, 8, 16, 4, 16, 8, 1  # M local views: V = 3 student views
EPOCHS, SEED = 2, 3
FLAGS = {"lr": 2.0, "min_lr": 0.01, "warmup_epochs": 1, "weight_decay": 0.04, "weight_decay_end": 0.4,
         "momentum_teacher": 0.5, "momentum_teacher_end": 0.95}


# ---------------------------------------------------------------- the reference step ---------------

def cosine(base, final, total_steps, warmup_steps, step):
    """A schedule's value at `step`: a linear ramp from 0 reaching `base` at the last warm-up step,
    then a half cosine from `base` (first step after the warm-up) towards `final`."""
    if step < warmup_steps:
        return base * step / (warmup_steps - 1)
    t, length = step - warmup_steps, total_steps - warmup_steps
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / length))


def reference_views(epoch, batch_in_epoch, batched):
    """The views of the `batch_in_epoch`-th batch of `epoch`: the images in the order of a shuffle
    seeded with seed + epoch (torch's DistributedSampler), each image's views drawn from a
    generator seeded by (seed, epoch, image index)."""
    order = torch.randperm(IMAGES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    indices = order[batch_in_epoch * BATCH:(batch_in_epoch + 1) * BATCH]
    seeds = [data.view_seed(SEED, epoch, i) for i in indices]
    crops = ((0.4, 1.0), (0.1, 0.4), M, SIZE, LOCAL_SIZE)
    if batched:
        images = data.build_dataset("synthetic", "pretrain", data.fixed_size_uint8(SIZE), synthetic_images=IMAGES,
                                    synthetic_size=SIZE)
        batch = torch.stack([images[i][0] for i in indices])
        return data.BatchedMultiCrop(*crops)(batch, torch.tensor(seeds))
    images = data.build_dataset("synthetic", "pretrain", synthetic_images=IMAGES, synthetic_size=SIZE)
    augmentation = data.MultiCropAugmentation(*crops)
    per_image = [augmentation(images[i][0], torch.Generator().manual_seed(s)) for i, s in zip(indices, seeds)]
    return [torch.stack(views) for views in zip(*per_image)]  # 2 + M views, each (B, 3, H, W)


def reference_partition(forward_pass):
    """A random permutation of the K prototypes cut into K / N_B blocks, from a generator seeded by
    (seed, forward pass) (forward pass + seed x 0x9E3779B9 mod 2**32: torch keeps 32 bits of a
    seed): a fresh partition for every forward pass, micro-steps included."""
    generator = torch.Generator().manual_seed((forward_pass + SEED * 0x9E3779B9) % 2 ** 32)
    return torch.randperm(K, generator=generator).view(K // N_B, N_B)  # (N_P, N_B)


def reference_loss(student_logits, teacher_logits, partition):
    """L_c and L_H as the paper writes them (block softmax of raw logits, u != v, KL to uniform of
    the block marginal over every student and teacher view of the batch)."""
    p = student_logits[..., partition].softmax(-1)  # (V, B, N_P, N_B)
    q = teacher_logits.detach()[..., partition].softmax(-1)  # (2, B, N_P, N_B)
    pairs = [-(p[u] * q[v]).sum(-1).clamp(EPS, 1 - EPS).log().mean() for u in range(len(p)) for v in range(2) if u != v]
    p_bar = torch.cat([p, q]).mean(dim=(0, 1))  # (N_P, N_B)
    uniformity = (math.log(N_B) + (p_bar * p_bar.clamp(EPS, 1 - EPS).log()).sum(-1)).mean()
    return torch.stack(pairs).mean(), uniformity


def block_entropy(student_logits, teacher_logits, partition):
    """The mean over blocks of the entropy of a block's batch marginal (every student and teacher view)."""
    p_bar = torch.cat([student_logits, teacher_logits])[..., partition].softmax(-1).mean(dim=(0, 1))  # (N_P, N_B)
    return -(p_bar * p_bar.log()).sum(-1).mean().item()


def network(head_flags):
    return MultiCropWrapper(SmallCNN(), CARPHead(256, K, use_bn=True, norm_last_layer=head_flags.get("norm_last_layer", True),
                                                 hidden_dim=16, bottleneck_dim=8))


def reference_forward_backward(before, step, steps_per_epoch, accumulation, clip_grad, batched, head_flags, seen=None):
    """The forward passes of optimizer step `step` from the run's state `before` (student, teacher
    and optimizer state dicts) and their gradient. Returns (the views and the loss terms of each
    forward pass, the gradient to apply by parameter name, the student and the teacher networks);
    each forward pass's mean block entropy and its student views' argmax prototypes are in `seen`."""
    student, teacher = network(head_flags), network(head_flags)
    student.load_state_dict(before["student"])
    teacher.load_state_dict(before["teacher"])
    # The SmallCNN runs in channels_last on a CPU, as in training: the same numbers in another memory
    # layout differ by about 1 % in the gradient of the first convolutions (their batch statistics
    # over 4 small images amplify the last bits), more than the comparison below allows.
    student, teacher = (n.to(memory_format=torch.channels_last) for n in (student, teacher))
    epoch = step // steps_per_epoch
    all_views, terms = [], []
    for micro_step in range(accumulation):
        views = reference_views(epoch, (step - epoch * steps_per_epoch) * accumulation + micro_step, batched)
        all_views.append(views)
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.no_grad():
            teacher_logits = teacher(views[:2])  # (2, B, K): the teacher sees the 2 global views
        student_logits = student(views)  # (V, B, K)
        partition = reference_partition(step * accumulation + micro_step)
        consistency, uniformity = reference_loss(student_logits, teacher_logits, partition)
        if seen is not None:
            seen.append((block_entropy(student_logits.detach(), teacher_logits, partition),
                         set(student_logits.argmax(-1).flatten().tolist())))
        ((consistency + uniformity) / accumulation).backward()
        terms.append((consistency + uniformity, consistency, uniformity))
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    if clip_grad:  # one norm over all the gradients together
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        grads = {n: g * min(1.0, clip_grad / (norm.item() + 1e-6)) for n, g in grads.items()}
    return all_views, terms, grads, student, teacher


def reference_update(before, grads, student, teacher, step, steps_per_epoch, accumulation, optimizer):
    """The optimizer's update of `student` with `grads` at the learning rate and weight decay of
    `step`, then the teacher's EMA with that step's momentum (in place). Returns the optimizer's
    state, in the optimizer's order of parameters."""
    total = EPOCHS * steps_per_epoch
    lr = cosine(FLAGS["lr"] * BATCH * accumulation / 256, FLAGS["min_lr"], total, FLAGS["warmup_epochs"] *
                steps_per_epoch, step)
    wd = cosine(FLAGS["weight_decay"], FLAGS["weight_decay_end"], total, 0, step)
    # Weight matrices and convolutions get weight decay (and LARS's trust ratio); biases, BatchNorm
    # and the prototype norm do not. The optimizer state lists weights first, then the rest.
    params = dict(student.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    decayed = [n for n in trained if params[n].ndim > 1 and not n.endswith("original0")]
    order = decayed + [n for n in trained if n not in decayed]
    state = {order[i]: s for i, s in before["optimizer"]["state"].items()}
    new_state = {}
    with torch.no_grad():
        for n in trained:
            w, g, s = params[n], grads[n], state[n]
            decay = wd if n in decayed else 0.0
            if optimizer == "adamw":  # decoupled weight decay, bias-corrected moments
                t = s["step"].item() + 1
                m = 0.9 * s["exp_avg"] + 0.1 * g
                v = 0.999 * s["exp_avg_sq"] + 0.001 * g * g
                w.mul_(1 - lr * decay)
                w.sub_(lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8))
                new_state[n] = {"step": t, "exp_avg": m, "exp_avg_sq": v}
            elif optimizer == "sgd":  # momentum 0.9 over the decayed gradient
                buf = 0.9 * s["momentum_buffer"] + (g + decay * w)
                w.sub_(lr * buf)
                new_state[n] = {"momentum_buffer": buf}
            else:  # lars: the decayed gradient scaled by 0.001 ||w|| / ||d||; none of it for the rest
                d = g + decay * w
                if n in decayed:
                    d = d * 0.001 * w.norm() / d.norm()
                mu = 0.9 * s["mu"] + d
                w.sub_(lr * mu)
                new_state[n] = {"mu": mu}
        momentum = cosine(FLAGS["momentum_teacher"], FLAGS["momentum_teacher_end"], total, 0, step)
        for n, t in teacher.named_parameters():  # the EMA, after the student's update
            t.copy_(momentum * t + (1 - momentum) * params[n])
    return [new_state[n] for n in order]


# ---------------------------------------------------------------- what the real loop does ----------

def recorded_run(tmp_path, monkeypatch, optimizer, accumulation, clip_grad, batched, head_flags, *extra):
    """Run pretrain.main with a checkpoint after every optimizer step, recording the run's state
    after every step, the views and loss terms of every forward pass and the gradients each
    optimizer step applied."""
    states, views, terms, grads = {}, [], [], []
    save = checkpointing.RunCheckpoint.save

    def saving(self, step, keep_copy=False):
        save(self, step, keep_copy)
        states[step] = copy.deepcopy({"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                                      "optimizer": self.optimizer.state_dict()})

    forward_backward = pretrain.forward_backward

    def recording_forward_backward(student, teacher, step_views, *args, **kwargs):
        views.append([v.clone() for v in step_views])
        return forward_backward(student, teacher, step_views, *args, **kwargs)

    add_forward = train_stats.TrainStats.add_forward

    def recording_add_forward(self, step, loss, consistency, uniformity, *args, **kwargs):
        terms.append((loss.item(), consistency.item(), uniformity.item()))
        return add_forward(self, step, loss, consistency, uniformity, *args, **kwargs)

    build_optimizer = pretrain.build_optimizer

    def recording_optimizer(name, model, *args, **kwargs):
        built = build_optimizer(name, model, *args, **kwargs)
        names = {id(p): n for n, p in model.named_parameters()}
        step = built.step

        def recording_step(*args, **kwargs):
            grads.append({names[id(p)]: p.grad.clone() for g in built.param_groups for p in g["params"]
                          if p.grad is not None})
            return step(*args, **kwargs)

        built.step = recording_step
        return built

    monkeypatch.setattr(checkpointing.RunCheckpoint, "save", saving)
    monkeypatch.setattr(pretrain, "forward_backward", recording_forward_backward)
    monkeypatch.setattr(train_stats.TrainStats, "add_forward", recording_add_forward)
    monkeypatch.setattr(pretrain, "build_optimizer", recording_optimizer)
    flags = ["--dataset", "synthetic", "--synthetic_images", str(IMAGES), "--arch", "small_cnn",
             "--global_crops_size", str(SIZE), "--local_crops_size", str(LOCAL_SIZE), "--local_crops_number", str(M),
             "--global_crops_scale", "0.4", "1", "--local_crops_scale", "0.1", "0.4",
             "--out_dim", str(K), "--block_size", str(N_B), "--hidden_dim", "16", "--bottleneck_dim", "8",
             "--batch_size_per_gpu", str(BATCH), "--gradient_accumulation_steps", str(accumulation),
             "--optimizer", optimizer, "--clip_grad", str(clip_grad), "--batched_views", str(batched).lower(),
             "--norm_last_layer", str(head_flags.get("norm_last_layer", True)).lower(),
             "--use_fp16", "false", "--epochs", str(EPOCHS), "--seed", str(SEED), "--num_workers", "0",
             "--checkpoint_every_steps", "1", "--output_dir", str(tmp_path)]
    flags += [x for k, v in FLAGS.items() for x in (f"--{k}", str(v))]
    pretrain.main(flags + list(extra))
    return states, views, terms, grads


@pytest.mark.parametrize("optimizer, accumulation, clip_grad, batched, head_flags", [
    ("adamw", 1, 0.0, True, {}),
    ("adamw", 2, 0.001, True, {}),
    ("sgd", 2, 0.0, False, {}),
    ("lars", 1, 0.001, False, {"norm_last_layer": False}),
], ids=["adamw", "adamw, 2 micro-steps, clipped", "sgd, 2 micro-steps, per-image views",
        "lars, clipped, learned prototype norm"])
def test_a_training_step_is_the_reference_step(tmp_path, monkeypatch, optimizer, accumulation, clip_grad, batched,
                                               head_flags):
    """Optimizer step s = steps_per_epoch + 1 (epoch 1) of the real loop equals the reference step
    from the same state: views, loss terms of every forward pass, the applied gradient, and every
    student, teacher and optimizer tensor after the step."""
    states, views, terms, grads = recorded_run(tmp_path, monkeypatch, optimizer, accumulation, clip_grad, batched,
                                               head_flags)
    steps_per_epoch = IMAGES // (BATCH * accumulation)
    step = steps_per_epoch + 1
    assert sorted(states) == list(range(1, EPOCHS * steps_per_epoch + 1))
    before, after = states[step], states[step + 1]
    # The teacher has moved away from the student: a target equal to the student would show.
    assert max((before["teacher"][n] - w).abs().max().item() for n, w in before["student"].items()
               if w.is_floating_point()) > 1e-2

    ref_views, ref_terms, ref_grads, student, teacher = reference_forward_backward(
        before, step, steps_per_epoch, accumulation, clip_grad, batched, head_flags)
    for micro_step in range(accumulation):
        forward_pass = step * accumulation + micro_step
        assert len(views[forward_pass]) == 2 + M
        for real, ref in zip(views[forward_pass], ref_views[micro_step]):
            torch.testing.assert_close(real, ref, rtol=0, atol=1e-6)
        assert terms[forward_pass] == pytest.approx([t.item() for t in ref_terms[micro_step]], rel=1e-5, abs=1e-6)
    real_grads = grads[step]
    assert real_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(real_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    if clip_grad:
        assert torch.sqrt(sum((g ** 2).sum() for g in real_grads.values())).item() == pytest.approx(clip_grad, rel=1e-3)
    # The update from the gradient the loop applied (equal to the reference's, checked above): a
    # gradient that is 0 in exact arithmetic (the bias of a layer followed by BatchNorm) is rounding
    # noise, which AdamW's normalisation would turn into steps of full size that no two programs share.
    optimizer_state = reference_update(before, real_grads, student, teacher, step, steps_per_epoch, accumulation,
                                       optimizer)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(after["student"][name], value, rtol=1e-4, atol=1e-6, msg=f"student {name}")
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(after["teacher"][name], value, rtol=1e-4, atol=1e-6, msg=f"teacher {name}")
    assert sorted(after["optimizer"]["state"]) == list(range(len(optimizer_state)))
    for i, saved in after["optimizer"]["state"].items():
        for key, value in optimizer_state[i].items():
            torch.testing.assert_close(torch.as_tensor(saved[key]).float(), torch.as_tensor(value).float(),
                                       rtol=1e-4, atol=1e-7, msg=f"optimizer {key} of parameter {i}")


def test_a_log_line_reports_the_steps_since_the_last_one(tmp_path, monkeypatch):
    """With --log_every 2, the line logged after step 7 (epoch 1) reports steps 6 and 7: the means of
    the reference's L_c, L_H and loss over their forward passes, the prototypes that were some
    student view's argmax in them (not since the epoch began), the mean entropy of a block's batch
    marginal and its fraction of log N_B, and the learning rate, weight decay and teacher momentum of
    step 7."""
    states, _, _, _ = recorded_run(tmp_path, monkeypatch, "adamw", 1, 0.0, True, {}, "--log_every", "2")
    line = next(r for r in map(json.loads, open(tmp_path / "log.jsonl")) if r.get("step") == 8 and "loss" in r)
    seen, terms = [], []
    for step in (6, 7):
        terms += reference_forward_backward(states[step], step, 4, 1, 0.0, True, {}, seen)[1]
    expected = [sum(t[i].item() for t in terms) / 2 for i in range(3)]  # loss, consistency, uniformity
    assert [line["loss"], line["consistency"], line["uniformity"]] == pytest.approx(expected, rel=1e-5)
    assert line["prototypes_used"] == len(seen[0][1] | seen[1][1])
    entropy = (seen[0][0] + seen[1][0]) / 2
    assert line["block_entropy"] == pytest.approx(entropy, rel=1e-4)
    assert line["normalised_block_entropy"] == pytest.approx(entropy / math.log(N_B), rel=1e-4)
    total = EPOCHS * 4
    assert line["lr"] == pytest.approx(cosine(FLAGS["lr"] * BATCH / 256, FLAGS["min_lr"], total, 4, 7))
    assert line["wd"] == pytest.approx(cosine(FLAGS["weight_decay"], FLAGS["weight_decay_end"], total, 0, 7))
    assert line["momentum"] == pytest.approx(cosine(FLAGS["momentum_teacher"], FLAGS["momentum_teacher_end"], total, 0, 7))
    assert line["epoch"] == 1
