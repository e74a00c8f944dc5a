"""The one error type of the data layer."""

from __future__ import annotations

from kdqat_dist.config import ConfigError


class DataError(ConfigError):
    """Bad input data or a data setting: one line naming the file/line/column and what is allowed.

    A subclass of :class:`ConfigError` so the CLI prints it as one line and exits non-zero.
    """
