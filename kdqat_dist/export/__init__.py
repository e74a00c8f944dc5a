"""``kdqat export``: real low-bit artifacts (packed ternary/n-bit weights) and their loader.

- :func:`export_student` / :func:`export_model`: write a packed export folder from a trained student;
- :func:`load`: rebuild the runnable quantized model from an export folder alone (no DeepSpeed needed);
- :func:`read_meta` / :func:`verify_file`: the folder's metadata; size + SHA-256 check of the packed file;
- :mod:`kdqat_dist.export.packing`: the bit packing and code/scale math (pure functions).
"""

from __future__ import annotations

from kdqat_dist.export.artifact import (
    EXPORT_META,
    WEIGHTS_FILE,
    ExportReport,
    export_model,
    export_student,
    load,
    read_meta,
    verify_file,
)

__all__ = [
    "EXPORT_META",
    "WEIGHTS_FILE",
    "ExportReport",
    "export_model",
    "export_student",
    "load",
    "read_meta",
    "verify_file",
]
