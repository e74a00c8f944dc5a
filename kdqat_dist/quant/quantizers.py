"""Quantizer math: forward values and straight-through backward passes (ALGORITHMS.md A.2-A.6).

Every function returns the *dequantized* (fake-quant) tensor. Functions that take ``clip`` zero the
gradient where ``|x| >= clip`` (the reference's clipped STE); everything else passes the gradient through
unchanged.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------- helpers


def _reduce_dims(x: torch.Tensor, per_row: bool) -> tuple[int, ...] | None:
    """Dimensions to reduce for one statistic per row (dim 0) or one per tensor."""
    return tuple(range(1, x.dim())) if per_row and x.dim() > 1 else None


def _mean_abs(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    dims = _reduce_dims(x, per_row)
    return x.abs().mean() if dims is None else x.abs().mean(dim=dims, keepdim=True)


def _max_abs(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    dims = _reduce_dims(x, per_row)
    return x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)


class _ClippedSTE(torch.autograd.Function):
    """Forward: a precomputed quantized value. Backward: identity, zeroed where |x| >= clip."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xq: torch.Tensor, clip: float | None) -> torch.Tensor:
        mask = None if clip is None else x.abs() < clip
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return xq

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        g = torch.where(mask, grad, 0.0) if ctx.has_mask else grad  # one pass, no float copy of the mask
        return g, None, None


def _ste(x: torch.Tensor, xq: torch.Tensor, clip: float | None) -> torch.Tensor:
    return _ClippedSTE.apply(x, xq.detach(), clip)


# --------------------------------------------------------------------------- weight quantizers


def _within_clip(x: torch.Tensor, clip: float | None) -> bool:
    """Whether ``|x| < clip`` everywhere, so that clamping is the identity and the STE mask all ones.

    Read on the CPU only (one pass that writes nothing); elsewhere it would stall the stream, so the
    answer there is "not known" and the clamp and mask are computed as written.
    """
    if clip is None:
        return True
    if x.device.type != "cpu" or x.numel() == 0:
        return False
    lo, hi = torch.aminmax(x)
    return max(float(hi), -float(lo)) < clip  # False for NaN: the clamp path then runs as before


def twn_ternary(w: torch.Tensor, per_row: bool = False, clip: float | None = 2.5) -> torch.Tensor:
    """TWN ternarisation (Li et al. 2016), as TernaryBERT's ``TwnQuantizer``.

    Δ = 0.7·mean|w|; b = sign(w)·[|w| > Δ]; α = mean of |w| over |w| > Δ; ŵ = α·b.

    Args:
        w: weight, [out, in] for Linear or [V, D] for an embedding table.
        per_row: one (Δ, α) per row (the reference's embedding setting) instead of one per tensor.
        clip: STE clip value; the weight is also clamped to [-clip, clip] first (a no-op for BERT weights).

    Returns:
        ŵ with the shape of ``w``; it takes at most 3 distinct values per row/tensor.
    """
    codes, alpha, within = _twn(w, per_row, clip)
    return _ste(w, codes.mul_(alpha), None if within else clip)


