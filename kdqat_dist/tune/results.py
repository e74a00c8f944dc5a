"""Sweep results: one row per trial (CSV + Markdown), mean ± std over seeds per setting, and the plot of
the task metric against the mixing coefficient per task (the paper's sweep figure).

Every value is read from the trial's own files - ``trials/<trial>/run/metrics.json`` (written by the
training loop) and ``run/config.yaml`` (the config it ran with) - never from Tune's bookkeeping, so
the table is the same whether the sweep ran once, was resumed, or is rebuilt with ``--report-only``.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from kdqat_dist.tune.spec import get_dotted

# The fixed columns: header -> dotted config key.
CONFIG_COLUMNS = {
    "task": "data.task",
    "map_w": "distill.attn_map.weight",
    "output_w": "distill.attn_output.weight",
    "gamma": "distill.gamma",
    "score_w": "distill.attn_score.weight",
    "seed": "train.seed",
    "w_bits": "quant.weight.bits",
    "a_bits": "quant.act.bits",
    "lr": "train.lr",
}
# Mixing coefficients in the order the plot prefers them for its x axis.
COEFFICIENTS = ("distill.gamma", "distill.attn_output.weight", "distill.attn_map.weight")


def _load_trial(tdir: Path) -> dict | None:
    meta_file = tdir / "point.json"
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    run = tdir / "run"
    cfg_file = run / "config.yaml" if (run / "config.yaml").exists() else tdir / "resolved.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    metrics_file, progress_file = run / "metrics.json", tdir / "progress.json"
    metrics, status = None, "incomplete"
    if metrics_file.exists():
        metrics, status = json.loads(metrics_file.read_text()), "ok"
    elif progress_file.exists():  # stopped early (ASHA) or failed after some evaluations
        metrics, status = json.loads(progress_file.read_text()), "partial"
    return {"dir": tdir, "meta": meta, "cfg": cfg, "metrics": metrics, "status": status}


def _effective_mix(cfg: dict) -> tuple[Any, Any]:
    gamma = get_dotted(cfg, "distill.gamma")
    if gamma is not None:  # the unified loss overrides both weights
        return gamma, 1.0 - gamma
    return get_dotted(cfg, "distill.attn_map.weight"), get_dotted(cfg, "distill.attn_output.weight")


def collect_rows(output_dir: str | Path) -> tuple[list[dict], list[str]]:
    """One dict per trial folder (sorted by setting then seed) and the metric column names."""
    out = Path(output_dir)
    sweep = _sweep_meta(out)
    searched = [k for k, _, _ in sweep.get("search", [])]
    extra_keys = [k for k in searched if k not in CONFIG_COLUMNS.values()]
    rows, metric_cols = [], []
    for tdir in sorted((out / "trials").glob("*")):
        t = _load_trial(tdir)
        if t is None:
            continue
        cfg, m = t["cfg"], t["metrics"]
        row: dict[str, Any] = {"trial": tdir.name, "variant": t["meta"].get("variant") or ""}
        for col, key in [*CONFIG_COLUMNS.items(), *((k, k) for k in extra_keys)]:
            row[col] = get_dotted(cfg, key) if cfg else None
        if cfg:
            row["map_w"], row["output_w"] = _effective_mix(cfg)
        if m is not None:
            best = m.get("best") or {}
            for k, v in best.items():
                if k in ("step", "selection", "best_selection", "best_step", "teacher_selection"):
                    continue
                row[k] = v
                if k not in metric_cols:
                    metric_cols.append(k)
            row["selection_metric"] = m.get("selection_metric", "selection")
            row["selection"] = best.get("selection")
            row["teacher_selection"] = (m.get("teacher") or {}).get("selection")
            row["best_step"] = best.get("step")
            row["total_steps"] = m.get("total_steps")
            row["run_dir"] = str(tdir / "run")
        row["status"] = t["status"]  # "incomplete" when the trial has no metrics
        rows.append(row)
    rows.sort(
        key=lambda r: tuple(
            str(r.get(c))
            for c in ("task", "variant", "map_w", "output_w", "gamma", "w_bits", "a_bits", "lr", *extra_keys, "seed")
        )
    )
    return rows, metric_cols


def _sweep_meta(out: Path) -> dict:
    f = out / "sweep.json"
    return json.loads(f.read_text()) if f.exists() else {}


def summarize(rows: list[dict], metric_cols: list[str]) -> list[dict]:
    """Mean ± std (sample std; 0 for one seed) of the selection metric over seeds, per setting."""
    ok = [r for r in rows if r.get("status") == "ok"]
    keys = [k for k in _columns(ok, []) if k not in TRIAL_LAST and k not in metric_cols and k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key, grp in groups.items():
        vals = [float(r["selection"]) for r in grp]
        teach = [float(r["teacher_selection"]) for r in grp if r.get("teacher_selection") is not None]
        row = dict(zip(keys, key, strict=True))
        row["selection_metric"] = grp[0].get("selection_metric")
        row["n_seeds"] = len(vals)
        row["seeds"] = " ".join(str(r.get("seed")) for r in grp)
        row["mean"] = statistics.fmean(vals)
        row["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["teacher_mean"] = statistics.fmean(teach) if teach else None
        out.append(row)
    return out


# --------------------------------------------------------------------------- writing


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _columns(rows: list[dict], first: list[str]) -> list[str]:
    """The keys of ``first`` that some row has, then every other key in the order the rows have them."""
    present = [c for c in first if any(c in r for r in rows)]
    return list(dict.fromkeys([*present, *(k for r in rows for k in r)]))


def _csv_value(v):
    """Floats to 6 significant digits (0.09999999999999998 -> 0.1); everything else as it is."""
    return float(f"{v:.6g}") if isinstance(v, float) else v


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_value(r.get(c, "")) for c in cols})


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


TRIAL_FIRST = ["task", "variant", "map_w", "output_w", "gamma", "score_w", "seed", "w_bits", "a_bits", "lr"]
TRIAL_LAST = "selection_metric selection teacher_selection best_step total_steps status trial run_dir".split()


def write_report(output_dir: str | Path) -> dict[str, Path]:
    """Write results.csv / results.md (every trial), summary.csv (mean ± std over seeds) and sweep.png.
    Returns the paths written."""
    out = Path(output_dir)
    rows, metric_cols = collect_rows(out)
    summary = summarize(rows, metric_cols)
    trial_cols = _columns(rows, TRIAL_FIRST + metric_cols)
    trial_cols = [c for c in trial_cols if c not in TRIAL_LAST] + [c for c in TRIAL_LAST if any(c in r for r in rows)]
    sum_cols = _columns(summary, [c for c in TRIAL_FIRST if c != "seed"])
    paths = {"csv": out / "results.csv", "md": out / "results.md", "summary_csv": out / "summary.csv"}
    _write_csv(paths["csv"], rows, trial_cols)
    _write_csv(paths["summary_csv"], summary, sum_cols)
    sum_rows = [{**r, "mean ± std": f"{r['mean']:.4f} ± {r['std']:.4f}"} for r in summary]
    sum_md_cols = [c for c in sum_cols if c not in ("mean", "std")]
    sum_md_cols.insert(sum_md_cols.index("n_seeds"), "mean ± std") if "n_seeds" in sum_md_cols else None
    md = [
        f"# Sweep results: {out.name}",
        "",
        f"{len(rows)} trials ({sum(r.get('status') == 'ok' for r in rows)} finished). Values come from "
        "each trial's run/metrics.json; `selection` is the task's selection metric at the best step, "
        "`teacher_selection` the full-precision teacher's.",
        "",
        "## Trials",
        "",
        markdown_table(rows, [c for c in trial_cols if c != "run_dir"]),
        "",
        "## Mean ± std over seeds",
        "",
        markdown_table(sum_rows, sum_md_cols),
        "",
        f"TensorBoard (every trial): `tensorboard --logdir {out / 'trials'}`",
        "",
    ]
    plot = plot_sweep(summary, out / "sweep.png", _sweep_meta(out))
    if plot is not None:
        paths["png"] = plot
        md.insert(-2, f"![sweep]({plot.name})\n")
    paths["md"].write_text("\n".join(md))
    return paths


def _x_key(summary: list[dict], sweep: dict) -> tuple[str, str] | None:
    """(column, label) of the mixing coefficient the sweep varies, or another numeric searched key."""
    searched = [k for k, _, _ in sweep.get("search", [])]
    rev = {v: k for k, v in CONFIG_COLUMNS.items()}
    for key in [*COEFFICIENTS, *searched]:
        if key not in searched or key == "train.seed":
            continue
        col = rev.get(key, key)
        vals = [r.get(col) for r in summary]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return col, key
    return None


def plot_sweep(summary: list[dict], path: Path, sweep: dict) -> Path | None:
    """Task metric (mean ± std over seeds) against the mixing coefficient, one line per task/variant;
    grouped bars per variant when nothing numeric is swept."""
    if not summary:
        return None
    import matplotlib  # lazy: slow to import, and only the sweep report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xk = _x_key(summary, sweep)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: dict[str, list[dict]] = {}
    for r in summary:
        label = str(r.get("task"))
        if r.get("variant"):
            label += f" / {r['variant']}"
        series.setdefault(label, []).append(r)
    if xk is not None:
        col, key = xk
        for label, grp in series.items():
            grp = sorted(grp, key=lambda r: r[col])
            xs, means, stds = ([r[k] for r in grp] for k in (col, "mean", "std"))
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
            teacher = [r["teacher_mean"] for r in grp if r.get("teacher_mean") is not None]
            if teacher:
                ax.axhline(statistics.fmean(teacher), ls=":", lw=1, color=ax.lines[-1].get_color())
        ax.set_xlabel(key)
    else:
        labels = list(series)
        width = 0.8 / max(1, max(len(g) for g in series.values()))
        for i, (_label, grp) in enumerate(series.items()):
            for j, r in enumerate(grp):
                ax.bar(i + j * width, r["mean"], width, yerr=r["std"], capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    metric = summary[0].get("selection_metric") or "selection"
    ax.set_ylabel(f"{metric} (mean ± std over seeds; dotted: teacher)")
    ax.set_title(path.parent.name)
    if len(series) > 1 or xk is not None:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


CONSOLE_COLS = "task variant map_w output_w gamma seed lr w_bits selection teacher_selection best_step status".split()


def format_console(rows: list[dict], limit: int = 40) -> str:
    cols = [
        c
        for c in CONSOLE_COLS
        if any(c in r for r in rows) and (c not in ("lr", "w_bits") or len({r.get(c) for r in rows}) > 1)
    ]
    text = markdown_table(rows[:limit], cols)
    if len(rows) > limit:
        text += f"\n... {len(rows) - limit} more rows in results.md"
    return text


__all__ = ["collect_rows", "summarize", "write_report", "plot_sweep", "markdown_table", "format_console"]
