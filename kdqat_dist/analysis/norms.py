"""Norm-based analysis of self-attention (Kobayashi et al. 2020; Kim et al. 2022, Exp. 3).

Self-attention output of token i, before the residual and LayerNorm, decomposes over heads h and keys j:

    y_i = Σ_h Σ_j α_{h,i,j} f_h(x_j) + b_o,     f_h(x_j) = W_o[:, head h] · v_{h,j}

so besides the weight α the size of the transformed vector ‖f_h(x_j)‖ says how much token j contributes.

The value vectors are recomputed here from the tapped layer input (``hidden[l]``) with the layer's own
value projection, called as a module: for a student that is the fake-quant ``QuantLinear`` (8-bit input,
quantized weight), followed by the attention quantizer of V, exactly as in its forward. W_o is the output
projection's weight, quantized for students (``quantized_weight()``). The tap machinery itself is not
touched. For a student, Σ_h Σ_j α f + b_o reproduces its ``sa_output`` only up to the 8-bit quantization
of the attention probabilities and of the context (both nonlinear, so they cannot be split over heads).

A SubLN layer (BitNet/BitDistill: ``W_o · LN_sub(ctx) + b_o``, kdqat_dist.models.subln) is decomposed exactly
too. LN_sub is linear in ctx but for the division by σ_i, the standard deviation of query i's context (a
scalar per query): with C the centring over all H·d_h units, γ and β LN_sub's gain and bias,

    y_i = Σ_h Σ_j α_{h,i,j} g_h(x_j) / σ_i + W_o β + b_o,     g_h(x_j) = W_o (γ ⊙ C [v_{h,j} in head h's slot])

so f_{h,i}(x_j) = g_h(x_j) / σ_i depends on the query through σ_i alone; ``f_norm`` reports its mean over
the queries.

Key tokens are grouped into classes ([CLS], [SEP], punctuation, other; plus all tokens), and every
quantity is averaged per class over a dev sample (:class:`NormAccumulator`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kdqat_dist.models.subln import SubLNLinear
from kdqat_dist.models.taps import self_attention_module

__all__ = [
    "CLASS_LABELS",
    "TOKEN_CLASSES",
    "NormAccumulator",
    "norm_decomposition",
    "layer_summary",
    "output_weight",
    "token_classes",
    "transformed_vectors",
    "value_vectors",
]

TOKEN_CLASSES = ("cls", "sep", "punct", "other", "all")
CLASS_LABELS = {"cls": "[CLS]", "sep": "[SEP]", "punct": "punctuation", "other": "other tokens", "all": "all tokens"}


def _is_punctuation(token: str) -> bool:
    # WordPiece continuation (##), byte-level BPE (Ġ) and SentencePiece (▁) markers are not the token.
    t = token.removeprefix("##").lstrip("Ġ▁")
    return bool(t) and all(unicodedata.category(c).startswith("P") for c in t)


def token_classes(input_ids: Sequence[int] | torch.Tensor, tokenizer) -> torch.Tensor:
    """Class membership of each token: [S, C] float (0/1), columns in :data:`TOKEN_CLASSES` order.

    [CLS] and [SEP] are the tokenizer's ``cls_token_id`` / ``sep_token_id`` (``<s>`` / ``</s>`` for
    RoBERTa); punctuation is a token made only of Unicode punctuation; the last column is all ones.
    """
    ids = [int(i) for i in (input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    out = torch.zeros(len(ids), len(TOKEN_CLASSES))
    for j, (i, tok) in enumerate(zip(ids, tokens, strict=True)):
        if i == tokenizer.cls_token_id:
            c = 0
        elif i == tokenizer.sep_token_id:
            c = 1
        elif tok is not None and _is_punctuation(tok):
            c = 2
        else:
            c = 3
        out[j, c] = 1.0
    out[:, 4] = 1.0
    return out


@torch.no_grad()
def value_vectors(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Per-head value vectors of one sample: [H, S, d_h], as the layer's attention function sees them.

    Args:
        layer: one Transformer layer (``encoder.layer[l]``).
        hidden: [S, D] or [1, S, D], the layer's input (tap ``hidden[l]``).
    """
    attn = self_attention_module(layer)
    x = hidden.reshape(1, -1, hidden.shape[-1])
    h, dh = attn.num_attention_heads, attn.attention_head_size
    v = attn.value(x).view(1, x.shape[1], h, dh).transpose(1, 2)  # [1, H, S, d_h]
    q = getattr(attn, "attn_quant", None)
    if q is not None:
        v = q.value(v)
    return v[0]