def twn_codes(w: torch.Tensor, per_row: bool = False, clip: float | None = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN's integer codes b = sign(w)·[|w| > Δ] and scale α (per tensor, or [rows, 1, ...] per row), so that
    :func:`twn_ternary` is α·b. Detached; same arguments as :func:`twn_ternary`."""
    codes, alpha, _ = _twn(w, per_row, clip)
    return codes, alpha


def _twn(w: torch.Tensor, per_row: bool, clip: float | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(codes, α, whether |w| < clip everywhere). One buffer of w's size is made and reused for |w|, the
    kept magnitudes and the codes: on a CPU each fresh buffer of a word-embedding table's size costs more
    in page faults than the arithmetic (a whole 30k-row table: 160 -> 42 ms here; training quantizes only
    a batch's rows, see QuantEmbedding)."""
    x = w.detach()
    within = _within_clip(x, clip)
    if not within:
        x = x.clamp(-clip, clip)
    dims = _reduce_dims(x, per_row)
    buf = x.abs()
    delta = 0.7 * (buf.mean() if dims is None else buf.mean(dim=dims, keepdim=True))
    # [|x| > Δ] as a float 0/1 made by arithmetic: fl(a − b) > 0 exactly when a > b, and float ops here
    # run several times faster than bool masks' conversions (mul by a bool mask, a bool sum)
    keep = buf.sub(delta).relu_().sign_()
    kept = buf.mul_(keep)  # |x| where kept, else 0
    if dims is None:
        alpha = kept.sum() / keep.sum().clamp(min=1)
    else:
        alpha = kept.sum(dim=dims, keepdim=True) / keep.sum(dim=dims, keepdim=True).clamp(min=1)
    codes = torch.sign(x, out=buf).mul_(keep)
    return codes, alpha, within


def symmetric_quant(
    x: torch.Tensor, bits: int, per_row: bool = False, clip: float | None = 2.5
) -> torch.Tensor:
    """Symmetric uniform max-abs quantisation (TernaryBERT ``SymQuantizer``).

    Clamp to [-clip, clip]; m = max|x| (detached); s = (2^(b-1) - 1)/m; x̂ = round(x·s)/s.
    Used for 8-bit weights and for every activation (dynamic range, recomputed at every call).

    Args:
        x: any tensor.
        bits: 2..8; 2^(b-1) - 1 levels per side (127 at 8 bits).
        per_row: one range per row (dim 0) instead of one per tensor.
        clip: clamp value and STE cut-off; None for no clamp.
    """
    v = x.detach()
    levels = 2 ** (bits - 1) - 1
    # max|clamp(v)| = min(max|v|, clip): one aminmax pass instead of a clamped copy, abs and amax.
    if per_row and v.dim() > 1:
        m = v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True)
    else:
        lo, hi = torch.aminmax(v)
        m = torch.maximum(hi, -lo)
    ste_clip = clip
    if clip is not None:
        # Nothing reaches the clip (e.g. attention probabilities in [0, 1]): the STE mask would be all
        # ones, so skip computing and storing it. Checked on the CPU only, where reading m costs nothing
        # (on a GPU it would stall the stream at every activation).
        if m.dim() == 0 and m.device.type == "cpu" and float(m) < clip:
            ste_clip = None
        m = m.clamp(max=clip)
    scale = levels / m.clamp(min=1e-8)
    # One new tensor, rounded in place (this is the hot path of every activation); no clamp pass when
    # nothing reaches the clip (then the clamp is the identity).
    xq = v.clamp(-clip, clip).mul_(scale) if ste_clip is not None else v * scale
    return _ste(x, xq.round_().div_(scale), ste_clip)


def mean_clip_quant(w: torch.Tensor, bits: int, per_row: bool = False, clip: float | None = 2.5) -> torch.Tensor:
    """The reference's n-bit weight quantiser ``TwnQuantizer_mx`` (used for 4-bit weights/embeddings).

    t = mean|w|; c' = mean of |w| over |w| > t; clamp to [-c', c']; step = 2c'/(2^b - 1);
    ŵ = round(w/step)·step.
    """
    x = w.detach()
    if clip is not None:
        x = x.clamp(-clip, clip)
    t = _mean_abs(x, per_row)
    big = (x.abs() > t).to(x.dtype)
    dims = _reduce_dims(x, per_row)
    if dims is None:
        c = (x.abs() * big).sum() / big.sum().clamp(min=1)
    else:
        c = (x.abs() * big).sum(dim=dims, keepdim=True) / big.sum(dim=dims, keepdim=True).clamp(min=1)
    c = c.clamp(min=1e-8)
    step = 2 * c / (2**bits - 1)
    xq = torch.round(torch.maximum(torch.minimum(x, c), -c) / step) * step
    return _ste(w, xq, clip)


# --------------------------------------------------------------------------- LSQ


def lsq_levels(bits: int, narrow_range: bool) -> tuple[int, int]:
    """(Q_N, Q_P) for signed LSQ: (2^(b-1), 2^(b-1)-1), or symmetric (Q_P, Q_P) with ``narrow_range``."""
    qp = 2 ** (bits - 1) - 1
    return (qp if narrow_range else qp + 1), qp


