"""Checkpointing a pretraining run: what checkpoint.pth holds, when pretrain.py writes it (every
--checkpoint_every_steps optimizer steps, at the end of every epoch, and when a scheduler asks the
run to stop), and how a run resumes from it exactly where it stopped.

Stopping on request: SIGTERM and SIGUSR1 are the signals that SLURM, Kubernetes, torchrun and
preemptible cloud machines send some time before they kill a job. StopRequest's handler only notes
the signal; the training loop finishes its optimizer step, writes the checkpoint at that step and
exits with cli.STOPPED_EXIT_CODE. Under torchrun the processes may receive the signal at different
steps, so after every step they agree (a max over the processes on a small gloo group: no GPU
synchronisation) and all stop after the same one. Ctrl-C (SIGINT) stops at once (cli.Interrupted)
and keeps the last checkpoint written.
"""
import os
import signal

import torch
import torch.distributed as dist

from cli import DataError, Stopped
from distributed import all_gather_object, is_initialized, is_main_process
from durable import size_in_words, warn_if_short_of_space
from run_folder import (check_resume_flags, current_names, read_run_checkpoint, rng_state, save_checkpoint, set_rng_state,
                        tensor_bytes)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The stop signal received by this process, if any, and the agreement of all processes on it."""

    def __init__(self):
        self.received = 0  # the signal number, 0 while none came
        # A small CPU group for the agreement: the default group may be NCCL, whose collectives
        # would make the host wait for the GPU after every step.
        self.group = dist.new_group(backend="gloo") if is_initialized() else None
        for signum in SIGNALS:
            signal.signal(signum, self.note)

    def note(self, signum, frame):
        self.received = signum

    def agreed(self):
        """The signal to stop on (a number, 0 for none), the same on every process."""
        if self.group is None:
            return self.received
        flag = torch.tensor([self.received])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def ignore_stop_signals(worker_id=None):
    """DataLoader workers leave the stop signals to the training process (which ends them): without
    this, a SIGTERM sent to the whole process group would kill a worker and end the run with an error
    instead of a checkpoint. Used as the loaders' worker_init_fn."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_if_asked(stop, checkpoint, log):
    """After an optimizer step: if a scheduler's signal came (to any process), write the checkpoint at
    this step (unless it was just written) and stop the run (cli.Stopped, exit code 75)."""
    signum = stop.agreed()
    if not signum:
        return
    step = checkpoint.stats.step
    if checkpoint.step != step:
        checkpoint.save(step)
    name = signal.Signals(signum).name
    log({"event": "stopped", "signal": name, "step": step})
    checkpoint.stats.close_bar()
    raise Stopped(f"stopped by {name} after optimizer step {step}; {checkpoint.path} holds it; run the same command "
                  f"to resume")


# Flags that shape the schedules: a resume with another value follows another schedule from there on.
SCHEDULE_ARGS = ("epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "momentum_teacher",
                 "momentum_teacher_end")
# Flags that define the objective: a resume with another value optimizes another objective from there on.
OBJECTIVE_ARGS = ("block_size", "fixed_partition", "uniformity_weight", "local_crops_number")
# Flags that define the networks and the optimizer state: a resume with another value cannot load them.
RESUME_ARGS = ("arch", "small_image_stem", "out_dim", "hidden_dim", "bottleneck_dim", "use_bn_in_head", "optimizer")
RESUME_DEFAULTS = {"hidden_dim": 2048, "bottleneck_dim": 256}  # what checkpoints from before these flags used


