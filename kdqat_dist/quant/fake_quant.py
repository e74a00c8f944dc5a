"""Fake-quant modules: quantizers with an on/off switch, and Linear/Embedding that use them.

``QuantLinear`` and ``QuantEmbedding`` are built *from* an existing module and reuse its Parameter
objects, so optimizer state, ZeRO partitioning and tied weights keep working.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from kdqat_dist.config import ActQuantConfig, WeightQuantConfig
from kdqat_dist.quant import quantizers as Q


class WeightFakeQuant(nn.Module):
    """Quantizes a weight tensor by ``cfg.method``; LSQ owns a learned ``step`` parameter."""

    def __init__(self, cfg: WeightQuantConfig, weight: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.per_row = cfg.granularity == "row"
        if cfg.method == "lsq":
            rows = weight.shape[0] if self.per_row and weight is not None else 1
            shape = (rows, 1) if self.per_row else ()
            self.step = nn.Parameter(torch.ones(shape))
            if weight is not None and weight.numel() > 0:  # ZeRO-3 partitions are empty: init later
                self.init_step(weight)

    @torch.no_grad()
    def init_step(self, weight: torch.Tensor) -> None:
        """Initialise the LSQ step from the whole weight (call on gathered weights under ZeRO-3)."""
        s = Q.lsq_init(weight, self.cfg.bits, self.cfg.init, self.per_row, self.cfg.percentile)
        self.step.copy_(s.reshape(self.step.shape).to(self.step.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        c = self.cfg
        if c.method == "twn":
            return Q.twn_ternary(w, self.per_row, c.clip)
        if c.method == "sym":
            return Q.symmetric_quant(w, c.bits, self.per_row, c.clip)
        if c.method == "mean_clip":
            return Q.mean_clip_quant(w, c.bits, self.per_row, c.clip)
        return Q.lsq_quant(w, self.step.to(w.dtype), c.bits, c.narrow_range, straight_through=c.straight_through)

    def extra_repr(self) -> str:
        return f"{self.cfg.method}, bits={self.cfg.bits}, {self.cfg.granularity}, enabled={self.enabled}"


class _LastSymQuant:
    """The latest dynamic (``sym``) activation quantization: input, settings and output.

    BERT's query, key and value projections read the same tensor, and dynamic max-abs quantization is
    a pure function of it, so the second and third quantizers hand back the first one's output instead
    of recomputing it (a third of the activation fake-quant work of an attention block). Weak
    references, plus the tensors' version counters, make a hit mean: the very same, unmodified input
    and output objects, quantized with equal settings, in the same grad mode. The gradient is the same
    as with three copies: the three consumers' gradients add up before the (linear) straight-through
    mask.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.out: weakref.ref | None = None
        self.out_version = -1

    def get(self, x: torch.Tensor, settings: tuple) -> torch.Tensor | None:
        if self.key is None or self.out is None:
            return None
        ref, version, old_settings, grad = self.key
        out = self.out()
        if (out is None or ref() is not x or version != x._version or old_settings != settings
                or grad != torch.is_grad_enabled() or out._version != self.out_version):
            return None
        return out

    def put(self, x: torch.Tensor, settings: tuple, out: torch.Tensor) -> None:
        self.key = (weakref.ref(x), x._version, settings, torch.is_grad_enabled())
        self.out, self.out_version = weakref.ref(out), out._version


_LAST_SYM = _LastSymQuant()


class ActFakeQuant(nn.Module):
    """Quantizes activations: dynamic max-abs (``sym``) or LSQ with a step initialised on first use."""

    def __init__(self, cfg: ActQuantConfig):
        super().__init__()
        self.cfg = cfg
        self.enabled = cfg.enabled
        # Clip-rate statistics for diagnostics: counted only while `track_stats` is set.
        self.track_stats = False
        self.register_buffer("clipped", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64), persistent=False)
        if cfg.method == "lsq":
            self.step = nn.Parameter(torch.ones(()))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_step(self, x: torch.Tensor) -> None:
        """Calibrate the LSQ step on a batch of activations (KDLSQ-BERT's act_init on one batch)."""
        s = Q.lsq_init(x, self.cfg.bits, self.cfg.init, False, self.cfg.percentile)
        self.step.copy_(s.reshape(()).to(self.step.dtype))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        c = self.cfg
        if self.track_stats:
            with torch.no_grad():
                limit = c.clip if c.method == "sym" else float(self.step) * (2 ** (c.bits - 1) - 1)
                if limit is not None:
                    self.clipped += (x.abs() > limit).sum().double()
                self.seen += x.numel()
        if c.method == "sym":
            settings = (c.bits, c.clip)
            out = None if self.track_stats else _LAST_SYM.get(x, settings)
            if out is None:
                out = Q.symmetric_quant(x, c.bits, False, c.clip)
                _LAST_SYM.put(x, settings, out)
            return out
        if not bool(self.initialized):
            self.init_step(x)
        # N for the gradient scale is the number of features per example (Esser et al.).
        n = max(x[0].numel(), 1) if x.dim() > 1 else x.numel()
        g = 1.0 / (n * (2 ** (c.bits - 1) - 1)) ** 0.5
        return Q.lsq_quant(x, self.step.to(x.dtype), c.bits, narrow_range=True, grad_scale=g)

    def extra_repr(self) -> str:
        return f"{self.cfg.method}, bits={self.cfg.bits}, clip={self.cfg.clip}, enabled={self.enabled}"


class QuantLinear(nn.Linear):
    """nn.Linear whose weight and input pass through fake quantizers (either may be None)."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, wq: WeightFakeQuant | None, aq: ActFakeQuant | None) -> QuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight  # the same Parameter object: no copy
        new.bias = lin.bias
        new.weight_quant = wq
        new.act_quant = aq
        return new

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantEmbedding(nn.Embedding):
    """nn.Embedding whose table passes through a weight fake quantizer (row-wise ternary by default)."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, wq: WeightFakeQuant) -> QuantEmbedding:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(new, attr, getattr(emb, attr))
        new.weight = emb.weight
        new.weight_quant = wq
        return new

    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding.__new__(nn.Embedding)
        nn.Module.__init__(emb)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(emb, attr, getattr(self, attr))
        emb.weight = self.weight
        return emb

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight

    def _row_local(self) -> bool:
        """Row-wise statistics depend on one row only, so quantizing just the looked-up rows is exact."""
        wq = self.weight_quant
        return (wq is not None and wq.enabled and wq.per_row and wq.cfg.method != "lsq"
                and self.max_norm is None and self.weight.numel() > 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._row_local():
            # Quantize the unique rows of this batch instead of the whole table (30k rows for BERT):
            # identical values and gradients, a fraction of the work.
            uniq, inverse = torch.unique(ids, return_inverse=True)
            rows = self.weight_quant(self.weight[uniq])
            pad = None
            if self.padding_idx is not None:  # keep nn.Embedding's "no gradient for the padding row"
                hit = (uniq == self.padding_idx).nonzero()
                pad = int(hit[0]) if len(hit) else None
            return F.embedding(inverse, rows, pad)
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class AttentionQuant(nn.Module):
    """The 8-bit quantizers of the attention matmuls: Q and K before QKᵀ, V and the probs before P·V."""

    def __init__(self, cfg: ActQuantConfig):
        super().__init__()
        self.query = ActFakeQuant(cfg)
        self.key = ActFakeQuant(cfg)
        self.value = ActFakeQuant(cfg)
        # Probabilities lie in [0, 1]: the reference still uses the symmetric quantizer (128 codes used)
        # and its 2.5 clamp is a no-op there.
        self.probs = ActFakeQuant(cfg)
