"""The KD losses against naive loop-based references written independently of the implementation."""

from __future__ import annotations

import math

import pytest
import torch

from kdqat_dist.distill.losses import (
    attention_map_kl,
    attention_score_mse,
    ground_truth_loss,
    hidden_mse,
    logits_mse,
    mse,
    soft_cross_entropy,
)

B, H, S, C, D = 4, 3, 6, 5, 7
NEG = torch.finfo(torch.float32).min


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _probs(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.softmax(torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * 2, dim=-1).to(dtype)


def _mask() -> torch.Tensor:
    """Per-sample lengths 6, 4, 1 (right-padded) and one left-padded sample with 3 real tokens."""
    m = torch.zeros(B, S, dtype=torch.long)
    m[0, :6] = 1
    m[1, :4] = 1
    m[2, :1] = 1
    m[3, 3:] = 1  # left padding
    return m


# ----------------------------------------------------------------------------- loop references


def ref_soft_ce(zs: list, zt: list, T: float) -> float:
    total = 0.0
    for b in range(len(zs)):
        es = [math.exp(v / T) for v in zs[b]]
        et = [math.exp(v / T) for v in zt[b]]
        zs_sum, zt_sum = sum(es), sum(et)
        for c in range(len(zs[b])):
            p_t = et[c] / zt_sum
            log_p_s = math.log(es[c] / zs_sum)
            total += -p_t * log_p_s
    return total / len(zs)


def ref_mse(a: list, b: list) -> float:
    fa, fb = _flatten(a), _flatten(b)
    return sum((x - y) ** 2 for x, y in zip(fa, fb, strict=True)) / len(fa)


def _flatten(x) -> list:
    if isinstance(x, list):
        out = []
        for v in x:
            out.extend(_flatten(v))
        return out
    return [x]


def ref_score_mse(a: list, b: list, threshold: float) -> float:
    fa = [0.0 if x <= threshold else x for x in _flatten(a)]
    fb = [0.0 if x <= threshold else x for x in _flatten(b)]
    return sum((x - y) ** 2 for x, y in zip(fa, fb, strict=True)) / len(fa)


def ref_map_kl(ps: list, pt: list, mask: list, eps: float) -> float:
    nb, nh, ns = len(ps), len(ps[0]), len(ps[0][0])
    total = 0.0
    for b in range(nb):
        s_b = sum(1 for v in mask[b] if v)
        for h in range(nh):
            kl = 0.0
            for i in range(ns):
                if not mask[b][i]:
                    continue
                for j in range(ns):
                    if not mask[b][j]:
                        continue
                    p = max(pt[b][h][i][j], eps)
                    q = max(ps[b][h][i][j], eps)
                    kl += p * (math.log(p) - math.log(q))
            total += kl / s_b if s_b > 0 else 0.0
    return total / (nb * nh)


def ref_ce(logits: list, labels: list) -> float:
    total = 0.0
    for row, y in zip(logits, labels, strict=True):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[y]
    return total / len(logits)


# ----------------------------------------------------------------------------- values


def test_soft_cross_entropy_matches_loop():
    zs = torch.randn(B, C, generator=_gen(1), dtype=torch.float64)
    zt = torch.randn(B, C, generator=_gen(2), dtype=torch.float64)
    for T in (1.0, 2.5):
        got = soft_cross_entropy(zs, zt, temperature=T)
        assert got.dim() == 0
        assert got.item() == pytest.approx(ref_soft_ce(zs.tolist(), zt.tolist(), T), rel=1e-10)


def test_soft_cross_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize(
    "fn, shape",
    [
        (logits_mse, (B, 1)),
        (logits_mse, (B, C)),
        (hidden_mse, (B, S, D)),
        (mse, (B, S, D)),
        (mse, (B, H, S, D)),
    ],
)
def test_mse_family_matches_loop(fn, shape):
    a = torch.randn(shape, generator=_gen(3), dtype=torch.float64)
    b = torch.randn(shape, generator=_gen(4), dtype=torch.float64)
    assert fn(a, b).item() == pytest.approx(ref_mse(a.tolist(), b.tolist()), rel=1e-10)


def test_mse_refuses_silent_broadcast():
    with pytest.raises(ValueError, match="shapes differ"):
        logits_mse(torch.zeros(B, 1), torch.zeros(B))


def _scores(seed: int, mask: torch.Tensor, fill: float, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(B, H, S, S, generator=_gen(seed), dtype=torch.float64) * 3
    neg = torch.full((), fill, dtype=torch.float64)
    add = torch.where(mask[:, None, None, :].bool(), torch.zeros((), dtype=torch.float64), neg)
    return (x + add).to(dtype)


@pytest.mark.parametrize("fill", [-10000.0, NEG, float("-inf")])
def test_attention_score_mse_matches_loop(fill):
    mask = _mask()
    s, t = _scores(5, mask, fill), _scores(6, mask, fill)
    got = attention_score_mse(s, t)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref_score_mse(s.tolist(), t.tolist(), -100.0), rel=1e-10)


def test_attention_score_mse_finfo_min_float32_is_finite_and_each_tensor_masked_by_itself():
    mask = _mask()
    s = _scores(5, mask, NEG, torch.float32)
    # The teacher is masked differently from the student: each must be zeroed by its own values.
    other = mask.clone()
    other[0, -1] = 0
    t = _scores(6, other, NEG, torch.float32)
    s.requires_grad_(True)
    got = attention_score_mse(s, t)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref_score_mse(s.tolist(), t.tolist(), -100.0), rel=1e-5)
    got.backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[s.detach() <= -100] == 0).all()