class RunCheckpoint:
    """checkpoint.pth: the whole state of the run after `step` optimizer steps (networks, optimizer,
    scaler, the k-NN baselines in `extra`, and what each process holds on its own: its RNG state and,
    within an epoch, its share of the epoch's statistics), written by process 0 atomically and
    durably (run_folder.save_checkpoint). Everything else a resumed run needs is a function of the
    step: the data order and the views (seeded by epoch and image), the partitions, the schedules."""

    def __init__(self, path, args, student, teacher, optimizer, scaler, stats, steps_per_epoch):
        self.path, self.args, self.student, self.teacher = path, args, student, teacher
        self.optimizer, self.scaler, self.stats, self.steps_per_epoch = optimizer, scaler, stats, steps_per_epoch
        self.step, self.extra, self.per_process_stats = 0, {}, None
        stats.checkpoint_path = path  # a NaN loss says what this file holds

    def save(self, step, keep_copy=False):
        # A loss that became NaN since the last log line stops the run here, before its weights
        # replace the last good checkpoint.
        self.stats.check_finite()
        within_epoch = step % self.steps_per_epoch != 0
        stats = {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.stats.state_dict().items()}
        per_process = all_gather_object({"rng": rng_state(), "stats": stats if within_epoch else None})
        state = {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": step // self.steps_per_epoch, "step": step, "steps_per_epoch": self.steps_per_epoch,
                 "rng": [p["rng"] for p in per_process], "stats": [p["stats"] for p in per_process],
                 "args": vars(self.args), "extra": self.extra}
        if is_main_process():
            # The copy first: when either write fails, checkpoint.pth still holds the previous step, so
            # the same command takes this step again and writes both.
            if keep_copy:
                save_checkpoint(state, os.path.join(os.path.dirname(self.path), f"checkpoint{state['epoch']:04}.pth"),
                                checkpoint=self.path)
            save_checkpoint(state, self.path, checkpoint=self.path)
            self.step = step  # from here on, Ctrl-C finds this step in the file
        self.step = step

    def check_free_space(self):
        """Warn (one line, on the main process) when the folder has less free space than the next
        write of checkpoint.pth needs: the new file, in its temporary copy, beside the previous one.
        The size is that of the tensors: student, teacher, and the optimizer's state (AdamW keeps two
        tensors per parameter, SGD's and LARS's momentum one), which exists only after the first step."""
        if not is_main_process():
            return
        parameters = tensor_bytes([p for group in self.optimizer.param_groups for p in group["params"]])
        size = (tensor_bytes(self.student.state_dict()) + tensor_bytes(self.teacher.state_dict())
                + (2 if self.args.optimizer == "adamw" else 1) * parameters)
        previous = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        warn_if_short_of_space(os.path.dirname(self.path), 2 * size - previous,
                               f"checkpoint.pth of this model ({size_in_words(size)}) and its temporary copy")

    def resume(self, rank):
        """Load the run from `path`. A file that is not a checkpoint of this script, or of another
        run, is refused with a message and left as it is."""
        what_to_do = (f"It was left as it is: move it away to start this run again from scratch, or copy an "
                      f"earlier checkpointNNNN.pth of this folder to {self.path} to resume from that epoch")
        checkpoint = read_run_checkpoint(self.path, ("student", "teacher", "optimizer", "scaler", "epoch", "rng",
                                                     "args"), "pretrain.py", what_to_do)
        checkpoint["args"] = current_names(checkpoint["args"])
        check_resume_flags(self.path, checkpoint["args"], self.args, RESUME_ARGS, RESUME_DEFAULTS)
        # Checkpoints from before step checkpoints hold whole epochs only; a step within an epoch means
        # the same only with the same steps per epoch (data, batch, accumulation and processes).
        saved_steps_per_epoch = checkpoint.get("steps_per_epoch", self.steps_per_epoch)
        step = checkpoint.get("step", checkpoint["epoch"] * saved_steps_per_epoch)
        if saved_steps_per_epoch != self.steps_per_epoch:
            if step % saved_steps_per_epoch:
                raise DataError(f"{self.path} stopped within an epoch of {saved_steps_per_epoch} optimizer steps, "
                                f"this run makes {self.steps_per_epoch}: the data, --batch_size_per_gpu, "
                                f"--gradient_accumulation_steps or the number of processes changed. Use the same to "
                                f"resume, or copy checkpointNNNN.pth of an epoch's end to {self.path}")
            step = checkpoint["epoch"] * self.steps_per_epoch  # an epoch's end: the next epoch starts afresh
        self.student.load_state_dict(checkpoint["student"])
        self.teacher.load_state_dict(checkpoint["teacher"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        # The scaler's state is empty when the checkpoint's run had no fp16 (float32 or bf16): a run that
        # continues it in fp16 starts a fresh scaler; a run that continues an fp16 run without fp16 has
        # a disabled scaler, which ignores the state. Precision may change at a resume (e.g. to float32
        # after a NaN, as NonFiniteLoss suggests); the networks and the optimizer state stay float32.
        if checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        elif self.scaler.is_enabled() and is_main_process():
            print(f"{self.path} was trained without fp16: the gradient scaler starts afresh")
        if rank < len(checkpoint["rng"]):
            set_rng_state(checkpoint["rng"][rank])
        self.step, self.extra = step, checkpoint.get("extra", {})
        changed = self.changed_flags(checkpoint["args"], SCHEDULE_ARGS)
        if changed and is_main_process():
            print(f"resuming with {changed}: the learning rate, weight decay and teacher momentum "
                  f"schedules are computed anew for these flags, so from step {step} on the run follows schedules "
                  f"that differ from those of its first {step} steps (with a longer --epochs the learning rate "
                  f"climbs back up the new cosine)")
        changed = self.changed_flags(checkpoint["args"], OBJECTIVE_ARGS)
        if changed and is_main_process():
            print(f"resuming with {changed}: from step {step} on the run optimizes an objective other than that of its "
                  f"first {step} steps, and its weights are those of neither run; use the checkpoint's values to "
                  f"continue it, or another --output_dir to train with these from scratch")
        per_process_stats = checkpoint.get("stats") or []
        self.per_process_stats = per_process_stats[rank] if rank < len(per_process_stats) else None
        if is_main_process():
            print(f"resuming from {self.path} at epoch {step // self.steps_per_epoch}, step {step}")

    def changed_flags(self, saved_args, names):
        """'--flag value (was value)' for each of `names` that differs from the checkpoint's run (flags
        newer than the checkpoint are not compared)."""
        return ", ".join(f"--{k} {getattr(self.args, k)} (was {saved_args[k]})" for k in names
                         if k in saved_args and saved_args[k] != getattr(self.args, k))

    def stats_state(self, first_step):
        """This process's statistics of the epoch so far, when the run resumes within an epoch."""
        return self.per_process_stats if first_step == self.step and first_step % self.steps_per_epoch else None
