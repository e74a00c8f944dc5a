"""The process group and the collectives every engine shares, through ``torch.distributed`` only.

Works under every launcher the project ships (``deepspeed``, ``torchrun``, Slurm + torchrun, Ray Train)
and with none: with ``RANK``/``WORLD_SIZE`` unset the process is world size 1 on a free local port, so a
sharded engine also runs as a plain ``kdqat train``. No engine's own library is imported here: DeepSpeed
attaches its comm layer to this group (:mod:`kdqat_dist.engine.ds_backend`), FSDP2 uses it as it is.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host now (a launcher-less run's rendezvous; two at once must not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ADDED_ENV: list[str] = []  # variables we set for a launcher-less run; removed again at teardown


def ensure_launch_env() -> bool:
    """Fill the variables ``env://`` rendezvous needs; returns True if this is a launcher-less run."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return False
    added = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    added = {k: v for k, v in added.items() if k not in os.environ}
    os.environ.update(added)
    _ADDED_ENV.extend(added)
    return True


def init_process_group(device_type: str | None = None, timeout_s: float | None = None) -> bool:
    """Bring up the default group over the launcher's environment; returns True if it was created here.

    ``device_type``: ``cuda`` (NCCL) or ``cpu`` (gloo); None: CUDA when there is one. A group that already
    exists (Ray Train's workers, a test script's) is reused and left for its owner to destroy.
    """
    if dist.is_initialized():
        return False
    ensure_launch_env()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("KDQAT_DIST_TIMEOUT_S", 1800)))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return True


def destroy_process_group() -> None:
    """Tear the group down and forget the variables a launcher-less run set (in-process callers such as
    tests and notebooks must not look like rank 0 of a launched job afterwards)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    while _ADDED_ENV:
        os.environ.pop(_ADDED_ENV.pop(), None)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    dist.barrier()


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run, and the collectives the training loop needs.

    One process (``Ranks()``) needs no process group: every collective is the identity. ``device`` is where
    collective buffers go (NCCL takes device tensors only; gloo takes CPU ones).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def of_group(cls, device: torch.device) -> Ranks:
        """The default process group's ranks (world size 1 without one)."""
        return cls(rank(), world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (out of place, on ``t``'s device)."""
        if self.world_size == 1:
            return t
        buf = t.detach().to(self.device).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(t.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
