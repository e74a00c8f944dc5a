"""Execution backends: how the student steps, how the teacher is held, and how ranks talk.

The training loop (:mod:`kdqat_dist.engine.loop`) talks only to the :class:`Backend` interface, so the
same loop runs in one process (:class:`LocalBackend`) or under DeepSpeed
(:class:`~kdqat_dist.engine.ds_backend.DeepSpeedBackend`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import resource
import shutil
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from kdqat_dist.config import ConfigError, RunConfig
from kdqat_dist.engine.optim import global_clip, make_optimizer, make_scheduler
from kdqat_dist.models.encoders import load_classifier


class Backend(Protocol):
    """What the training loop needs of a backend: the student's stepping, the teacher, the ranks.

    ``rank``/``world_size``/``is_main`` describe this process; ``device`` is where batches go.
    """

    rank: int
    world_size: int
    is_main: bool
    device: torch.device

    def setup_student(self, model: nn.Module, total_steps: int) -> nn.Module:
        """Take over the prepared student (optimizer, schedule); returns what the loop calls forward on."""
        ...

    def load_teacher(self, path: str, num_labels: int) -> nn.Module:
        """The fine-tuned teacher at ``path``: frozen, in eval mode, in the backend's precision."""
        ...

    def student_module(self) -> nn.Module:
        """The student's ``nn.Module`` (inside any engine wrapper)."""
        ...

    def partitioned_student(self) -> bool:
        """True when the student's submodules must not be called outside its own forward (ZeRO-3)."""
        ...

    def partitioned_teacher(self) -> bool:
        """True when the teacher's submodules must not be called outside its own forward (ZeRO-3)."""
        ...

    def gathered_student(self) -> AbstractContextManager[nn.Module]:
        """The student with whole weights inside the block (a collective under ZeRO-3)."""
        ...

    def gathered_params(self, params: list[nn.Parameter]) -> AbstractContextManager:
        """Whole ``params`` inside the block (a collective under ZeRO-3)."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> bool:
        """Call after every micro-batch; True when the weights changed (an accumulation boundary)."""
        ...

    def lr(self) -> float: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor: ...

    def gather_objects(self, obj: Any) -> list[Any]: ...

    def barrier(self) -> None: ...

    def save_checkpoint(self, ckpt_dir: Path, client_state: dict) -> None: ...

    def load_checkpoint(self, ckpt_dir: Path) -> dict:
        """Restore the student, optimizer, schedule and RNG; returns the loop's ``client_state``."""
        ...

    def memory_report(self) -> dict[str, float]: ...

    def teardown(self) -> None: ...


