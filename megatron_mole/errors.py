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
