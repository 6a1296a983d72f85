"""durable.py: every file the scripts write (checkpoints, log lines, JSON records, feature caches,
figures) goes through durable_write, so that a crash, a kill, a full disk or a refused write never
leaves half a file, never changes the previous one, and ends the script with one line
(cli.WriteError: which file, why, the space it needs, what was kept). check_output_dir,
check_output_file and warn_if_short_of_space: the checks of an output before any work is spent.

No torch here: plot_log.py writes its figures through it without importing torch.
"""
import errno
import os
import shutil
import sys
import tempfile

from cli import DataError, WriteError

# What the OS's reasons for a failed write mean, in words, and what to do about each.
REASONS = {errno.ENOSPC: ("no space left on the device", "free some space there"),
           errno.EDQUOT: ("the disk quota is exceeded", "free some space within the quota"),
           errno.EACCES: ("permission denied", "make the folder writable"),
           errno.EPERM: ("operation not permitted", "make the folder writable"),
           errno.EROFS: ("the file system is read-only", "write to a file system that is not read-only"),
           errno.EIO: ("an input/output error (a failing disk or a lost network mount)", "check the disk"),
           errno.ENOTDIR: ("a part of its path is a file, not a folder", "fix the path")}
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


def durable_write(path, write, append=False, size=None, checkpoint=None):
    """The one way the scripts write a file: write(f) writes the content to the open binary file f.

    A new file goes to path + ".tmp", which is flushed to the disk (fsync) and renamed over `path`,
    and the folder is flushed after the rename: a crash, a kill or a power loss at any moment leaves
    at `path` either the previous file or the new one, whole, never a name pointing at data that did
    not reach the disk. append=True adds the content to the end of `path` (a log line) and flushes it.

    A write that fails with an OSError (a full disk, a quota, a permission, a read-only or failing
    disk; or torch.save stopping half-way, see save_checkpoint) removes the temporary file, or cuts
    an append back to its previous length, so that `path` is left as it was, and raises one
    cli.WriteError: which file, why, the `size` in bytes it needs (when known), and what
    `checkpoint` (the path of the run's checkpoint, if the file belongs to a run that resumes) holds.
    Any other exception (a bug) is raised as it is, also after the temporary file is removed."""
    target = path if append else path + ".tmp"
    existed, length, renamed = os.path.exists(path), None, False
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(target, "ab" if append else "wb") as f:
            length = os.fstat(f.fileno()).st_size
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not append:
            os.replace(target, path)
            renamed = True
            folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(folder)  # the rename itself
            finally:
                os.close(folder)
    except BaseException as e:  # Ctrl-C included: it too leaves no temporary file
        left = "" if renamed else undo_write(target, append, existed, length)
        error = os_error(e) if isinstance(e, Exception) else None
        if error is None:
            raise
        raise WriteError(write_error_message(path, error, size, checkpoint, existed, renamed, left)) from e


def os_error(e):
    """The OSError behind `e`, or None: `e` itself or one it was raised from or while handling
    (torch.save reports a failed write of the file as a RuntimeError, the OSError as its context)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def undo_write(target, append, existed, length):
    """Leave the file as it was before a write to `target` failed: remove the temporary file (or the
    file an append created), or cut an append back to its previous `length`. Returns '' or, when
    that failed too, the words that say what was left."""
    try:
        if (not append or not existed) and os.path.exists(target):
            os.remove(target)
        elif append and existed and length is not None:
            os.truncate(target, length)
        return ""
    except OSError as e:
        return f"; {target} could not be cleaned up ({reason_in_words(e)[0]})"


def reason_in_words(e):
    """(why, what to do) for the OSError of a failed write."""
    if e.errno in REASONS:
        return REASONS[e.errno]
    if e.errno is None:  # a message of our own: torch.save stopped half-way
        return str(e), "check the disk and its free space"
    return (e.strerror or str(e)).rstrip(".").lower(), "fix that"


def size_in_words(n):
    for unit, scale in (("GB", 2 ** 30), ("MB", 2 ** 20), ("KB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def write_error_message(path, e, size, checkpoint, existed, renamed, left):
    """The line of a failed write: which file, why, the space it needs, what is intact, what to do."""
    why, fix = reason_in_words(e)
    if e.errno in SPACE_ERRORS and size is not None:
        why += f" (it needs about {size_in_words(size)}"
        if e.errno == errno.ENOSPC:
            why += f", {size_in_words(free_space(path))} are free there"
        why += ")"
    if renamed:
        kept = [f"the new {path} is in place but the disk may not have recorded its name"]
    elif existed:
        kept = [f"the previous {path} is as it was"]
    else:
        kept = ["no part of it was left behind"]
    again = "run the same command again"
    if checkpoint is not None:
        from run_folder import describe_checkpoint  # here: run_folder imports torch, which plot_log.py does without
        held, state = describe_checkpoint(checkpoint)
        if checkpoint == path and not renamed:
            kept = []  # the sentence about the checkpoint says it
        kept.append(held + (" and is intact" if state == "held" else ""))
        again = {"held": "run the same command to resume", "none": "run the same command to start again"}.get(
            state, again)
    return f"cannot write {path}: {why}; {'; '.join(kept)}{left}; {fix}, then {again}"


def free_space(path):
    """Free bytes on the file system of `path` (its nearest folder that exists), or 0 if unknown."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def check_output_dir(folder, flag="--output_dir", value=None, expected="DIR, a folder you can write to"):
    """Before any work is spent: make `folder` if it does not exist and write a test file in it. A
    folder that cannot be used (a file in its path, no permission, a read-only file system) is a
    DataError that names it (exit code 1: change the flag); a full or failing disk a WriteError.
    `value`: the flag's value when the folder is only where it writes (check_output_file)."""
    value = value or folder
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write_test_")
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        if isinstance(e, FileExistsError) or os.path.isfile(folder):
            why = "it is a file, not a folder" if value == folder else f"{folder} is a file, not a folder"
        elif e.errno == errno.ENOTDIR:
            parent = os.path.dirname(os.path.abspath(folder))
            while parent != os.path.dirname(parent) and not os.path.isfile(parent):
                parent = os.path.dirname(parent)
            why = f"{parent} is a file, not a folder"
        elif e.errno in (*SPACE_ERRORS, errno.EIO):  # not the flag's fault: make room, then run it again
            raise WriteError(f"cannot write in {flag} {value}: {reason_in_words(e)[0]}; "
                             f"{reason_in_words(e)[1]}, then run the same command again") from None
        else:
            why = reason_in_words(e)[0]
        raise DataError(f"{flag} {value} cannot be used: {why}; pass {flag} {expected}") from None


def check_output_file(path, flag="--output_json"):
    """The same check for a file an evaluation writes at its end (--output_json): its folder is made
    and written to before the backbone runs over any image, so that a bad path costs one line, not
    the evaluation's minutes. Nothing to check when the flag is not given."""
    if not path:
        return
    if os.path.isdir(path):
        raise DataError(f"{flag} {path} cannot be used: it is a folder; pass {flag} FILE, a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag, path, "FILE in a folder you can write to")


def warn_if_short_of_space(folder, need, what):
    """A one-line warning on stderr when the file system of `folder` has less than `need` bytes free:
    the run goes on (space may be freed meanwhile; a write that fails stops it with its last
    checkpoint kept)."""
    free = free_space(os.path.join(folder, "x"))
    if free < need:
        print(f"warning: {folder} has {size_in_words(free)} free, less than the {size_in_words(need)} that {what} "
              f"need: the run will stop at the first write that fails, its last checkpoint kept; free some space or "
              f"pass another --output_dir", file=sys.stderr)
