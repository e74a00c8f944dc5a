"""Storage size of a model: FP32 bytes vs the bytes of its low-bit form (packed weights + scales)."""

from __future__ import annotations

from torch import nn

from kdqat_dist.quant.fake_quant import QuantEmbedding, QuantLinear
from kdqat_dist.quant.quantizers import make_quantizer


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())


def _shape(p) -> tuple[int, ...]:
    # ZeRO-3 leaves a partitioned parameter an empty tensor and keeps its full shape in ds_shape
    return tuple(getattr(p, "ds_shape", p.shape))


def fp32_bytes(model: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> int:
    """4 bytes x every parameter but the learned quantizer steps and those whose id is in ``skip``."""
    steps = {id(s) for m in model.modules() if (s := getattr(m, "step", None)) is not None}
    return 4 * sum(_numel(p) for p in model.parameters() if id(p) not in steps and id(p) not in skip)


def packed_bytes(model: nn.Module) -> int:
    """Bytes with every quantized weight stored at its storage width (ternary at 2 bits) plus one FP32 scale
    per tensor or row; all other parameters (LayerNorm, biases, position embeddings, FP heads) in FP32."""
    quantized, total = _quantized_bytes(model)
    return total + fp32_bytes(model, quantized)


def _quantized_bytes(model: nn.Module) -> tuple[set[int], int]:
    quantized: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            cfg = m.weight_quant.cfg if m.weight_quant is not None else getattr(m, "frozen_weight_cfg", None)
            if cfg is None or not cfg.enabled:
                continue
            shape = _shape(m.weight)
            per_row = cfg.granularity == "row" and len(shape) > 1 and _numel(m.weight) > 0
            scales = shape[0] if per_row else 1
            # bits per stored code: ``bits``, but one more for mean-clip's 2^b + 1 levels, as export stores it
            total += (_numel(m.weight) * make_quantizer(cfg).storage_bits() + 7) // 8 + 4 * scales
            quantized.add(id(m.weight))
    return quantized, total


def quantized_packed_bytes(model: nn.Module) -> int:
    """The quantized weights' part of :func:`packed_bytes`: their packed codes and FP32 scales."""
    return _quantized_bytes(model)[1]


def size_report(model: nn.Module) -> dict[str, float]:
    fp, packed = fp32_bytes(model), packed_bytes(model)
    return {"fp32_mb": fp / 1e6, "packed_mb": packed / 1e6, "ratio": fp / max(packed, 1)}
