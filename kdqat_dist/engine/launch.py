"""Start a multi-rank ``kdqat`` job from Python with the launcher its engine uses, as ``launch/`` does:
the ``deepspeed`` launcher for ``engine.backend=deepspeed``, ``torchrun`` for ``engine.backend=fsdp2``.

Used by ``kdqat demo`` so that its KD-QAT stage runs the product's real shape (one rank per GPU, or CPU
ranks over gloo) through the same launcher users run, not a shortcut.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import torch

from kdqat_dist.engine.dist import free_port
from kdqat_dist.errors import TrainingError

LAUNCHERS = {"deepspeed": "DeepSpeed", "fsdp2": "torchrun"}  # engine -> the launcher that starts its ranks


def default_num_procs() -> int:
    """One rank per visible GPU; two CPU ranks where there is none (the smallest real sharding)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def launch_command(
    engine: str, command: str, config: str, overrides: list[str], num_procs: int, port: int
) -> list[str]:
    """The launcher command line: ``deepspeed --num_accelerators N --module kdqat_dist.cli <command> ...``
    or ``torchrun --standalone --nproc_per_node N --module kdqat_dist.cli <command> ...``."""
    job = ["--module", "kdqat_dist.cli", command, "--config", config, f"engine.backend={engine}", *overrides]
    if engine == "deepspeed":
        runner = ["-m", "deepspeed.launcher.runner", "--num_accelerators", str(num_procs), "--master_port", str(port)]
    elif engine == "fsdp2":
        # --standalone picks its own free rendezvous port
        runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_procs)]
    else:
        raise ValueError(f"engine must be one of {sorted(LAUNCHERS)}, got {engine!r}")
    return [sys.executable, *runner, *job]


def run_launcher(engine: str, command: str, config: str, overrides: list[str], num_procs: int) -> None:
    """Run the job to its end; raises :class:`TrainingError` (one line) when any rank fails."""
    cmd = launch_command(engine, command, config, overrides, num_procs, free_port())
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():  # CPU ranks share the cores: more threads each only oversubscribes
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_procs)))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # we are not a rank
        env.pop(var, None)
    shown = "deepspeed " if engine == "deepspeed" else "torchrun "
    print("$ " + shown + shlex.join(cmd[cmd.index("-m") + 2 :]), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise TrainingError(f"the {num_procs}-rank {LAUNCHERS[engine]} job exited with code {rc} (its log is above)")
