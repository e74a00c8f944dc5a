"""Quantizer values and gradients against the formulas of ALGORITHMS.md A.2-A.6."""

import math

import pytest
import torch

from kdqat_dist.quant import quantizers as Q


def test_twn_per_tensor_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(16, 24) * 0.05
    out = Q.twn_ternary(w, per_row=False)
    delta = 0.7 * w.abs().mean()
    keep = w.abs() > delta
    alpha = w.abs()[keep].mean()
    expected = alpha * torch.sign(w) * keep
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)  # summation order only
    assert len(torch.unique(out)) == 3


def test_twn_per_row_matches_formula_row_by_row():
    torch.manual_seed(1)
    w = torch.randn(5, 40)
    out = Q.twn_ternary(w, per_row=True, clip=2.5)
    for r in range(5):
        row = w[r].clamp(-2.5, 2.5)  # step 1 of A.2
        delta = 0.7 * row.abs().mean()
        keep = row.abs() > delta
        alpha = row.abs()[keep].mean()
        torch.testing.assert_close(out[r], alpha * torch.sign(row) * keep, rtol=2e-6, atol=0)
        assert len(torch.unique(out[r])) == 3


def test_twn_ste_identity_inside_zero_outside_clip():
    w = torch.tensor([[0.1, -0.2, 3.0, -2.6, 0.01, 2.4]], requires_grad=True)
    Q.twn_ternary(w, clip=2.5).sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def test_symmetric_quant_8bit_formula_and_clip():
    torch.manual_seed(2)
    x = torch.randn(4, 10) * 2
    out = Q.symmetric_quant(x, 8, clip=2.5)
    xc = x.clamp(-2.5, 2.5)
    s = 127 / xc.abs().max()
    assert torch.equal(out, torch.round(xc * s) / s)
    assert len(torch.unique(out)) <= 255


def test_symmetric_quant_inside_the_clip_skips_nothing_of_the_formula():
    x = (torch.randn(4, 10, generator=torch.Generator().manual_seed(3)) * 0.5).requires_grad_()
    assert x.abs().max() < 2.5  # the clamp is the identity here, and the STE mask all ones
    out = Q.symmetric_quant(x, 8, clip=2.5)
    s = 127 / x.detach().abs().max()
    assert torch.equal(out, torch.round(x.detach() * s) / s)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_quant_levels(bits):
    x = torch.linspace(-1, 1, 1001)
    out = Q.symmetric_quant(x, bits, clip=None)
    assert len(torch.unique(out)) == 2 * (2 ** (bits - 1) - 1) + 1


def test_symmetric_quant_ste_zero_outside_clip():
    x = torch.tensor([0.5, -1.0, 2.6, -3.0, 2.49], requires_grad=True)
    Q.symmetric_quant(x, 8, clip=2.5).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_mean_clip_quant_formula():
    torch.manual_seed(3)
    w = torch.randn(8, 8)
    out = Q.mean_clip_quant(w, 4, clip=None)
    t = w.abs().mean()
    c = w.abs()[w.abs() > t].mean()
    step = 2 * c / 15
    torch.testing.assert_close(out, torch.round(w.clamp(-c, c) / step) * step)


def test_lsq_forward_and_levels():
    v = torch.linspace(-2, 2, 101)
    s = torch.tensor(0.3)
    out = Q.lsq_quant(v, s, 3)  # Q_N = 4, Q_P = 3
    expected = torch.clamp(torch.round(v / s), -4, 3) * s
    assert torch.equal(out, expected)
    narrow = Q.lsq_quant(v, s, 2, narrow_range=True)
    assert set(torch.round(narrow / s).tolist()) == {-1.0, 0.0, 1.0}


def test_lsq_step_gradient_equals_analytic_expression():
    torch.manual_seed(4)
    v = torch.randn(200) * 2
    s = torch.tensor(0.4, requires_grad=True)
    bits = 3
    qn, qp = 4, 3
    upstream = torch.randn(200)
    out = Q.lsq_quant(v, s, bits)
    (out * upstream).sum().backward()
    r = v / 0.4
    ds = torch.where(r <= -qn, torch.tensor(-float(qn)),
                     torch.where(r >= qp, torch.tensor(float(qp)), torch.round(r) - r))
    g = 1 / math.sqrt(v.numel() * qp)
    torch.testing.assert_close(s.grad, (upstream * ds).sum() * g)


def test_lsq_input_gradient_is_clipped_ste():
    v = torch.tensor([-3.0, -0.2, 0.0, 0.3, 5.0], requires_grad=True)
    Q.lsq_quant(v, torch.tensor(0.5), 3).sum().backward()  # range [-2.0, 1.5]
    assert v.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_per_row_step_gradient_shape():
    w = torch.randn(6, 10)
    s = torch.full((6, 1), 0.2, requires_grad=True)
    Q.lsq_quant(w, s, 4).sum().backward()
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


def test_sibling_activation_quantizers_share_one_quantization_with_the_same_gradient():
    # Q/K/V projections read one tensor: the second quantizer returns the first one's output. It must be
    # the formula's value, with the gradient three separate quantizations would give, and never reused
    # for a modified input or other settings.
    from kdqat_dist.config import ActQuantConfig
    from kdqat_dist.quant.fake_quant import ActFakeQuant

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 5, 16, generator=g) * 2).requires_grad_(True)
    qs = [ActFakeQuant(ActQuantConfig()) for _ in range(3)]
    ws = [torch.randn(4, 5, 16, generator=g) for _ in range(3)]
    outs = [q(x) for q in qs]
    assert outs[1] is outs[0] and outs[2] is outs[0]
    assert torch.equal(outs[0], Q.symmetric_quant(x, 8, False, 2.5))
    sum((o * w).sum() for o, w in zip(outs, ws, strict=True)).backward()
    shared = x.grad.clone()
    x.grad = None
    sum((Q.symmetric_quant(x, 8, False, 2.5) * w).sum() for w in ws).backward()
    assert torch.equal(shared, x.grad)
    assert (shared[x.detach().abs() >= 2.5] == 0).all()

    other = ActFakeQuant(ActQuantConfig(bits=4))
    assert other(x) is not outs[0]
    with torch.no_grad():
        x.add_(1.0)  # same object, new values
    fresh = qs[0](x)
    assert fresh is not outs[0] and torch.equal(fresh, Q.symmetric_quant(x, 8, False, 2.5))


def test_lsq_straight_through_passes_the_weight_gradient_outside_the_range():
    v = torch.tensor([-3.0, -0.4, 0.2, 0.9, 2.5], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    (g_clip,) = torch.autograd.grad(Q.lsq_quant(v, s, 2, narrow_range=True).sum(), v)
    v2 = v.detach().clone().requires_grad_(True)
    s2 = s.detach().clone().requires_grad_(True)
    out = Q.lsq_quant(v2, s2, 2, narrow_range=True, straight_through=True)
    g_v, g_s = torch.autograd.grad(out.sum(), (v2, s2))
    inside = (v.detach() / 0.5).abs() < 1  # Q_P = 1 at 2 bits, narrow range
    assert torch.equal(g_clip, inside.float())  # LSQ: zero outside [-Q_N s, Q_P s]
    assert torch.equal(g_v, torch.ones(5))  # KDLSQ: plain STE for weights
    (g_s_clip,) = torch.autograd.grad(Q.lsq_quant(v.detach(), s, 2, narrow_range=True).sum(), s)
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
