"""The integer form of a quantized student: the modules :func:`kdqat_dist.quant.api.convert` swaps in.

One convention for every quantizer (:mod:`kdqat_dist.quant.quantizers`): integer codes ``q`` and a scale,
``x̂ = (q − zero_point) · scale``; every method here is symmetric, so the zero point is 0.

- :class:`QuantizedLinear`: the weight as integer codes (int8; int16 for 8-bit mean-clip's 257 levels) and
  its scale (one per tensor, or one per output row), the bias, and the input's activation quantizer;
- :class:`QuantizedEmbedding`: the table as codes and scales (one per row or one per tensor);
- :class:`QuantizedAct`: an activation quantizer at inference: dynamic max-abs per tensor (``sym``) or per
  token (``absmax_token``), or a learned static step (``lsq``); no autograd, and no Python branch on tensor
  data, so ``torch.export`` traces it;
- :class:`QuantizedAttention`: the Q, K, V and probability quantizers of one attention module.

The torch forward computes the fake-quant student's numbers (bit for bit where training multiplies codes by
the scale; within float rounding for max-abs weights, whose training divides). While ``torch.onnx.export``
traces them, the same modules write their ONNX form (:mod:`kdqat_dist.quant.onnx_form`). ``to_linear()`` /
``to_embedding()`` give plain float modules holding the dequantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdqat_dist.config import ActQuantConfig, WeightQuantConfig
from kdqat_dist.quant import onnx_form
from kdqat_dist.quant.fake_quant import ActFakeQuant, AttentionQuant, QuantEmbedding, QuantLinear
from kdqat_dist.quant.quantizers import AbsMaxToken, Quantizer, make_quantizer


def code_dtype(q: Quantizer) -> torch.dtype:
    """The narrowest signed integer dtype holding ``q``'s codes."""
    lo, hi = q.code_range()
    return torch.int8 if -128 <= lo and hi <= 127 else torch.int16


def _in_onnx_export() -> bool:
    return torch.onnx.is_in_onnx_export()


