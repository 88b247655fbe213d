"""One base error for everything a user can get wrong.

Every user-facing error derives from :class:`MoleError`, so the command line
reports any of them as one line (exit code 2) and callers can catch them all.
The subclasses keep the built-in type code already catches them by.
"""


class MoleError(Exception):
    """Base of megatron_mole's user-facing errors (bad config, checkpoint, input)."""


class ConfigError(MoleError, ValueError):
    """A configuration value is wrong; the message names the field."""


class CheckpointError(MoleError, ValueError):
    """A checkpoint is missing, damaged or does not fit; the message names the file or tensor."""


# What a command line reports as one line (exit status 2) instead of a traceback:
# megatron_mole's own errors and the OS's answer to a wrong path.
USER_ERRORS = (MoleError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def run_command(prog: str, run, args) -> int:
    """``run(args)`` as a command: a user error becomes ``PROG: error: MESSAGE`` (one
    line, on stderr) and exit status 2; anything else is a bug and propagates."""
    import sys

    try:
        return int(run(args) or 0)
    except USER_ERRORS as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{prog}: error: {message or type(error).__name__}", file=sys.stderr, flush=True)
        return 2
