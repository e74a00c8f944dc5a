"""Quantizers: one class per method (docs/algorithms.md §1 and §4), chosen once from the config by
:func:`make_quantizer`.

Each class is the single home of its method's statistics and gives:

- ``codes(x, step) -> (q, scale)``: the **quantized form**, one convention for every method: integer codes
  ``q`` (integer-valued, in ``x``'s dtype, detached) and a scale with ``x̂ = (q − zero_point) · scale``;
  every method here is symmetric, so ``zero_point`` is 0 and ``x̂ = q · scale``. Bit for bit for the methods
  whose training multiplies (TWN, mean-clip, LSQ, absmean, SEQ); within float rounding (an ulp) for the
  max-abs ones (sym, absmax_token), whose training divides by ``1/scale``. 2-bit SEQ's half-integer levels
  (k + ½)·α/2 are the odd codes 2k + 1 with the scale α/4 (exact: the same real number, rounded once);
- ``code_range()`` / ``code_stride``: the codes it can produce (SEQ's 2-bit codes step by 2);
- ``fake_quant(x, step)``: x̂ with training's backward: the straight-through estimator, zeroed where
  ``|x| >= clip`` (the reference's clipped STE), or LSQ's step-size gradient;
- ``dequantized(x, step)``: the same x̂ without autograd (the inference path of a converted model);

so training (:mod:`~kdqat_dist.quant.fake_quant`), diagnostics, the integer model
(:mod:`~kdqat_dist.quant.integer`) and export compute the same numbers. ``step`` is the learned LSQ step (a
parameter of the owning module, shape (1,) or [rows, 1]); None otherwise.

No Python branch reads tensor data while ``torch.compile`` / ``torch.export`` trace (``_tracing``): the two
CPU shortcuts that skip an identity clamp take the general path there, with the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from kdqat_dist.config import ActQuantConfig, ConfigError, WeightQuantConfig


def _reduce_dims(x: Tensor, per_row: bool) -> tuple[int, ...] | None:
    """Dimensions to reduce for one statistic per row (dim 0) or one per tensor (None)."""
    return tuple(range(1, x.dim())) if per_row and x.dim() > 1 else None


def _mean(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    return x.mean() if dims is None else x.mean(dim=dims, keepdim=True)


def _sum(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    return x.sum() if dims is None else x.sum(dim=dims, keepdim=True)


class _ClippedSTE(torch.autograd.Function):
    """Forward: a precomputed quantized value. Backward: identity, zeroed where |x| >= clip."""

    @staticmethod
    def forward(ctx, x: Tensor, xq: Tensor, clip: float | None) -> Tensor:
        mask = None if clip is None else x.abs() < clip
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return xq

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        g = torch.where(mask, grad, 0.0) if ctx.has_mask else grad  # one pass, no float copy of the mask
        return g, None, None


def _ste(x: Tensor, xq: Tensor, clip: float | None) -> Tensor:
    return _ClippedSTE.apply(x, xq.detach(), clip)


def _tracing() -> bool:
    """True while torch.compile or torch.export traces: a Python branch on tensor data would fail there
    (``GuardOnDataDependentSymNode``) or bake one input's answer into the graph."""
    return torch.compiler.is_compiling()


def _within_clip(x: Tensor, clip: float | None) -> bool:
    """Whether ``|x| < clip`` everywhere, so that clamping is the identity and the STE mask all ones.

    Read on the CPU only (one pass that writes nothing); elsewhere it would stall the stream, so the
    answer there is "not known" and the clamp and mask are computed as written. Also "not known" while
    tracing (the clamp then runs: the same values).
    """
    if clip is None:
        return True
    if x.device.type != "cpu" or x.numel() == 0 or _tracing():
        return False
    lo, hi = torch.aminmax(x)
    return max(float(hi), -float(lo)) < clip  # False for NaN: the clamp path then runs as before


