"""The paper's comparison on real SST-2: TernaryBERT's KD losses vs attention map, output and unified.

Same teacher, data and budget as ``bench/bench_accuracy_sst2.py`` (300 KD-QAT steps of the MiniLM teacher
fine-tuned on 20k SST-2 rows; TWN W2, row-wise ternary E2, A8), with the optimizer and padding given by
``--extra`` (the shipped SST-2 recipe's by default). Each loss variant runs for every seed; the script
writes ``<out>/results.jsonl`` (one line per run), ``<out>/loss_variants.md`` (mean ± std over seeds,
holdout and sentence-level split) and ``<out>/loss_variants.png``; with more than one weight quantizer also
``<out>/quantizer_grid.md`` and ``.png`` (loss x quantizer).

The 2025 methods (issue #18) join the same grid: ``--quantizers twn absmean seq`` runs every loss variant
with each weight quantizer (TWN: the recipe's; absmean: BitNet b1.58, per tensor; seq: ParetoQ's SEQ,
per row as ParetoQ), and the loss variants ``relation`` (logits + hidden + MiniLM-v2 attention-relation KD
at every layer) and ``relation_unified`` (relation KD added to the unified map/output loss at γ = 0.5).
Runs of a quantizer other than TWN are named ``<quantizer>_<variant>``.

Usage:
    python bench/bench_loss_variants.py --seeds 42 43 44
    python bench/bench_loss_variants.py --variants map output --seeds 42 --gammas 0.25 0.75
    python bench/bench_loss_variants.py --quantizers twn absmean seq --gammas 0.5 \
        --variants ternarybert relation relation_unified --seeds 42 43 44      # the 2025 comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from sst2_runs import TEACHER, run_one

# every variant: logits + hidden-state KD, plus its attention terms (the others 0)
OFF = ["distill.attn_map.weight=0", "distill.attn_output.weight=0", "distill.attn_score.weight=0"]
LOSSES: dict[str, list[str]] = {
    "ternarybert": [*OFF, "distill.attn_score.weight=1"],  # logits + hidden + attention scores
    "map": [*OFF, "distill.attn_map.weight=1"],
    "output": [*OFF, "distill.attn_output.weight=1"],
    "relation": [*OFF, "distill.attn_relation.weight=1", "distill.attn_relation.layers=all"],
    "relation_unified": [
        *OFF,
        "distill.gamma=0.5",
        "distill.attn_relation.weight=1",
        "distill.attn_relation.layers=all",
    ],
}
DEFAULT_VARIANTS = ["ternarybert", "map", "output"]  # the 2022 paper's comparison
# weight quantizers of the 2025 comparison (embeddings and activations stay the recipe's)
QUANTIZERS: dict[str, list[str]] = {
    "twn": [],
    "absmean": ["quant.weight.method=absmean"],
    # ParetoQ learns one clip value per output row (its default); per tensor, α₀ = max|W| of the whole
    # matrix puts the ternary threshold α/3 above most weights: 0.1-2% non-zero codes at the start on
    # the MiniLM teacher, 12-27% per row (TWN's 0.7·mean|W|: 55%)
    "seq": ["quant.weight.method=seq", "quant.weight.granularity=row"],
}
# the shipped SST-2 recipe's optimizer and MSE normalisation (the best row of the 300-step ablation)
EXTRA = ["train.optimizer=bertadam", "distill.mse_tokens=valid"]


def unified(gamma: float) -> list[str]:
    return [*OFF, f"distill.gamma={gamma}"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """(mean, sample std) in percent of accuracies in [0, 1]; std 0 for one value."""
    pct = [100 * x for x in xs]
    return statistics.mean(pct), statistics.stdev(pct) if len(pct) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std per variant; a (variant, seed) scored twice counts once (its last line)."""
    last = {(r["variant"], r["seed"]): r for r in rows}
    by: dict[str, list[dict]] = {}
    for r in last.values():
        by.setdefault(r["variant"], []).append(r)
    return [
        {
            "variant": name,
            "seeds": sorted(r["seed"] for r in rs),
            "holdout": mean_std([r["holdout"] for r in rs]),
            "sentences": mean_std([r["sentences"] for r in rs]),
        }
        for name, rs in by.items()
    ]


