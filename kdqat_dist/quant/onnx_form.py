"""The ONNX form of the integer student: what its modules emit while ``torch.onnx.export`` traces them.

Each function here is an autograd Function whose ``forward`` computes the student's own numbers (so the traced
shapes and the eager fallback are right) and whose ``symbolic`` writes the QDQ graph ONNX Runtime runs with
its integer kernels:

- **activations, one scale per tensor** (``sym``: dynamic max-abs clamped at ``clip``; ``lsq``: the learned
  static step): ``QuantizeLinear`` to uint8 with zero point 128 (the int8 code + 128: ONNX Runtime's x86
  integer kernels take unsigned activations) and ``DequantizeLinear`` back. ``sym``'s scale is computed in
  the graph as training computes it: m = min(max(ReduceMax(x), −ReduceMin(x)), clip), scale = m/Q_P
  (Q_P = 2^(b−1) − 1; attention probabilities: ReduceMax alone); a ``Clip`` of the uint8 codes at
  128 − Q_P is training's clamp at −clip (QuantizeLinear would saturate at code −128, not −Q_P). ``lsq``:
  ``Clip(x, −Q_N·s, Q_P·s)``, then the pair with the constant step s;
- **weights**: ``DequantizeLinear`` of an int8 initializer holding the transposed codes, with one scale per
  tensor or one per output column (``axis=1``), feeding ``MatMul`` (+ ``Add`` for the bias). ONNX Runtime
  fuses "DQ(activation) -> MatMul <- DQ(weight)" into ``MatMulIntegerToFloat`` (8-bit × 8-bit -> int32,
  then one float scale), the same fusion its own dynamic quantization produces. (The export then rewrites
  a Linear fed by quantized codes as ``MatMulInteger`` + scales + bias, which ONNX Runtime fuses with the
  bias: :mod:`kdqat_dist.export.onnx_graph`.) Codes beyond ±64 (8-bit
  weights) are stored as uint8 with zero point 128 (:func:`weight_storage`): on x86 without VNNI the
  u8 × s8 kernel adds pairs of products in 16 bits, which 255·127·2 overflows; u8 × u8 has no such limit;
- **activations, one scale per token** (``absmax_token``): QDQ has no per-token form that ONNX Runtime
  fuses, so a Linear fed by one computes ``MatMulInteger`` on the uint8 codes itself, then multiplies by
  the per-token and weight scales (:func:`token_linear`); elsewhere (attention inputs) the quantization is
  written with float ops (``Round``), exact but without integer kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdqat_dist.quant.quantizers import LSQ, AbsMaxToken, Quantizer, SymMaxAbs

OPSET = 17  # QuantizeLinear/DequantizeLinear with per-axis scales (13+), LayerNormalization (17)
ACT_ZERO_POINT = 128  # uint8 activations: code + 128
_UINT8, _INT8, _INT32, _FLOAT = 2, 3, 6, 1  # ONNX TensorProto data types


def _const(g, value: float | int | Tensor, dtype: torch.dtype = torch.float32):
    t = value if isinstance(value, Tensor) else torch.tensor(value, dtype=dtype)
    return g.op("Constant", value_t=t)


def _qp(q: Quantizer) -> int:
    return 2 ** (q.bits - 1) - 1


def _act_qdq_sym(g, x, q: SymMaxAbs, nonnegative: bool):
    """QuantizeLinear/DequantizeLinear of ``x`` with training's dynamic per-tensor scale m / Q_P,
    m = min(max|x|, clip) (module docstring). ``nonnegative``: x >= 0 is known (attention probabilities), so
    max|x| is one ReduceMax."""
    hi = g.op("ReduceMax", x, keepdims_i=0)
    m = hi if nonnegative else g.op("Max", hi, g.op("Neg", g.op("ReduceMin", x, keepdims_i=0)))
    if q.clip is not None:
        m = g.op("Min", m, _const(g, q.clip))
    m = g.op("Max", m, _const(g, 1e-8))  # training's clamp(min=1e-8) on m
    scale = g.op("Div", m, _const(g, float(_qp(q))))
    zp = _const(g, ACT_ZERO_POINT, torch.uint8)
    u = g.op("QuantizeLinear", x, scale, zp)
    if q.clip is not None and not nonnegative:
        # Training clamps x to ±clip, so codes stay in ±Q_P; QuantizeLinear saturates at 0..255, i.e. codes
        # -128..127: -128 only for x < -clip·(Q_P + ½)/Q_P, which the clamp would have made -Q_P. Raising
        # those bytes to 1 (code -127) is that clamp, on the uint8 codes (a quarter of the float traffic).
        u = g.op("Clip", u, _const(g, ACT_ZERO_POINT - _qp(q), torch.uint8))
    return g.op("DequantizeLinear", u, scale, zp)


def _qdq(g, x, scale):
    zp = _const(g, ACT_ZERO_POINT, torch.uint8)
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


def _token_codes(g, x, q: AbsMaxToken):
    """(codes as float, per-token scale 1/s) of x along its last dim, training's float arithmetic."""
    if q.clip is not None:
        x = g.op("Clip", x, _const(g, -q.clip), _const(g, q.clip))
    m = g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1)
    s = g.op("Div", _const(g, float(_qp(q))), g.op("Max", m, _const(g, q.eps)))  # training's s = Q_P / m
    return g.op("Round", g.op("Mul", x, s)), g.op("Reciprocal", s)


