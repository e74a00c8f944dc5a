"""Where a rank's bytes are: parameters, gradients, optimizer state, the teacher; and the per-rank table.

Counts storages, not tensors, so views of one flat buffer (DeepSpeed's) count once; a sharded tensor
(FSDP2's ``DTensor``) counts its local shard.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

MIB = 1 / 2**20


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor``, else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = local_tensor(t).untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The optimizer's per-parameter state tensors (moments), leaving out scalar step counters."""
    if optimizer is None:
        return []
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]


def memory_report(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
    """Parameter, gradient and optimizer-state bytes held by this process (MiB), plus peak RSS/CUDA."""
    out: dict[str, float] = {}
    if model is not None:
        params = list(model.parameters())
        out["param_mib"] = storage_bytes(p.data for p in params) * MIB
        out["grad_mib"] = storage_bytes(p.grad for p in params if p.grad is not None) * MIB
    if optimizer is not None:
        out["optim_mib"] = storage_bytes(optimizer_state_tensors(optimizer)) * MIB
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() * MIB
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
