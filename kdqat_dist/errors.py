"""The exception types of kdqat-dist, in one leaf module that imports nothing (cheap to import anywhere).

Two kinds of failure, printed differently by the CLI:

- **user errors** (:class:`ConfigError` and its subclass :class:`DataError`, and :class:`TrainingError`):
  a bad config, data file, path or CLI argument, or a run that cannot go on; one line naming what is wrong
  and what is allowed, exit status 2, no traceback;
- **internal errors** (:class:`InternalError`): an invariant of kdqat-dist itself is broken (a bug); the
  traceback is shown and the message says it is a bug to report.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in a config file, an override, a file or a CLI argument (printed as one line)."""


class DataError(ConfigError):
    """Bad input data or a data setting: one line naming the file/line/column and what is allowed."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a failed rank); printed as one line by the CLI."""


class InternalError(RuntimeError):
    """A broken internal invariant: a bug in kdqat-dist, never the user's input. Shown with its traceback."""

    def __init__(self, message: str):
        super().__init__(f"{message} (internal error: this is a bug in kdqat-dist, please report it)")
