"""Quantizer values and gradients against the formulas of docs/algorithms.md §1 and §4."""

import math

import pytest
import torch

from kdqat_dist.quant import quantizers as Q


def test_twn_per_tensor_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(16, 24) * 0.05
    out = Q.TWN(bits=2, per_row=False).fake_quant(w)
    delta = 0.7 * w.abs().mean()
    keep = w.abs() > delta
    alpha = w.abs()[keep].mean()
    expected = alpha * torch.sign(w) * keep
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)  # summation order only
    assert len(torch.unique(out)) == 3


def test_twn_per_row_matches_formula_row_by_row():
    torch.manual_seed(1)
    w = torch.randn(5, 40)
    out = Q.TWN(bits=2, per_row=True, clip=2.5).fake_quant(w)
    for r in range(5):
        row = w[r].clamp(-2.5, 2.5)  # step 1 of A.2
        delta = 0.7 * row.abs().mean()
        keep = row.abs() > delta
        alpha = row.abs()[keep].mean()
        torch.testing.assert_close(out[r], alpha * torch.sign(row) * keep, rtol=2e-6, atol=0)
        assert len(torch.unique(out[r])) == 3


def test_twn_ste_identity_inside_zero_outside_clip():
    w = torch.tensor([[0.1, -0.2, 3.0, -2.6, 0.01, 2.4]], requires_grad=True)
    Q.TWN(bits=2, clip=2.5).fake_quant(w).sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def test_symmetric_quant_8bit_formula_and_clip():
    torch.manual_seed(2)
    x = torch.randn(4, 10) * 2
    out = Q.SymMaxAbs(bits=8, clip=2.5).fake_quant(x)
    xc = x.clamp(-2.5, 2.5)
    s = 127 / xc.abs().max()
    assert torch.equal(out, torch.round(xc * s) / s)
    assert len(torch.unique(out)) <= 255


def test_symmetric_quant_inside_the_clip_skips_nothing_of_the_formula():
    x = (torch.randn(4, 10, generator=torch.Generator().manual_seed(3)) * 0.5).requires_grad_()
    assert x.abs().max() < 2.5  # the clamp is the identity here, and the STE mask all ones
    out = Q.SymMaxAbs(bits=8, clip=2.5).fake_quant(x)
    s = 127 / x.detach().abs().max()
    assert torch.equal(out, torch.round(x.detach() * s) / s)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_quant_levels(bits):
    x = torch.linspace(-1, 1, 1001)
    out = Q.SymMaxAbs(bits=bits, clip=None).fake_quant(x)
    assert len(torch.unique(out)) == 2 * (2 ** (bits - 1) - 1) + 1


