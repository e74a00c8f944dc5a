"""Small file helpers shared by the writers of model folders and the caches."""

from __future__ import annotations

import os
from pathlib import Path


def ordinary_permissions(path: str | Path) -> None:
    """Give a written file the mode a plain ``open(..., "w")`` would (0666 less the umask).

    safetensors' ``save_file`` creates its file 0600, so a model folder shared with a group, a serving
    container or another user would not be readable there.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def cache_root() -> Path:
    """``$KDQAT_CACHE`` if set, else ``~/.cache/kdqat_dist``: where tokenized data and tiny models are cached."""
    root = os.environ.get("KDQAT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kdqat_dist"