def test_attention_map_kl_matches_loop():
    mask = _mask()
    ps, pt = _probs((B, H, S, S), 7), _probs((B, H, S, S), 8)
    # Tiny values exercise the eps clamp.
    ps[0, 0, 0, 0] = 0.0
    pt[1, 1, 2, 3] = 1e-12
    got = attention_map_kl(ps, pt, mask)
    want = ref_map_kl(ps.tolist(), pt.tolist(), mask.tolist(), 1e-8)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # A bool mask means the same.
    assert attention_map_kl(ps, pt, mask.bool()).item() == pytest.approx(want, rel=1e-10)


def test_attention_map_kl_ignores_padded_entries():
    mask = _mask()
    ps, pt = _probs((B, H, S, S), 7), _probs((B, H, S, S), 8)
    base = attention_map_kl(ps, pt, mask)
    pad = ~(mask[:, None, :, None].bool() & mask[:, None, None, :].bool())
    pad = pad.expand(B, H, S, S)
    ps2 = ps.clone()
    ps2[pad] = float("nan")  # garbage in padded rows/columns must not leak
    assert attention_map_kl(ps2, pt, mask).item() == pytest.approx(base.item(), rel=1e-12)


def test_attention_map_kl_zero_for_identical_and_positive_otherwise():
    mask = _mask()
    p = _probs((B, H, S, S), 9)
    assert attention_map_kl(p, p.clone(), mask).item() == 0.0
    q = _probs((B, H, S, S), 10)
    assert attention_map_kl(q, p, mask).item() > 0.0


def test_attention_map_kl_all_masked_sample_and_batch_give_zero():
    ps, pt = _probs((B, H, S, S), 11), _probs((B, H, S, S), 12)
    mask = _mask()
    mask[2] = 0  # one sample with no real token
    got = attention_map_kl(ps, pt, mask)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref_map_kl(ps.tolist(), pt.tolist(), mask.tolist(), 1e-8), rel=1e-10)
    ps.requires_grad_(True)
    empty = attention_map_kl(ps, pt, torch.zeros(B, S, dtype=torch.long))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(ps.grad).all() and (ps.grad == 0).all()


def test_attention_map_kl_shape_checks():
    p = _probs((B, H, S, S), 13)
    with pytest.raises(ValueError, match="attention_mask"):
        attention_map_kl(p, p, torch.ones(B, S + 1))
    with pytest.raises(ValueError, match=r"\[B, H, S, S\]"):
        attention_map_kl(p[..., :-1], p[..., :-1], torch.ones(B, S))


