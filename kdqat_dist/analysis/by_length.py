"""Attention-map distance by input length: does the student drift further from its teacher on long inputs?

Pure numpy over what :func:`kdqat_dist.analysis.collect.collect` gathered: a distance per sample, layer and
head (``[N, L, H]``) and each sample's length in tokens (``[N]``, special tokens included). The buckets are
length quantiles of the sample, so each holds about the same number of examples whatever the task's
lengths are; the Spearman correlation over all samples says whether the trend is monotone.

Only the KL is reported this way: it is a per-query-row average whose scale does not depend on the length,
while the ranking loss sums over key pairs (it grows with S by construction) and the cover length ratio's
floor is min(k, S)/S.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

__all__ = ["by_length", "length_edges"]


def length_edges(lengths: np.ndarray, buckets: int = 4) -> list[int]:
    """Inclusive upper bounds of at most ``buckets`` length buckets with about equal counts.

    Each bound is a length that occurs in ``lengths`` (the empirical quantile, ``method="inverted_cdf"``), so no
    bucket is empty; equal quantiles merge, hence "at most". The last bound is ``max(lengths)``.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.size == 0:
        raise ValueError(f"length_edges: expected a non-empty 1-D array of lengths, got shape {lengths.shape}")
    if buckets < 1:
        raise ValueError(f"length_edges: buckets must be >= 1, got {buckets}")
    q = np.quantile(lengths, np.arange(1, buckets + 1) / buckets, method="inverted_cdf")
    return sorted({int(v) for v in q})


def by_length(per_sample: np.ndarray, lengths: np.ndarray, edges: list[int]) -> dict:
    """One distance averaged over layers and heads per sample, then grouped into length buckets.

    Args:
        per_sample: [N, L, H] distances (e.g. ``distance[student]["kl"]["per_sample"]``).
        lengths: [N] token counts of the samples.
        edges: [B] increasing inclusive upper bounds (:func:`length_edges`); samples longer than the last
            one are an error, so that no sample is silently dropped.

    Returns:
        ``labels`` [B] ("lo–hi" in tokens), ``edges`` [B], ``count`` [B], ``mean_length`` [B] (of the
        bucket's samples), ``mean`` [B], ``std`` [B] (sample s.d., 0 for a bucket of one), ``sample_mean``
        [N] (the per-sample values grouped) and ``spearman`` (rank correlation of ``sample_mean`` with
        length; NaN when either is constant).
    """
    v = np.asarray(per_sample, dtype=np.float64)
    lengths = np.asarray(lengths)
    if v.ndim != 3 or lengths.shape != (v.shape[0],):
        raise ValueError(f"by_length: expected [N, L, H] values and [N] lengths, got {v.shape} and {lengths.shape}")
    if not edges or list(edges) != sorted(set(edges)) or lengths.max() > edges[-1]:
        raise ValueError(f"by_length: edges must increase and reach the longest sample ({lengths.max()}), got {edges}")
    sample_mean = v.mean(axis=(1, 2))
    bucket = np.searchsorted(np.asarray(edges), lengths, side="left")  # first edge >= length
    labels, count, mean_length, mean, std = [], [], [], [], []
    lo = int(lengths.min())
    for b, hi in enumerate(edges):
        x = sample_mean[bucket == b]
        labels.append(f"{lo}–{hi}" if lo < hi else f"{hi}")
        lo = hi + 1
        count.append(len(x))
        mean_length.append(float(lengths[bucket == b].mean()) if len(x) else float("nan"))
        mean.append(float(x.mean()) if len(x) else float("nan"))
        std.append(float(x.std(ddof=1)) if len(x) > 1 else 0.0)
    constant = np.ptp(sample_mean) == 0 or np.ptp(lengths) == 0
    rho = float("nan") if constant else float(spearmanr(lengths, sample_mean).statistic)
    return {
        "labels": labels,
        "edges": [int(e) for e in edges],
        "count": np.asarray(count),
        "mean_length": np.asarray(mean_length),
        "mean": np.asarray(mean),
        "std": np.asarray(std),
        "sample_mean": sample_mean,
        "spearman": rho,
    }
