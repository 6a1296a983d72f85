"""What pretrain.py reports about its steps (as DINO's MetricLogger): the loss terms, the prototypes
in use, the gradient norm and the speed for each log line and each epoch, a progress bar, a warning
when the run collapses, where the run is when it stops (a NaN loss, Ctrl-C), and the run's summary.json.

The statistics stay on the training device and are read only when a line is logged, so the loop
has no host-device synchronisation per step. Under torchrun they are averaged over the processes.
"""
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import UserError
from distributed import all_reduce, world_size
from loss import COLLAPSE_THRESHOLD
from run_folder import describe_checkpoint, timestamp, write_json


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite."""


class TrainStats:
    """Statistics of one pretraining run, reset at every log line and every epoch.

    Log keys (log.jsonl), each over the line's steps (the interval since the last line, or the
    epoch for an epoch_summary line): loss = consistency + uniformity (the two terms of loss.py;
    uniformity times --uniformity_weight when that is not 1), prototypes_used (prototypes that were
    some student view's argmax), block_entropy = log N_B - uniformity (the mean entropy of a block's
    batch marginal) and normalised_block_entropy = block_entropy / log N_B (COLLAPSE_THRESHOLD),
    grad_norm (the norm of all the student's gradients together, the steps the fp16 scaler skipped
    left out), images_per_s, and bad_images where --skip_bad_images left unreadable images out.
    state_dict() / load_state_dict(): a checkpoint written in the middle of an epoch carries them,
    so a resumed run logs what an uninterrupted one would.
    """

    STATE = ("sums", "epoch_sums", "used", "epoch_used", "grad_norms", "first_bad_step", "bad_images", "n_forward")

    def __init__(self, args, world_size, device, show_progress=True, log=None):
        self.n_prototypes, self.block_size, self.device = args.out_dim, args.block_size, device  # K, N_B
        self.accumulation_steps = args.gradient_accumulation_steps
        self.images_per_step = args.batch_size_per_gpu * world_size * args.gradient_accumulation_steps
        self.show_progress, self.log = show_progress, log or (lambda record: None)
        self.checkpoint_path = None  # the run's checkpoint, which a NaN message describes (set by RunCheckpoint)
        self.epoch, self.step, self.in_epoch = None, 0, False  # where the run is
        self.collapsed = False  # whether the last log line was below COLLAPSE_THRESHOLD

    def start_epoch(self, epoch, steps_per_epoch, first_step=None, state=None):
        """Epoch `epoch` from its beginning, or from `first_step` (a global step) with the `state` of
        the epoch's statistics so far, as a checkpoint written during the epoch holds them."""
        self.epoch, self.in_epoch = epoch, True
        self.step = epoch * steps_per_epoch if first_step is None else first_step  # optimizer steps taken so far
        self.sums = torch.zeros(3, device=self.device)  # loss, consistency, uniformity over the interval's forward passes
        self.epoch_sums = torch.zeros(4, device=self.device)  # the same over the epoch, and the count of forward passes
        self.used = torch.zeros(self.n_prototypes, device=self.device)  # 1 where a prototype was some view's argmax
        self.epoch_used = torch.zeros(self.n_prototypes, device=self.device)  # the same over the epoch
        self.grad_norms = torch.zeros(2, device=self.device)  # sum of the interval's finite gradient norms, their count
        self.first_bad_step = torch.full((), -1, device=self.device, dtype=torch.long)
        self.bad_images = torch.zeros(2, device=self.device)  # images left out in the interval, in the epoch
        self.n_forward, self.last_time = 0, time.time()
        if state is not None:
            self.load_state_dict(state)
        self.bar = tqdm(total=steps_per_epoch, initial=self.step - epoch * steps_per_epoch, desc=f"epoch {epoch}",
                        disable=not self.show_progress, dynamic_ncols=True)

    def state_dict(self):
        return {name: getattr(self, name) for name in self.STATE}

    def load_state_dict(self, state):
        if "epoch_used" not in state:  # a checkpoint from before per-interval usage: one count for both
            state = {**state, "epoch_used": state["used"]}
        for name in self.STATE:
            value = state[name]
            setattr(self, name, value.to(self.device) if torch.is_tensor(value) else value)

    @torch.no_grad()
    def add_forward(self, step, loss, consistency, uniformity, student_logits, bad_images=None):
        """One forward pass of optimizer step `step`: its loss terms, the student's argmax prototypes
        and the count of the batch's images that were left out (unreadable) and replaced."""
        if bad_images is not None:
            self.bad_images += bad_images.to(self.device, non_blocking=True).sum()  # pinned by the DataLoader on CUDA
        terms = torch.stack([loss, consistency, uniformity]).detach()
        self.sums += terms
        self.epoch_sums[:3] += terms
        self.epoch_sums[3] += 1
        chosen = student_logits.argmax(dim=-1).flatten()  # (V * B,): each view's prototype
        self.used[chosen] = 1
        self.epoch_used[chosen] = 1
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)
        self.n_forward += 1

    def add_optimizer_step(self, grad_norm):
        """fp16's scaler skips the steps whose gradients overflowed (an inf norm): they are left out of
        the mean gradient norm."""
        finite = torch.isfinite(grad_norm)
        self.grad_norms += torch.stack([torch.where(finite, grad_norm, 0.0), finite.float()])
        self.step += 1
        self.bar.update(1)

    def interval(self, **extra):
        """The log line of the steps since the last one (the only host-device syncs of the loop);
        `extra` (epoch, lr, ...) is added to it. Raises NonFiniteLoss if a loss was NaN or infinite."""
        self.check_finite()
        record = self.means(self.sums, self.n_forward, self.bad_images[0], self.used)
        total, count = self.grad_norms.tolist()
        elapsed = time.time() - self.last_time
        record.update(extra, step=self.step, grad_norm=total / count if count else None,
                      images_per_s=self.n_forward // self.accumulation_steps * self.images_per_step
                      / max(elapsed, 1e-9))
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", cons=f"{record['consistency']:.3f}",
                             unif=f"{record['uniformity']:.4f}", lr=f"{record['lr']:.3g}", img_s=f"{record['images_per_s']:.0f}")
        self.sums.zero_()
        self.used.zero_()
        self.grad_norms.zero_()
        self.bad_images[0] = 0
        self.n_forward, self.last_time = 0, time.time()
        return record

    def log_interval(self, **extra):
        """Log the interval's line (interval(**extra)) and, when its normalised block entropy falls
        below COLLAPSE_THRESHOLD, a `collapse` event and a one-line warning (again only after the run
        has risen above it)."""
        record = self.interval(**extra)
        self.log(record)
        collapsed = record["normalised_block_entropy"] < COLLAPSE_THRESHOLD
        if collapsed and not self.collapsed:
            self.log({"event": "collapse", "step": record["step"], "epoch": record.get("epoch"),
                      "normalised_block_entropy": record["normalised_block_entropy"],
                      "prototypes_used": record["prototypes_used"], "threshold": COLLAPSE_THRESHOLD})
            if self.show_progress:
                tqdm.write(f"warning: collapse at optimizer step {record['step']}: the blocks' batch marginals have "
                           f"{record['normalised_block_entropy']:.2f} of their maximum entropy (below "
                           f"{COLLAPSE_THRESHOLD}) and {record['prototypes_used']} of {self.n_prototypes} prototypes "
                           f"were used since the last log line; the views go to a few prototypes (check "
                           f"--uniformity_weight, --lr, --momentum_teacher)", file=sys.stderr)
        self.collapsed = collapsed
        return record

    def close_bar(self):
        """End the progress bar's line (before a message on the terminal)."""
        if self.epoch is not None:
            self.bar.close()

    def end_epoch(self):
        """The epoch's means (the epoch summary of the log)."""
        self.bar.close()
        self.in_epoch = False
        self.check_finite()
        return self.means(self.epoch_sums[:3], int(self.epoch_sums[3].item()), self.bad_images[1], self.epoch_used)

    def means(self, sums, n_forward, bad_images, used):
        """Means over processes and forward passes, the prototypes `used` and the images left out, as
        plain numbers (bad_images only when some were)."""
        sums = all_reduce(sums.clone()) / (max(n_forward, 1) * world_size())
        loss, consistency, uniformity = sums.tolist()
        n_used = int(all_reduce(used.clone(), dist.ReduceOp.MAX).sum().item())
        # uniformity = log N_B - mean_b H(pbar_b), so the mean per-block entropy of the batch marginal is:
        block_entropy = math.log(self.block_size) - uniformity
        record = dict(loss=loss, consistency=consistency, uniformity=uniformity, prototypes_used=n_used,
                      block_entropy=block_entropy,
                      normalised_block_entropy=block_entropy / math.log(self.block_size) if self.block_size > 1 else 1.0)
        n_bad = int(all_reduce(bad_images.clone()).item())
        if n_bad:
            record["bad_images"] = n_bad
        return record

    def check_finite(self):
        step = all_reduce(self.first_bad_step.clone(), dist.ReduceOp.MAX).item()
        if step >= 0:
            held, state = (describe_checkpoint(self.checkpoint_path) if self.checkpoint_path
                           else ("this run writes no checkpoint", "none"))
            raise NonFiniteLoss(f"the loss became NaN or infinite at optimizer step {step} (epoch {self.epoch}). "
                                f"Nothing was saved after it: {held}. Try a lower --lr, --clip_grad about twice the "
                                f"grad_norm that log.jsonl shows before the failure (a bound on all the gradients' "
                                f"norm together), or --use_fp16 false, then run the same command to "
                                f"{'resume' if state == 'held' else 'start again'}.")

    def interruption(self, saved_step, steps_per_epoch, epochs, checkpoint_path):
        """The one line of Ctrl-C: where the run stopped and what checkpoint_path holds (its first
        `saved_step` optimizer steps, of `epochs` epochs of `steps_per_epoch`)."""
        if self.epoch is None:
            return ("interrupted during the k-NN monitor before training; no checkpoint was written yet; run the "
                    "same command to start again")
        self.close_bar()
        saved_epochs, steps_into_epoch = divmod(saved_step, steps_per_epoch)
        where = (f"epoch {self.epoch}, after optimizer step {self.step}" if self.in_epoch
                 else f"epoch {saved_epochs}, outside its optimizer steps")
        if not saved_step:
            held = "no checkpoint was written yet; run the same command to start again"
        elif not steps_into_epoch:
            held = f"{checkpoint_path} holds the first {saved_epochs} of {epochs} epochs; run the same command to resume"
        else:
            held = (f"{checkpoint_path} holds the first {saved_step} optimizer steps ({saved_epochs} epochs and "
                    f"{steps_into_epoch} of {steps_per_epoch} steps of epoch {saved_epochs}); run the same command "
                    f"to resume")
        return f"interrupted at {where}; {held}"