def test_ground_truth_loss_classification_matches_loop():
    logits = torch.randn(B, C, generator=_gen(14), dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 1])
    got = ground_truth_loss(logits, labels, regression=False)
    assert got.item() == pytest.approx(ref_ce(logits.tolist(), labels.tolist()), rel=1e-10)


@pytest.mark.parametrize("shape", [(B, 1), (B,)])
def test_ground_truth_loss_regression_uses_labels(shape):
    pred = torch.randn(shape, generator=_gen(15), dtype=torch.float64)
    labels = torch.tensor([0.5, 4.2, 2.0, 1.1], dtype=torch.float64)
    got = ground_truth_loss(pred, labels, regression=True)
    want = sum((p - y) ** 2 for p, y in zip(pred.reshape(-1).tolist(), labels.tolist(), strict=True)) / B
    assert got.item() == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError):
        ground_truth_loss(torch.zeros(B, 2), labels, regression=True)


# ----------------------------------------------------------------------------- gradients and dtypes


def _all_losses(dtype: torch.dtype, requires_grad: bool):
    """(name, student, fn(student) -> loss, float64 reference on the same rounded inputs)."""
    mask = _mask()
    cases = []

    zs = torch.randn(B, C, generator=_gen(20)).to(dtype)
    zt = torch.randn(B, C, generator=_gen(21)).to(dtype)
    cases.append(
        (
            "soft_ce",
            zs,
            lambda x: soft_cross_entropy(x, zt, 2.0),
            ref_soft_ce(zs.double().tolist(), zt.double().tolist(), 2.0),
        )
    )
    cases.append(
        ("logits_mse", zs.clone(), lambda x: logits_mse(x, zt), ref_mse(zs.double().tolist(), zt.double().tolist()))
    )

    hs = torch.randn(B, S, D, generator=_gen(22)).to(dtype)
    ht = torch.randn(B, S, D, generator=_gen(23)).to(dtype)
    want_h = ref_mse(hs.double().tolist(), ht.double().tolist())
    cases.append(("hidden_mse", hs, lambda x: hidden_mse(x, ht), want_h))
    cases.append(("mse", hs.clone(), lambda x: mse(x, ht), want_h))

    fill = torch.finfo(dtype).min
    ss, st = _scores(24, mask, fill, dtype), _scores(25, mask, fill, dtype)
    cases.append(
        (
            "score_mse",
            ss,
            lambda x: attention_score_mse(x, st),
            ref_score_mse(ss.double().tolist(), st.double().tolist(), -100.0),
        )
    )

    ps, pt = _probs((B, H, S, S), 26, dtype), _probs((B, H, S, S), 27, dtype)
    cases.append(
        (
            "map_kl",
            ps,
            lambda x: attention_map_kl(x, pt, mask),
            ref_map_kl(ps.double().tolist(), pt.double().tolist(), mask.tolist(), 1e-8),
        )
    )

    labels = torch.tensor([0, 4, 2, 1])
    cases.append(
        (
            "gt_ce",
            zs.clone(),
            lambda x: ground_truth_loss(x, labels, regression=False),
            ref_ce(zs.double().tolist(), labels.tolist()),
        )
    )

    if requires_grad:
        for _, x, _, _ in cases:
            x.requires_grad_(True)
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_flow_to_student(dtype):
    for name, x, fn, _ in _all_losses(dtype, requires_grad=True):
        loss = fn(x)
        loss.backward()
        assert x.grad is not None, name
        assert torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "dtype, out_dtype, rel",
    [
        (torch.float64, torch.float64, 1e-10),
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 2e-3),
        (torch.float16, torch.float32, 2e-3),
    ],
)
def test_dtypes(dtype, out_dtype, rel):
    for name, x, fn, want in _all_losses(dtype, requires_grad=False):
        got = fn(x)
        assert got.dtype == out_dtype, name
        assert torch.isfinite(got), name
        assert got.item() == pytest.approx(want, rel=rel), name