def test_symmetric_quant_ste_zero_outside_clip():
    x = torch.tensor([0.5, -1.0, 2.6, -3.0, 2.49], requires_grad=True)
    Q.SymMaxAbs(bits=8, clip=2.5).fake_quant(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_mean_clip_quant_formula():
    torch.manual_seed(3)
    w = torch.randn(8, 8)
    out = Q.MeanClip(bits=4, clip=None).fake_quant(w)
    t = w.abs().mean()
    c = w.abs()[w.abs() > t].mean()
    step = 2 * c / 15
    torch.testing.assert_close(out, torch.round(w.clamp(-c, c) / step) * step)


def test_lsq_forward_and_levels():
    v = torch.linspace(-2, 2, 101)
    s = torch.tensor(0.3)
    out = Q.LSQ(bits=3, narrow_range=False).fake_quant(v, s)  # Q_N = 4, Q_P = 3
    expected = torch.clamp(torch.round(v / s), -4, 3) * s
    assert torch.equal(out, expected)
    narrow = Q.LSQ(bits=2, narrow_range=True).fake_quant(v, s)
    assert set(torch.round(narrow / s).tolist()) == {-1.0, 0.0, 1.0}


def test_lsq_step_gradient_equals_analytic_expression():
    torch.manual_seed(4)
    v = torch.randn(200) * 2
    s = torch.tensor(0.4, requires_grad=True)
    bits = 3
    qn, qp = 4, 3
    upstream = torch.randn(200)
    out = Q.LSQ(bits=bits, narrow_range=False).fake_quant(v, s)
    (out * upstream).sum().backward()
    r = v / 0.4
    ds = torch.where(
        r <= -qn, torch.tensor(-float(qn)), torch.where(r >= qp, torch.tensor(float(qp)), torch.round(r) - r)
    )
    g = 1 / math.sqrt(v.numel() * qp)
    torch.testing.assert_close(s.grad, (upstream * ds).sum() * g)


def test_lsq_input_gradient_is_clipped_ste():
    v = torch.tensor([-3.0, -0.2, 0.0, 0.3, 5.0], requires_grad=True)
    Q.LSQ(bits=3, narrow_range=False).fake_quant(v, torch.tensor(0.5)).sum().backward()  # range [-2.0, 1.5]
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_per_row_step_gradient_shape():
    w = torch.randn(6, 10)
    s = torch.full((6, 1), 0.2, requires_grad=True)
    Q.LSQ(bits=4, narrow_range=False).fake_quant(w, s).sum().backward()
    assert s.grad.shape == (6, 1)
    assert torch.all(s.grad != 0)


def test_lsq_init_mean():
    v = torch.randn(1000)
    s0 = Q.lsq_init(v, 4, "mean")
    torch.testing.assert_close(s0, 2 * v.abs().mean() / math.sqrt(7))


def test_lsq_init_percentile():
    v = torch.arange(-100, 101, dtype=torch.float32)
    s0 = Q.lsq_init(v, 8, "percentile", percentile=97.5)
    q = torch.quantile(v, torch.tensor([0.025, 0.975]))
    torch.testing.assert_close(s0, q.abs().max() / 127)


def test_kl_calibration_clips_outliers():
    torch.manual_seed(5)
    v = torch.cat([torch.randn(20000), torch.tensor([50.0])])  # one outlier
    clip = Q.kl_calibrated_clip(v, 8)
    assert 1.0 < float(clip) < 50.0  # ignores the outlier but keeps the bulk
    s = Q.lsq_init(v, 8, "kl")
    torch.testing.assert_close(s, clip / 127)


def test_sibling_activation_quantizers_each_give_the_formula_and_its_gradient():
    # Q/K/V projections read one tensor. There is no cache between them (the former process-wide one never
    # hit in a real forward): each quantizer gives the formula's value, the gradient is that of three
    # quantizations, and a modified input is quantized afresh.
    from kdqat_dist.config import ActQuantConfig
    from kdqat_dist.quant.fake_quant import ActFakeQuant

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 16, generator=g) * 2).requires_grad_(True)
    qs = [ActFakeQuant(ActQuantConfig()) for _ in range(3)]
    ws = [torch.randn(4, 5, 16, generator=g) for _ in range(3)]
    outs = [q(x) for q in qs]
    sym = Q.SymMaxAbs(bits=8, per_row=False, clip=2.5)
    assert all(torch.equal(o, sym.fake_quant(x)) for o in outs)
    sum((o * w).sum() for o, w in zip(outs, ws, strict=True)).backward()
    grad = x.grad.clone()
    x.grad = None
    sum((sym.fake_quant(x) * w).sum() for w in ws).backward()
    assert torch.equal(grad, x.grad)
    torch.testing.assert_close(grad, sum(ws) * (x.detach().abs() < 2.5))  # zero outside the clip
    assert not torch.equal(ActFakeQuant(ActQuantConfig(bits=4))(x), outs[0])
    with torch.no_grad():
        x.add_(1.0)  # same object, new values
    assert torch.equal(qs[0](x), sym.fake_quant(x)) and not torch.equal(qs[0](x), outs[0])