def write_table(summary: list[dict], teacher: dict, path: Path) -> None:
    lines = [
        "| loss | seeds | holdout (mean ± std) | sentence split (mean ± std) |",
        "|---|---|---|---|",
        f"| teacher (FP) | - | {100 * teacher['holdout']:.2f} | {100 * teacher['sentences']:.2f} |",
    ]
    for s in summary:
        h, t = s["holdout"], s["sentences"]
        lines.append(
            f"| {s['variant']} | {', '.join(map(str, s['seeds']))} | {h[0]:.2f} ± {h[1]:.2f} | "
            f"{t[0]:.2f} ± {t[1]:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(summary: list[dict], teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["variant"] for s in summary]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for off, key, label in ((-0.18, "holdout", "2k holdout"), (0.18, "sentences", "sentence split")):
        ax.bar(
            [i + off for i in x],
            [s[key][0] for s in summary],
            0.36,
            yerr=[s[key][1] for s in summary],
            capsize=3,
            label=label,
        )
        ax.axhline(100 * teacher[key], ls="--", lw=1, color="C0" if key == "holdout" else "C1")
    ax.set_xticks(list(x), names)
    lo = min(s[k][0] - s[k][1] for s in summary for k in ("holdout", "sentences"))
    ax.set_ylim(lo - 2, 100 * max(teacher.values()) + 1)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("W2/E2/A8 students by KD loss (dashed: FP teacher)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def split_name(variant: str) -> tuple[str, str]:
    """(quantizer, loss) of a run name: ``absmean_relation`` -> ("absmean", "relation"); TWN runs are unprefixed."""
    q, _, rest = variant.partition("_")
    return (q, rest) if q in QUANTIZERS and q != "twn" and rest else ("twn", variant)


def grid(summary: list[dict]) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """(losses, quantizers, {(loss, quantizer): summary row}) in first-seen / QUANTIZERS order."""
    cells = {split_name(s["variant"])[::-1]: s for s in summary}
    losses = list(dict.fromkeys(loss for loss, _ in cells))
    quants = [q for q in QUANTIZERS if any(q == qq for _, qq in cells)]
    return losses, quants, cells


def write_grid(summary: list[dict], teacher: dict, path: Path) -> None:
    """Markdown: one row per loss, holdout and sentence split (mean ± std, seeds) per weight quantizer."""
    losses, quants, cells = grid(summary)
    head = " | ".join(f"{q} holdout | {q} sentences" for q in quants)
    lines = [f"| loss | {head} |", "|---" * (1 + 2 * len(quants)) + "|"]
    t = f"{100 * teacher['holdout']:.2f} | {100 * teacher['sentences']:.2f}"
    lines.append(f"| teacher (FP) | {' | '.join([t] * len(quants))} |")
    for loss in losses:
        row = []
        for q in quants:
            s = cells.get((loss, q))
            if s is None:
                row += ["-", "-"]
                continue
            n = len(s["seeds"])  # one seed: no spread to show
            row += [
                f"{s[k][0]:.2f} ± {s[k][1]:.2f} (n={n})" if n > 1 else f"{s[k][0]:.2f} (n=1)"
                for k in ("holdout", "sentences")
            ]
        lines.append(f"| {loss} | {' | '.join(row)} |")
    path.write_text("\n".join(lines) + "\n")


def plot_grid(summary: list[dict], teacher: dict, path: Path) -> None:
    """Two panels (holdout, sentence split): bars per loss, one colour per weight quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, quants, cells = grid(summary)
    fig, axes = plt.subplots(1, 2, figsize=(2.2 * len(losses) + 3, 4), sharey=True)
    width = 0.8 / len(quants)
    for ax, key, title in zip(axes, ("holdout", "sentences"), ("2k holdout", "sentence split"), strict=True):
        for j, q in enumerate(quants):
            xs = [i for i, loss in enumerate(losses) if (loss, q) in cells]
            ax.bar(
                [x - 0.4 + width * (j + 0.5) for x in xs],
                [cells[(losses[x], q)][key][0] for x in xs],
                width,
                yerr=[cells[(losses[x], q)][key][1] for x in xs],
                capsize=3,
                label=q,
            )
        ax.axhline(100 * teacher[key], ls="--", lw=1, color="k")
        ax.set_xticks(range(len(losses)), losses, rotation=15)
        ax.set_title(f"{title} (dashed: FP teacher)")
    lo = min(s[k][0] - s[k][1] for s in summary for k in ("holdout", "sentences"))
    axes[0].set_ylim(lo - 2, 100 * max(teacher.values()) + 1)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(loc="upper center", ncol=len(quants), title="weights", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, help=f"of {', '.join(LOSSES)}")
    ap.add_argument("--quantizers", nargs="+", default=["twn"], help=f"of {', '.join(QUANTIZERS)}")
    ap.add_argument("--gammas", nargs="*", type=float, default=[0.5], help="unified-loss γ values to run")
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    ap.add_argument("--extra", nargs="*", default=EXTRA, help="overrides added to every variant")
    ap.add_argument("--teacher", type=Path, default=TEACHER)
    ap.add_argument(
        "--teacher-sentences",
        type=float,
        default=None,
        help="the teacher's sentence-split accuracy (0-1), for the table",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/out/loss_variants"))
    ap.add_argument(
        "--table", action="store_true", help="only write the table and plot of every run in <out>/results.jsonl"
    )
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(x) for x in (args.out / "results.jsonl").read_text().splitlines() if x.strip()]
        report(rows, args)
        return
    bad = [v for v in args.variants if v not in LOSSES]
    if bad:
        sys.exit(f"unknown loss variant(s) {bad}; allowed: {', '.join(LOSSES)}")
    bad = [q for q in args.quantizers if q not in QUANTIZERS]
    if bad:
        sys.exit(f"unknown quantizer(s) {bad}; allowed: {', '.join(QUANTIZERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    losses = [(v, LOSSES[v]) for v in args.variants] + [(f"unified_{g:g}", unified(g)) for g in args.gammas]
    todo = [
        (name if q == "twn" else f"{q}_{name}", [*QUANTIZERS[q], *overrides])
        for q in args.quantizers
        for name, overrides in losses
    ]
    rows = []
    for seed in args.seeds:
        for name, overrides in todo:
            row = run_one(name, seed, args.out, args.teacher, [*overrides, *args.extra])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("history", "buckets")}), flush=True)
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    """Write ``loss_variants.md`` and ``loss_variants.png`` into ``args.out`` and print the table."""
    if args.teacher_sentences is None:  # score it: one pass over the 311-row split
        from sst2_runs import DATA, evaluate_on

        args.teacher_sentences = evaluate_on(args.teacher, DATA / "sentences", [])
    summary = summarise(rows)
    teacher = {"holdout": rows[0]["teacher_holdout"], "sentences": args.teacher_sentences}
    write_table(summary, teacher, args.out / "loss_variants.md")
    plot(summary, teacher, args.out / "loss_variants.png")
    print((args.out / "loss_variants.md").read_text())
    if len(grid(summary)[1]) > 1:  # the 2025 comparison: quantizer x loss
        write_grid(summary, teacher, args.out / "quantizer_grid.md")
        plot_grid(summary, teacher, args.out / "quantizer_grid.png")
        print((args.out / "quantizer_grid.md").read_text())


if __name__ == "__main__":
    main()
