"""Errors caused by what a user asked for, as opposed to bugs.

The entry points print these as one message and exit with status 2, without a
traceback: the message itself names the bad value and what was expected.
"""


class UserError(Exception):
    """Base of every error a user can fix by changing a config value, a path or a file."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot work."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, unsafe or made for another model."""


class DiskFullError(UserError, OSError):
    """A file could not be written for lack of space (or quota) on its device; the file that was
    there before, if any, is unchanged."""
