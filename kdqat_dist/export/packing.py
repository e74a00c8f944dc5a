"""Bit packing of integer weight codes, and the exact code/scale form of every weight quantizer.

Two layers, both pure functions on tensors:

- **packing**: unsigned codes ``u`` in ``[0, 2^bits)`` -> a flat ``uint8`` tensor, ``bits`` per value,
  little-endian (value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, bit 0 = the least
  significant bit of byte 0); the last byte is zero-padded. Base-3 packing stores trits ``{0, 1, 2}``
  five per byte (``t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4``, at most 242), 1.6 bits per ternary value.
- **codes**: a quantized weight ``ŵ`` (what :class:`~kdqat_dist.quant.fake_quant.WeightFakeQuant`
  returns) in the quantized form of :mod:`kdqat_dist.quant.quantizers`: signed integer codes ``q`` and FP32
  scales with ``ŵ = q · scale`` (zero point 0: every method is symmetric). The codes and scales are the
  quantizer classes' own (TWN b and α, sym round(v·s) and 1/s, mean-clip codes and step, LSQ codes and step,
  absmean codes and γ, SEQ codes and α/n, 2-bit SEQ's odd codes 2k + 1 and α/4). Bit for bit where
  training multiplies; within float rounding for sym, whose training divides by s. ``mean_clip`` can
  produce 2^b + 1 levels (round-half-even takes the clamped ``±c`` to ``±2^(b-1)``); when a tensor uses them
  its codes are stored with one extra bit instead of being altered. Codes ``stride`` apart (2-bit SEQ's odd
  codes) are stored as ``(q − lo) / stride``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdqat_dist.config import ALLOWED_BITS, ConfigError, WeightQuantConfig
from kdqat_dist.quant.quantizers import Quantizer, make_quantizer

MAX_STORAGE_BITS = 9  # 8-bit mean_clip with its 257th level
TERNARY_ONLY = ("twn", "absmean", "seq")  # methods defined at bits=2 only (SEQ: 1.58 or 2 bits)
_TRIT_POWERS = (1, 3, 9, 27, 81)


# --------------------------------------------------------------------------- sizes


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` values take at ``bits`` bits each (the last byte padded)."""
    return (n * bits + 7) // 8


def base3_nbytes(n: int) -> int:
    """Bytes that ``n`` trits take at five per byte."""
    return (n + 4) // 5


# --------------------------------------------------------------------------- dense n-bit packing


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_STORAGE_BITS:
        raise ConfigError(f"packing: unsupported storage width {bits!r} bits; allowed: 1..{MAX_STORAGE_BITS}")


