"""KD-QAT accuracy on real SST-2 at a fixed budget: variants x seeds, one `kdqat train` process each.

The accuracy issue's setting: the MiniLM teacher fine-tuned on 20,000 SST-2 rows (``bench/sst2_data.py``
makes the folders; the teacher command is in bench/RESULTS.md), then 300 KD-QAT steps at batch 32, max
length 64, TWN ternary weights, row-wise ternary embeddings, 8-bit activations, logits + hidden +
attention-map losses, lr 2e-5, 10% warmup then linear decay, fp32 on the CPU. Each variant adds its
overrides. For every run the script records the best accuracy on the run's dev set (the 2k holdout, as the
reference selects, or for ``fullsent_*`` the 1,000-row sentence dev set), that student's accuracy on the
holdout, the 311-row sentence split and the 4,000-row sentence test set (with length buckets), the median
step time (TensorBoard ``train/step_time_s``) and peak RSS, one JSON line per run in ``<out>/results.jsonl``.

Usage:
    python bench/bench_accuracy_sst2.py --variants adamw bertadam --seeds 42 43 44
    python bench/bench_accuracy_sst2.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from sst2_runs import DATA, TEACHER, VARIANTS, evaluate_on, length_buckets, load_rows, run_one, sentence_test


def table(out: Path) -> str:
    """Markdown: one row per variant (mean ± sample std over its seeds) from ``<out>/results.jsonl``."""
    rows = load_rows(out)
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)

    def ms(xs: list[float]) -> str:
        pct = [100 * x for x in xs]
        return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}" if len(pct) > 1 else f"{pct[0]:.2f}"

    buckets = list(rows[0]["buckets"]) if rows and "buckets" in rows[0] else []
    lines = [
        "| variant | seeds | holdout | sentence split | "
        + " | ".join(f"{b} words" for b in buckets)
        + " | s/step (median) | peak RSS GiB |",
        "|---" * (6 + len(buckets)) + "|",
    ]
    for name, rs in by.items():
        cells = [ms([r["buckets"][b][1] for r in rs]) for b in buckets] if buckets else []
        steps = [r["s_per_step"] for r in rs if r.get("s_per_step")]
        step = f"{statistics.median(steps):.2f}" if steps else "-"
        rss = max(r["peak_rss_mib"] for r in rs) / 1024
        lines.append(
            f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {ms([r['holdout'] for r in rs])} | "
            f"{ms([r['sentences'] for r in rs])} | "
            + " | ".join(cells)
            + f" | {step} | {f'{rss:.2f}' if rss else '-'} |"
        )
    tested = {name: [r for r in rs if r.get("sentence_test") is not None] for name, rs in by.items()}
    tested = {name: rs for name, rs in tested.items() if rs}
    if tested:  # the 4,000-row sentence test set, by length (rows scored before it existed are left out)
        sizes = next(iter(tested.values()))[0]["sentence_test_buckets"]
        heads = [b for b, (n, _) in sizes.items() if n]  # no whole sentence is under 8 words
        lines += [
            "",
            "| variant | seeds | selected on | sentence dev (1,000) | sentence test (4,000) | "
            + " | ".join(f"{b} words ({sizes[b][0]})" for b in heads)
            + " |",
            "|---" * (5 + len(heads)) + "|",
        ]
        for name, rs in tested.items():
            dev = [r["sentence_dev"] for r in rs if r.get("sentence_dev") is not None]
            lines.append(
                f"| {name} | {', '.join(str(r['seed']) for r in rs)} | {rs[0].get('selected_on', 'holdout')} | "
                f"{ms(dev) if dev else '-'} | {ms([r['sentence_test'] for r in rs])} | "
                + " | ".join(ms([r["sentence_test_buckets"][b][1] for r in rs]) for b in heads)
                + " |"
            )
    return "\n".join(lines)


def plot_gap(out: Path, variants: list[str], png: Path) -> None:
    """Bars: student minus teacher on the 4,000-row sentence test set and its length buckets, one group per
    split and one bar per variant (mean over its seeds, whiskers one sample s.d.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(out)
    rows = [r for r in rows if r.get("sentence_test") is not None]
    teacher = next(r for r in rows if r["variant"] == "teacher (FP)")
    sizes = teacher["sentence_test_buckets"]
    splits = [("sentence test", None)] + [(f"{b} words ({n})", b) for b, (n, _) in sizes.items() if n]

    def acc(r: dict, bucket: str | None) -> float:
        return 100 * (r["sentence_test"] if bucket is None else r["sentence_test_buckets"][bucket][1])

    fig, ax = plt.subplots(figsize=(2.4 * len(splits) + 4, 4))
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            sys.exit(f"no sentence-test rows for variant {name!r} in {out / 'results.jsonl'}")
        gaps = [[acc(r, b) - acc(teacher, b) for r in rs] for _, b in splits]
        ax.bar(
            [j + (i - (len(variants) - 1) / 2) * width for j in range(len(splits))],
            [statistics.mean(g) for g in gaps],
            width,
            yerr=[statistics.stdev(g) for g in gaps] if len(rs) > 1 else None,
            capsize=3,
            label=f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})",
        )
    ax.axhline(-0.5, color="grey", linestyle="--", linewidth=1, label="target: -0.5")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(splits)), [s for s, _ in splits])
    ax.set_ylabel("student - teacher (accuracy points)")
    ax.set_title("SST-2 whole sentences: gap to the FP teacher by length")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["adamw", "bertadam"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[42])
    ap.add_argument("--out", type=Path, default=Path("bench/out/acc/runs"))
    ap.add_argument("--teacher", type=Path, default=TEACHER)
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--table", action="store_true", help="print the markdown table of <out>/results.jsonl")
    ap.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="draw the gap to the teacher on the sentence test set, by length, for --variants, and exit",
    )
    ap.add_argument(
        "--score-teacher",
        action="store_true",
        help="add the FP teacher's row (holdout, sentence split, length buckets) to results.jsonl",
    )
    args = ap.parse_args()
    if args.list:
        for k, v in VARIANTS.items():
            print(f"{k:24s} {' '.join(v)}")
        return
    if args.table:
        print(table(args.out))
        return
    if args.plot:
        plot_gap(args.out, args.variants, args.plot)
        return
    if args.score_teacher:
        args.out.mkdir(parents=True, exist_ok=True)
        buckets = length_buckets(args.teacher, DATA / "teacher", [])
        row = {
            "variant": "teacher (FP)",
            "seed": 0,
            "selected_on": "-",
            "holdout": evaluate_on(args.teacher, DATA / "teacher", []),
            "sentences": evaluate_on(args.teacher, DATA / "sentences", []),
            "sentence_dev": evaluate_on(args.teacher, DATA / "full_sent", []),
            **sentence_test(args.teacher, []),
            "buckets": buckets,
            "s_per_step": None,
            "peak_rss_mib": 0.0,
        }
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; allowed: {', '.join(VARIANTS)}")
    if not (args.teacher / "config.json").exists() or not (DATA / "teacher" / "train.tsv").exists():
        sys.exit("run bench/sst2_data.py and fine-tune the teacher first (commands in bench/RESULTS.md)")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    for seed in args.seeds:
        for name in args.variants:
            row = run_one(name, seed, args.out, args.teacher)
            print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)


if __name__ == "__main__":
    main()
