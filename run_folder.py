"""The files of a run folder, written so that a crash or a full disk never leaves half a file
(durable.py) and read so that a file from elsewhere never runs code.

- checkpoints: save_checkpoint (torch.save through durable.durable_write: atomic and durable, and a
  write that fails leaves the previous file as it was), read_checkpoint
  (torch.load with weights_only=True, and a one-line error for a file that is not a checkpoint),
  read_run_checkpoint and check_resume_flags (the checks before a script resumes from its own
  checkpoint), checkpoint_args (the flags a checkpoint was trained with), describe_checkpoint (what
  a checkpoint file holds, in words), the RNG states;
- JSON records: write_json (settings.json, summary.json, an evaluation's results), JsonLog
  (log.jsonl, one object a line with its wall-clock time), run_settings (what settings.json holds).
"""
import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import zipfile

import numpy as np
import torch
import torchvision

from cli import DataError
from durable import durable_write, os_error


# ============ checkpoints ============

def tensor_bytes(obj):
    """The bytes of the tensors in `obj` (nested dicts, lists and tuples): about the size torch.save
    writes for a state dict."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state, path, checkpoint=None):
    """torch.save of `state` to `path` through durable_write: a crash leaves the previous file or the
    new one, whole; a full disk or any failure of torch.save leaves the previous file, no temporary
    file, and one cli.WriteError (`checkpoint`: see durable_write)."""
    def write(f):
        try:
            torch.save(state, f)
        except RuntimeError as e:
            if os_error(e) is None:  # not the OS: torch.save itself stopped half-way
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise OSError(f"torch.save stopped half-way ({first_line})") from e
            raise

    durable_write(path, write, size=tensor_bytes(state), checkpoint=checkpoint)


def read_checkpoint(path, what_to_do="Pass --pretrained_weights PATH to a checkpoint (.pth) file, or 'random' "
                                     "for the random-weights baseline", mmap=False):
    """torch.load with weights_only=True. The authors' CARP checkpoints pickle an
    argparse.Namespace under 'args': that one class is allow-listed, nothing else, so a file that
    holds any other object is refused rather than unpickled (unpickling can run code).
    A file that torch.load cannot read (cut short, empty, text, ...) is a DataError naming it and
    ending with `what_to_do`; it is never changed. mmap=True maps the file instead of reading it
    (to look at its args without reading every weight)."""
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not a checkpoint file: pass the file in it (e.g. "
                        f"{os.path.join(path, 'checkpoint.pth')}). {what_to_do}")
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} does not exist. {what_to_do}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated zip, an empty or text file, a pickle of arbitrary objects
        found = re.search(r"GLOBAL (\S+) was not an allowed", str(e))
        if found:
            raise DataError(f"{path} holds Python objects (such as {found.group(1)}) that torch.load(weights_only="
                            f"True) does not unpickle, as unpickling can run code: load it yourself only if you "
                            f"trust it, and save its tensors alone (e.g. its state_dict). {what_to_do}") from None
        raise DataError(f"{path} ({os.path.getsize(path)} bytes) is not a readable checkpoint: torch.load failed "
                        f"with {type(e).__name__}; it may have been cut short (a full disk, an unfinished copy) "
                        f"or be another kind of file. {what_to_do}") from None


def read_run_checkpoint(path, keys, script, what_to_do):
    """The checkpoint a script resumes from: read_checkpoint, and every entry of `keys` present with
    the run's args as a dict, else a DataError saying the file is not one of `script`'s (another
    layout, e.g. the authors' or DINO's, whose args are an argparse.Namespace)."""
    checkpoint = read_checkpoint(path, what_to_do)
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if not missing and not isinstance(checkpoint["args"], dict):
        missing = ["args as a dict"]
    if missing:
        raise DataError(f"{path} is not a checkpoint of {script} (no {', '.join(missing)}). {what_to_do}")
    return checkpoint


def check_resume_flags(path, saved_args, args, names, defaults=None, other_changes=()):
    """Refuse to resume from `path` when a flag of `names` differs from the run that wrote it:
    a resumed run must be the same experiment. `defaults` gives the value of a flag that did not
    exist yet when an older checkpoint was written; `other_changes` are further differences, in words."""
    saved = {**(defaults or {}), **saved_args}
    changed = [f"--{k} {saved.get(k)} (now {getattr(args, k)})" for k in names if saved.get(k) != getattr(args, k)]
    changed += list(other_changes)
    if changed:
        raise DataError(f"{path} was trained with {', '.join(changed)}; use the same flags to resume, "
                        f"or another --output_dir to start a new run")


# Flags renamed since runs first wrote them: a checkpoint's or settings.json's args are read under
# today's names (current_names). --partition_size is the authors' name of N_B.
RENAMED_FLAGS = {"partition_size": "block_size", "knn_k": "nb_knn"}


def current_names(saved_args):
    """A run's flags {name: value} with every renamed flag under its name of today."""
    return {RENAMED_FLAGS.get(k, k): v for k, v in saved_args.items()}


def describe_checkpoint(path):
    """What the checkpoint at `path` holds, read from the file itself (mapped, not read whole), in
    words, and its state: ("PATH holds the first 2 epochs (optimizer step 64)", "held"),
    ("no checkpoint has been written yet", "none"), or ("PATH cannot be read ...", "unreadable")."""
    if not os.path.isfile(path):
        return "no checkpoint has been written yet", "none"
    try:
        checkpoint = read_checkpoint(path, mmap=zipfile.is_zipfile(path))
    except (DataError, OSError):
        return f"{path} exists but torch.load cannot read it", "unreadable"
    checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
    step, epoch, steps_per_epoch = (checkpoint.get(k) for k in ("step", "epoch", "steps_per_epoch"))
    if step is not None and steps_per_epoch:
        epochs, into_epoch = divmod(step, steps_per_epoch)
        if into_epoch:
            return (f"{path} holds optimizer step {step} ({into_epoch} of {steps_per_epoch} steps of epoch {epochs})",
                    "held")
        return f"{path} holds {first_epochs(epochs)} (optimizer step {step})", "held"
    if epoch is not None:
        return f"{path} holds {first_epochs(epoch)}", "held"
    return f"{path} holds a checkpoint", "held"


