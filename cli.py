"""The command line of every script: the --help formatter, the flag types, renamed flags, and the
one place where a script turns an error or Ctrl-C into one line and an exit code.

    if __name__ == "__main__":
        cli.run(main)
"""
import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help of every script: each flag's default, and the examples' line breaks. A default of None
    is not shown: those flags' help says what happens when they are left out."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def bool_flag(s):
    """--flag true / false (also 1 / 0, yes / no, on / off): one boolean style in every script."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def auto_flag(s):
    """A flag that is 'auto' (the script decides, e.g. by image size or device), or true / false."""
    return "auto" if s.lower() == "auto" else bool_flag(s)


def parse_with_recipe(parser, argv, recipes):
    """Parse `argv` (the command line when None) after the flags of the recipe it names with --recipe
    NAME (`recipes`: name -> a string of flags): the command line's flags come later, so a flag given
    there wins over the recipe's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = parser.parse_known_args(argv)[0].recipe
    return parser.parse_args(recipes[recipe].split() + argv)


def renamed(old_name):
    """The --help note of a flag that was renamed: the old name still works, for one release."""
    return f" (the old name --{old_name} still works for one release)"


class UserError(Exception):
    """Something a user can fix (bad input, a loss that became NaN): the message says what was wrong
    and what to do, and cli.run prints it as one line, without a traceback."""


class DataError(UserError):
    """Data, a checkpoint or a folder that cannot be used as given; the message says what was
    expected and how to fix it."""


# The exit code of a run that could not write a file (a full disk, a quota, a folder it may no longer
# write to, a failing disk): EX_IOERR, "an error occurred while doing I/O on some file", distinct
# from a bad argument (1), a stop to resume (75) and Ctrl-C (130), so a job script can tell "make
# room, then resume" from "fix the command".
WRITE_ERROR_EXIT_CODE = 74


class WriteError(UserError):
    """A file that could not be written (durable.durable_write): the message names it, says why,
    and what was kept; the previous file is as it was and no temporary file is left."""


class Interrupted(Exception):
    """Ctrl-C, with the message that says where the run stopped and what its folder holds."""


# The exit code of a run that stopped on a scheduler's signal after writing its checkpoint
# (stop_signals.py): EX_TEMPFAIL, "try again later", distinct from success (0), an error (1) and
# Ctrl-C (130), so a job script can tell "resume me" from "fix me".
STOPPED_EXIT_CODE = 75


class Stopped(Exception):
    """SIGTERM or SIGUSR1: the run finished its optimizer step and wrote its checkpoint."""


def one_line(e):
    """The message of `e` without the traceback text that DataLoader workers add when they re-raise
    an exception in the main process ("Caught DataError in DataLoader worker process 0. Original
    Traceback ...": the message is the last line)."""
    lines = str(e).strip().splitlines() or [""]
    return lines[-1].split(f"{type(e).__name__}: ", 1)[-1]


def run(main):
    """Run a script's main(): a UserError ends it with `error: <message>` and exit code 1 (a
    WriteError with WRITE_ERROR_EXIT_CODE), an Interrupted (Ctrl-C) with its message and 130, the
    shell's code for a command stopped by Ctrl-C, a Stopped run (SIGTERM, SIGUSR1) with its message
    and STOPPED_EXIT_CODE. Anything else is a bug and keeps its traceback."""
    try:
        main()
    except WriteError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(WRITE_ERROR_EXIT_CODE)
    except UserError as e:
        sys.exit(f"error: {one_line(e)}")
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(STOPPED_EXIT_CODE)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