def test_lsq_straight_through_passes_the_weight_gradient_outside_the_range():
    v = torch.tensor([-3.0, -0.4, 0.2, 0.9, 2.5], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    (g_clip,) = torch.autograd.grad(Q.LSQ(bits=2, narrow_range=True).fake_quant(v, s).sum(), v)
    v2 = v.detach().clone().requires_grad_(True)
    s2 = s.detach().clone().requires_grad_(True)
    out = Q.LSQ(bits=2, narrow_range=True, straight_through=True).fake_quant(v2, s2)
    g_v, g_s = torch.autograd.grad(out.sum(), (v2, s2))
    inside = (v.detach() / 0.5).abs() < 1  # Q_P = 1 at 2 bits, narrow range
    assert torch.equal(g_clip, inside.float())  # LSQ: zero outside [-Q_N s, Q_P s]
    assert torch.equal(g_v, torch.ones(5))  # KDLSQ: plain STE for weights
    (g_s_clip,) = torch.autograd.grad(Q.LSQ(bits=2, narrow_range=True).fake_quant(v.detach(), s).sum(), s)
    assert float(g_s) == pytest.approx(float(g_s_clip))  # the step's gradient is LSQ's either way


def _naive_kdlsq_clip(values: list[float], bits: int) -> float:
    """KDLSQ's calibration written out with lists: sqrt bins, CDF, resample to n points and back."""

    def interp(x: float, xp: list[float], fp: list[float]) -> float:
        for k in range(len(xp) - 1):
            if xp[k] <= x <= xp[k + 1]:
                t = 0.0 if xp[k + 1] == xp[k] else (x - xp[k]) / (xp[k + 1] - xp[k])
                return fp[k] + t * (fp[k + 1] - fp[k])
        return fp[-1]

    def lin(m: int) -> list[float]:
        return [j / (m - 1) for j in range(m)]

    a = [abs(x) for x in values]
    mx = max(a)
    nb = math.ceil(mx / ((mx - min(a)) / math.sqrt(len(a))))  # numpy's bins="sqrt" over [0, max]
    w = mx / nb
    hist = [0] * nb
    for x in a:
        hist[min(int(x / w), nb - 1)] += 1
    cdf, acc = [], 0.0
    for h in hist:
        acc += h / len(a)
        cdf.append(acc)
    n = 2 ** (bits - 1)
    best = (math.inf, mx)
    for i in range(n + 1, nb + 1):
        p = cdf[: i - 1] + [1.0] * (nb - i + 1)
        coarse = [interp(x, lin(i), p[:i]) for x in lin(n)]
        q = [interp(x, lin(n), coarse) for x in lin(i)] + p[i:]
        d = sum(0.0 if c == 0 and qq == 0 else (c - qq) * math.log2(c / qq) for c, qq in zip(cdf, q, strict=True))
        if d < best[0]:
            best = (d, (i + 0.5) * w)
    return best[1]


@pytest.mark.parametrize("bits", [2, 4])
def test_kdlsq_cdf_clip_matches_its_formula_and_clips_outliers(bits):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(900, generator=g)
    v[:3] *= 8  # a few outliers: the calibrated clip stays well inside them
    got = float(Q.kdlsq_cdf_clip(v, bits))
    assert got == pytest.approx(_naive_kdlsq_clip(v.tolist(), bits), rel=1e-6)
    assert 0 < got < float(v.abs().max())
    step = Q.lsq_init(v, bits, "kl_cdf")
    assert float(step) == pytest.approx(got / (2 ** (bits - 1) - 1), rel=1e-6)


# ---- one class per method: codes, scale and fake quant from the same statistics


def _formula_codes(method: str, w: torch.Tensor, bits: int, step: torch.Tensor | None) -> torch.Tensor:
    """Each method's codes written out per row from docs/algorithms.md, independently of the library."""
    rows = []
    for r in w:
        x = r.clamp(-2.5, 2.5)
        if method == "twn":
            rows.append(torch.sign(x) * (x.abs() > 0.7 * x.abs().mean()))
        elif method == "sym":
            rows.append(torch.round(x * ((2 ** (bits - 1) - 1) / x.abs().max())))
        elif method == "mean_clip":
            c = x.abs()[x.abs() > x.abs().mean()].mean()
            rows.append(torch.round(x.clamp(-c, c) / (2 * c / (2**bits - 1))))
        elif method == "absmean":
            rows.append(torch.clamp(torch.round(x / (x.abs().mean() + 1e-5)), -1, 1))
        elif method == "seq":  # ternary (narrow_range): n = 1.5, no shift; the learned clip α, no clamp before it
            a = step.reshape(-1)[len(rows)]
            rows.append(torch.round(torch.clamp(r / a, -0.99, 0.99) * 1.5))
        else:  # lsq, narrow range, no clamp before the step
            qp = 2 ** (bits - 1) - 1
            rows.append(torch.clamp(torch.round(r / step.reshape(-1)[len(rows)]), -qp, qp))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "method,bits",
    [("twn", 2), ("sym", 8), ("sym", 3), ("mean_clip", 4), ("lsq", 2), ("lsq", 4), ("absmean", 2), ("seq", 2)],
)
def test_each_class_codes_match_the_formula_and_give_its_fake_quant_bit_for_bit(method, bits):
    from kdqat_dist.config import WeightQuantConfig
    from kdqat_dist.engine.diagnostics import weight_codes as diag_codes
    from kdqat_dist.export.packing import weight_codes as export_codes
    from kdqat_dist.quant.fake_quant import WeightFakeQuant

    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(bits)) * 0.3
    w[1, 3] = 3.0  # beyond the 2.5 clip
    cfg = WeightQuantConfig(bits=bits, method=method, granularity="row")
    wq = WeightFakeQuant(cfg, w)
    q, step = wq.quantizer, getattr(wq, "step", None)
    assert type(q) is Q.QUANTIZERS[method] and q.per_row
    codes, scale = q.codes(w, step)
    lo, hi = q.code_range()
    assert torch.equal(codes, codes.round()) and lo <= int(codes.min()) and int(codes.max()) <= hi
    torch.testing.assert_close(codes, _formula_codes(method, w, bits, step), rtol=0, atol=0)
    # the public form is q · scale for every method: bit for bit where training multiplies, within an ulp for
    # sym, whose training divides by 1/scale
    w_hat = codes * scale
    with torch.no_grad():
        fq = q.fake_quant(w, step)
        assert torch.equal(wq(w), fq) and torch.equal(q.dequantized(w, step), fq)
        if method == "sym":
            torch.testing.assert_close(w_hat, fq, rtol=1.2e-7, atol=0)
        else:
            assert torch.equal(w_hat, fq)
    # diagnostics and export read the same class: the same codes, no second formula
    assert torch.equal(export_codes(w, cfg, step)[0], codes.long())
    assert torch.equal(diag_codes(wq, w)[0], codes)


