"""Figures of ``kdqat analyze``: matplotlib ``Figure`` objects (no pyplot state), written as PNG.

Every function takes the plain arrays of the analysis JSON and a path, writes one PNG and returns the
path. Colours are fixed per model across figures (teacher black, students in the tab10 order), layers and
heads are 0-based as in the JSON and in TensorBoard.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.stats import gaussian_kde

from kdqat_dist.analysis.norms import CLASS_LABELS, TOKEN_CLASSES

__all__ = [
    "colors",
    "gaussian_density",
    "plot_distance_by_length",
    "plot_distance_heatmaps",
    "plot_distance_layers",
    "plot_dynamic_range_layers",
    "plot_dynamic_range_tokens",
    "plot_hessian_spectrum",
    "plot_norm_heads",
    "plot_norm_layers",
]

DPI = 150
DISTANCE_LABELS = {
    "kl": ("KL(teacher ‖ student)", "nats per query row"),
    "ranking_loss": ("Ranking loss", "per query row"),
    "cover_length_ratio": ("Top-{k} cover length ratio", "fraction of sequence length"),
}
NORM_LABELS = {
    "alpha": "α (attention weight)",
    "f_norm": "‖f(x)‖",
    "af_norm": "‖αf(x)‖",
    "sum_af_norm": "‖Σ_h αf(x)‖",
}


def colors(names: Sequence[str]) -> dict[str, str]:
    """Teacher black, students C0, C1, ... (the order given)."""
    student_colors = (f"C{i % 10}" for i in itertools.count())
    return {n: "black" if n == "teacher" else next(student_colors) for n in names}


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _int_axis(ax, axis: str = "x") -> None:
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def _note(ax, text: str, **kw) -> None:
    """Grey text in the middle of a panel with nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray", **kw)


def _heatmap(ax, data: np.ndarray, title: str, vmin=None, vmax=None, diverging: bool = False):
    """A layer × head image (layer 0 at the bottom); returns the image for a colour bar."""
    kw = {"cmap": "viridis", "vmin": vmin, "vmax": vmax}
    if diverging:
        lim = vmax if vmax is not None else np.nanmax(np.abs(data))
        lim = lim if np.isfinite(lim) and lim > 0 else 1.0
        kw = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(0.0, -lim, lim)}
    im = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=9)
    ax.set(xlabel="head", ylabel="layer")
    _int_axis(ax, "x")
    _int_axis(ax, "y")
    return im


def _colorbar(fig: Figure, im, axes, label: str) -> None:
    """One colour bar for ``axes`` (a single axes or several sharing the scale of ``im``)."""
    many = isinstance(axes, np.ndarray) and axes.size > 1
    # aspect (length / width) grows with the axes spanned, so a shared bar runs the whole column
    cb = fig.colorbar(im, ax=axes, fraction=0.03 if many else 0.046, pad=0.02, aspect=20 * (axes.size if many else 1))
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)


# --------------------------------------------------------------------------- Exp1


def plot_distance_heatmaps(dist: Mapping[str, Mapping[str, np.ndarray]], path: Path, top_k: int = 5) -> Path:
    """Rows: students; columns: KL, ranking loss, cover length ratio; each a layer × head heat map of the
    mean over the sample. Each column shares one colour scale across students.

    Args:
        dist: ``dist[student][metric]`` [L, H] means.
    """
    students = list(dist)
    metrics = list(DISTANCE_LABELS)
    fig = Figure(figsize=(4.2 * len(metrics), 3.0 * len(students) + 0.4), layout="constrained")
    axes = fig.subplots(len(students), len(metrics), squeeze=False)
    for j, m in enumerate(metrics):
        vals = np.stack([np.asarray(dist[s][m]) for s in students])
        vmin, vmax = float(np.nanmin(vals)), float(np.nanmax(vals))
        vmax = vmax if vmax > vmin else vmin + 1e-12
        title, unit = DISTANCE_LABELS[m]
        for i, s in enumerate(students):
            im = _heatmap(axes[i, j], np.asarray(dist[s][m]), f"{title.format(k=top_k)}: {s}", vmin, vmax)
        _colorbar(fig, im, axes[:, j], unit)
    fig.suptitle("Attention-map distance to the teacher, per layer and head (mean over dev samples)")
    return _save(fig, path)


