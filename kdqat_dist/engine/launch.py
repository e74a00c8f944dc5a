"""Start a multi-rank ``kdqat`` job with the DeepSpeed launcher, as ``launch/deepspeed_single_node.sh`` does.

Used by ``kdqat demo`` so that its KD-QAT stage runs the product's real shape (one rank per GPU, or CPU
ranks over gloo) through the same launcher users run, not a shortcut.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import torch

from kdqat_dist.errors import TrainingError


def free_port() -> int:
    """A TCP port free on this host now (the launcher's rendezvous; two demos at once must not clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_num_procs() -> int:
    """One rank per visible GPU; two CPU ranks where there is none (the smallest real sharding)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def deepspeed_command(command: str, config: str, overrides: list[str], num_procs: int, port: int) -> list[str]:
    """The launcher command line: ``deepspeed --num_accelerators N --module kdqat_dist.cli <command> ...``."""
    runner = ["-m", "deepspeed.launcher.runner", "--num_accelerators", str(num_procs), "--master_port", str(port)]
    job = ["--module", "kdqat_dist.cli", command, "--config", config, "engine.backend=deepspeed", *overrides]
    return [sys.executable, *runner, *job]


def run_deepspeed(command: str, config: str, overrides: list[str], num_procs: int) -> None:
    """Run the job to its end; raises :class:`TrainingError` (one line) when any rank fails."""
    cmd = deepspeed_command(command, config, overrides, num_procs, free_port())
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():  # CPU ranks share the cores: more threads each only oversubscribes
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_procs)))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # we are not a rank
        env.pop(var, None)
    print("$ deepspeed " + shlex.join(cmd[cmd.index("--num_accelerators") :]), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise TrainingError(f"the {num_procs}-rank DeepSpeed job exited with code {rc} (its log is above)")