def freeze_teacher(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """A teacher that is not partitioned: no gradients, eval mode, on ``device`` (in ``dtype``, if given)."""
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """The device ``name`` (``auto``, ``cpu``, ``cuda``...) names; ``key`` is the config key it came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda requested but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(name)


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


class LocalBackend:
    """Single process: torch AdamW, linear warmup/decay, global-norm clipping, gradient accumulation."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        self.micro = 0
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self._grad_peak = 0

    # -- models
    def setup_student(self, model: nn.Module, total_steps: int) -> nn.Module:
        if self.cfg.engine.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.student = model.to(self.device)
        self.optimizer = make_optimizer(model, self.cfg.train)
        self.scheduler = make_scheduler(self.optimizer, total_steps, self.cfg.train)
        return self.student

    def load_teacher(self, path: str, num_labels: int) -> nn.Module:
        self.teacher = freeze_teacher(load_classifier(path, num_labels, "eager"), self.device)
        return self.teacher

    def student_module(self) -> nn.Module:
        return self.student

    def partitioned_student(self) -> bool:
        return False

    def partitioned_teacher(self) -> bool:
        return False

    @contextlib.contextmanager
    def gathered_student(self) -> Iterator[nn.Module]:  # weights are always whole in one process
        yield self.student

    def gathered_params(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.student.state_dict()

    # -- stepping
    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum).backward()

    def step(self) -> bool:
        self.micro += 1
        if self.micro % self.cfg.train.grad_accum:
            return False
        grads = storage_bytes(p.grad for p in self.student.parameters() if p.grad is not None)
        self._grad_peak = max(self._grad_peak, grads)
        if (clip := global_clip(self.cfg.train)) > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- collectives (trivial in one process)
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    # -- checkpoints (for --resume)
    def save_checkpoint(self, ckpt_dir: Path, client_state: dict) -> None:
        tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "client": client_state,
                "rng": rng_state(),
            },
            tmp / "state.pt",
        )
        _commit_checkpoint(tmp, ckpt_dir, keep=self.cfg.train.keep_checkpoints)

    def load_checkpoint(self, ckpt_dir: Path) -> dict:
        with damaged_checkpoint(ckpt_dir):
            state = torch.load(ckpt_dir / "state.pt", map_location=self.device, weights_only=False)
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _fit_moments_to_params(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return state["client"]

    def memory_report(self) -> dict[str, float]:
        out = memory_report(self.student, getattr(self, "optimizer", None))
        out["grad_mib"] = self._grad_peak / 2**20
        if self.teacher is not None:
            out["teacher_param_mib"] = storage_bytes(p.data for p in self.teacher.parameters()) / 2**20
        return out

    def teardown(self) -> None:
        pass


def _commit_checkpoint(tmp: Path, final: Path, keep: int | None = None) -> None:
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
        steps = sorted(p for p in final.parent.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name))
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def damaged_checkpoint(ckpt_dir: Path) -> Iterator[None]:
    """Turn a truncated or unreadable checkpoint file into one ConfigError line that says what to do."""
    try:
        yield
    except ConfigError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"--resume: the checkpoint {ckpt_dir} is damaged or incomplete ({first}); to resume "
            f"from an older one, write its folder name (e.g. step0000100) into "
            f"{ckpt_dir.parent / 'latest'}"
        ) from None


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The folder ``<ckpt_root>/latest`` names, or None if there is no complete checkpoint."""
    f = ckpt_root / "latest"
    if not f.exists():
        return None
    text = f.read_text().strip()
    tag = json.loads(text)["tag"] if text.startswith("{") else text
    p = ckpt_root / tag
    return p if p.exists() else None


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def memory_report(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
    """Parameter, gradient and optimizer-state bytes held by this process (MiB), plus peak RSS/CUDA."""
    mib = 1 / 2**20
    out: dict[str, float] = {}
    if model is not None:
        params = list(model.parameters())
        out["param_mib"] = storage_bytes(p.data for p in params) * mib
        out["grad_mib"] = storage_bytes(p.grad for p in params if p.grad is not None) * mib
    if optimizer is not None:
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        out["optim_mib"] = storage_bytes(states) * mib
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() * mib
    return out


MEMORY_COLUMNS = (
    "param_mib",
    "master_mib",
    "grad_mib",
    "optim_mib",
    "teacher_param_mib",
    "peak_rss_mib",
    "peak_cuda_mib",
)


def memory_table(per_rank: list[dict]) -> str:
    """One line per rank: where the bytes are, so sharding is visible in the log."""
    cols = [c for c in MEMORY_COLUMNS if any(c in r for r in per_rank)]
    head = "memory (MiB) per rank: " + " ".join(f"{c.removesuffix('_mib'):>13s}" for c in cols)
    lines = [head] + [
        f"  rank {i:<16d}" + " ".join(f"{r.get(c, 0.0):13.2f}" for c in cols) for i, r in enumerate(per_rank)
    ]
    return "\n".join(lines)


def _fit_moments_to_params(optimizer: torch.optim.Optimizer) -> None:
    """Checkpoints from before per-tensor LSQ steps had shape (1,) hold 0-d moments for them (the modules
    reshape the steps themselves on load): give the moments the parameter's shape. Step counters stay."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if k != "step" and torch.is_tensor(v) and v.dim() == 0 and p.shape == (1,):
                state[k] = v.reshape(1)