def test_sym_and_mean_clip_per_tensor_scales_and_storage_bits():
    x = torch.linspace(-3, 3, 61)
    codes, s = Q.SymMaxAbs(bits=8).codes(x)
    assert torch.equal(s, 1 / torch.tensor(127 / 2.5)) and int(codes.abs().max()) == 127
    assert Q.MeanClip(bits=4).code_range() == (-8, 8) and Q.MeanClip(bits=4).storage_bits() == 5
    assert Q.TWN(bits=2).storage_bits() == 2 and Q.SymMaxAbs(bits=8).storage_bits() == 8
    assert Q.LSQ(bits=2, narrow_range=False).code_range() == (-2, 1)


def test_unknown_method_is_a_value_error_naming_the_allowed_methods_at_prepare_time():
    from transformers import BertConfig, BertForSequenceClassification

    from kdqat_dist.config import ActQuantConfig, QuantConfig, WeightQuantConfig
    from kdqat_dist.quant.api import prepare
    from kdqat_dist.quant.fake_quant import ActFakeQuant

    assert set(Q.QUANTIZERS) == {"twn", "sym", "mean_clip", "lsq", "absmean", "seq", "absmax_token"}
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    with pytest.raises(ValueError, match=r"'ternary'; allowed: twn, sym, mean_clip, lsq, absmean, seq$"):
        prepare(BertForSequenceClassification(cfg), QuantConfig(weight=WeightQuantConfig(method="ternary")))
    with pytest.raises(ValueError, match=r"activation quantization method 'twn'; allowed: sym, lsq, absmax_token$"):
        ActFakeQuant(ActQuantConfig(method="twn"))
    with pytest.raises(ValueError, match=r"weight quantization method 'absmax_token'"):
        prepare(BertForSequenceClassification(cfg), QuantConfig(weight=WeightQuantConfig(method="absmax_token")))


def test_lsq_steps_have_shape_1_and_old_0d_steps_load():
    from kdqat_dist.config import ActQuantConfig, WeightQuantConfig
    from kdqat_dist.quant.fake_quant import ActFakeQuant, WeightFakeQuant

    w = torch.randn(5, 8)
    wq = WeightFakeQuant(WeightQuantConfig(method="lsq", bits=4), w)
    aq = ActFakeQuant(ActQuantConfig(method="lsq"))
    assert wq.step.shape == (1,) and aq.step.shape == (1,)
    for q, value in ((wq, 0.125), (aq, 0.5)):
        old = {k: v.clone() for k, v in q.state_dict().items()}
        old["step"] = torch.tensor(value)  # as saved before steps had shape (1,)
        q.load_state_dict(old)
        assert q.step.shape == (1,) and float(q.step.detach()) == value
        assert old["step"].dim() == 0  # the caller's dict is left alone
    out = wq(w)
    assert torch.equal(out, torch.clamp(torch.round(w / 0.125), -7, 7) * 0.125)