def write_summary(args, epoch_stats, extra, seconds, start_epoch):
    """summary.json at the end of a pretraining run, and the line that puts the trained teacher's
    k-NN next to its baselines (extra: knn.KnnMonitor.baselines). A finished run started again keeps
    its summary.json; where that file's write had failed (a full disk at the very end), it is written
    now from the last epoch line of log.jsonl, its training time unknown (null)."""
    path, log_path = os.path.join(args.output_dir, "summary.json"), os.path.join(args.output_dir, "log.jsonl")
    if start_epoch == args.epochs:
        if os.path.isfile(path) or not os.path.isfile(log_path):
            return
        with open(log_path) as f:
            epochs = [line for line in map(json.loads, f) if line.get("epoch_summary")]
        if not epochs:
            return
        epoch_stats = {key: value for key, value in epochs[-1].items() if key not in ("epoch_summary", "time")}
        seconds = None
    summary = {"finished": timestamp(), "epochs": args.epochs, "trained_epochs": args.epochs - start_epoch,
               "training_seconds": seconds and round(seconds, 1), "final_epoch": epoch_stats, "nb_knn": args.nb_knn,
               "knn_top1_random_init": extra.get("knn_top1_init"), "knn_top1_teacher": epoch_stats.get("knn_top1"),
               "knn_top1_pixels": extra.get("knn_top1_pixels")}
    if extra.get("knn_top1_init") is not None and epoch_stats.get("knn_top1") is not None:
        pixels = extra.get("knn_top1_pixels")
        summary["line"] = (f"k-NN top-1 (k={args.nb_knn}) on the {args.dataset} validation images: randomly "
                           f"initialised backbone {extra['knn_top1_init']:.2f}% | CARP teacher after {args.epochs} "
                           f"epochs {epoch_stats['knn_top1']:.2f}% | raw pixels "
                           + (f"{pixels:.2f}%" if pixels is not None else "not measured"))
        print(summary["line"])
    write_json(summary, path, checkpoint=os.path.join(args.output_dir, "checkpoint.pth"))