def plot_distance_layers(
    mean: Mapping[str, Mapping[str, np.ndarray]],
    std: Mapping[str, Mapping[str, np.ndarray]],
    n_samples: int,
    path: Path,
    top_k: int = 5,
    identical_cover: float | None = None,
) -> Path:
    """Per-layer curves (mean over heads) of the three distances, one line per student.

    Args:
        mean: ``mean[student][metric]`` [L], the mean over heads and samples.
        std: ``std[student][metric]`` [L], the standard deviation over samples of the head mean (band).
        identical_cover: the cover ratio of identical maps (min(k, S)/S averaged over samples), drawn as a
            reference line.
    """
    students = list(mean)
    col = colors(students)
    metrics = list(DISTANCE_LABELS)
    fig = Figure(figsize=(4.3 * len(metrics), 3.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        title, unit = DISTANCE_LABELS[m]
        for s in students:
            y, e = np.asarray(mean[s][m]), np.asarray(std[s][m])
            x = np.arange(len(y))
            ax.plot(x, y, marker="o", ms=4, color=col[s], label=s)
            ax.fill_between(x, y - e, y + e, color=col[s], alpha=0.15, lw=0)
        if m == "cover_length_ratio" and identical_cover is not None:
            ax.axhline(identical_cover, color="gray", ls="--", lw=1, label="identical maps (minimum)")
            ax.legend(handles=ax.get_lines()[-1:], fontsize=8, loc="best")
        ax.set_ylim(0, 1.02 if m == "cover_length_ratio" else None)  # None: the top stays automatic
        ax.set_title(title.format(k=top_k), fontsize=10)
        ax.set(xlabel="layer", ylabel=unit)
        _int_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=f"mean ± s.d. over {n_samples} samples", title_fontsize=7)
    fig.suptitle("Attention-map distance to the teacher per layer (mean over heads)")
    return _save(fig, path)


def plot_distance_by_length(by_len: Mapping[str, Mapping[str, np.ndarray]], lengths: np.ndarray, path: Path) -> Path:
    """KL(teacher ‖ student) against input length: one dot per sample (mean over layers and heads) and the
    mean ± s.d. of each length bucket at its samples' mean length, one colour per student.

    Args:
        by_len: ``by_len[student]`` from :func:`kdqat_dist.analysis.by_length.by_length`.
        lengths: [N] token counts of the samples, in the order of ``sample_mean``.
    """
    students = list(by_len)
    col = colors(students)
    lengths = np.asarray(lengths)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for s in students:
        d = by_len[s]
        ax.scatter(lengths, np.asarray(d["sample_mean"]), s=10, alpha=0.35, color=col[s], lw=0)
        rho = float(d["spearman"])
        label = s if not np.isfinite(rho) else f"{s} (Spearman ρ {rho:+.2f})"
        ax.errorbar(d["mean_length"], d["mean"], yerr=d["std"], color=col[s], marker="o", ms=5, capsize=3, label=label)
    ax.set(xlabel="input length (tokens, [CLS] and [SEP] included)", ylabel="nats per query row")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="dots: samples; line: length-bucket mean ± s.d.", title_fontsize=7)
    ax.set_title("Attention-map KL(teacher ‖ student) by input length (mean over layers and heads)", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- Exp3: dynamic range


def plot_dynamic_range_layers(rng: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path:
    """Per layer: the max and min of the attention-block output over tokens and hidden units, mean over
    samples (line) and the range over samples (band), one colour per model.

    Args:
        rng: ``rng[model]["min"|"max"]`` [N, L].
    """
    col = colors(list(rng))
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, r in rng.items():
        for key, ls in (("max", "-"), ("min", "--")):
            v = np.asarray(r[key])
            x = np.arange(v.shape[1])
            ax.plot(x, v.mean(0), ls=ls, marker="o", ms=3, color=col[name], label=f"{name} {key}")
            ax.fill_between(x, v.min(0), v.max(0), color=col[name], alpha=0.1, lw=0)
    ax.axhline(0, color="gray", lw=0.6)
    ax.set(xlabel="layer", ylabel="attention output value (after LayerNorm)")
    _int_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    n = next(iter(rng.values()))["min"].shape[0]
    ax.set_title(
        f"Attention-output dynamic range per layer\n(min/max over tokens and hidden units; "
        f"line: mean, band: range over {n} samples)",
        fontsize=10,
    )
    return _save(fig, path)


def plot_dynamic_range_tokens(rng: Mapping[str, Mapping[str, np.ndarray]], tokens: Sequence[str], path: Path) -> Path:
    """One panel per layer: per-token max (solid) and min (dashed) over the hidden units, first sample.

    Args:
        rng: ``rng[model]["example_min"|"example_max"]`` [L, S].
        tokens: the sample's tokens, used as tick labels when there are at most 40.
    """
    col = colors(list(rng))
    n_layers = np.asarray(next(iter(rng.values()))["example_min"]).shape[0]
    ncols = min(4, n_layers)
    nrows = -(-n_layers // ncols)
    s = len(tokens)
    x = np.arange(s)
    fig = Figure(figsize=(max(4.0, 0.16 * s + 1.5) * ncols, 3.0 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for ax in axes.flat[n_layers:]:
        ax.set_visible(False)
    for l, ax in enumerate(axes.flat[:n_layers]):
        for name, r in rng.items():
            ax.plot(x, np.asarray(r["example_max"])[l], color=col[name], lw=1.2, label=f"{name} max")
            ax.plot(x, np.asarray(r["example_min"])[l], color=col[name], lw=1.2, ls="--", label=f"{name} min")
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_title(f"layer {l}", fontsize=9)
        if s <= 40:
            ax.set_xticks(x)
            ax.set_xticklabels(tokens, rotation=90, fontsize=6)
        else:
            ax.set_xlabel("token index")
        if l % ncols == 0:
            ax.set_ylabel("attention output value")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Attention-output min/max over the hidden units, per token (first dev sample)")
    return _save(fig, path)


# --------------------------------------------------------------------------- Exp3: norms


def plot_norm_heads(norms: Mapping[str, Mapping[str, np.ndarray]], cls: str, path: Path) -> Path:
    """Layer × head heat maps for key-token class ``cls``: rows α, ‖f(x)‖, ‖αf(x)‖; columns: the teacher,
    then teacher − student for each student (diverging scale, shared by the students of a row).

    Args:
        norms: ``norms[model][quantity]`` [L, H, C] (C in :data:`TOKEN_CLASSES` order).
    """
    c = TOKEN_CLASSES.index(cls)
    students = [m for m in norms if m != "teacher"]
    quantities = ("alpha", "f_norm", "af_norm")
    fig = Figure(figsize=(3.9 * (1 + len(students)), 2.9 * len(quantities) + 0.4), layout="constrained")
    axes = fig.subplots(len(quantities), 1 + len(students), squeeze=False)
    for i, q in enumerate(quantities):
        t = np.asarray(norms["teacher"][q])[..., c]
        _colorbar(fig, _heatmap(axes[i, 0], t, f"{NORM_LABELS[q]}: teacher"), axes[i, 0], NORM_LABELS[q])
        diffs = [t - np.asarray(norms[s][q])[..., c] for s in students]
        lim = max([float(np.nanmax(np.abs(d))) if np.isfinite(d).any() else 0.0 for d in diffs] + [0.0])
        for j, (s, d) in enumerate(zip(students, diffs, strict=True)):
            im = _heatmap(axes[i, j + 1], d, f"{NORM_LABELS[q]}: teacher − {s}", vmax=lim or 1e-12, diverging=True)
        if students:
            _colorbar(fig, im, axes[i, 1:], "teacher − student")
    fig.suptitle(f"Norm-based analysis for key tokens: {CLASS_LABELS[cls]} (mean over dev samples)")
    return _save(fig, path)


def plot_norm_layers(values: Mapping[str, Mapping[str, np.ndarray]], path: Path, difference: bool) -> Path:
    """Per-layer curves: rows α, ‖f(x)‖, ‖Σ_h αf(x)‖ (α and ‖f‖ averaged over heads); columns key-token
    classes. With ``difference`` the lines are |teacher − student| per student, else the raw values of
    every model.

    Args:
        values: ``values[model][quantity]`` [L, C] (for ``difference``: ``values[student]``, already
            the absolute differences).
    """
    col = colors(list(values))
    quantities = ("alpha", "f_norm", "sum_af_norm")
    fig = Figure(figsize=(3.3 * len(TOKEN_CLASSES), 2.6 * len(quantities) + 0.5), layout="constrained")
    # One y scale per row, so the key-token classes compare at a glance.
    axes = fig.subplots(len(quantities), len(TOKEN_CLASSES), squeeze=False, sharex=True, sharey="row")
    for i, q in enumerate(quantities):
        for j, cls in enumerate(TOKEN_CLASSES):
            ax = axes[i, j]
            empty = True
            for name, v in values.items():
                y = np.asarray(v[q], dtype=np.float64)[:, j]
                empty &= not np.isfinite(y).any()
                ax.plot(np.arange(len(y)), y, marker="o", ms=3, color=col[name], label=name)
            if empty:
                _note(ax, "no such tokens\nin the sample", fontsize=8)
            if i == 0:
                ax.set_title(CLASS_LABELS[cls], fontsize=10)
            if j == 0:
                ax.set_ylabel(("|Δ| " if difference else "") + NORM_LABELS[q])
            if i == len(quantities) - 1:
                ax.set_xlabel("layer")
            _int_axis(ax)
            ax.grid(alpha=0.3)
        if difference:  # after the whole row is drawn, so the shared top covers every panel
            axes[i, 0].set_ylim(bottom=0)
    axes[0, 0].legend(fontsize=7)
    what = "|teacher − student| of the dev-sample means" if difference else "dev-sample means"
    fig.suptitle(f"Norm-based analysis per layer, by key-token class: {what}")
    return _save(fig, path)


# --------------------------------------------------------------------------- Exp2


def gaussian_density(
    values: np.ndarray, grid: np.ndarray | None = None, points: int = 400, min_bandwidth: float = 0.0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Gaussian KDE (Scott's bandwidth) of ``values``: (grid, density), None for < 2 distinct values.

    Without ``grid`` the density is evaluated on ``points`` points spanning the values ± 3 bandwidths, so
    a narrow spectrum is resolved whatever the scale of the other models' values. ``min_bandwidth``
    widens a kernel narrower than that (values equal to 5 digits would otherwise give a needle of
    density 10^4 that dwarfs every other model on shared axes).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2 or np.ptp(v) == 0:
        return None
    kde = gaussian_kde(v)
    std = float(np.sqrt(kde.covariance[0, 0] / kde.factor**2))  # the data's own (weighted) spread
    if min_bandwidth > 0 and kde.factor * std < min_bandwidth:
        kde.set_bandwidth(min_bandwidth / std)
    if grid is None:
        bw = 3 * float(np.sqrt(kde.covariance[0, 0]))
        grid = np.linspace(v.min() - bw, v.max() + bw, points)
    return grid, kde(grid)


def plot_hessian_spectrum(
    eigs: Mapping[str, np.ndarray], path: Path, norm_term: Mapping[str, float] | None = None
) -> Path:
    """Densities of the per-example dominant Hessian eigenvalues, positive and negative ones apart.

    When the eigenvalues of a panel span more than two decades (models of very different curvature),
    the density is taken over log10|λ| instead, so every model stays readable.

    Kernels are at least 2% of the panel's span wide. ``norm_term[model]``, when given, is drawn as a
    dashed line: the λ_max of the 0.01·Σ‖p‖₂ term alone, which a model's values sit on when its loss
    term adds less curvature than that.

    Args:
        eigs: ``eigs[model]`` [N] the dominant eigenvalue of each example (first column of the result).
        norm_term: ``norm_term[model]`` the norm term's own λ_max (0: no norm term).
    """
    col = colors(list(eigs))
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, sign, title in ((axes[0], 1, "Positive max eigenvalue"), (axes[1], -1, "Negative max eigenvalue")):
        sets = {m: np.asarray(e, dtype=np.float64).ravel() for m, e in eigs.items()}
        sets = {m: e[(e > 0) if sign > 0 else (e < 0)] for m, e in sets.items()}
        pooled = np.abs(np.concatenate([*sets.values(), np.zeros(0)]))
        log = pooled.size > 0 and pooled.max() / max(pooled.min(), 1e-300) > 100
        if log:
            sets = {m: np.log10(np.abs(e)) for m, e in sets.items()}
            ax.set_xlabel("log10 λ_max" if sign > 0 else "log10 |λ_max|")
        else:
            ax.set_xlabel("dominant Hessian eigenvalue λ_max")
        if pooled.size == 0:
            _note(ax, "none in this sample")
            ax.set(xticks=[], yticks=[])
        span = float(np.ptp(np.concatenate([*sets.values(), np.zeros(0)]))) if pooled.size else 0.0
        if sign > 0 and norm_term:
            for m, lam in norm_term.items():
                if lam > 0 and sets.get(m, np.zeros(0)).size:
                    x = np.log10(lam) if log else lam
                    ax.axvline(x, color=col[m], ls="--", lw=1, alpha=0.7, label=f"{m}: norm term alone")
        for m, e in sets.items():
            if e.size == 0:
                continue
            label = f"{m} (n={e.size})"
            kde = gaussian_density(e, min_bandwidth=0.02 * span)
            if kde is not None and not log:  # the density of positive (negative) values stops at 0
                keep = kde[0] >= 0 if sign > 0 else kde[0] <= 0
                kde = (kde[0][keep], kde[1][keep])
            if kde is not None:
                ax.plot(*kde, color=col[m], label=label)
                ax.fill_between(*kde, color=col[m], alpha=0.12, lw=0)
            else:
                ax.axvline(float(e[0]), color=col[m], ls=":", label=label + ", one value")
            # rug: one tick per example, just above the x axis
            ax.plot(e, np.full(e.shape, 0.02), "|", color=col[m], ms=12, mew=1.2, transform=ax.get_xaxis_transform())
        if pooled.size:
            ax.set_ylim(bottom=0)
            ax.set_ylabel("density")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    dashed = "; dashed: the norm term's own λ_max" if norm_term and any(v > 0 for v in norm_term.values()) else ""
    fig.suptitle(
        "Hessian max-eigenvalue spectrum over dev examples (power iteration per example; "
        f"Gaussian KDE; ticks: examples{dashed})",
        fontsize=10,
    )
    return _save(fig, path)
