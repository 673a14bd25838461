"""One exception family: everything a user can cause raises a RequantError subclass.

The CLI turns any of them into one line on stderr and exit code 2; nothing else is caught there,
so a real bug still shows its traceback.
"""

from __future__ import annotations


class RequantError(Exception):
    """Base of every error requant raises on bad input or bad data."""


class ConfigError(RequantError):
    """A setting has a value that is not allowed (the message names the value and what is allowed)."""


class InputError(RequantError):
    """A model, text or path given by the user cannot be used."""


class CheckpointError(RequantError):
    """A checkpoint on disk is unreadable, truncated, inconsistent or of an unknown version."""


class NumericalError(RequantError):
    """NaN or Inf appeared in weights, a loss or gradients."""


class OutputError(RequantError):
    """An output cannot be written: no space, no permission, a path in the way, or another run writing it."""