class QuantizedAct(nn.Module):
    """An activation quantizer at inference: x ↦ x̂ (the same values as training's forward).

    Holds the quantizer (method, bits, clip) and, for LSQ, its learned step as the buffer ``step`` (1,).
    """

    def __init__(
        self,
        cfg: ActQuantConfig,
        quantizer: Quantizer | None = None,
        step: Tensor | None = None,
        nonnegative: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.nonnegative = nonnegative  # inputs known to be >= 0 (attention probabilities): a cheaper ONNX form
        self.quantizer = quantizer if quantizer is not None else make_quantizer(cfg, activation=True)
        self.method = onnx_form.act_method(self.quantizer)
        if self.quantizer.learned:
            self.register_buffer("step", torch.ones(1) if step is None else step.detach().clone().reshape(1))

    @classmethod
    def from_fake_quant(cls, aq: ActFakeQuant | None, nonnegative: bool = False) -> QuantizedAct | None:
        """The inference form of ``aq``; None when ``aq`` is absent or switched off (the identity)."""
        if aq is None or not aq.enabled:
            return None
        return cls(aq.cfg, aq.quantizer, getattr(aq, "step", None), nonnegative)

    @property
    def per_token(self) -> bool:
        return isinstance(self.quantizer, AbsMaxToken)

    def forward(self, x: Tensor) -> Tensor:
        step = getattr(self, "step", None)
        if _in_onnx_export():
            q = self.quantizer
            return onnx_form.ActQDQ.apply(x, step, self.method, q.bits, q.clip, self.nonnegative)
        return self.quantizer.dequantized(x, step)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The quantized form (q, scale) of ``x``: x̂ = q · scale."""
        return self.quantizer.codes(x, getattr(self, "step", None))

    def extra_repr(self) -> str:
        return f"{self.cfg.method}, bits={self.cfg.bits}, clip={self.cfg.clip}"


class _QuantizedWeight(nn.Module):
    """Integer codes + scale of one weight, and how they were made (method, bits, granularity)."""

    weight_codes: Tensor
    weight_scale: Tensor

    def _set_weight(self, cfg: WeightQuantConfig, codes: Tensor, scale: Tensor) -> None:
        self.weight_cfg = cfg
        self.quantizer = make_quantizer(cfg)
        self.register_buffer("weight_codes", codes.to(code_dtype(self.quantizer)))
        self.register_buffer("weight_scale", scale.detach().to(torch.float32).clone())

    def dequantized_weight(self) -> Tensor:
        """ŵ = codes · scale, float32, the weight's shape."""
        return self.weight_codes.to(self.weight_scale.dtype) * self.weight_scale


def _weight_form(weight: Tensor, wq) -> tuple[WeightQuantConfig, Tensor, Tensor]:
    """(config, codes, scale) of a fake-quantized weight, the public form of its quantizer."""
    codes, scale = wq.quantizer.codes(weight, getattr(wq, "step", None))
    rows = scale.numel() > 1 or wq.quantizer.per_row
    scale = scale.reshape(weight.shape[0], 1) if rows else scale.reshape(())
    return wq.cfg, codes, scale


class QuantizedLinear(_QuantizedWeight):
    """``y = Linear(act_quant(x))`` with the weight as integer codes and scale (see the module docstring).

    Buffers: ``weight_codes`` [out, in] (int8/int16), ``weight_scale`` [] or [out, 1] (float32);
    ``bias`` [out] or None; ``act_quant`` a :class:`QuantizedAct` or None (full-precision input).
    """

    def __init__(
        self,
        cfg: WeightQuantConfig,
        codes: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        act_quant: QuantizedAct | None,
    ):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self._set_weight(cfg, codes, scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act_quant = act_quant

    @classmethod
    @torch.no_grad()
    def from_fake_quant(cls, m: QuantLinear) -> QuantizedLinear:
        """The integer form of ``m`` (its weight quantizer must be on)."""
        cfg, codes, scale = _weight_form(m.weight, m.weight_quant)
        return cls(cfg, codes, scale, m.bias, QuantizedAct.from_fake_quant(m.act_quant))

    def forward(self, x: Tensor) -> Tensor:
        aq = self.act_quant
        if _in_onnx_export():
            storage = onnx_form.weight_storage(self.weight_codes)
            if aq is not None and aq.per_token and storage == "int8":
                q = aq.quantizer
                return onnx_form.TokenLinear.apply(x, self.weight_codes, self.weight_scale, self.bias, q.bits, q.clip)
            if aq is not None:
                x = aq(x)
            return onnx_form.LinearDQ.apply(x, self.weight_codes, self.weight_scale, self.bias, storage)
        if aq is not None:
            x = aq(x)
        return F.linear(x, self.dequantized_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight and the bias (no activation quantization)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        c = self.weight_cfg
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {c.method}{c.bits}/{c.granularity}, "
            f"codes={str(self.weight_codes.dtype).replace('torch.', '')}"
        )


class QuantizedInputLinear(nn.Linear):
    """An ``nn.Linear`` whose weight stays in full precision (a rule switched its quantizer off) but whose
    input is quantized: the Parameters of the fake-quant module, the activation quantizer as ``act_quant``."""

    act_quant: QuantizedAct

    @classmethod
    def from_fake_quant(cls, m: QuantLinear, act_quant: QuantizedAct) -> QuantizedInputLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = m.in_features, m.out_features
        new.weight, new.bias = m.weight, m.bias
        new.act_quant = act_quant
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act_quant(x), self.weight, self.bias)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight, lin.bias = self.weight, self.bias
        return lin


class QuantizedEmbedding(_QuantizedWeight):
    """An embedding table as integer codes [V, D] and scales ([] or [V, 1]): rows gathered, then scaled."""

    def __init__(self, cfg: WeightQuantConfig, codes: Tensor, scale: Tensor, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self._set_weight(cfg, codes, scale)

    @classmethod
    @torch.no_grad()
    def from_fake_quant(cls, m: QuantEmbedding) -> QuantizedEmbedding:
        cfg, codes, scale = _weight_form(m.weight, m.weight_quant)
        return cls(cfg, codes, scale, m.padding_idx)

    def forward(self, ids: Tensor) -> Tensor:
        codes = F.embedding(ids, self.weight_codes).to(self.weight_scale.dtype)
        scale = F.embedding(ids, self.weight_scale) if self.weight_scale.dim() == 2 else self.weight_scale
        return codes * scale  # training: the looked-up rows' codes · their scales, the same products

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the dequantized table."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            emb.weight.copy_(self.dequantized_weight())
        return emb

    def extra_repr(self) -> str:
        c = self.weight_cfg
        return f"{self.num_embeddings}, {self.embedding_dim}, {c.method}{c.bits}/{c.granularity}"


class QuantizedAttention(nn.Module):
    """The attention matmuls' quantizers at inference (an absent one is the identity)."""

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module, probs: nn.Module):
        super().__init__()
        self.query, self.key, self.value, self.probs = query, key, value, probs

    @classmethod
    def from_fake_quant(cls, aq: AttentionQuant) -> QuantizedAttention:
        parts = [QuantizedAct.from_fake_quant(q) or nn.Identity() for q in (aq.query, aq.key, aq.value)]
        return cls(*parts, QuantizedAct.from_fake_quant(aq.probs, nonnegative=True) or nn.Identity())
