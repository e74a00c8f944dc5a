"""Fake-quant modules: quantizers with an on/off switch, and Linear/Embedding that use them.

``QuantLinear`` and ``QuantEmbedding`` are built *from* an existing module and reuse its Parameter
objects, so optimizer state, ZeRO partitioning and tied weights keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdqat_dist.config import ActQuantConfig, WeightQuantConfig
from kdqat_dist.quant.quantizers import Quantizer, make_quantizer


def _load_0d_step(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Students and checkpoints saved before per-tensor steps had shape (1,) hold 0-d steps: load them."""
    step = state_dict.get(prefix + "step")
    if step is not None and step.dim() == 0:
        state_dict[prefix + "step"] = step.reshape(1)


class _FakeQuant(nn.Module):
    """A quantizer, chosen once from ``cfg`` (:func:`make_quantizer`), with an on/off switch and, for LSQ,
    its learned ``step`` parameter."""

    def __init__(
        self, cfg: WeightQuantConfig | ActQuantConfig, quantizer: Quantizer, step_shape: tuple[int, ...] = (1,)
    ):
        super().__init__()
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.quantizer = quantizer
        if quantizer.learned:
            # (1,), not 0-d: DeepSpeed moves parameters through byte views, which a 0-d tensor cannot give
            self.step = nn.Parameter(torch.ones(step_shape))
            self.register_load_state_dict_pre_hook(_load_0d_step)

    @torch.no_grad()
    def init_step(self, x: torch.Tensor) -> None:
        """Initialise the LSQ step from ``x``: the whole weight (gathered under ZeRO-3), or a calibration
        batch of activations (KDLSQ-BERT's act_init on one batch)."""
        self.step.copy_(self.quantizer.init_step(x).reshape(self.step.shape).to(self.step.dtype))


class WeightFakeQuant(_FakeQuant):
    """Fake-quantizes a weight: [out, in] (Linear) or [V, D] (embedding table), same shape out."""

    def __init__(self, cfg: WeightQuantConfig, weight: torch.Tensor | None = None):
        q = make_quantizer(cfg)
        rows = weight.shape[0] if q.per_row and weight is not None else 1
        super().__init__(cfg, q, (rows, 1) if q.per_row else (1,))
        if q.learned and weight is not None and weight.numel() > 0:  # ZeRO-3 partitions are empty: init later
            self.init_step(weight)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.quantizer.fake_quant(w, getattr(self, "step", None)) if self.enabled else w

    def extra_repr(self) -> str:
        return f"{self.cfg.method}, bits={self.cfg.bits}, {self.cfg.granularity}, enabled={self.enabled}"


class ActFakeQuant(_FakeQuant):
    """Fake-quantizes activations (any shape): dynamic max-abs (``sym``) or LSQ with a step initialised
    on first use."""

    def __init__(self, cfg: ActQuantConfig):
        super().__init__(cfg, make_quantizer(cfg, activation=True))
        # Clip-rate statistics for diagnostics: counted only while `track_stats` is set.
        self.track_stats = False
        self.register_buffer("clipped", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64), persistent=False)
        if self.quantizer.learned:
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init_step(self, x: torch.Tensor) -> None:
        super().init_step(x)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        step = getattr(self, "step", None)
        if self.track_stats:
            with torch.no_grad():
                limit = self.quantizer.clip_limit(step)
                if limit is not None:
                    self.clipped += (x.abs() > limit).sum().double()
                self.seen += x.numel()
        if step is not None and not bool(self.initialized):
            self.init_step(x)
        return self.quantizer.fake_quant(x, step)

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

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)


# what an nn.Embedding holds besides its weight (copied by QuantEmbedding)
_EMBEDDING_ATTRS = (
    "num_embeddings",
    "embedding_dim",
    "padding_idx",
    "max_norm",
    "norm_type",
    "scale_grad_by_freq",
    "sparse",
)


class QuantEmbedding(nn.Embedding):
    """nn.Embedding whose table passes through a weight fake quantizer (row-wise ternary by default)."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, wq: WeightFakeQuant) -> QuantEmbedding:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in _EMBEDDING_ATTRS:
            setattr(new, attr, getattr(emb, attr))
        new.weight = emb.weight
        new.weight_quant = wq
        return new

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight

    def _row_local(self) -> bool:
        """Row-wise statistics depend on one row only, so quantizing just the looked-up rows is exact."""
        wq = self.weight_quant
        return (
            wq is not None
            and wq.enabled
            and wq.quantizer.per_row
            and not wq.quantizer.learned
            and self.max_norm is None
            and self.weight.numel() > 0
        )

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
        return F.embedding(
            ids,
            self.quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


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
