"""``kdqat export``: real low-bit artifacts (packed ternary/n-bit weights) and their loader.

- :func:`export_student` / :func:`export_model`: write a packed export folder from a trained student;
- :func:`load`: rebuild the runnable quantized model from an export folder alone (no DeepSpeed needed);
- :func:`read_meta` / :func:`verify_file`: the folder's metadata; size + SHA-256 check of the packed file;
- :mod:`kdqat_dist.export.packing`: the bit packing and code/scale math (pure functions).

Names are imported lazily so that registering the ``export`` subcommand stays cheap.
"""

from __future__ import annotations

_ARTIFACT = ("EXPORT_META", "WEIGHTS_FILE", "ExportReport", "export_model", "export_student", "load",
             "read_meta", "verify_file")


def __getattr__(name: str):
    if name in _ARTIFACT:
        from kdqat_dist.export import artifact

        return getattr(artifact, name)
    raise AttributeError(f"module 'kdqat_dist.export' has no attribute {name!r}")


__all__ = list(_ARTIFACT)
