"""Errors a user can act on.

Anything raised as :class:`GnaqInputError` is the user's input being wrong (a path,
a column, a value, a config key). The CLI prints its one-line message and exits with
status 2; library callers can catch it like any ``ValueError``.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class GnaqInputError(ValueError):
    """Bad input: the message names the file, column or value at fault."""


class ConfigError(GnaqInputError):
    """A config file or override that does not fit the schema."""


class DistributedTrainingError(RuntimeError):
    """A distributed worker failed; the message carries the worker's own error (exit 1)."""
