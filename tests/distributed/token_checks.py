"""Run by tests/distributed/test_dist_token.py under ``torchrun --nproc_per_node 2``: KD-QAT of a tiny
token-classification student (ZeRO-2 and ZeRO-3) with a ZeRO-3 teacher on a CoNLL folder.

Each rank writes ``<out>/rank<r>.json`` with the training logs (``zero2``, ``zero3``) and the entity F1 of
every evaluation (``evals_zero3``).
"""

from __future__ import annotations

import argparse

from rank_job import deepspeed_config, rank_job

from kdqat_dist.engine.loop import run


def checks(args: argparse.Namespace) -> dict:
    conll = ("data.task=conll2003", f"data.source={args.data}")
    zero2 = run(deepspeed_config(args, "zero2", *conll, "engine.deepspeed.zero_stage=2"), "train")
    zero3 = run(deepspeed_config(args, "zero3", *conll, "engine.deepspeed.zero_stage=3"), "train")
    return {"zero2": zero2["train_log"], "zero3": zero3["train_log"], "evals_zero3": zero3["history"]}


if __name__ == "__main__":
    rank_job(checks, "--data")
