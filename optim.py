"""Optimisation shared by pretraining and the linear probe: LARS, the parameter groups, the linear
learning-rate scaling rule and the per-step schedules.

Schedules are precomputed as one value per optimizer step (as DINO's), indexed by the global step:
plottable, testable, and a resumed run reads the same values as an uninterrupted one.
"""
import numpy as np
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For every weight tensor w with gradient g: d = g + wd * w, then d is rescaled by the trust ratio
    eta * ||w|| / ||d||, so that every layer moves by about the same fraction of its norm.
    Parameter groups with `lars_exclude=True` (param_groups: biases and BatchNorm parameters, and
    the prototype norm g when it is learned) get plain momentum SGD with no weight decay and no
    rescaling. NOTE(paper): trust coefficient 0.001, momentum 0.9.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if not group["lars_exclude"]:
                    d = d.add(w, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                    d = d.mul(trust)
                state = self.state[w]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(w)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                w.add_(mu, alpha=-group["lr"])


def param_groups(model):
    """[{weights}, {the rest: weight_decay 0, lars_exclude}]: convolution and linear weights (the
    prototype directions among them) get weight decay and LARS adaptation; biases, BatchNorm
    parameters and the prototype norm g of the weight-normalised layer get neither. (With the
    paper's --norm_last_layer true, g is frozen at 1: it takes no gradient and is in neither group.)"""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # g, the prototype norm, has shape (K, 1): its name, not its shape, says it is not a weight.
        if p.ndim == 1 or name.endswith("parametrizations.weight.original0"):
            not_regularized.append(p)
        else:
            regularized.append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0, "lars_exclude": True}]


def scaled_lr(lr, batch_size_per_gpu, world_size, accumulation_steps):
    """The linear scaling rule (Goyal et al., 2017): --lr is for an effective batch of 256 images."""
    return lr * batch_size_per_gpu * world_size * accumulation_steps / 256


def cosine_schedule(base_value, final_value, epochs, steps_per_epoch, warmup_epochs=0, start_warmup_value=0.0):
    """One value per optimizer step (epochs x steps_per_epoch values): linear warm-up, then a half
    cosine from base_value towards final_value. A warm-up longer than the run is cut where the run
    ends (the values ramp as they would; the cosine never starts).

    As DINO's, the cosine's T steps never reach final_value: the last value falls short of it by
    (base_value - final_value) (1 - cos(pi / T)) / 2, about (base_value - final_value) (pi / T)^2 / 4.
    For the teacher momentum 0.99 -> 1 over the 1,395 steps of --recipe cpu_small_45ep the last is
    1 - 1.3e-8: the schedule never reaches 1, though so close to it 1 - m is below float32's
    resolution and the last steps barely move float32 weights."""
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps)
    steps = np.arange(max(0, epochs * steps_per_epoch - warmup_steps))
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(1, len(steps))))
    return np.concatenate([warmup, cosine])[:epochs * steps_per_epoch]


def build_optimizer(name, model, momentum, weight_decay):
    """'lars', 'sgd' (with `momentum`) or 'adamw' (its default betas (0.9, 0.999) and eps 1e-8) over
    param_groups(model): the weights get `weight_decay` (and, with LARS, the trust-ratio adaptation),
    biases, BatchNorm parameters and a learned prototype norm neither. The learning rate starts at 0: the scripts set it (and
    pretraining the weight decay) at every step from their schedules."""
    groups = param_groups(model)  # [{weights}, {biases and norms: weight_decay 0, lars_exclude}]
    if name == "lars":
        return LARS(groups, weight_decay=weight_decay, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose lars, sgd or adamw")
