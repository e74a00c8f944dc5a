"""Bit packing and the code/scale form of every weight quantizer: exact round trips, clear refusals."""

import pytest
import torch

from kdqat_dist.config import ConfigError, WeightQuantConfig
from kdqat_dist.export import packing as P
from kdqat_dist.quant.fake_quant import WeightFakeQuant

SIZES = [0, 1, 2, 3, 5, 7, 8, 9, 13, 31, 1001]


@pytest.mark.parametrize("bits", range(1, P.MAX_STORAGE_BITS + 1))
def test_pack_bits_round_trip_every_width_and_odd_sizes(bits):
    g = torch.Generator().manual_seed(bits)
    for n in SIZES:
        u = torch.randint(0, 1 << bits, (n,), generator=g)
        if n:
            u[0], u[-1] = 0, (1 << bits) - 1  # both extremes present
        packed = P.pack_bits(u, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == (n * bits + 7) // 8 == P.packed_nbytes(n, bits)
        assert torch.equal(P.unpack_bits(packed, bits, n), u)


def test_pack_bits_layout_is_little_endian_and_padding_is_zero():
    assert P.pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert P.pack_bits(torch.tensor([5, 7, 1]), 3).tolist() == [5 | 7 << 3 | (1 & 3) << 6, 1 >> 2]
    assert P.pack_bits(torch.tensor([3]), 2).tolist() == [3]


def test_pack_bits_accepts_any_shape():
    u = torch.randint(0, 4, (3, 5, 7))
    assert torch.equal(P.unpack_bits(P.pack_bits(u, 2), 2, u.numel()).view(3, 5, 7), u)


def test_base3_round_trip_and_size():
    g = torch.Generator().manual_seed(0)
    for n in SIZES:
        t = torch.randint(0, 3, (n,), generator=g)
        packed = P.pack_base3(t)
        assert packed.numel() == (n + 4) // 5 == P.base3_nbytes(n)
        assert n == 0 or int(packed.max()) <= 242
        assert torch.equal(P.unpack_base3(packed, n), t)
    assert P.pack_base3(torch.tensor([2, 2, 2, 2, 2])).tolist() == [242]
    assert P.pack_base3(torch.tensor([1, 0, 2])).tolist() == [1 + 2 * 9]


def test_bad_packing_inputs_are_refused():
    with pytest.raises(ValueError, match="do not fit in 2 bits"):
        P.pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ConfigError, match="unsupported storage width"):
        P.pack_bits(torch.tensor([0]), 10)
    with pytest.raises(ConfigError, match="expected 3 uint8 bytes"):
        P.unpack_bits(torch.zeros(2, dtype=torch.uint8), 2, 9)
    with pytest.raises(ValueError, match="base-3 needs"):
        P.pack_base3(torch.tensor([3]))
    with pytest.raises(ConfigError, match="corrupt"):
        P.unpack_base3(torch.tensor([243], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="unsupported weight bits 5"):
        P.choose_encoding(torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="unsupported weight bits 6"):
        P.weight_codes(torch.randn(3, 3), WeightQuantConfig(bits=6, method="sym"))


QUANTIZERS = [("twn", 2), ("absmean", 2), ("seq", 2)] + [
    (m, b) for m in ("sym", "mean_clip", "lsq") for b in (2, 3, 4, 8)
]


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("method,bits", QUANTIZERS)
def test_codes_reproduce_the_fake_quant_weight_bit_exactly(method, bits, granularity):
    torch.manual_seed(bits)
    for shape, narrow in (((7, 13), True), ((5, 3), False), ((1, 33), True)):
        w = torch.randn(*shape) * 0.05
        w[0, 0] = 3.0  # beyond the 2.5 clip
        cfg = WeightQuantConfig(bits=bits, method=method, granularity=granularity, narrow_range=narrow)
        wq = WeightFakeQuant(cfg, w)
        with torch.no_grad():
            target = wq(w)
        codes, scale = P.weight_codes(w, cfg, getattr(wq, "step", None))
        lo, hi = P.code_range(method, bits, narrow)
        stride = P.code_stride(method, bits, narrow)
        assert lo <= int(codes.min()) and int(codes.max()) <= hi
        out = P.dequantize(codes, scale)  # the quantized form: ŵ = codes · scale for every method
        if method == "sym":  # training divides by s; codes · (1/s) is within an ulp
            torch.testing.assert_close(out, target, rtol=2.5e-7, atol=0)
        else:
            assert torch.equal(out, target), (method, bits, granularity, shape)
        rows = shape[0] if granularity == "row" else 1
        assert scale.numel() == rows
        for base3 in (False, True):
            enc = P.choose_encoding(codes, bits, base3, stride)
            packed = P.encode(codes, enc)
            assert packed.numel() == enc.nbytes(codes.numel())
            if not (base3 and enc.packing == "base3"):
                assert enc.storage_bits <= bits + (method == "mean_clip")
            assert torch.equal(P.decode(packed, enc, codes.numel()).view(shape), codes)


def test_ternary_codes_pack_at_two_bits_or_base3():
    codes = torch.tensor([[-1, 0, 1], [1, 1, -1]])
    enc = P.choose_encoding(codes, 2)
    assert (enc.packing, enc.storage_bits, enc.zero) == ("bits", 2, 1)
    assert P.choose_encoding(codes, 2, base3=True).packing == "base3"
    # mean_clip's extra level (codes -2..2 at 2 bits) widens the storage instead of altering values
    wide = torch.tensor([-2, -1, 0, 1, 2])
    enc = P.choose_encoding(wide, 2, base3=True)
    assert (enc.packing, enc.storage_bits) == ("bits", 3)
    assert torch.equal(P.decode(P.encode(wide, enc), enc, 5), wide)


def test_sym_scale_is_the_reciprocal_of_trainings_and_format_1_converts():
    # sym trains with s = levels/max|w| and divides; the quantized form's scale is 1/s (within an ulp)
    cfg = WeightQuantConfig(bits=8, method="sym")
    torch.manual_seed(3)
    w = torch.randn(64, 64)
    codes, scale = P.weight_codes(w, cfg)
    with torch.no_grad():
        target = WeightFakeQuant(cfg, w)(w)
    s = 127 / w.abs().max().clamp(max=2.5)
    assert torch.equal(scale, s.reciprocal()) and torch.equal(codes.float() / s, target)
    torch.testing.assert_close(P.dequantize(codes, scale), target, rtol=2.5e-7, atol=0)
    # format-1 exports stored (codes, s) for codes / s
    assert P.legacy_dequant_op("sym") == "div" and P.legacy_dequant_op("twn") == "mul"
    q1, s1 = P.legacy_to_public(codes, s, "div")
    assert torch.equal(q1, codes) and torch.equal(s1, scale)


def test_two_bit_seq_odd_codes_pack_at_two_bits():
    # SEQ's 2-bit levels (k + 1/2)·α/2, k in -2..1, are the odd codes 2k + 1 with the scale α/4: two bits
    w = torch.linspace(-0.2, 0.2, 40).reshape(4, 10)
    cfg = WeightQuantConfig(bits=2, method="seq", narrow_range=False, granularity="row")
    wq = WeightFakeQuant(cfg, w)
    codes, scale = P.weight_codes(w, cfg, wq.step)
    assert set(codes.unique().tolist()) == {-3, -1, 1, 3} and P.code_stride("seq", 2, False) == 2
    enc = P.choose_encoding(codes, 2, stride=2)
    assert (enc.packing, enc.storage_bits, enc.stride) == ("bits", 2, 2)
    with torch.no_grad():
        assert torch.equal(P.dequantize(P.decode(P.encode(codes, enc), enc, 40).view(4, 10), scale), wq(w))
    with pytest.raises(ValueError, match="not 2 apart"):
        P.encode(torch.tensor([-3, 0, 1]), enc)
    # format 1 stored k with "mul_half"
    k = (codes - 1) // 2
    q1, s1 = P.legacy_to_public(k, scale * 2, "mul_half")
    assert torch.equal(q1, codes) and torch.equal(s1, scale)
    assert P.legacy_dequant_op("seq", False) == "mul_half" and P.code_range("seq", 2) == (-1, 1)  # ternary SEQ
