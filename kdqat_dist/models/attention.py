"""Our attention function, registered with transformers' attention-function registry as ``"kdqat"``.

Instead of a copied modeling file, every BERT-style self-attention module calls this function (the model's
``config._attn_implementation`` is set to ``"kdqat"``). It

- fake-quantizes Q, K, V and the attention probabilities when the module carries an ``attn_quant``
  (:class:`~kdqat_dist.quant.fake_quant.AttentionQuant`), as TernaryBERT's modeling file does;
- emits the taps the KD losses need (``qkv``, ``scores``, ``probs``, ``map_inputs``, ``context``) to the module's tap
  sink, if one is attached by :mod:`kdqat_dist.models.taps`. Nothing is emitted, and nothing retained,
  otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

ATTN_IMPL = "kdqat"


def _wants(module: torch.nn.Module, name: str) -> bool:
    tap = getattr(module, "_kdqat_tap", None)
    return tap is not None and name in tap.names


def _emit(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    if _wants(module, name):
        module._kdqat_tap.sink(module._kdqat_tap.layer, name, tensor)


def attention_scores(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """``Q Kᵀ · scaling`` plus the additive mask (or a boolean keep-mask applied as finfo.min): [B, H, S, S].

    Scaled and masked in place: the product's backward needs Q and K, not the product, so one [B, H, S, S]
    tensor is made instead of three (the same values as out of place).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)
    if attention_mask is None:
        return scores
    wider = torch.broadcast_shapes(attention_mask.shape, scores.shape) != scores.shape
    if attention_mask.dtype == torch.bool:
        fill = torch.finfo(scores.dtype).min
        return scores.masked_fill(~attention_mask, fill) if wider else scores.masked_fill_(~attention_mask, fill)
    if attention_mask.dtype != scores.dtype or wider:
        return scores + attention_mask  # type promotion or a mask wider than the scores: out of place
    return scores.add_(attention_mask)


@dataclass(frozen=True)
class MapInputs:
    """What one layer's attention probabilities are computed from (the ``map_inputs`` tap).

    ``probs()`` gives the same values as the ``probs`` tap (same operations on the same tensors, float32), so a
    KD loss can keep Q and K (2·B·S·D numbers) for its backward instead of the map (B·H·S·S).
    """

    query: torch.Tensor
    key: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float

    def probs(self) -> torch.Tensor:
        return attention_probs(
            attention_scores(self.query, self.key, self.attention_mask, self.scaling), overwrite=True
        )


def attention_probs(scores: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Softmax over keys in float32 whatever the model's dtype, as transformers' eager attention does: in
    bf16 the rows would sum to 1 only to ~1e-3, enough to make the KL of two nearly equal maps negative.

    With ``overwrite`` (the caller no longer needs ``scores``) a float32 CPU map that autograd does not
    track is written over the scores, so a teacher's forward makes one [B, H, S, S] tensor where it made
    two. Only there: the CPU kernel is tested to give the same bits in place; other kernels are not.
    """
    # contiguous only: the kernel reads and writes each row in place, which a strided alias would break
    if (
        overwrite
        and scores.dtype == torch.float32
        and scores.device.type == "cpu"
        and scores.is_contiguous()
        and not (torch.is_grad_enabled() and scores.requires_grad)
    ):
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return F.softmax(scores, dim=-1, dtype=torch.float32)


def kdqat_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager scaled-dot-product attention with fake quantization and KD taps.

    Args:
        module: the self-attention module (holds ``attn_quant`` and ``_kdqat_tap`` when prepared/tapped).
        query, key, value: [B, H, S, d_h].
        attention_mask: additive float mask [B, 1, S, S] (0 / very negative) or a boolean keep-mask.
        scaling: 1/sqrt(d_h) by default.
        dropout: attention-probability dropout (already 0 in eval mode).

    Returns:
        (context [B, S, H, d_h], probs [B, H, S, S]) as transformers expects.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    q = getattr(module, "attn_quant", None)
    if q is not None:
        query, key, value = q.query(query), q.key(key), q.value(value)
    if _wants(module, "qkv"):
        _emit(module, "qkv", (query, key, value))  # as the matmuls see them (after fake quantization)
    scores = attention_scores(query, key, attention_mask, scaling)
    _emit(module, "scores", scores)
    # the KD tap is this float32 map (in float32 models: no casts); written over the scores unless they
    # were tapped, as nothing keeps them for the backward
    probs32 = attention_probs(scores, overwrite=not _wants(module, "scores"))
    del scores  # free it before the taps' losses allocate theirs
    if _wants(module, "map_inputs"):
        _emit(module, "map_inputs", MapInputs(query, key, attention_mask, scaling))
    _emit(module, "probs", probs32)  # before dropout and quantization, as the reference's KD tap
    probs = probs32.to(value.dtype)
    p = F.dropout(probs, p=dropout, training=module.training)
    if q is not None:
        p = q.probs(p)
    context = torch.matmul(p, value)
    _emit(module, "context", context)  # per head, before the head merge and W_o
    return context.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTN_IMPL, kdqat_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def use_kdqat_attention(model: torch.nn.Module) -> None:
    """Route every self-attention call of ``model`` through :func:`kdqat_attention`."""
    model.set_attn_implementation(ATTN_IMPL)