def _output_dense(layer: nn.Module) -> tuple[nn.Module, nn.LayerNorm | None]:
    """The attention output projection (a Linear or QuantLinear) and its SubLN LayerNorm, if any."""
    dense = layer.attention.output.dense
    if isinstance(dense, SubLNLinear):
        return dense.linear, dense.LayerNorm
    return dense, None


@torch.no_grad()
def output_weight(layer: nn.Module) -> torch.Tensor:
    """W_o of the attention output projection, [D, H·d_h] (quantized for a fake-quant student)."""
    dense, _ = _output_dense(layer)
    quantized = getattr(dense, "quantized_weight", None)
    return quantized() if callable(quantized) else dense.weight


def _project(layer: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """W_o applied to each head's value vectors on their own: [H, S, d_h] -> [H, S, D]; for a SubLN layer
    W_o (γ ⊙ C e_h(v)), the query-independent part g_h (module docstring)."""
    w = output_weight(layer).to(v.dtype)  # [D, H*dh]
    h, s, dh = v.shape
    _, sub_ln = _output_dense(layer)
    if sub_ln is None:
        return torch.einsum("hsd,ohd->hso", v, w.view(w.shape[0], h, dh))
    # e_h(v): v in head h's slot of an otherwise zero [H*dh] vector; centred over all units, then the gain
    e = torch.einsum("hsd,hk->hskd", v, torch.eye(h, dtype=v.dtype, device=v.device)).reshape(h, s, h * dh)
    e = (e - e.mean(dim=-1, keepdim=True)) * sub_ln.weight.to(v.dtype)
    return e @ w.T


def _query_scale(layer: nn.Module, alpha: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """1/σ_i per query [S] for a SubLN layer (σ_i: the std of query i's context over its H·d_h units, with
    LN_sub's eps); ones for a plain layer. ``alpha`` [H, S, S], ``v`` [H, S, d_h]."""
    _, sub_ln = _output_dense(layer)
    if sub_ln is None:
        return torch.ones(alpha.shape[-1], dtype=v.dtype, device=v.device)
    ctx = torch.einsum("hij,hjd->ihd", alpha.to(v.dtype), v).reshape(alpha.shape[-1], -1)  # [S, H*dh]
    return torch.rsqrt(ctx.var(dim=-1, unbiased=False) + sub_ln.eps)


@torch.no_grad()
def transformed_vectors(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """f_h(x_j) = W_o[:, head h] · v_{h,j} for every head and token: [H, S, D] (bias excluded); for a SubLN
    layer g_h(x_j), which query i divides by σ_i (module docstring)."""
    return _project(layer, value_vectors(layer, hidden))


@torch.no_grad()
def norm_decomposition(layer: nn.Module, hidden: torch.Tensor, probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kobayashi et al.'s quantities for one layer and one sample (true length S).

    Args:
        layer: the Transformer layer.
        hidden: [S, D] or [1, S, D] layer input (tap ``hidden[l]``).
        probs: [H, S, S] or [1, H, S, S] attention probabilities α (tap ``probs[l]``; query, key).

    Returns:
        ``alpha`` [H, S, S]; ``f_norm`` ‖f_h(x_j)‖ [H, S] (for SubLN its mean over the queries);
        ``af_norm`` ‖α_{h,i,j} f_{h,i}(x_j)‖ [H, S, S]; ``sum_af_norm`` ‖Σ_h α_{h,i,j} f_{h,i}(x_j)‖ [S, S];
        ``sum_af`` Σ_j Σ_h α f [S, D] (= sa_output − b_o, and − W_o β with SubLN, for a full-precision model).
    """
    alpha = probs.reshape(probs.shape[-3:]).float()
    v = value_vectors(layer, hidden).float()  # [H, S, dh]
    f = _project(layer, v)  # [H, S, D]
    scale = _query_scale(layer, alpha, v)  # [S]: 1/σ_i with SubLN, else ones
    g_norm = f.norm(dim=-1)  # [H, S]
    af = torch.einsum("hij,hjo->ijo", alpha, f) * scale[:, None, None]  # [S, S, D]: Σ_h α f, per (query, key)
    return {
        "alpha": alpha,
        "f_norm": g_norm * scale.mean(),
        "af_norm": alpha * g_norm[:, None, :] * scale[None, :, None],  # α ≥ 0, so ‖αf‖ = α‖f‖
        "sum_af_norm": af.norm(dim=-1),
        "sum_af": af.sum(dim=1),
    }


@dataclass
class NormAccumulator:
    """Per-class means over a dev sample, for one model: sums and counts, divided at the end.

    Key-token class c of token j decides where a quantity goes. α, ‖αf‖ and ‖Σ_h αf‖ are averaged over
    every (query i, key j ∈ c) pair, ‖f‖ over the keys j ∈ c; every token of every sample weighs the same.
    """

    n_layers: int
    n_heads: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(len(TOKEN_CLASSES)))
    pairs: np.ndarray = field(default_factory=lambda: np.zeros(len(TOKEN_CLASSES)))

    def __post_init__(self) -> None:
        c = len(TOKEN_CLASSES)
        for k in ("alpha", "f_norm", "af_norm"):
            self.sums[k] = np.zeros((self.n_layers, self.n_heads, c))
        self.sums["sum_af_norm"] = np.zeros((self.n_layers, c))

    def add(self, layer: int, dec: dict[str, torch.Tensor], classes: torch.Tensor) -> None:
        """Add one layer of one sample; call once per layer, then :meth:`count` once per sample."""
        m = classes.to(dec["alpha"].device, torch.float64)  # [S, C]
        self.sums["alpha"][layer] += (dec["alpha"].double().sum(1) @ m).cpu().numpy()
        self.sums["f_norm"][layer] += (dec["f_norm"].double() @ m).cpu().numpy()
        self.sums["af_norm"][layer] += (dec["af_norm"].double().sum(1) @ m).cpu().numpy()
        self.sums["sum_af_norm"][layer] += (dec["sum_af_norm"].double().sum(0) @ m).cpu().numpy()

    def count(self, classes: torch.Tensor) -> None:
        n = classes.double().sum(0).cpu().numpy()  # tokens per class
        self.tokens += n
        self.pairs += n * classes.shape[0]  # every query row sees every key

    def result(self) -> dict[str, np.ndarray]:
        """Means: ``alpha``, ``f_norm``, ``af_norm`` [L, H, C]; ``sum_af_norm`` [L, C]; NaN for an absent
        class. Also ``tokens`` [C], the number of key tokens of each class seen."""
        pairs = np.where(self.pairs > 0, self.pairs, np.nan)  # NaN: a class never seen
        toks = np.where(self.tokens > 0, self.tokens, np.nan)
        # ‖f‖ is averaged over the keys of a class, the other quantities over (query, key) pairs
        means = {k: total / (toks if k == "f_norm" else pairs) for k, total in self.sums.items()}
        return {**means, "tokens": self.tokens.copy()}


def layer_summary(result: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-layer curves [L, C]: α and ‖f(x)‖ averaged over heads, and ‖Σ_h αf(x)‖."""
    return {
        "alpha": result["alpha"].mean(axis=1),
        "f_norm": result["f_norm"].mean(axis=1),
        "sum_af_norm": result["sum_af_norm"],
    }
