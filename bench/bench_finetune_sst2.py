"""Fine-tune the offline MiniLM teacher on real SST-2 (issue #3 benchmark), then optionally KD-QAT it.

Reads ../shared/data/sst2/train.tsv (never committed), holds out the last ``--dev`` rows as a dev split
(the official dev set is not available here), fine-tunes on a subset of the rest and reports time and dev
accuracy. Usage:
    python bench/bench_finetune_sst2.py --train 8000 --dev 2000 --epochs 1 --out bench/out/sst2_teacher
    python bench/bench_finetune_sst2.py ... --kdqat-epochs 2   # then the demo's W2/E2/A8 KD-QAT on the same data
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--train", type=int, default=8000, help="training rows used (from the front)")
    ap.add_argument("--dev", type=int, default=2000, help="held-out rows (from the end)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", default="bench/out/sst2_teacher")
    ap.add_argument(
        "--kdqat-epochs",
        type=float,
        default=0.0,
        help="then KD-QAT the teacher with the demo recipe (W2/E2/A8, map+output) for this many epochs",
    )
    args = ap.parse_args()
    src = Path(args.data)
    if not src.exists():
        sys.exit(f"SST-2 not found at {src}")
    rows = list(csv.reader(src.open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    work = Path(args.out) / "data"
    work.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", body[: args.train]), ("dev.tsv", body[-args.dev :])):
        # Written back verbatim (a csv.writer would escape the quotes inside sentences).
        (work / name).write_text("\n".join("\t".join(r) for r in [header, *part]) + "\n")

    from kdqat_dist.config import load_config
    from kdqat_dist.pipeline import run_and_report

    run_dir = Path(args.out) / "run"
    cfg = load_config(
        None,
        [
            "model.name_or_path=minilm",
            "data.task=sst2",
            f"data.source={work}",
            f"train.output_dir={run_dir}",
            f"train.epochs={args.epochs}",
            "train.batch_size=32",
            "train.lr=5e-5",
            "train.eval_every=100",
            "train.progress=false",
        ],
    )
    t0 = time.perf_counter()
    result = run_and_report(cfg, "finetune")
    wall = time.perf_counter() - t0
    report = {
        "train_rows": args.train,
        "dev_rows": args.dev,
        "epochs": args.epochs,
        "steps": result["total_steps"],
        "wall_s": round(wall, 1),
        "best_dev_acc": result["best"]["acc"],
        "best_step": result["best"]["step"],
    }
    if args.kdqat_epochs > 0:
        cfg = load_config(
            "demo",
            [
                "data.task=sst2",
                f"data.source={work}",
                "data.max_seq_length=64",
                f"teacher.path={run_dir / 'model'}",
                f"train.output_dir={Path(args.out) / 'kdqat'}",
                f"train.epochs={args.kdqat_epochs}",
                "train.eval_every=100",
                "train.progress=false",
            ],
        )
        t0 = time.perf_counter()
        kd = run_and_report(cfg, "train")
        report.update(
            kdqat_epochs=args.kdqat_epochs,
            kdqat_steps=kd["total_steps"],
            kdqat_wall_s=round(time.perf_counter() - t0, 1),
            student_best_dev_acc=kd["best"]["acc"],
            student_best_step=kd["best"]["step"],
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