def _check_packed(packed: torch.Tensor, expected: int, what: str) -> torch.Tensor:
    """``packed`` as int64 once it is the flat uint8 tensor of ``expected`` bytes that ``what`` take."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ConfigError(
            f"packing: expected {expected} uint8 bytes for {what}, got "
            f"{packed.numel()} {str(packed.dtype).replace('torch.', '')}"
        )
    return packed.to(torch.int64)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers (any shape, each in ``[0, 2^bits)``) into a flat uint8 tensor.

    Raises:
        ConfigError: ``bits`` outside 1..9. ValueError: a value that does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    u = values.reshape(-1).to(torch.int64)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ValueError(f"packing: values in [{int(u.min())}, {int(u.max())}] do not fit in {bits} bits")
    n = u.numel()
    nbytes = packed_nbytes(n, bits)
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: whole values per byte, no value straddles two bytes
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        return (F.pad(u, (0, nbytes * per - n)).view(nbytes, per) << shifts).sum(dim=1).to(torch.uint8)
    # 3, 5, 6, 7, 9 bits: expand to a bit stream, regroup by 8.
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = F.pad(((u.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1), (0, nbytes * 8 - n * bits))
    weights = (1 << torch.arange(8, dtype=torch.int64)).to(torch.uint8)
    return (stream.view(nbytes, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values, as a flat int64 tensor.

    Raises:
        ConfigError: ``packed`` is not the uint8 length that ``n`` values at ``bits`` bits need.
    """
    _check_bits(bits)
    b = _check_packed(packed, packed_nbytes(n, bits), f"{n} values at {bits} bits")
    if 8 % bits == 0:
        shifts = torch.arange(8 // bits, dtype=torch.int64) * bits
        return ((b.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    stream = ((b.unsqueeze(1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: n * bits]
    return (stream.view(n, bits) << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


# --------------------------------------------------------------------------- base-3 packing


def pack_base3(trits: torch.Tensor) -> torch.Tensor:
    """Pack values in {0, 1, 2} five per byte (1.6 bits each) into a flat uint8 tensor (ValueError: others)."""
    t = trits.reshape(-1).to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > 2):
        raise ValueError(f"packing: base-3 needs values in {{0, 1, 2}}, got [{int(t.min())}, {int(t.max())}]")
    n = t.numel()
    nbytes = base3_nbytes(n)
    return (F.pad(t, (0, nbytes * 5 - n)).view(nbytes, 5) * torch.tensor(_TRIT_POWERS)).sum(dim=1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_base3`: the first ``n`` trits as a flat int64 tensor.

    Raises:
        ConfigError: wrong length or dtype, or a byte above 242 (not five trits: a corrupt file).
    """
    b = _check_packed(packed, base3_nbytes(n), f"{n} base-3 values")
    if b.numel() and int(b.max()) > 242:
        raise ConfigError("packing: a base-3 byte is above 242 (3^5 - 1); the packed data is corrupt")
    return ((b.unsqueeze(1) // torch.tensor(_TRIT_POWERS)) % 3).reshape(-1)[:n]


# --------------------------------------------------------------------------- signed codes <-> bytes


@dataclass(frozen=True)
class Encoding:
    """How one tensor's signed codes are stored: ``u = (code + zero) / stride``, packed by ``packing``."""

    packing: str  # "bits" | "base3"
    storage_bits: int  # bits per value for "bits"; 0 for base3 (1.6 bits)
    zero: int
    stride: int = 1  # distance between consecutive codes (2 for 2-bit SEQ's odd codes)

    def nbytes(self, n: int) -> int:
        return base3_nbytes(n) if self.packing == "base3" else packed_nbytes(n, self.storage_bits)


def choose_encoding(codes: torch.Tensor, bits: int, base3: bool = False, stride: int = 1) -> Encoding:
    """The encoding of signed ``codes`` at nominal width ``bits``; consecutive codes lie ``stride`` apart.

    Codes spanning at most three values are base-3 packed when ``base3`` is set. Otherwise the width is
    ``bits``, or the smallest width that holds the codes' range when it does not fit (mean_clip's extra
    level). ``zero`` is minus the smallest code present, so every stored value is non-negative.
    """
    if bits not in ALLOWED_BITS:
        raise ValueError(f"export: unsupported weight bits {bits}; allowed: 2, 3, 4, 8")
    if stride < 1:
        raise ValueError(f"packing: code stride {stride} must be >= 1")
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    span = (hi - lo) // stride
    if base3 and span <= 2:
        return Encoding("base3", 0, -lo, stride)
    width = max(bits, math.ceil(math.log2(span + 1)) if span else 1)
    _check_bits(width)
    return Encoding("bits", width, -lo, stride)


def encode(codes: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """Signed codes -> packed uint8 bytes.

    Raises:
        ValueError: a code that is not ``stride`` apart from the smallest one.
    """
    u = codes.reshape(-1).to(torch.int64) + enc.zero
    if enc.stride != 1:
        if u.numel() and bool((u % enc.stride).any()):
            raise ValueError(f"packing: codes are not {enc.stride} apart")
        u = u // enc.stride
    return pack_base3(u) if enc.packing == "base3" else pack_bits(u, enc.storage_bits)


def decode(packed: torch.Tensor, enc: Encoding, n: int) -> torch.Tensor:
    """Packed uint8 bytes -> ``n`` signed int64 codes."""
    if enc.packing == "base3":
        u = unpack_base3(packed, n)
    elif enc.packing == "bits":
        u = unpack_bits(packed, enc.storage_bits, n)
    else:
        raise ConfigError(f"packing: unknown packing {enc.packing!r}; allowed: bits, base3")
    return u * enc.stride - enc.zero


# --------------------------------------------------------------------------- quantizer -> codes


def _quantizer(method: str, bits: int = 8, narrow_range: bool = True) -> Quantizer:
    return make_quantizer(WeightQuantConfig(bits=bits, method=method, narrow_range=narrow_range))


def legacy_dequant_op(method: str, narrow_range: bool = True) -> str:
    """How format-1 exports stored a method's codes: ``"div"`` (sym: codes / s), ``"mul_half"`` (2-bit SEQ:
    (k + ½)·s) or ``"mul"`` (codes · scale, the quantized form of format 2)."""
    if method not in TERNARY_ONLY + ("sym", "mean_clip", "lsq"):
        raise ConfigError(f"export: unknown weight method {method!r}")
    if method == "sym":
        return "div"
    return "mul_half" if method == "seq" and not narrow_range else "mul"


def legacy_to_public(codes: torch.Tensor, scale: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Format-1 (codes, scale) stored for ``op`` -> the quantized form (q, scale) with ŵ = q · scale."""
    if op == "div":
        return codes, scale.reciprocal()
    if op == "mul_half":
        return codes * 2 + 1, scale / 2
    if op == "mul":
        return codes, scale
    raise ConfigError(f"export: unknown dequantization {op!r}; allowed: mul, div, mul_half")


def code_range(method: str, bits: int, narrow_range: bool = True) -> tuple[int, int]:
    """The codes a quantizer can produce (inclusive). Raises ConfigError for an unknown method."""
    return _quantizer(method, bits, narrow_range).code_range()


def code_stride(method: str, bits: int, narrow_range: bool = True) -> int:
    """The distance between a quantizer's consecutive codes (2 for 2-bit SEQ, else 1)."""
    return _quantizer(method, bits, narrow_range).code_stride


def weight_codes(
    latent: torch.Tensor, cfg: WeightQuantConfig, step: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int64, the weight's shape) and scales of ``cfg``'s quantizer on the ``latent`` weight:
    the quantizer's own :meth:`~kdqat_dist.quant.quantizers.Quantizer.codes`, so that :func:`dequantize`
    gives the fake-quant weight (see the module docstring). The scale has shape [rows, 1] (row
    granularity) or [] / [1] (tensor). A learned quantizer (``lsq``, ``seq``) needs its ``step``
    (``WeightFakeQuant.step``).
    """
    if cfg.bits not in ALLOWED_BITS:
        raise ValueError(f"export: unsupported weight bits {cfg.bits}; allowed: 2, 3, 4, 8")
    if cfg.method in TERNARY_ONLY and cfg.bits != 2:
        raise ValueError(f"export: {cfg.method} needs bits=2, got {cfg.bits}")
    q = make_quantizer(cfg)
    if q.learned and step is None:
        raise ValueError(f"export: an {cfg.method} weight quantizer needs its learned step")
    codes, scale = q.codes(latent, step)
    return codes.to(torch.int64), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = codes · scale (``scale`` broadcasts: [] or [rows, 1])."""
    return codes.to(dtype) * scale.to(dtype)
