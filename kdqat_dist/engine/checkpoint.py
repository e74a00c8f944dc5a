"""The checkpoint folder every engine writes, and how a resume finds and checks it.

``<output_dir>/checkpoints/step<N>/`` holds the engine's own files (one ``state.pt`` in one process,
DeepSpeed's or ``torch.distributed.checkpoint``'s shards) plus one ``rank<r>_state.pt`` per rank with the
loop's state and RNG states; ``checkpoints/latest`` names the newest complete one. A resume either
continues exactly from the checkpoint ``latest`` names or stops with one line naming the file and what is
wrong with it: never a silent fresh start, never a traceback for a damaged or foreign file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdqat_dist.engine.dist import Ranks
from kdqat_dist.errors import ConfigError, InternalError

RANK_STATE = "rank{rank:05d}_state.pt"
TAG = re.compile(r"step\d+")
# what torch says when a saved tensor does not fit the parameter it is loaded into
_DOES_NOT_FIT = ("mismatch", "missing key", "unexpected key", "doesn't match", "does not match")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def commit_checkpoint(tmp: Path, final: Path, keep: int | None = None) -> None:
    """Atomically publish a finished checkpoint and point ``latest`` at it; then keep the newest ``keep``.

    The folder is complete before it is renamed into place, and ``latest`` is replaced with an atomic
    rename, so a crash mid-write never leaves a ``latest`` that names a partial checkpoint. ``latest``
    holds the bare tag, as DeepSpeed's own ``latest`` does, so ``zero_to_fp32.py`` works on the folder.
    Older ``step*`` folders are deleted only after ``latest`` has moved, so a crash while pruning leaves
    extra checkpoints, never too few.
    """
    if final.exists():  # complete but never published (a crash before `latest` moved): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = final.parent / "latest.tmp"
    with open(latest_tmp, "w") as f:
        f.write(final.name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, final.parent / "latest")
    if keep is not None:
        for old in step_folders(final.parent)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def step_folders(root: Path) -> list[Path]:
    """The published checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and TAG.fullmatch(p.name))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint folder ``<root>/latest`` names; None when the run has none yet.

    Raises:
        ConfigError: naming the file: ``latest`` is unreadable or malformed, or names a folder that does
            not exist; or there are checkpoint folders but no ``latest`` (which one to resume is unknown).
    """
    f = root / "latest"
    existing = ", ".join(p.name for p in step_folders(root)[-3:]) or "none"
    fix = f"write the name of the checkpoint folder to resume from ({existing} here) into {f}"
    if not f.exists():
        if step_folders(root):
            raise ConfigError(f"--resume: {root} holds checkpoints but no 'latest' file naming one; {fix}")
        return None
    try:
        text = f.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume: {f} cannot be read ({type(exc).__name__}); {fix}") from None
    tag = text
    if text.startswith("{"):  # the JSON pointer of earlier versions: {"tag": "step0000100"}
        try:
            tag = json.loads(text)["tag"]
        except (json.JSONDecodeError, KeyError, TypeError):
            tag = None
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise ConfigError(f"--resume: {f} does not name a checkpoint (got {text[:60]!r}); {fix}")
    if not (root / tag).is_dir():
        raise ConfigError(f"--resume: {f} names {tag}, but {root / tag} does not exist; {fix}")
    return root / tag


def save_sharded(
    ckpt_dir: Path, ranks: Ranks, write_shards: Callable[[Path], None], rank_state: dict, keep: int | None
) -> None:
    """A checkpoint written by every rank: the engine's own files (``write_shards(folder)``, a collective
    where the engine's save is one) and this rank's ``rank_state``, into ``<tag>.tmp``; then rank 0
    publishes it (:func:`commit_checkpoint`)."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if ranks.is_main and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-write
    ranks.barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    write_shards(tmp)
    torch.save(
        {**rank_state, "rng": rng_state(), "world_size": ranks.world_size}, tmp / RANK_STATE.format(rank=ranks.rank)
    )
    ranks.barrier()
    if ranks.is_main:
        commit_checkpoint(tmp, ckpt_dir, keep=keep)
    ranks.barrier()


def load_rank_state(ckpt_dir: Path, rank: int) -> dict:
    """This rank's part of a :func:`save_sharded` checkpoint, its RNG states restored."""
    state = torch.load(ckpt_dir / RANK_STATE.format(rank=rank), map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state


def check_rank_count(ckpt_dir: Path, world_size: int) -> None:
    """Refuse a checkpoint written by another number of ranks (each rank's data order and RNG differ)."""
    saved = len(list(ckpt_dir.glob("rank*_state.pt")))
    if saved != world_size:  # every rank checks the same folder, so all refuse together
        raise ConfigError(
            f"--resume: {ckpt_dir} was written by {saved} rank(s); resume it with the same "
            f"number of ranks (now {world_size})"
        )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]  # torch's header line says nothing; the next names the tensor
    return (lines or [type(exc).__name__])[0][:200]


@contextlib.contextmanager
def readable_checkpoint(path: Path) -> Iterator[None]:
    """Turn a checkpoint that cannot be loaded into one ConfigError line that names ``path`` and the fix:
    a truncated or unreadable file, or tensors that do not fit the model being trained."""
    try:
        yield
    except (ConfigError, InternalError):
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError, KeyError) as exc:
        first = _first_line(exc)
        older = f"to resume from an older one, write its folder name (e.g. step0000100) into {_latest_of(path)}"
        if isinstance(exc, (RuntimeError, ValueError)) and any(s in str(exc).lower() for s in _DOES_NOT_FIT):
            raise ConfigError(
                f"--resume: the checkpoint {path} does not fit the model being trained ({first}); it was "
                "written for another model: resume with the run's own teacher and config, or start a new "
                "run in another output_dir"
            ) from None
        raise ConfigError(f"--resume: the checkpoint {path} is damaged or incomplete ({first}); {older}") from None


def _latest_of(path: Path) -> Path:
    folder = path if TAG.fullmatch(path.name) else path.parent
    return folder.parent / "latest"
