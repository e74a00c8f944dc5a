"""The data layer's error type; it lives in :mod:`kdqat_dist.errors` with the others."""

from __future__ import annotations

from kdqat_dist.errors import DataError

__all__ = ["DataError"]
