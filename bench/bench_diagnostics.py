"""Cost of the training-time diagnostics (issue #7): a short real `kdqat train` of MiniLM-L6, on vs off.

Both runs are the same KD-QAT run of the demo task (W2 E2 A8, logits + hidden + map + output losses) with
an untuned MiniLM-L6 as its own teacher (timing does not need a fine-tuned one), each in its own process:
``train.diagnostics=true`` and ``=false``. Reported per run: the wall time of ``Trainer.train()`` (set-up
excluded) and, in the run with diagnostics, the time spent inside them, measured in-process by wrapping
``log_diagnostics`` (log steps), ``log_flip_rate`` (start + evaluations) and ``Trainer._contributions``
(every micro-batch). The in-process time is the robust number on a shared machine; the wall difference
also holds what the wrapping cannot see (clip counting in the first forward after each log step) and noise.
``--log-every 2`` logs 5x more often than the recipes' default (10), so the log-step cost is overstated.

Usage: HF_HUB_OFFLINE=1 python bench/bench_diagnostics.py [--steps 20] [--log-every 2] [--eval-every 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def _timed(table: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            table[name] += time.perf_counter() - t0
            table[name + "_calls"] += 1

    return wrapper


def one(diagnostics: bool, teacher: str, out: str, args: argparse.Namespace) -> dict:
    import torch

    import kdqat_dist.engine.diagnostics as D
    from kdqat_dist.config import load_config
    from kdqat_dist.engine.loop import Trainer

    torch.set_num_threads(args.threads)
    spent: dict[str, float] = defaultdict(float)
    # the loop imports these by name at each call, so wrapping the module's attributes catches every call
    D.log_diagnostics = _timed(spent, "log_diagnostics", D.log_diagnostics)
    D.log_flip_rate = _timed(spent, "log_flip_rate", D.log_flip_rate)
    Trainer._contributions = _timed(spent, "contributions", Trainer._contributions)
    cfg = load_config(
        "demo",
        [
            f"teacher.path={teacher}",
            f"train.output_dir={out}",
            f"train.max_steps={args.steps}",
            f"train.log_every={args.log_every}",
            f"train.eval_every={args.eval_every}",
            f"train.batch_size={args.batch}",
            "train.device=cpu",
            "train.progress=false",
            "data.max_eval_samples=64",
            f"train.diagnostics={str(diagnostics).lower()}",
        ],
    )
    trainer = Trainer(cfg, "train").setup()
    try:
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    finally:
        trainer.cleanup()
    inside = sum(v for k, v in spent.items() if not k.endswith("_calls"))
    return {"diagnostics": diagnostics, "train_wall_s": wall, "inside_diagnostics_s": inside, **spent}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one == "on", args.teacher, args.out, args)))
        return
    from kdqat_dist.models.encoders import load_classifier, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        load_classifier("minilm", 2).save_pretrained(teacher)
        load_tokenizer("minilm").save_pretrained(teacher)
        rows = {}
        for mode in ("off", "on"):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                mode,
                "--teacher",
                str(teacher),
                "--out",
                f"{tmp}/{mode}",
                "--steps",
                str(args.steps),
                "--log-every",
                str(args.log_every),
                "--eval-every",
                str(args.eval_every),
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    on, off = rows["on"], rows["off"]
    print(
        f"MiniLM-L6 KD-QAT, demo task, batch {args.batch}, {args.steps} steps, log every {args.log_every}, "
        f"evaluate every {args.eval_every} (64 dev examples), {args.threads} threads"
    )
    print(
        f"train() wall: diagnostics off {off['train_wall_s']:.1f} s, on {on['train_wall_s']:.1f} s "
        f"({100 * (on['train_wall_s'] / off['train_wall_s'] - 1):+.1f}%)"
    )
    print(
        f"inside the diagnostics (run with them on): {on['inside_diagnostics_s']:.2f} s = "
        f"{100 * on['inside_diagnostics_s'] / on['train_wall_s']:.1f}% of its train() wall"
    )
    for name in ("log_diagnostics", "log_flip_rate", "contributions"):
        n = int(on.get(name + "_calls", 0))
        if n:
            print(f"  {name:18s} {n:4d} calls  {on[name]:7.3f} s  {1000 * on[name] / n:8.2f} ms/call")


if __name__ == "__main__":
    main()