class _LSQ(torch.autograd.Function):
    """LSQ (Esser et al. 2020): v̂ = clamp(round(v/s), -Q_N, Q_P)·s with the paper's step-size gradient."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float,
                straight_through: bool = False) -> torch.Tensor:
        r = v / s
        ctx.save_for_backward(r)
        ctx.shape_s, ctx.qn, ctx.qp, ctx.g, ctx.straight = s.shape, qn, qp, g, straight_through
        return torch.clamp(torch.round(r), -qn, qp) * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (r,) = ctx.saved_tensors
        qn, qp = ctx.qn, ctx.qp
        lower, upper = r <= -qn, r >= qp
        inside = ~(lower | upper)
        grad_v = grad if ctx.straight else grad * inside.to(grad.dtype)
        # d v̂ / d s: round(r) - r inside, -Q_N below, +Q_P above; then scaled by g.
        ds = torch.where(inside, torch.round(r) - r, torch.where(lower, torch.full_like(r, -qn),
                                                                 torch.full_like(r, qp)))
        grad_s = grad * ds * ctx.g
        # Reduce to the step's shape (one per tensor or one per row).
        if len(ctx.shape_s) == 0 or grad_s.shape != ctx.shape_s:
            dims = [i for i in range(grad_s.dim()) if i >= len(ctx.shape_s) or ctx.shape_s[i] == 1]
            grad_s = grad_s.sum(dim=dims, keepdim=True) if dims else grad_s
            grad_s = grad_s.reshape(ctx.shape_s)
        return grad_v, grad_s, None, None, None, None


def lsq_quant(v: torch.Tensor, step: torch.Tensor, bits: int, narrow_range: bool = False,
              grad_scale: float | None = None, straight_through: bool = False) -> torch.Tensor:
    """LSQ fake quantisation.

    Args:
        v: the tensor to quantise (weight or activation).
        step: learned step size s, a scalar tensor or [rows, 1, ...] for per-row steps.
        bits: bit width.
        narrow_range: Q_N = Q_P (symmetric; ternary at 2 bits, as KDLSQ-BERT).
        grad_scale: g; default 1/sqrt(N·Q_P) with N = elements per step (Esser et al.).
        straight_through: pass v's gradient through everywhere (KDLSQ-BERT's weights) instead of zeroing
            it where v/s falls outside [-Q_N, Q_P] (LSQ).
    """
    qn, qp = lsq_levels(bits, narrow_range)
    if grad_scale is None:
        n = v.numel() // max(step.numel(), 1)
        grad_scale = 1.0 / math.sqrt(n * qp)
    return _LSQ.apply(v, step, qn, qp, grad_scale, straight_through)


def lsq_init_mean(v: torch.Tensor, bits: int, per_row: bool = False) -> torch.Tensor:
    """s₀ = 2·mean|v|/sqrt(Q_P) (Esser et al.)."""
    qp = 2 ** (bits - 1) - 1
    return (2 * _mean_abs(v.detach().float(), per_row) / math.sqrt(qp)).clamp(min=1e-8)


def lsq_init_percentile(v: torch.Tensor, bits: int, percentile: float = 97.5) -> torch.Tensor:
    """KDLSQ-BERT ``reset_wgt_alpha``: clip at the larger |value| of the (100-p)th and pth percentiles.

    The clip value c becomes the step through s = c / Q_P (the top level lands on the clip value).
    """
    qp = 2 ** (bits - 1) - 1
    flat = v.detach().float().flatten()
    if flat.numel() > 2_000_000:  # quantile() has an input-size limit; a strided sample is enough
        flat = flat[:: flat.numel() // 2_000_000 + 1]
    q = torch.quantile(flat, torch.tensor([1 - percentile / 100, percentile / 100], dtype=flat.dtype))
    return (q.abs().max() / qp).clamp(min=1e-8)


def kl_calibrated_clip(v: torch.Tensor, bits: int, num_bins: int = 2048) -> torch.Tensor:
    """TensorRT-style KL-divergence calibration of a symmetric clip value on the histogram of |v|.

    For each candidate threshold i (in bins), the reference distribution P is the histogram truncated at
    i with the clipped mass folded into the last bin; Q is P quantised to 2^(b-1) levels and expanded
    back (zero bins stay zero). The threshold with the smallest KL(P‖Q) wins (KDLSQ-BERT "new init").

    Returns:
        the clip value (a scalar tensor); divide by Q_P for an LSQ step.
    """
    a = v.detach().float().abs().flatten()
    amax = float(a.max())
    if amax == 0.0:
        return torch.tensor(1e-8)
    hist = torch.histc(a, bins=num_bins, min=0.0, max=amax).double()
    width = amax / num_bins
    levels = 2 ** (bits - 1)
    best_kl, best_i = math.inf, num_bins
    for i in range(levels, num_bins + 1, max(1, num_bins // 256)):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        nz = p > 0
        # Merge the i bins into `levels` groups, spread each group's mass evenly over its non-zero bins.
        idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        group_mass = torch.zeros(levels, dtype=p.dtype).index_add_(0, idx, hist[:i])
        group_nz = torch.zeros(levels, dtype=p.dtype).index_add_(0, idx, nz.to(p.dtype))
        q = torch.where(nz, group_mass[idx] / group_nz[idx].clamp(min=1), torch.zeros_like(p))
        ps, qs = p / p.sum(), q / q.sum().clamp(min=1e-12)
        m = nz & (qs > 0)
        kl = float((ps[m] * torch.log(ps[m] / qs[m])).sum()) + (float(ps[nz & ~m].sum()) * 1e3)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return torch.tensor((best_i + 0.5) * width)


def kdlsq_cdf_clip(v: torch.Tensor, bits: int) -> torch.Tensor:
    """KDLSQ-BERT's own KL calibration of a symmetric clip value (its ``kl_divergence_initilization``).

    On the histogram of |v| over [0, max|v|] with numpy's ``bins="sqrt"`` (width (max − min)/√N), normalised, with
    C its cumulative sum: for each candidate i = n+1 … bins−1 (n = 2^(b−1)), threshold (i + ½)·width,

        P = C with P[i−1:] = 1;   P' = P[:i] linearly resampled onto n points and back onto i points;
        Q = P with Q[:i] = P';     d_i = Σ (C − Q) · log2(C / Q)

    (a J-divergence between the cumulative distributions), and the threshold with the smallest d_i wins.
    Terms where C and Q are both 0 count 0 (the reference code would give NaN there). With fewer bins
    than n + 1 the clip is max|v|.

    Returns:
        the clip value (a scalar tensor); divide by Q_P for an LSQ step.
    """
    import numpy as np

    a = v.detach().float().abs().flatten().cpu().numpy().astype(np.float64)
    mx = float(a.max()) if a.size else 0.0
    if mx == 0.0:
        return torch.tensor(1e-8)
    hist, edges = np.histogram(a, bins="sqrt", range=(0.0, mx))
    cdf = np.cumsum(hist / hist.sum())
    n, nbins, width = 2 ** (bits - 1), len(hist), edges[1] - edges[0]
    if n + 1 > nbins:
        return torch.tensor(mx)
    best_d, best_t = math.inf, mx
    for i in range(n + 1, nbins + 1):
        p = cdf.copy()
        p[i - 1:] = 1.0
        coarse = np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, i), p[:i])
        q = p.copy()
        q[:i] = np.interp(np.linspace(0.0, 1.0, i), np.linspace(0.0, 1.0, n), coarse)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = (cdf - q) * np.log2(cdf / q)
        d = float(np.where((cdf == 0) & (q == 0), 0.0, terms).sum())
        if d < best_d:
            best_d, best_t = d, (i + 0.5) * width
    return torch.tensor(best_t)


def lsq_init(v: torch.Tensor, bits: int, method: str, per_row: bool = False,
             percentile: float = 97.5) -> torch.Tensor:
    """Initial LSQ step by ``method`` in {mean, percentile, kl, kl_cdf}; per-row only for ``mean``.

    ``kl``: TensorRT-style KL on the histogram (:func:`kl_calibrated_clip`); ``kl_cdf``: KDLSQ-BERT's own
    calibration (:func:`kdlsq_cdf_clip`)."""
    if method == "mean":
        return lsq_init_mean(v, bits, per_row)
    if per_row:  # calibrated inits are per tensor; broadcast to one step per row
        s = lsq_init(v, bits, method, False, percentile)
        return s.expand(v.shape[0], *([1] * (v.dim() - 1))).clone()
    if method == "percentile":
        return lsq_init_percentile(v, bits, percentile)
    if method == "kl":
        return (kl_calibrated_clip(v, bits) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
    if method == "kl_cdf":
        return (kdlsq_cdf_clip(v, bits) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
    raise ValueError(f"unknown LSQ init {method!r}; allowed: mean, percentile, kl, kl_cdf")