def test_half_inputs_backprop_in_their_own_dtype():
    for name, x, fn, _ in _all_losses(torch.bfloat16, requires_grad=True):
        fn(x).backward()
        assert x.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(x.grad.float()).all(), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attention_map_kl_gradients_equal_autograd_of_the_formula(dtype):
    # The loss has a hand-written backward (for memory): it must equal autograd through the plain formula,
    # for the student and for a teacher that requires grad, with clamped and padded entries present.
    mask = _mask()
    ps, pt = _probs((B, H, S, S), 21).to(dtype), _probs((B, H, S, S), 22).to(dtype)
    ps[0, 0, 0, 0] = 0.0
    pt[1, 1, 2, 3] = 1e-12
    ps.requires_grad_(True)
    pt.requires_grad_(True)
    got = attention_map_kl(ps, pt, mask)
    g_s, g_t = torch.autograd.grad(got * 3.0, (ps, pt))

    def plain(a, b):
        valid = mask.bool()
        pair = valid[:, None, :, None] & valid[:, None, None, :]
        up = torch.float64 if dtype == torch.float64 else torch.float32
        a_c = torch.where(pair, a.to(up).clamp_min(1e-8), 1.0)
        b_c = torch.where(pair, b.to(up).clamp_min(1e-8), 1.0)
        kl = torch.where(pair, b_c * (b_c.log() - a_c.log()), 0.0)
        return (kl.sum(dim=(-2, -1)) / valid.sum(-1).clamp_min(1)[:, None]).mean()

    a, b = ps.detach().clone().requires_grad_(True), pt.detach().clone().requires_grad_(True)
    want = plain(a, b)
    w_s, w_t = torch.autograd.grad(want * 3.0, (a, b))
    tol = dict(rel=1e-10, abs=0) if dtype == torch.float64 else dict(rel=1e-5, abs=1e-6)
    assert got.item() == pytest.approx(want.item(), **tol)
    assert g_s.dtype == dtype and g_t.dtype == dtype
    assert torch.allclose(g_s.double(), w_s.double(), rtol=tol["rel"], atol=tol["abs"])
    assert torch.allclose(g_t.double(), w_t.double(), rtol=tol["rel"], atol=tol["abs"])
    assert (g_s != 0).any() and (
        g_s[~(mask[:, None, :, None].bool() & mask[:, None, None, :].bool()).expand(B, H, S, S)] == 0
    ).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fn", [mse, attention_score_mse])
def test_mse_gradients_equal_autograd_of_the_formula(fn, dtype):
    # mse keeps only s - t for its hand-written backward (for memory): its gradients to both arguments
    # must equal autograd through F.mse_loss, including the masked-score entries zeroed by attention_score_mse.
    mask = _mask()
    if fn is attention_score_mse:
        s, t = _scores(30, mask, torch.finfo(dtype).min, dtype), _scores(31, mask, torch.finfo(dtype).min, dtype)
    else:
        s = torch.randn(B, S, D, generator=_gen(30)).to(dtype)
        t = torch.randn(B, S, D, generator=_gen(31)).to(dtype)
    s.requires_grad_(True)
    t.requires_grad_(True)
    got = fn(s, t)
    g_s, g_t = torch.autograd.grad(got * 3.0, (s, t))

    up = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = s.detach().to(up).requires_grad_(True), t.detach().to(up).requires_grad_(True)
    a_m, b_m = a, b
    if fn is attention_score_mse:
        a_m, b_m = torch.where(a <= -100.0, 0.0, a), torch.where(b <= -100.0, 0.0, b)
    want = torch.nn.functional.mse_loss(a_m, b_m)
    w_s, w_t = torch.autograd.grad(want * 3.0, (a, b))
    assert got.dtype == up and g_s.dtype == dtype and g_t.dtype == dtype
    assert got.item() == pytest.approx(want.item(), rel=1e-12 if dtype == torch.float64 else 1e-6)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-6)
    assert torch.allclose(g_s.to(up), w_s.to(dtype).to(up), **tol)
    assert torch.allclose(g_t.to(up), w_t.to(dtype).to(up), **tol)
    assert (g_s != 0).any() and torch.equal(g_s, -g_t)