def test_old_0d_optimizer_moments_are_reshaped_on_resume():
    from kdqat_dist.engine.local import fit_moments_to_params

    step = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.AdamW([step], lr=0.1)
    step.grad = torch.ones(1)
    opt.step()
    old = opt.state_dict()
    old["state"][0] = {k: (v.reshape(()) if k != "step" else v) for k, v in old["state"][0].items()}
    opt.load_state_dict(old)
    fit_moments_to_params(opt)
    assert opt.state[step]["exp_avg"].shape == (1,) and opt.state[step]["step"].dim() == 0
    opt.step()  # 0-d moments would fail here (an in-place update of shape [] by [1])


# ---- BitNet b1.58 absmean weights, per-token absmax activations, ParetoQ's SEQ


@pytest.mark.parametrize("per_row", [False, True])
def test_absmean_matches_bitnet_formula_and_passes_the_gradient_straight_through(per_row):
    w = (torch.randn(5, 24, generator=torch.Generator().manual_seed(7)) * 0.05).requires_grad_()
    out = Q.AbsMean(bits=2, per_row=per_row, clip=None).fake_quant(w)
    x = w.detach()
    gamma = (x.abs().mean(dim=1, keepdim=True) if per_row else x.abs().mean()) + 1e-5
    assert torch.equal(out, torch.clamp(torch.round(x / gamma), -1, 1) * gamma)
    assert set(torch.unique(torch.round(out / gamma)).tolist()) == {-1.0, 0.0, 1.0}
    upstream = torch.randn(5, 24)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)  # clip null: BitNet's plain STE


def test_absmean_clip_follows_the_twn_convention():
    w = torch.tensor([[0.1, -0.2, 3.0, -2.6, 0.01, 2.4]], requires_grad=True)
    out = Q.AbsMean(bits=2, clip=2.5).fake_quant(w)
    xc = w.detach().clamp(-2.5, 2.5)
    gamma = xc.abs().mean() + 1e-5
    assert torch.equal(out, torch.clamp(torch.round(xc / gamma), -1, 1) * gamma)
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def test_absmax_token_one_scale_per_token_and_straight_through():
    x = (torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(8)) * 3).requires_grad_()
    x.data[0, 1] = 0.0  # an all-zero token: scale 127/eps, codes 0, no NaN
    q = Q.AbsMaxToken(bits=8, clip=None)
    out = q.fake_quant(x)
    xd = x.detach()
    s = 127.0 / xd.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    assert torch.equal(out, torch.round(xd * s) / s)
    assert torch.equal(out[0, 1], torch.zeros(16))
    codes, scale = q.codes(xd)
    assert scale.shape == (2, 3, 1) and int(codes.abs().amax()) == 127 and q.code_range() == (-127, 127)
    torch.testing.assert_close(codes * scale, out.detach(), rtol=1.2e-7, atol=0)  # public form: q · (1/s)
    # every token reaches ±127: its own max sets its scale
    assert torch.equal(codes.abs().amax(dim=-1)[xd.abs().amax(dim=-1) > 0], torch.full((5,), 127.0))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_absmax_token_is_an_activation_method_only():
    from kdqat_dist.config import ActQuantConfig
    from kdqat_dist.quant.fake_quant import ActFakeQuant

    aq = ActFakeQuant(ActQuantConfig(method="absmax_token", bits=8, clip=None))
    x = torch.randn(4, 7, 12)
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True)
    assert torch.equal(aq(x), torch.round(x * s) / s) and not hasattr(aq, "step")