def _dequant(codes: Tensor, scale: Tensor, op: str) -> Tensor:
    """ŵ from training's ``codes`` (a fresh tensor, overwritten) and ``scale``, by the class's ``_train_op``.

    Training's own arithmetic, kept as it was so that its numbers never change; the public form is
    :meth:`Quantizer.codes` (always ``q · scale``)."""
    if op == "div":
        return codes.div_(scale)
    if op == "mul_half":
        return codes.add_(0.5).mul_(scale)
    return codes.mul_(scale)


@dataclass(frozen=True)
class Quantizer:
    """What every method shares. Subclasses implement ``_quant`` (training's codes and scale) and
    ``code_range`` (of the public codes); ``_public`` maps training's pair to the public one.

    Attributes:
        bits: bit width (TWN is ternary whatever it says).
        per_row: one statistic (or step) per row (dim 0) instead of one per tensor.
        clip: clamp value and STE cut-off; None for neither.
    """

    bits: int = 8
    per_row: bool = False
    clip: float | None = 2.5

    # how training computes x̂ from _quant's pair: "mul" codes * scale, "div" codes / scale, "mul_half"
    # (codes + ½) * scale. Internal: the public form (codes()) is always q * scale.
    _train_op: ClassVar[str] = "mul"
    learned: ClassVar[bool] = False  # the owning module holds a learned step
    code_stride: ClassVar[int] = 1  # distance between consecutive public codes

    @classmethod
    def from_config(cls, cfg: WeightQuantConfig | ActQuantConfig, activation: bool) -> Quantizer:
        return cls(bits=cfg.bits, per_row=getattr(cfg, "granularity", "tensor") == "row", clip=cfg.clip)

    def code_range(self) -> tuple[int, int]:
        """The smallest and largest public code this quantizer can produce."""
        raise NotImplementedError

    def num_codes(self) -> int:
        """How many codes :meth:`code_range` holds (``code_stride`` apart)."""
        lo, hi = self.code_range()
        return (hi - lo) // self.code_stride + 1

    def storage_bits(self) -> int:
        """Bits per stored code: enough for :meth:`num_codes` (mean-clip needs one more than ``bits``)."""
        return math.ceil(math.log2(self.num_codes()))

    def codes(self, x: Tensor, step: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The quantized form (q, scale) of ``x``, detached: ``x̂ = q · scale`` (see the module docstring).

        Returns:
            q: integer-valued codes in ``x``'s dtype, the shape of ``x``, within :meth:`code_range`;
            scale: a scalar, (1,), [rows, 1, ...] (per row) or [..., 1] (per token), broadcastable to q.
        """
        codes, scale, _ = self._quant(x.detach(), step)
        return self._public(codes, scale)

    def _public(self, codes: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """Training's (codes, scale) -> the public (q, scale) with x̂ = q · scale."""
        if self._train_op == "div":
            return codes, scale.reciprocal()
        if self._train_op == "mul_half":  # (k + ½)·s = (2k + 1)·(s/2): both exact, the same real number
            return codes.mul_(2).add_(1), scale / 2
        return codes, scale

    def fake_quant(self, x: Tensor, step: Tensor | None = None) -> Tensor:
        """x̂, the shape of ``x``; backward: straight through, zeroed where |x| >= clip."""
        codes, scale, ste_clip = self._quant(x.detach(), step)
        return _ste(x, _dequant(codes, scale, self._train_op), ste_clip)

    def dequantized(self, x: Tensor, step: Tensor | None = None) -> Tensor:
        """:meth:`fake_quant`'s value without autograd: the inference path of a converted model."""
        codes, scale, _ = self._quant(x.detach(), None if step is None else step.detach())
        return _dequant(codes, scale, self._train_op)

    def _quant(self, x: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        """(codes in a fresh tensor, scale, the STE's clip) of the detached ``x``."""
        raise NotImplementedError

    def clip_limit(self, step: Tensor | None) -> float | None:
        """|x| beyond which an input is clipped (the activation clip-rate diagnostic)."""
        return self.clip


@dataclass(frozen=True)
class TWN(Quantizer):
    """TWN ternarisation (Li et al. 2016), as TernaryBERT's ``TwnQuantizer``.

    Clamp to ±clip; Δ = 0.7·mean|w|; codes b = sign(w)·[|w| > Δ]; α = mean of |w| over |w| > Δ; ŵ = α·b.
    Scale α: a scalar, or [rows, 1, ...] per row (the reference's embedding setting).
    """

    def code_range(self) -> tuple[int, int]:
        return -1, 1

    def _quant(self, x: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        """One buffer of x's size is made and reused for |x|, the kept magnitudes and the codes: on a CPU
        each fresh buffer of a word-embedding table's size costs more in page faults than the arithmetic
        (training quantizes only a batch's rows, see QuantEmbedding). No STE clip when nothing reaches it."""
        within = _within_clip(x, self.clip)
        if not within:
            x = x.clamp(-self.clip, self.clip)
        dims = _reduce_dims(x, self.per_row)
        buf = x.abs()
        delta = 0.7 * _mean(buf, dims)
        # [|x| > Δ] as a float 0/1 made by arithmetic: fl(a − b) > 0 exactly when a > b, and float ops here
        # run several times faster than bool masks' conversions (mul by a bool mask, a bool sum)
        keep = buf.sub(delta).relu_().sign_()
        kept = buf.mul_(keep)  # |x| where kept, else 0
        alpha = _sum(kept, dims) / _sum(keep, dims).clamp(min=1)
        return torch.sign(x, out=buf).mul_(keep), alpha, None if within else self.clip


@dataclass(frozen=True)
class SymMaxAbs(Quantizer):
    """Symmetric uniform max-abs quantisation (TernaryBERT ``SymQuantizer``), for 8-bit weights and every
    dynamic activation: clamp to ±clip; m = max|x|; s = (2^(b-1) - 1)/m; codes round(x·s); ŵ = codes/s.

    The range is recomputed at every call (nothing learned); 2^(b-1) - 1 levels per side. Public form:
    q = codes, scale = 1/s (= m/(2^(b-1) - 1)).
    """

    _train_op: ClassVar[str] = "div"

    def code_range(self) -> tuple[int, int]:
        levels = 2 ** (self.bits - 1) - 1
        return -levels, levels

    def _quant(self, v: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        clip = self.clip
        # max|clamp(v)| = min(max|v|, clip): one aminmax pass instead of a clamped copy, abs and amax.
        dims = _reduce_dims(v, self.per_row)
        if dims is not None:
            m = v.abs().amax(dim=dims, keepdim=True)
        else:
            lo, hi = torch.aminmax(v)
            m = torch.maximum(hi, -lo)
        ste_clip = clip
        if clip is not None:
            # Nothing reaches the clip (e.g. attention probabilities in [0, 1]): the STE mask would be all
            # ones, so skip computing and storing it. Checked on the CPU only, where reading m costs nothing
            # (on a GPU it would stall the stream at every activation), and never while tracing.
            if m.dim() == 0 and m.device.type == "cpu" and not _tracing() and float(m) < clip:
                ste_clip = None
            m = m.clamp(max=clip)
        scale = (2 ** (self.bits - 1) - 1) / m.clamp(min=1e-8)
        # One new tensor, rounded in place (the hot path of every activation); no clamp pass when nothing
        # reaches the clip (then the clamp is the identity).
        codes = v.clamp(-clip, clip).mul_(scale) if ste_clip is not None else v * scale
        return codes.round_(), scale, ste_clip


@dataclass(frozen=True)
class MeanClip(Quantizer):
    """The reference's n-bit weight quantiser ``TwnQuantizer_mx`` (4-bit weights/embeddings).

    Clamp to ±clip; t = mean|w|; c = mean of |w| over |w| > t; step = 2c/(2^b - 1);
    codes round(clamp(w, ±c)/step), which reach ±2^(b-1) (2^b + 1 levels); ŵ = codes·step.
    """

    def code_range(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1)

    def _quant(self, x: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        if self.clip is not None:
            x = x.clamp(-self.clip, self.clip)
        dims = _reduce_dims(x, self.per_row)
        t = _mean(x.abs(), dims)
        big = (x.abs() > t).to(x.dtype)
        c = (_sum(x.abs() * big, dims) / _sum(big, dims).clamp(min=1)).clamp(min=1e-8)
        s = 2 * c / (2**self.bits - 1)
        return torch.round(torch.maximum(torch.minimum(x, c), -c) / s), s, self.clip


class _LSQFunction(torch.autograd.Function):
    """LSQ (Esser et al. 2020): v̂ = clamp(round(v/s), -Q_N, Q_P)·s with the paper's step-size gradient."""

    @staticmethod
    def forward(ctx, v: Tensor, s: Tensor, qn: int, qp: int, g: float, straight_through: bool) -> Tensor:
        r = v / s
        ctx.save_for_backward(r)
        ctx.shape_s, ctx.qn, ctx.qp, ctx.g, ctx.straight = s.shape, qn, qp, g, straight_through
        return torch.clamp(torch.round(r), -qn, qp) * s

    @staticmethod
    def backward(ctx, grad: Tensor):
        (r,) = ctx.saved_tensors
        qn, qp = ctx.qn, ctx.qp
        lower, upper = r <= -qn, r >= qp
        inside = ~(lower | upper)
        grad_v = grad if ctx.straight else grad * inside.to(grad.dtype)
        # d v̂ / d s: round(r) - r inside, -Q_N below, +Q_P above; then scaled by g.
        ds = torch.where(
            inside, torch.round(r) - r, torch.where(lower, torch.full_like(r, -qn), torch.full_like(r, qp))
        )
        grad_s = (grad * ds * ctx.g).sum_to_size(ctx.shape_s)  # one per tensor or one per row
        return grad_v, grad_s, None, None, None, None


@dataclass(frozen=True)
class LSQ(Quantizer):
    """LSQ with a learned step s (Esser et al.; KDLSQ-BERT's variants): codes clamp(round(v/s), -Q_N, Q_P),
    ŵ = codes·s, scale s. The step is the caller's (``step``); :meth:`init_step` gives its first value.

    Attributes:
        narrow_range: Q_N = Q_P (symmetric; ternary at 2 bits, as KDLSQ-BERT); else Q_N = Q_P + 1.
        straight_through: pass v's gradient through everywhere (KDLSQ-BERT's weights) instead of zeroing
            it where v/s falls outside [-Q_N, Q_P] (LSQ).
        activation: the gradient scale's N is the number of features per example (activations), not the
            number of elements per step (weights).
        init: the step's initialisation, see :func:`lsq_init`.
        percentile: for ``init="percentile"``.
    """

    narrow_range: bool = True
    straight_through: bool = False
    activation: bool = False
    init: str = "mean"
    percentile: float = 97.5

    learned: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: WeightQuantConfig | ActQuantConfig, activation: bool) -> LSQ:
        # activations: symmetric levels and LSQ's clipped STE (KDLSQ-BERT); no clamp before the step
        return cls(
            bits=cfg.bits,
            per_row=getattr(cfg, "granularity", "tensor") == "row",
            clip=None,
            narrow_range=activation or cfg.narrow_range,
            straight_through=not activation and cfg.straight_through,
            activation=activation,
            init=cfg.init,
            percentile=cfg.percentile,
        )

    @property
    def levels(self) -> tuple[int, int]:
        """(Q_N, Q_P)."""
        qp = 2 ** (self.bits - 1) - 1
        return (qp if self.narrow_range else qp + 1), qp

    def code_range(self) -> tuple[int, int]:
        qn, qp = self.levels
        return -qn, qp

    def _quant(self, x: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        qn, qp = self.levels
        s = step.detach().to(x.dtype)
        return torch.clamp(torch.round(x / s), -qn, qp), s, None

    def fake_quant(self, x: Tensor, step: Tensor | None = None) -> Tensor:
        """ŵ with LSQ's gradients for ``x`` and the step."""
        qn, qp = self.levels
        if self.activation:
            n = max(x[0].numel(), 1) if x.dim() > 1 else x.numel()
            g = 1.0 / (n * qp) ** 0.5  # as before: math.sqrt differs from ** 0.5 by an ulp for some N
        else:
            g = 1.0 / math.sqrt(x.numel() // max(step.numel(), 1) * qp)
        return _LSQFunction.apply(x, step.to(x.dtype), qn, qp, g, self.straight_through)

    def clip_limit(self, step: Tensor | None) -> float | None:
        return float(step) * self.levels[1]

    def init_step(self, v: Tensor) -> Tensor:
        """The initial step for ``v`` (a whole weight, or a calibration batch of activations)."""
        return lsq_init(v, self.bits, self.init, self.per_row, self.percentile)


@dataclass(frozen=True)
class AbsMean(Quantizer):
    """BitNet b1.58's absmean ternary weights (Ma et al. 2024): γ = mean|w| + ε (ε = 1e-5);
    codes clamp(round(w/γ), -1, 1); ŵ = codes·γ. Scale γ: a scalar, or [rows, 1, ...] per row.

    The clip follows TWN's convention: clamp to ±clip before the statistic, and the STE zeroed where
    |w| >= clip; ``clip: null`` is BitNet's plain straight-through estimator.
    """

    eps: ClassVar[float] = 1e-5

    def code_range(self) -> tuple[int, int]:
        return -1, 1

    def _quant(self, x: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        within = _within_clip(x, self.clip)
        if not within:
            x = x.clamp(-self.clip, self.clip)
        gamma = _mean(x.abs(), _reduce_dims(x, self.per_row)) + self.eps
        return torch.round(x / gamma).clamp_(-1, 1), gamma, None if within else self.clip


@dataclass(frozen=True)
class AbsMaxToken(Quantizer):
    """BitNet's per-token absmax activations: for each vector along the last dim (a token's hidden
    vector), s = Q_P / max(max|x|, ε) with Q_P = 2^(b-1) - 1 (127 at 8 bits) and ε = 1e-5; codes round(x·s);
    x̂ = codes / s. Scale s: [..., 1]; public form q = codes, scale = 1/s.

    As :class:`SymMaxAbs` (one scale per tensor), a ``clip`` clamps first and zeroes the STE beyond it;
    ``clip: null`` is BitNet's plain STE.
    """

    _train_op: ClassVar[str] = "div"
    eps: ClassVar[float] = 1e-5

    def code_range(self) -> tuple[int, int]:
        levels = 2 ** (self.bits - 1) - 1
        return -levels, levels

    def _quant(self, v: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        within = _within_clip(v, self.clip)
        if not within:
            v = v.clamp(-self.clip, self.clip)
        m = v.abs().amax(dim=-1, keepdim=True) if v.dim() else v.abs()
        scale = (2 ** (self.bits - 1) - 1) / m.clamp(min=self.eps)
        return (v * scale).round_(), scale, None if within else self.clip


# ParetoQ's SEQ: |w/α| is clipped just inside 1, so that the top level's rounding bin is never hit on its edge.
_SEQ_CLIP = 1 - 1e-2
_SEQ_EPS = 1e-5  # α is clamped below at this value in the forward


class _SEQFunction(torch.autograd.Function):
    """SEQ's forward and ParetoQ's gradients (an LSQ-style gradient for α, see :class:`SEQ`)."""

    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor, n: float, shift: float, top: float, g: float) -> Tensor:
        a = alpha.clamp_min(_SEQ_EPS)
        r = w / a
        ctx.save_for_backward(r)
        ctx.shape_a, ctx.n, ctx.shift, ctx.top, ctx.g = alpha.shape, n, shift, top, g
        codes = torch.round(torch.clamp(r, -_SEQ_CLIP, _SEQ_CLIP) * n - shift)
        return _dequant(codes, a / n, "mul_half" if shift else "mul")

    @staticmethod
    def backward(ctx, grad: Tensor):
        (r,) = ctx.saved_tensors
        n, shift, top = ctx.n, ctx.shift, ctx.top
        below, above = r < -_SEQ_CLIP, r > _SEQ_CLIP
        inside = ~(below | above)
        grad_w = grad * inside.to(grad.dtype)
        q = (torch.round(torch.clamp(r, -_SEQ_CLIP, _SEQ_CLIP) * n - shift) + shift) / n
        da = torch.where(inside, q - r, torch.where(below, torch.full_like(r, -top), torch.full_like(r, top)))
        grad_a = (grad * da * ctx.g).sum_to_size(ctx.shape_a)
        return grad_w, grad_a, None, None, None, None


@dataclass(frozen=True)
class SEQ(Quantizer):
    """ParetoQ's stretched elastic quantization (Liu et al. 2025) for 1.58 and 2 bits, with a learned
    clip value α (the owning module's ``step``; one per tensor or one per row):

        r = w / max(α, 1e-5);   k = round(clamp(r, -0.99, 0.99)·n - shift);   ŵ = (k + shift)·α/n

    ternary (``narrow_range``, 1.58 bits): n = 1.5, shift = 0, k ∈ {-1, 0, 1}, ŵ ∈ {0, ±⅔α};
    2 bits: n = 2, shift = ½, k ∈ {-2, -1, 0, 1}, ŵ ∈ {±¼α, ±¾α}. The levels sit at the centres of equal
    bins of [-α, α]. Training computes k·α/n or (k + ½)·α/n; the public form is q = k, scale α/n (ternary)
    or the odd codes q = 2k + 1 ∈ {-3, -1, 1, 3}, scale α/(2n) = α/4 (2 bits).

    Gradients (ParetoQ's ``StretchedElasticQuant``): ∂ŵ/∂w = 1[|r| <= 0.99];
    ∂ŵ/∂α = g·{q(r) - r inside, ∓top beyond ±0.99} with q(r) = (k + shift)/n, top = (n - shift)/n (1 for
    ternary, ¾ for 2 bits) and g = 1/sqrt(numel(w)) (the whole tensor's, per row too).
    """

    narrow_range: bool = True

    learned: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: WeightQuantConfig | ActQuantConfig, activation: bool) -> SEQ:
        return cls(
            bits=cfg.bits,
            per_row=getattr(cfg, "granularity", "tensor") == "row",
            clip=None,
            narrow_range=getattr(cfg, "narrow_range", True),
        )

    @property
    def grid(self) -> tuple[float, float]:
        """(n, shift): (1.5, 0) ternary, (2^(b-1), ½) otherwise."""
        return (1.5, 0.0) if self.narrow_range else (float(2 ** (self.bits - 1)), 0.5)

    @property
    def _train_op(self) -> str:  # type: ignore[override]  # depends on the grid, not only the class
        return "mul" if self.narrow_range else "mul_half"

    @property
    def code_stride(self) -> int:  # type: ignore[override]  # 2-bit: odd codes
        return 1 if self.narrow_range else 2

    @property
    def levels(self) -> tuple[int, int]:
        """(1, 1): the learned parameter is the clip value α itself, so its rate is not divided by a Q_P."""
        return 1, 1

    def code_range(self) -> tuple[int, int]:
        # 2 bits: k in -2^(b-1) .. 2^(b-1) - 1, public 2k + 1
        return (-1, 1) if self.narrow_range else (1 - 2**self.bits, 2**self.bits - 1)

    def _quant(self, x: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
        n, shift = self.grid
        a = step.detach().to(x.dtype).clamp_min(_SEQ_EPS)
        return torch.round(torch.clamp(x / a, -_SEQ_CLIP, _SEQ_CLIP) * n - shift), a / n, None

    def fake_quant(self, x: Tensor, step: Tensor | None = None) -> Tensor:
        """ŵ with ParetoQ's gradients for ``x`` and α (``step``)."""
        n, shift = self.grid
        return _SEQFunction.apply(x, step.to(x.dtype), n, shift, (n - shift) / n, 1.0 / math.sqrt(x.numel()))

    def clip_limit(self, step: Tensor | None) -> float | None:
        return float(step.detach().max()) * _SEQ_CLIP

    def init_step(self, v: Tensor) -> Tensor:
        """α₀ = max|w| (per row or per tensor), as ParetoQ initialises its 1.58- and 2-bit clip values."""
        x = v.detach().float().abs()
        dims = _reduce_dims(x, self.per_row)
        return (x.amax() if dims is None else x.amax(dim=dims, keepdim=True)).clamp(min=_SEQ_EPS)


QUANTIZERS: dict[str, type[Quantizer]] = {
    "twn": TWN,
    "sym": SymMaxAbs,
    "mean_clip": MeanClip,
    "lsq": LSQ,
    "absmean": AbsMean,
    "seq": SEQ,
    "absmax_token": AbsMaxToken,
}
WEIGHT_METHODS = ("twn", "sym", "mean_clip", "lsq", "absmean", "seq")
# activations: dynamic max-abs (per tensor or per token) or a learned step
ACT_METHODS = ("sym", "lsq", "absmax_token")


def make_quantizer(cfg: WeightQuantConfig | ActQuantConfig, activation: bool = False) -> Quantizer:
    """The quantizer ``cfg.method`` names, with ``cfg``'s settings.

    Raises:
        ConfigError (a ValueError): an unknown method, naming the allowed ones.
    """
    allowed = ACT_METHODS if activation else WEIGHT_METHODS
    if cfg.method not in allowed:
        kind = "activation" if activation else "weight"
        raise ConfigError(f"unknown {kind} quantization method {cfg.method!r}; allowed: {', '.join(allowed)}")
    return QUANTIZERS[cfg.method].from_config(cfg, activation)


# --------------------------------------------------------------------------- LSQ step initialisation


def kl_calibrated_clip(v: Tensor, bits: int, num_bins: int = 2048) -> Tensor:
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


def kdlsq_cdf_clip(v: Tensor, bits: int) -> Tensor:
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
        p[i - 1 :] = 1.0
        coarse = np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, i), p[:i])
        q = p.copy()
        q[:i] = np.interp(np.linspace(0.0, 1.0, i), np.linspace(0.0, 1.0, n), coarse)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = (cdf - q) * np.log2(cdf / q)
        d = float(np.where((cdf == 0) & (q == 0), 0.0, terms).sum())
        if d < best_d:
            best_d, best_t = d, (i + 0.5) * width
    return torch.tensor(best_t)


def lsq_init(v: Tensor, bits: int, method: str, per_row: bool = False, percentile: float = 97.5) -> Tensor:
    """Initial LSQ step for ``v`` by ``method``; a scalar, or [rows, 1, ...] with ``per_row``.

    ``mean``: s₀ = 2·mean|v|/sqrt(Q_P) (Esser et al.; per row when asked); ``percentile``: KDLSQ-BERT's
    ``reset_wgt_alpha``, the larger |value| of the (100-p)th and pth percentiles over Q_P (the top level
    lands on that clip value); ``kl``: TensorRT-style KL on the histogram (:func:`kl_calibrated_clip`);
    ``kl_cdf``: KDLSQ-BERT's own calibration (:func:`kdlsq_cdf_clip`). The calibrated inits are per
    tensor, broadcast to every row with ``per_row``.
    """
    qp = 2 ** (bits - 1) - 1
    x = v.detach().float()
    if method == "mean":
        return (2 * _mean(x.abs(), _reduce_dims(x, per_row)) / math.sqrt(qp)).clamp(min=1e-8)
    if per_row:
        s = lsq_init(v, bits, method, False, percentile)
        return s.expand(v.shape[0], *([1] * (v.dim() - 1))).clone()
    if method == "percentile":
        flat = x.flatten()
        if flat.numel() > 2_000_000:  # quantile() has an input-size limit; a strided sample is enough
            flat = flat[:: flat.numel() // 2_000_000 + 1]
        q = torch.quantile(flat, torch.tensor([1 - percentile / 100, percentile / 100], dtype=flat.dtype))
        return (q.abs().max() / qp).clamp(min=1e-8)
    if method == "kl":
        return (kl_calibrated_clip(v, bits) / qp).clamp(min=1e-8)
    if method == "kl_cdf":
        return (kdlsq_cdf_clip(v, bits) / qp).clamp(min=1e-8)
    raise ConfigError(f"unknown LSQ init {method!r}; allowed: mean, percentile, kl, kl_cdf")