def test_hand_written_backwards_refuse_double_backward():
    # Their backwards use tensors saved without a graph: a second derivative would be silently wrong.
    s = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(mse(s, torch.zeros(B, S, D, dtype=torch.float64)), s, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_attention_map_kl_blocks_of_heads_and_recompute_give_the_same_loss_and_gradients(monkeypatch):
    import kdqat_dist.distill.kernels as kernels_mod
    from kdqat_dist.distill.kernels import attention_map_kl_recomputed

    mask = _mask()
    ps0, pt = _probs((B, H, S, S), 41), _probs((B, H, S, S), 42)
    ps = ps0.clone().requires_grad_(True)
    whole = attention_map_kl(ps, pt, mask)
    (g_whole,) = torch.autograd.grad(whole, ps)
    monkeypatch.setattr(kernels_mod, "_KL_BLOCK_ELEMENTS", 1)  # one head per block
    ps = ps0.clone().requires_grad_(True)
    calls = []
    blocked = attention_map_kl_recomputed(ps, pt, mask, (lambda x: calls.append(1) or x * 1.0, (pt,)))
    (g_blocked,) = torch.autograd.grad(blocked, ps)
    assert calls == [1]
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=0)
    assert torch.equal(g_blocked, g_whole)


# ---- attention-relation KD (MiniLM-v2 / BitDistill)


def _relation_kl_loop(xs: torch.Tensor, xt: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """The relation KL written out row by row in float64: for each relation head and each real query token,
    softmax over the real keys of the scaled dot products, then KL(teacher || student); mean over heads and
    real tokens."""
    total = torch.zeros((), dtype=torch.float64)
    n_rows = 0
    for b in range(xs.shape[0]):
        real = [j for j in range(xs.shape[1]) if mask[b, j]]
        for r in range(heads):
            ds, dt = xs.shape[-1] // heads, xt.shape[-1] // heads
            hs = xs[b, :, r * ds : (r + 1) * ds].double()
            ht = xt[b, :, r * dt : (r + 1) * dt].double()
            for i in real:
                ps = torch.softmax(torch.stack([hs[i] @ hs[j] / math.sqrt(ds) for j in real]), dim=0)
                pt = torch.softmax(torch.stack([ht[i] @ ht[j] / math.sqrt(dt) for j in real]), dim=0)
                total = total + (pt * (pt.log() - ps.log())).sum()
        n_rows += len(real)
    return total / max(n_rows, 1) / heads


@pytest.mark.parametrize("d_s,d_t,heads", [(8, 8, 2), (8, 12, 4), (12, 6, 3)])
def test_attention_relation_kl_matches_loop_values_and_gradients(d_s, d_t, heads):
    from kdqat_dist.distill.losses import attention_relation_kl

    g = torch.Generator().manual_seed(d_s + d_t)
    xs = torch.randn(3, 5, d_s, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(3, 5, d_t, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])  # right and left padding
    got = attention_relation_kl(xs, xt, mask, heads)
    xs_ref = xs.detach().clone().requires_grad_()
    want = _relation_kl_loop(xs_ref, xt, mask, heads)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(xs.grad, xs_ref.grad, rtol=1e-9, atol=1e-12)
    assert xs.grad[1, 3:].abs().max() == 0 and xs.grad[2, 0].abs().max() == 0  # padding learns nothing


def test_attention_relation_kl_zero_for_identical_masked_and_checks_shapes():
    from kdqat_dist.distill.losses import attention_relation_kl

    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert float(attention_relation_kl(x, x.clone(), mask, 2)) == pytest.approx(0.0, abs=1e-6)
    y = x.clone()
    y[0, 3] = 100.0  # a padded token changes nothing
    assert float(attention_relation_kl(y, x, mask, 2)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_relation_kl(x, torch.randn(2, 4, 8), mask, 4)) > 0
    zero = attention_relation_kl(x.requires_grad_(), torch.randn(2, 4, 8), torch.zeros(2, 4), 2)
    assert float(zero.detach()) == 0.0 and not torch.isnan(zero)
    with pytest.raises(ValueError, match="3 relation heads do not divide the student's hidden size 8"):
        attention_relation_kl(x, x, mask, 3)
    with pytest.raises(ValueError, match="same B and S"):
        attention_relation_kl(x, torch.randn(2, 5, 8), mask, 2)
    half = attention_relation_kl(x.detach().bfloat16(), torch.randn(2, 4, 8).bfloat16(), mask, 2)
    assert half.dtype == torch.float32
