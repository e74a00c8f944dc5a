"""The seam between the training loop and an engine: what each engine does, as a ``Protocol``.

The builder (:mod:`kdqat_dist.engine.build`) makes the models; an engine only wraps what it is given
(shards it, builds its optimizer, steps it, checkpoints it). Rank numbers and collectives are not part of
an engine: every engine shares :class:`~kdqat_dist.engine.dist.Ranks`. Engines: one process
(:mod:`~kdqat_dist.engine.local`), DeepSpeed ZeRO (:mod:`~kdqat_dist.engine.ds_backend`) and PyTorch FSDP2
(:mod:`~kdqat_dist.engine.fsdp2`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from kdqat_dist.engine.dist import Ranks
from kdqat_dist.errors import ConfigError

PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Backend(Protocol):
    """One engine. ``ranks``: this process among the run's ranks; ``device``: where batches go;
    ``optimizer``: the student's, once :meth:`setup_student` has built it."""

    ranks: Ranks
    device: torch.device
    optimizer: torch.optim.Optimizer | None

    # -- wrapping the models the builder made
    def building_teacher(self, hidden_size: int | None) -> AbstractContextManager:
        """The block in which the builder constructs the teacher (DeepSpeed ZeRO-3: partitioned as built)."""
        ...

    def setup_teacher(self, model: nn.Module) -> nn.Module:
        """The frozen teacher (eval mode, no gradients) in the engine's precision; returns what to call."""
        ...

    def setup_student(self, model: nn.Module, total_steps: int) -> nn.Module:
        """Take over the prepared student: shard it, build its optimizer and schedule; returns what to call."""
        ...

    def student_module(self) -> nn.Module:
        """The student's ``nn.Module`` (inside any engine wrapper)."""
        ...

    def partitioned_student(self) -> bool:
        """True when the student's weights are shards outside its forward (gather them to read them)."""
        ...

    def partitioned_teacher(self) -> bool:
        """True when the teacher's modules must not be called outside its own forward (distill/streaming.py)."""
        ...

    def gathered_params(self, params: list[nn.Parameter]) -> AbstractContextManager:
        """Whole ``params`` of the student inside the block (a collective when it is partitioned: every
        rank enters it with the same list)."""
        ...

    # -- stepping
    def autocast(self) -> AbstractContextManager:
        """The block the forward passes and losses run in (bf16 autocast in one process)."""
        ...

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Accumulate the gradients of ``loss / train.grad_accum``; ``sync=False`` on the micro-batches
        before the last of a step, whose gradients need not be reduced over the ranks yet."""
        ...

    def step(self) -> None:
        """The optimizer and schedule step, once per step, after its last micro-batch's backward."""
        ...

    def lr(self) -> float: ...

    # -- checkpoints (for --resume)
    def save_checkpoint(self, ckpt_dir: Path, client_state: dict) -> None: ...

    def load_checkpoint(self, ckpt_dir: Path) -> dict:
        """Restore the student, optimizer, schedule and RNG; returns the loop's ``client_state``."""
        ...

    def memory_report(self) -> dict[str, float]:
        """This rank's bytes (MiB) by kind: the columns of :func:`~kdqat_dist.engine.memory.memory_table`."""
        ...

    def teardown(self) -> None: ...


@contextlib.contextmanager
def gathered_student(backend: Backend) -> Iterator[nn.Module]:
    """The student with whole weights inside the block, on every rank (a collective when it is sharded)."""
    module = backend.student_module()
    with backend.gathered_params(list(module.parameters())):
        yield module


def enable_activation_checkpointing(model: nn.Module) -> None:
    """``engine.activation_checkpointing``: every Transformer layer's activations recomputed in the backward
    (non-reentrant checkpointing, which every engine's hooks support)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def freeze(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """No gradients, eval mode, on ``device`` (in ``dtype``, if given): a teacher nobody trains."""
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """The device ``name`` (``auto``, ``cpu``, ``cuda``...) names; ``key`` is the config key it came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda requested but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(name)