def first_epochs(n):
    return "the first epoch" if n == 1 else f"the first {n} epochs"


def checkpoint_args(path):
    """The flags a checkpoint was trained with (ours: a dict; the authors': an argparse.Namespace),
    as a dict under today's names; {} for 'random' and for files without them."""
    if path == "random":
        return {}
    # Mapped, not read, where torch allows it: zip-format files (torch >= 1.6); older releases
    # (pickle-format .pth.tar files) are read whole.
    checkpoint = read_checkpoint(path, mmap=os.path.isfile(path) and zipfile.is_zipfile(path))
    saved = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    return current_names(saved) if isinstance(saved, dict) else {}


def rng_state():
    """This process's random state: the CPU generator's and, where the process has used its GPU, the
    generator of that GPU (a list of one; training draws from none of CUDA's generators, so a resume is
    exact without it). Without CUDA no torch.cuda function is called."""
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state()] if on_gpu else []}


def set_rng_state(state):
    """Restore rng_state()'s `state`, on a machine with as many GPUs as the one that wrote it or not.
    Checkpoints that kept one CUDA state per GPU the process saw (8 on an 8-GPU node) resume where a
    process sees fewer (a launcher giving each process only its own GPU): the state of the GPU with
    this process's device number, when the list has one, goes to this process's GPU; the others are
    left out."""
    torch.set_rng_state(state["cpu"])
    saved = state.get("cuda") or []
    if saved and torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        index = 0 if len(saved) == 1 else device  # (N,) states: one per GPU of the machine that wrote them
        if index < len(saved):
            torch.cuda.set_rng_state(saved[index], device)


def flags_digest(flags):
    """Eight hex digits that name a set of flags ({flag: value}): the same command gives the same
    digits, a flag that matters changed gives others. What default run folders are named with, so
    that a run resumes in its own folder and never in another run's."""
    return hashlib.sha1(json.dumps(flags, sort_keys=True, default=str).encode()).hexdigest()[:8]


# pretrain.py's flags that do not change what a run learns: left out of the name of a default --output_dir.
NOT_TRAINING = ("output_dir", "num_workers", "log_every", "knn_every", "nb_knn", "saveckp_freq",
                "checkpoint_every_steps", "download", "recipe", "compile", "deterministic")
# pretrain.py's ablation flags (docs/experiments.md, *What each part buys*), at the method's values. Left
# out of the name of a default --output_dir while at these values, so runs named before the flags existed
# keep their folder.
METHOD_VALUES = {"fixed_partition": False, "uniformity_weight": 1.0, "momentum_teacher_end": 1.0}


def training_flags(args):
    """The flags that decide what a run learns (all but NOT_TRAINING, and the ablation flags at the
    method's values), renamed flags under their first names (RENAMED_FLAGS): the name of a default
    folder stays what it was."""
    first_names = {new: old for old, new in RENAMED_FLAGS.items()}
    return {first_names.get(k, k): v for k, v in vars(args).items()
            if k not in NOT_TRAINING and not (k in METHOD_VALUES and v == METHOD_VALUES[k])}


def default_pretraining_dir(args):
    """pretrain.py's --output_dir when none is given: runs/<dataset>_<arch>_<flags_digest of the
    training flags>, a folder of its own (never the current folder, often the source tree), the same
    for the same command, so that a run resumes there and other flags start another."""
    return os.path.join("runs", f"{args.dataset}_{args.arch}_{flags_digest(training_flags(args))}")


# ============ JSON records ============

def timestamp():
    """Local wall-clock time, to the second, for the log lines and the run files."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(results, path, checkpoint=None):
    """A JSON object (the metrics of an evaluation, a run's settings or summary), written through
    durable_write (`checkpoint`: see there); NaN (a metric with nothing to average) becomes null."""
    def clean(value):
        if isinstance(value, list):
            return [clean(v) for v in value]
        return None if isinstance(value, float) and math.isnan(value) else value

    text = json.dumps({key: clean(value) for key, value in results.items()}, indent=1).encode()
    durable_write(path, lambda f: f.write(text), size=len(text), checkpoint=checkpoint)


class JsonLog:
    """log.jsonl: one JSON object a line, each with its wall-clock `time`, appended by the main process
    only (`enabled`), so that a resumed run continues the same file. A line that cannot be written
    leaves the file as it was, without half a line (durable_write; `checkpoint`: see there)."""

    def __init__(self, path, enabled=True, checkpoint=None):
        self.path, self.enabled, self.checkpoint = path, enabled, checkpoint

    def __call__(self, record):
        if self.enabled:
            line = (json.dumps({**record, "time": timestamp()}) + "\n").encode()
            durable_write(self.path, lambda f: f.write(line), append=True, size=len(line), checkpoint=self.checkpoint)


def run_settings(args, argv, world_size, start_epoch):
    """What settings.json records: the flags, the command, the versions and the machine, so that a
    run folder says on its own how it was made."""
    return {"started": timestamp(), "start_epoch": start_epoch, "argv": sys.argv[1:] if argv is None else list(argv),
            "args": vars(args), "world_size": world_size,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__,
                         "cuda": torch.version.cuda},
            "machine": {"host": platform.node(), "cpu_cores": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
