"""Run by tests/distributed/test_dist_token.py under ``torchrun --nproc_per_node 2``: KD-QAT of a tiny
token-classification student (ZeRO-2 and ZeRO-3) with a ZeRO-3 teacher on a CoNLL folder.

Each rank writes ``<out>/rank<r>.json`` with the training logs (``zero2``, ``zero3``) and the entity F1 of
every evaluation (``evals_zero3``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdqat_dist.config import load_config
from kdqat_dist.engine import dist
from kdqat_dist.engine.loop import run


def _cfg(args, name: str, *extra: str):
    return load_config(
        "tiny_debug",
        [
            f"teacher.path={args.teacher}",
            f"train.output_dir={args.out / name}",
            "data.task=conll2003",
            f"data.source={args.data}",
            "engine.backend=deepspeed",
            "engine.deepspeed.teacher=zero3",
            "train.log_every=1",
            "train.dropout=0",
            f"train.max_steps={args.steps}",
            "train.eval_every=1",
            *extra,
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group()  # owned here; each backend below reuses it and leaves it up
    result: dict = {"world_size": dist.world_size()}
    result["zero2"] = run(_cfg(args, "zero2", "engine.deepspeed.zero_stage=2"), "train")["train_log"]
    zero3 = run(_cfg(args, "zero3", "engine.deepspeed.zero_stage=3"), "train")
    result["zero3"], result["evals_zero3"] = zero3["train_log"], zero3["history"]
    (args.out / f"rank{dist.rank()}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