def _seq_reference(w: torch.Tensor, alpha: torch.Tensor, ternary: bool):
    """ParetoQ's StretchedElasticQuant (models/utils_quant.py) written out elementwise: forward, and the
    gradients for w and alpha of sum(upstream * forward)."""
    n, shift = (1.5, 0.0) if ternary else (2.0, 0.5)
    top = (n - shift) / n
    a = alpha.clamp(min=1e-5)
    r = w / a
    q = (torch.round(torch.clamp(r, -0.99, 0.99) * n - shift) + shift) / n
    small, big = r < -0.99, r > 0.99
    mid = ~(small | big)
    dalpha = torch.where(mid, q - r, torch.where(small, -top, top)) / math.sqrt(w.numel())
    return q * a, mid.float(), dalpha


@pytest.mark.parametrize("ternary", [True, False])
@pytest.mark.parametrize("per_row", [False, True])
def test_seq_values_and_gradients_match_paretoq(ternary, per_row):
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(6, 20, generator=g) * 0.05).requires_grad_()
    w.data[0, 0], w.data[1, 1] = 0.5, -0.5  # beyond the clip value: the ±top branch of α's gradient
    alpha = (torch.full((6, 1), 0.08) if per_row else torch.tensor([0.08])) * (
        1 + torch.rand(6, 1, generator=g) if per_row else 1.0
    )
    alpha.requires_grad_()
    q = Q.SEQ(bits=2, per_row=per_row, narrow_range=ternary)
    out = q.fake_quant(w, alpha)
    ref, gw, galpha = _seq_reference(w.detach(), alpha.detach(), ternary)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)  # (k + shift)·α/n vs ((k + shift)/n)·α
    levels = torch.round(out.detach() / (alpha.detach() / (1.5 if ternary else 2.0)) * 2) / 2
    assert set(levels.unique().tolist()) == ({-1.0, 0.0, 1.0} if ternary else {-1.5, -0.5, 0.5, 1.5})
    upstream = torch.randn(6, 20, generator=g)
    (out * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream * gw)
    torch.testing.assert_close(alpha.grad, (upstream * galpha).sum_to_size(alpha.shape), rtol=1e-5, atol=1e-7)
    assert w.grad[0, 0] == 0 and w.grad[1, 1] == 0
    # codes and scale give the fake-quant weight bit for bit, as export needs: 2-bit SEQ's levels (k + ½)·α/2
    # are the odd codes 2k + 1 with the scale α/4
    codes, scale = q.codes(w, alpha)
    lo, hi = q.code_range()
    assert torch.equal(codes, codes.round()) and lo <= int(codes.min()) and int(codes.max()) <= hi
    assert (lo, hi, q.code_stride) == ((-1, 1, 1) if ternary else (-3, 3, 2)) and q.storage_bits() == 2
    assert set(codes.unique().tolist()) <= ({-1.0, 0.0, 1.0} if ternary else {-3.0, -1.0, 1.0, 3.0})
    torch.testing.assert_close(scale, alpha.detach().clamp(min=1e-5) / (1.5 if ternary else 4.0), rtol=0, atol=0)
    assert torch.equal(codes * scale, out.detach())


def test_seq_alpha_initialised_at_max_abs_and_in_its_own_lr_group():
    from kdqat_dist.config import WeightQuantConfig
    from kdqat_dist.quant.fake_quant import WeightFakeQuant

    w = torch.randn(5, 9)
    row = WeightFakeQuant(WeightQuantConfig(method="seq", bits=2, granularity="row"), w)
    assert torch.equal(row.step.detach(), w.abs().amax(dim=1, keepdim=True))
    whole = WeightFakeQuant(WeightQuantConfig(method="seq", bits=2, narrow_range=False), w)
    assert whole.step.shape == (1,) and float(whole.step.detach()) == float(w.abs().max())
    assert row.quantizer.levels == (1, 1)  # α is a clip value: its learning rate is not divided by Q_P


@pytest.mark.parametrize("method", ["absmean", "seq"])
def test_ternary_only_methods_refuse_other_bits(method):
    from kdqat_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"quant.weight.method: {method}"):
        load_config(None, [f"quant.weight.method={method}", "quant.weight.bits=4"])
    cfg = load_config(None, [f"quant.weight.method={method}", "quant.rules=[{pattern: output, weight_bits: 8}]"])
    from kdqat_dist.quant.api import _weight_cfg

    assert _weight_cfg(cfg.quant.weight, cfg.quant.rules[0]).method == "sym"  # more bits: max-abs uniform
