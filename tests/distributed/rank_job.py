"""What the torchrun check scripts of tests/distributed share (zero_checks.py, token_checks.py): the parity
runs' config under DeepSpeed and the job's frame (arguments, process group, one JSON file per rank)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from kdqat_dist.config import RunConfig, load_config
from kdqat_dist.engine import dist


def deepspeed_config(args: argparse.Namespace, name: str, *extra: str) -> RunConfig:
    """``tiny_debug`` KD-QAT of ``args.teacher`` under DeepSpeed with a ZeRO-3 teacher, ``args.steps`` steps
    logged and evaluated each, dropout 0 (so ranks and the single process see the same model), output in
    ``args.out / name``; ``extra``: more ``key=value`` overrides."""
    return load_config(
        "tiny_debug",
        [
            f"teacher.path={args.teacher}",
            f"train.output_dir={args.out / name}",
            "engine.backend=deepspeed",
            "engine.deepspeed.teacher=zero3",
            "train.log_every=1",
            "train.dropout=0",
            f"train.max_steps={args.steps}",
            "train.eval_every=1",
            *extra,
        ],
    )


def rank_job(checks: Callable[[argparse.Namespace], dict], *required: str) -> None:
    """Run ``checks`` on this rank and write ``<out>/rank<r>.json``: ``world_size`` and what ``checks`` returns.

    Arguments: ``--teacher``, ``--out``, ``--steps`` (default 3) and each flag of ``required`` (a string).
    The process group is set up here, once, and every backend of ``checks`` reuses it and leaves it up.
    """
    ap = argparse.ArgumentParser()
    for flag in ("--teacher", *required):
        ap.add_argument(flag, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # two ranks on a shared CPU
    dist.init_process_group()
    result = {"world_size": dist.world_size(), **checks(args)}
    (args.out / f"rank{dist.rank()}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