class ActQDQ(torch.autograd.Function):
    """x̂ = the activation quantizer's value; ONNX: its QDQ pair (see the module docstring)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, step: Tensor | None, quantizer: str, bits: int, clip: float | None, nonnegative: bool
    ) -> Tensor:
        return _QUANTIZERS[quantizer](bits, clip).dequantized(x, step)

    @staticmethod
    def symbolic(g, x, step, quantizer: str, bits: int, clip: float | None, nonnegative: bool):
        q = _QUANTIZERS[quantizer](bits, clip)
        if isinstance(q, SymMaxAbs):
            # probabilities are <= 1: a clip of at least 1 never bites (below 1 it does: the general path)
            return _act_qdq_sym(g, x, q, nonnegative and (q.clip is None or q.clip >= 1))
        if isinstance(q, LSQ):
            qn, qp = q.levels
            s = g.op("Reshape", step, _const(g, torch.tensor([], dtype=torch.int64)))  # (1,) -> scalar
            lo, hi = g.op("Mul", s, _const(g, float(-qn))), g.op("Mul", s, _const(g, float(qp)))
            return _qdq(g, g.op("Clip", x, lo, hi), s)
        codes, inv = _token_codes(g, x, q)  # per token, float ops
        return g.op("Mul", codes, inv)


def _lsq_act(bits: int, clip: float | None) -> LSQ:
    return LSQ(bits=bits, clip=None, activation=True)


_QUANTIZERS = {
    "sym": lambda bits, clip: SymMaxAbs(bits=bits, clip=clip),
    "lsq": _lsq_act,
    "absmax_token": lambda bits, clip: AbsMaxToken(bits=bits, clip=clip),
}


def act_method(q: Quantizer) -> str:
    """The key of ``q``'s class in this module's table (activation methods only)."""
    for name, cls in (("sym", SymMaxAbs), ("lsq", LSQ), ("absmax_token", AbsMaxToken)):
        if type(q) is cls:
            return name
    raise TypeError(f"{type(q).__name__} is not an activation quantizer")


def weight_storage(codes: Tensor) -> str:
    """How a Linear's codes go into the graph: ``int8`` (|codes| <= 64: no 16-bit overflow in u8 × s8),
    ``uint8`` (8-bit codes, + 128) or ``int32`` (int16 codes, e.g. 8-bit mean-clip's ±128: no int8 kernel)."""
    if codes.dtype != torch.int8:
        return "int32"
    return "int8" if codes.numel() == 0 or int(codes.abs().max()) <= 64 else "uint8"


_STORAGE = {"int8": (torch.int8, _INT8, 0), "uint8": (torch.uint8, _UINT8, 128), "int32": (torch.int32, _INT32, 0)}


def _weight_dq(g, codes, scale, storage: str):
    """DequantizeLinear of the transposed codes [in, out] (constant-folded into one initializer)."""
    dtype, onnx_type, zero = _STORAGE[storage]
    wt = g.op("Transpose", codes, perm_i=[1, 0])
    if storage != "int8":
        wt = g.op("Cast", g.op("Add", g.op("Cast", wt, to_i=_INT32), _const(g, zero, torch.int32)), to_i=onnx_type)
    if _rank(scale) == 2:  # one scale per output row: per column of the transposed codes
        rows = scale.type().sizes()[0]
        s = g.op("Reshape", scale, _const(g, torch.tensor([rows], dtype=torch.int64)))
        return g.op("DequantizeLinear", wt, s, _const(g, torch.full((rows,), zero, dtype=dtype)), axis_i=1)
    s = g.op("Reshape", scale, _const(g, torch.tensor([], dtype=torch.int64)))
    return g.op("DequantizeLinear", wt, s, _const(g, zero, dtype))


class LinearDQ(torch.autograd.Function):
    """y = x · (codes · scale)ᵀ + bias; ONNX: MatMul(x, DequantizeLinear(codesᵀ, scale)) + bias."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, storage: str) -> Tensor:
        return F.linear(x, codes.to(scale.dtype) * scale, bias)

    @staticmethod
    def symbolic(g, x, codes, scale, bias, storage: str):
        y = g.op("MatMul", x, _weight_dq(g, codes, scale, storage))
        return y if _is_none(bias) else g.op("Add", y, bias)


class TokenLinear(torch.autograd.Function):
    """A Linear fed by per-token activations: y = (q_x / s_x) · (q_w · scale_w)ᵀ + bias with the uint8 codes
    multiplied by ``MatMulInteger`` (int32 accumulation), then scaled per token and per weight."""

    @staticmethod
    def forward(
        ctx, x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None, bits: int, clip: float | None
    ) -> Tensor:
        xq = AbsMaxToken(bits=bits, clip=clip).dequantized(x)
        return F.linear(xq, codes.to(scale.dtype) * scale, bias)

    @staticmethod
    def symbolic(g, x, codes, scale, bias, bits: int, clip: float | None):
        q = AbsMaxToken(bits=bits, clip=clip)
        xcodes, inv = _token_codes(g, x, q)
        xu8 = g.op("Cast", g.op("Add", xcodes, _const(g, float(ACT_ZERO_POINT))), to_i=_UINT8)
        wt = g.op("Transpose", codes, perm_i=[1, 0])
        acc = g.op("MatMulInteger", xu8, wt, _const(g, ACT_ZERO_POINT, torch.uint8), _const(g, 0, torch.int8))
        s = g.op("Reshape", scale, _const(g, torch.tensor([-1] if _rank(scale) == 2 else [], dtype=torch.int64)))
        y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), inv), s)
        return y if _is_none(bias) else g.op("Add", y, bias)


def _rank(value) -> int | None:
    t = value.type()
    return t.dim() if hasattr(t, "dim") else None


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())
