"""Process-group plumbing: who am I, how many are we, and bringing the group up and down.

Works under every launcher the project ships (``deepspeed``, ``torchrun``, Slurm + torchrun, Ray Train)
and with none: with ``RANK``/``WORLD_SIZE`` unset the process is world size 1 on a free local port, so
``engine.backend=deepspeed`` also runs as a plain ``kdqat train``.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from kdqat_dist.engine.ds_workarounds import skip_shm_comm_build


def free_port() -> int:
    # launch.py has its own: importing it here would pull the training loop into this plumbing module,
    # and launch.py importing this one would load DeepSpeed on every `kdqat` command
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


def init_process_group(timeout_s: float | None = None) -> bool:
    """Bring up DeepSpeed's comm layer over the launcher's group; returns True if we created the group.

    A group that already exists (Ray Train's workers) is reused and left for its owner to destroy.
    """
    skip_shm_comm_build()
    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        return False
    ensure_launch_env()
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("KDQAT_DIST_TIMEOUT_S", 1800)))
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), timeout=timeout, verbose=False
    )
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


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``t`` over ranks (out of place). NCCL needs device tensors; gloo is happy with CPU ones."""
    buf = t.detach().to(device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def gather_objects(obj) -> list:
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    dist.barrier()
