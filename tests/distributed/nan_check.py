"""Run by test_dist_launch.py under ``torchrun --nproc_per_node 2``: rank 1's attention-map term turns NaN
at the first step; every rank must stop at that step with the same one-line error (no rank left waiting
in a collective). Each rank writes its message to ``<out>/rank<r>.txt``."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kdqat_dist.config import load_config
from kdqat_dist.engine import dist
from kdqat_dist.engine.loop import Trainer, TrainingError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(
        "tiny_debug",
        [
            f"teacher.path={args.teacher}",
            f"train.output_dir={args.out / 'run'}",
            "engine.backend=deepspeed",
            "engine.deepspeed.zero_stage=2",
            "train.max_steps=3",
        ],
    )
    trainer = Trainer(cfg, "train").setup()
    real = trainer.objective.term_loss

    def poisoned(term, s, t, mask, *rest):
        v = real(term, s, t, mask, *rest)
        return v * float("nan") if term == "attn_map" and dist.rank() == 1 else v

    trainer.objective.term_loss = poisoned
    message = "no error"
    try:
        trainer.train()
    except TrainingError as exc:
        message = str(exc)
    (args.out / f"rank{dist.rank()}.txt").write_text(message)
    trainer.cleanup()


if __name__ == "__main__":
    main()
