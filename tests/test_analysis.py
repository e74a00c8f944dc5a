"""`kdqat analyze`: the distances, norms and Hessian on known inputs, shapes, figures, and bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdqat_dist.analysis.attention_distance import cover_length_ratio, head_kl, ranking_loss
from kdqat_dist.analysis.by_length import by_length, length_edges
from kdqat_dist.analysis.collect import forward_taps
from kdqat_dist.analysis.hessian import hessian_loss, norm_penalty_hvp, norm_penalty_max_eigenvalue, power_iteration
from kdqat_dist.analysis.norms import TOKEN_CLASSES, norm_decomposition, token_classes, value_vectors
from kdqat_dist.analysis.report import FIGURES, AnalyzeOptions, analyze, analyze_models, load_models, run_config
from kdqat_dist.config import ConfigError, QuantConfig
from kdqat_dist.models.encoders import encoder_layers
from kdqat_dist.models.taps import TapStore, tapped

N_LAYERS, N_HEADS = 2, 2


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matrices: a second intra-op thread only adds synchronisation (100x slower on a loaded 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_checkpoint(out: Path, num_layers: int = N_LAYERS, seed: int = 0) -> Path:
    from kdqat_dist.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(out, num_layers=num_layers, num_heads=N_HEADS, seed=seed)


def _make_student(teacher_dir: Path, out: Path, quant: QuantConfig, seed: int, noise: float = 0.02) -> Path:
    from kdqat_dist.models.encoders import load_classifier, load_tokenizer
    from kdqat_dist.quant.api import calibrate_activations, prepare
    from kdqat_dist.quant.student import save_student

    tok = load_tokenizer(str(teacher_dir))
    model = load_classifier(str(teacher_dir), 2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a different student without training
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    prepare(model, quant)
    calibrate_activations(
        model, dict(tok(["the plot was good , but slow .", "i found it dull"], padding=True, return_tensors="pt"))
    )
    return save_student(model, out, quant, tok)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """<root>/teacher (FP), <root>/map (TWN student), <root>/out (LSQ student); no training."""
    root = tmp_path_factory.mktemp("analysis_models")
    teacher = _tiny_checkpoint(root / "teacher")
    _make_student(teacher, root / "map", QuantConfig(), seed=1)
    lsq = QuantConfig()
    lsq.weight.method = "lsq"
    lsq.act.method = "lsq"
    _make_student(teacher, root / "out", lsq, seed=2)
    return root


@pytest.fixture(scope="session")
def loaded(models_dir):
    teacher, students, tok = load_models(
        models_dir / "teacher", [str(models_dir / "map"), str(models_dir / "out")], num_labels=2
    )
    return teacher, students, tok


def _example(tok, text: str) -> dict[str, torch.Tensor]:
    enc = tok([text], return_tensors="pt")
    return {**dict(enc), "labels": torch.tensor([1])}


# --------------------------------------------------------------------------- Exp1: distances


def _probs(h: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(h, s, s, generator=g, dtype=torch.float64) * 2, dim=-1)


def test_distances_are_zero_for_identical_maps():
    p = _probs(3, 7, 0)
    assert torch.equal(head_kl(p, p.clone()), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(ranking_loss(p, p.clone()), torch.zeros(3, dtype=torch.float64))
    # identical maps cover the teacher's top-k in exactly k positions: the minimum, k/S
    torch.testing.assert_close(cover_length_ratio(p, p.clone(), k=5), torch.full((3,), 5 / 7, dtype=torch.float64))
    torch.testing.assert_close(cover_length_ratio(p, p.clone(), k=9), torch.ones(3, dtype=torch.float64))


def test_distances_known_values():
    # one head, three identical query rows: teacher [.5, .3, .2], student reversed [.2, .3, .5]
    t = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).expand(1, 3, 3)
    s = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).expand(1, 3, 3)
    kl = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(1.0) + 0.2 * math.log(0.2 / 0.5)
    torch.testing.assert_close(head_kl(s, t), torch.tensor([kl], dtype=torch.float64))
    # pairs (0,1): 0.1, (0,2): 0.3, (1,2): 0.2 -> 0.6 per row
    torch.testing.assert_close(ranking_loss(s, t), torch.tensor([0.6], dtype=torch.float64))
    # the teacher's top key (0) is the student's last: depth 3 of 3
    torch.testing.assert_close(cover_length_ratio(s, t, k=1), torch.tensor([1.0], dtype=torch.float64))
    # a student that swaps only the two smallest keeps the top-1 at depth 1
    s2 = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64).expand(1, 3, 3)
    torch.testing.assert_close(cover_length_ratio(s2, t, k=1), torch.tensor([1 / 3], dtype=torch.float64))
    torch.testing.assert_close(ranking_loss(s2, t), torch.tensor([0.1], dtype=torch.float64))


def test_length_buckets_are_quantiles_and_group_the_sample_means():
    lengths = np.array([5, 9, 6, 12, 30, 7, 9, 20])
    # empirical quartiles are lengths that occur: no bucket is empty, the last bound is the longest
    assert length_edges(lengths, 4) == [6, 9, 12, 30]
    assert length_edges(np.array([8, 8, 8]), 4) == [8]  # equal quantiles merge
    assert length_edges(lengths, 1) == [30]
    # per sample: layer 0 holds the sample's index, layer 1 zero -> sample mean = index / 2
    v = np.zeros((8, 2, 3))
    v[:, 0, :] = np.arange(8)[:, None]
    r = by_length(v, lengths, [6, 9, 12, 30])
    np.testing.assert_allclose(r["sample_mean"], np.arange(8) / 2)
    assert r["labels"] == ["5–6", "7–9", "10–12", "13–30"]
    assert r["count"].tolist() == [2, 3, 1, 2]  # {5, 6}, {9, 7, 9}, {12}, {30, 20}
    np.testing.assert_allclose(r["mean"], [(0 + 2) / 4, (1 + 5 + 6) / 6, 3 / 2, (4 + 7) / 4])
    np.testing.assert_allclose(r["std"][[0, 2]], [np.std([0, 1], ddof=1), 0.0])
    # Spearman = Pearson of the ranks (ties share their mean rank: the two 9s are 4.5)
    rho = np.corrcoef([1, 4.5, 2, 6, 8, 3, 4.5, 7], np.arange(1, 9))[0, 1]
    np.testing.assert_allclose(r["spearman"], rho)
    assert np.isnan(by_length(np.ones((3, 1, 1)), np.array([4, 5, 6]), [6])["spearman"])  # constant: no trend
    with pytest.raises(ValueError, match="reach the longest sample"):
        by_length(v, lengths, [6, 9, 12])  # the 30-token sample would be dropped


def test_ranking_loss_chunking_matches_reference():
    p_s, p_t = _probs(2, 9, 1), _probs(2, 9, 2)
    ref = torch.zeros(2, dtype=torch.float64)
    for h in range(2):
        for i in range(9):
            for j in range(9):
                for k in range(j + 1, 9):
                    ref[h] += max(0.0, float(-(p_s[h, i, j] - p_s[h, i, k]) * torch.sign(p_t[h, i, j] - p_t[h, i, k])))
    ref /= 9
    torch.testing.assert_close(ranking_loss(p_s, p_t), ref)
    torch.testing.assert_close(ranking_loss(p_s, p_t, chunk_elems=200), ref)  # several row chunks


# --------------------------------------------------------------------------- Exp2: power iteration


def _quadratic(eigs: list[float], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """0.5·xᵀAx + bᵀx with A = Q diag(eigs) Qᵀ, x split over two parameter tensors."""
    n = len(eigs)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    x1 = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(n - 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.cat([x1, x2])
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return 0.5 * x @ a @ x + b @ x, [x1, x2]


def test_power_iteration_finds_the_top_eigenvalues_of_a_quadratic():
    loss, params = _quadratic([5.0, 2.0, -1.0, 0.5, 0.1])
    r = power_iteration(loss, params, top_n=2, max_iter=500, tol=1e-9, generator=torch.Generator().manual_seed(0))
    assert r.eigenvalues == pytest.approx([5.0, 2.0], rel=1e-4)
    assert all(r.converged)


def test_power_iteration_keeps_the_sign_of_a_dominant_negative_eigenvalue():
    loss, params = _quadratic([-6.0, 2.0, 1.0], seed=3)
    r = power_iteration(loss, params, max_iter=500, tol=1e-9, generator=torch.Generator().manual_seed(1))
    assert r.eigenvalues[0] == pytest.approx(-6.0, rel=1e-4)


def test_closed_form_norm_penalty_hvp_matches_autograd():
    g = torch.Generator().manual_seed(4)
    params = [
        torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True),
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
    ]  # a zero tensor adds nothing
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    loss = 0.01 * sum(p.norm() for p in params[:2])
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
    ref = torch.autograd.grad(grads[:2], params[:2], grad_outputs=v[:2])
    got = norm_penalty_hvp(params, v, 0.01)
    for r, h in zip(ref, got[:2], strict=True):
        torch.testing.assert_close(h, r)
    assert torch.equal(got[2], torch.zeros(2, dtype=torch.float64))


def test_norm_term_eigenvalue_is_what_power_iteration_finds_on_that_term_alone():
    g = torch.Generator().manual_seed(6)
    params = [(torch.randn(6, 5, generator=g, dtype=torch.float64) * s).requires_grad_(True) for s in (1.0, 0.05)]
    params.append(torch.full((1,), 1e-4, dtype=torch.float64, requires_grad=True))  # 1 element: no curvature
    loss = 0.01 * sum(p.norm() for p in params)
    r = power_iteration(loss, params, max_iter=200, tol=1e-10, generator=torch.Generator().manual_seed(0))
    want = norm_penalty_max_eigenvalue(params, 0.01)
    assert want == pytest.approx(0.01 / float(params[1].detach().norm()))
    assert r.eigenvalues[0] == pytest.approx(want, rel=1e-6)
    assert norm_penalty_max_eigenvalue(params, 0.0) == 0.0


def test_model_spectrum_equals_the_reference_loss_through_autograd(loaded):
    from kdqat_dist.analysis.hessian import max_eigenvalue_spectrum

    _, students, tok = loaded
    model = students["map"]
    ex = _example(tok, "the plot was good .")
    fast = max_eigenvalue_spectrum(model, [ex], max_iter=6, tol=1e-12, seed=5)["eigenvalues"][0, 0]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    with torch.enable_grad():
        ref = power_iteration(
            hessian_loss(model, ex, 0.01), params, max_iter=6, tol=1e-12, generator=torch.Generator().manual_seed(5)
        )
    for p, f in zip(params, flags, strict=True):
        p.requires_grad_(f)
    assert fast == pytest.approx(ref.eigenvalues[0], rel=1e-4)


# --------------------------------------------------------------------------- Exp3: norms


def test_token_classes(loaded):
    _, _, tok = loaded
    ids = tok(["the plot , sadly , was good ."])["input_ids"][0]
    c = token_classes(ids, tok)
    assert c.shape == (len(ids), len(TOKEN_CLASSES))
    names = tok.convert_ids_to_tokens(ids)
    expect = [0 if n == "[CLS]" else 1 if n == "[SEP]" else 2 if n in ",." else 3 for n in names]
    assert c[:, :4].argmax(1).tolist() == expect
    assert c[:, 4].eq(1).all() and c[:, :4].sum(1).eq(1).all()


def _taps(model, ex, wanted):
    store = TapStore()
    with torch.no_grad(), tapped(model, wanted, store):
        model(**{k: v for k, v in ex.items() if k != "labels"})
    return store


def test_norm_decomposition_reconstructs_the_teacher_self_attention_output(loaded):
    teacher, _, tok = loaded
    ex = _example(tok, "although the plot was dull , the acting was good .")
    taps = _taps(teacher, ex, {"hidden": {0, 1}, "probs": {0, 1}, "sa_output": {0, 1}})
    for l, layer in enumerate(encoder_layers(teacher)):
        dec = norm_decomposition(layer, taps["hidden"][l], taps["probs"][l])
        s = ex["input_ids"].shape[1]
        assert dec["alpha"].shape == (N_HEADS, s, s) and dec["f_norm"].shape == (N_HEADS, s)
        assert dec["af_norm"].shape == (N_HEADS, s, s) and dec["sum_af_norm"].shape == (s, s)
        # Σ_h Σ_j α f_h(x_j) + b_o is the self-attention output (Kobayashi et al.'s decomposition)
        rebuilt = dec["sum_af"] + layer.attention.output.dense.bias
        torch.testing.assert_close(rebuilt, taps["sa_output"][l][0], atol=1e-5, rtol=1e-4)


def test_norm_decomposition_of_a_subln_layer_reconstructs_its_self_attention_output(loaded):
    """With SubLN (W_o · LN(ctx) + b_o) the decomposition is exact too: f_{h,i}(x_j) = g_h(x_j) / σ_i."""
    from kdqat_dist.models.subln import insert_subln

    teacher, _, tok = loaded
    model = copy.deepcopy(teacher)
    assert insert_subln(model) == 2 * N_LAYERS
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained SubLN: neither gain 1 nor bias 0
        for layer in encoder_layers(model):
            ln = layer.attention.output.dense.LayerNorm
            ln.weight.copy_(1 + 0.5 * torch.randn(ln.weight.shape, generator=g))
            ln.bias.copy_(0.3 * torch.randn(ln.bias.shape, generator=g))
    ex = _example(tok, "although the plot was dull , the acting was good .")
    taps = _taps(model, ex, {"hidden": {0, 1}, "probs": {0, 1}, "sa_output": {0, 1}})
    s = ex["input_ids"].shape[1]
    for l, layer in enumerate(encoder_layers(model)):
        dec = norm_decomposition(layer, taps["hidden"][l], taps["probs"][l])
        assert dec["f_norm"].shape == (N_HEADS, s) and dec["sum_af_norm"].shape == (s, s)
        sub = layer.attention.output.dense
        # Σ_h Σ_j α_{h,i,j} g_h(x_j) / σ_i + W_o β + b_o
        rebuilt = dec["sum_af"] + sub.linear.weight @ sub.LayerNorm.bias + sub.linear.bias
        torch.testing.assert_close(rebuilt, taps["sa_output"][l][0], atol=1e-5, rtol=1e-4)
        # ‖Σ_h α f‖ per (query, key) against a naive loop over one query and one key
        i, j = s - 1, 1
        v = value_vectors(layer, taps["hidden"][l])  # [H, S, dh]
        alpha = taps["probs"][l].reshape(N_HEADS, s, s)
        ctx = torch.einsum("hk,hkd->hd", alpha[:, i], v).reshape(-1)  # query i's context [H*dh]
        slot = torch.zeros(N_HEADS, v.shape[-1])
        for h in range(N_HEADS):
            slot[h] = alpha[h, i, j] * v[h, j]  # key j's share of the context, in each head's slot
        part = slot.reshape(-1)
        ln = sub.LayerNorm
        naive = sub.linear.weight @ (ln.weight * (part - part.mean()) / torch.sqrt(ctx.var(unbiased=False) + ln.eps))
        torch.testing.assert_close(dec["sum_af_norm"][i, j], naive.norm(), atol=1e-5, rtol=1e-4)


def test_student_value_vectors_are_the_ones_its_attention_uses(loaded):
    _, students, tok = loaded
    ex = _example(tok, "i found the ending really clever .")
    for model in students.values():
        taps = _taps(model, ex, {"hidden": {0, 1}, "probs": {0, 1}, "context": {0, 1}})
        for l, layer in enumerate(encoder_layers(model)):
            v = value_vectors(layer, taps["hidden"][l])
            p = layer.attention.self.attn_quant.probs(taps["probs"][l])  # the 8-bit probs used for P·V
            torch.testing.assert_close(p[0] @ v, taps["context"][l][0], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- all analyses together


@pytest.fixture(scope="session")
def results(loaded):
    teacher, students, tok = loaded
    texts = [
        "the plot was good .",
        "although the acting was dull , the music was great",
        "i did not find the ending clever , though the cast was solid .",
    ]
    examples = [_example(tok, t) for t in texts]
    # "same" is a copy of the teacher: every distance and difference must vanish
    models = {"same": copy.deepcopy(teacher), **students}
    return analyze_models(
        teacher, models, examples, tok, top_k=3, hessian_samples=2, hessian_iters=4, hessian_top_n=2
    ), examples


def test_result_shapes(results):
    res, examples = results
    n, (l, h, c) = len(examples), (N_LAYERS, N_HEADS, len(TOKEN_CLASSES))
    s0 = examples[0]["input_ids"].shape[1]
    assert res["lengths"].tolist() == [e["input_ids"].shape[1] for e in examples]
    for s in ("same", "map", "out"):
        for m in ("kl", "ranking_loss", "cover_length_ratio"):
            d = res["distance"][s][m]
            assert d["per_sample"].shape == (n, l, h)
            assert d["mean"].shape == d["std"].shape == (l, h)
            assert d["layer_mean"].shape == d["layer_std"].shape == (l,)
        for q in ("alpha", "f_norm", "af_norm"):
            assert res["norm_difference"][s][q].shape == (l, h, c)
        assert res["norm_difference"][s]["sum_af_norm"].shape == (l, c)
        assert all(v.shape == (l, c) for v in res["norm_difference"][s]["layer_abs"].values())
    for m in ("teacher", "same", "map", "out"):
        r = res["dynamic_range"][m]
        assert r["min"].shape == r["max"].shape == (n, l)
        assert r["example_min"].shape == r["example_max"].shape == (l, s0)
        assert (r["min"] < r["max"]).all()
        nr = res["norms"][m]
        assert nr["alpha"].shape == nr["f_norm"].shape == nr["af_norm"].shape == (l, h, c)
        assert nr["sum_af_norm"].shape == (l, c) and nr["tokens"].shape == (c,)
        hs = res["hessian"][m]
        assert hs["eigenvalues"].shape == hs["iterations"].shape == hs["converged"].shape == (2, 2)
        assert np.isfinite(hs["eigenvalues"]).all()
    # every sample has one [CLS] and one [SEP]; the texts hold 4 punctuation marks
    assert res["norms"]["teacher"]["tokens"].tolist()[:3] == [n, n, 4]
    # each query row of α sums to 1: over all (query, key) pairs of the sample, α sums to Σ S over Σ S² pairs
    lengths = res["lengths"].astype(float)
    np.testing.assert_allclose(res["norms"]["teacher"]["alpha"][..., -1], lengths.sum() / (lengths**2).sum(), rtol=1e-5)


def test_identical_models_give_zero_distance_and_difference(results):
    res, _ = results
    d = res["distance"]["same"]
    assert np.array_equal(d["kl"]["per_sample"], np.zeros_like(d["kl"]["per_sample"]))
    assert np.array_equal(d["ranking_loss"]["per_sample"], np.zeros_like(d["ranking_loss"]["per_sample"]))
    np.testing.assert_allclose(d["cover_length_ratio"]["mean"].mean(), res["identical_cover"])
    for q, v in res["norm_difference"]["same"].items():
        if q != "layer_abs":
            assert np.nan_to_num(v).max() == 0 and np.nan_to_num(v).min() == 0, q
    for k in ("min", "max", "example_min", "example_max"):
        assert np.array_equal(res["dynamic_range"]["same"][k], res["dynamic_range"]["teacher"][k])
    np.testing.assert_allclose(
        res["hessian"]["same"]["eigenvalues"], res["hessian"]["teacher"]["eigenvalues"], rtol=1e-5
    )
    # the quantized students do differ
    assert res["distance"]["map"]["kl"]["mean"].min() > 0
    # by length: a copy of the teacher is 0 in every bucket; a student's buckets hold its per-sample KL
    assert res["distance_by_length"]["same"]["mean"].tolist() == [0.0] * len(res["distance_by_length"]["same"]["edges"])
    b = res["distance_by_length"]["map"]
    np.testing.assert_allclose(b["sample_mean"], res["distance"]["map"]["kl"]["per_sample"].mean(axis=(1, 2)))
    assert b["count"].sum() == len(res["lengths"]) and (b["mean"] > 0).all()
    assert np.abs(res["norm_difference"]["out"]["f_norm"][..., -1]).max() > 0


def test_forward_taps_slices_nothing_and_pads_nothing(loaded):
    teacher, _, tok = loaded
    ex = _example(tok, "the score was fresh")
    taps = forward_taps(teacher, ex)
    s = ex["input_ids"].shape[1]
    assert taps["probs"][0].shape == (N_HEADS, s, s) and taps["attn_output"][1].shape[0] == s


# --------------------------------------------------------------------------- the command


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from kdqat_dist.cli import main

    capsys.readouterr()  # drop earlier output (progress bars of model writing)
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_analyze_command_writes_every_figure_json_and_summary(models_dir, tmp_path, capsys):
    out = tmp_path / "an"
    # the sample size and iterations come from the config's analysis section; a flag overrides it
    rc, err = _cli(
        [
            "analyze",
            "--config",
            "tiny_debug",
            "--teacher",
            str(models_dir / "teacher"),
            "--student",
            str(models_dir / "map"),
            "--student",
            f"lsq={models_dir / 'out'}",
            "--out",
            str(out),
            "--hessian-samples",
            "2",
            "analysis.samples=4",
            "analysis.hessian_iters=3",
            "analysis.hessian_samples=6",
        ],
        capsys,
    )
    assert rc == 0, err
    for name in FIGURES:
        assert (out / name).stat().st_size > 5000, name  # a real image, not an empty canvas
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "analysis.json").read_text())
    assert set(doc["distance"]) == {"map", "lsq"}
    assert set(doc["norms"]) == {"teacher", "map", "lsq"}
    assert len(doc["lengths"]) == 4 and doc["meta"]["task"] == "demo"
    assert (doc["meta"]["samples"], doc["meta"]["hessian_iters"], doc["meta"]["hessian_samples"]) == (4, 3, 2)
    hs = doc["hessian"]["map"]
    assert len(hs["eigenvalues"]) == 2 and max(i for row in hs["iterations"] for i in row) <= 3
    # by default the spectrum is the loss's own curvature, not the Σ‖p‖₂ regulariser's (whose λ_max it hid)
    assert doc["meta"]["hessian_norm_weight"] == 0.0 and hs["norm_term_eigenvalue"] == 0.0
    md = (out / "summary.md").read_text()
    assert all(f"({name})" in md for name in FIGURES)
    # the KL by input length: 4 samples in at most analysis.length_buckets (4) quantile buckets
    by_len = doc["distance_by_length"]["lsq"]
    assert sum(by_len["count"]) == 4 and len(by_len["edges"]) <= 4 and by_len["edges"][-1] == max(doc["lengths"])
    assert "### By input length" in md and "| lsq | " in md.split("### By input length")[1]
    # a used --out is refused: nothing of the earlier analysis is replaced
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, err = _cli(
        [
            "analyze",
            "--config",
            "tiny_debug",
            "--teacher",
            str(models_dir / "teacher"),
            "--student",
            str(models_dir / "map"),
            "--out",
            str(out),
            "analysis.samples=2",
        ],
        capsys,
    )
    assert rc == 2 and err == f"kdqat: error: --out: {out} already exists and is not empty; choose a new folder\n"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_bad_input_is_a_one_line_config_error(models_dir, tmp_path, capsys):
    from kdqat_dist.models.encoders import load_classifier
    from kdqat_dist.models.tiny import make_tiny_checkpoint
    from kdqat_dist.quant.api import prepare
    from kdqat_dist.quant.student import save_student

    teacher = models_dir / "teacher"

    def opts(student, *overrides) -> AnalyzeOptions:
        return AnalyzeOptions(
            teacher=str(teacher),
            students=[str(student)],
            out=str(tmp_path / "x"),
            config="tiny_debug",
            overrides=list(overrides),
            samples=2,
            hessian_samples=0,
        )

    with pytest.raises(ConfigError, match="not a kdqat student folder"):
        analyze(opts(teacher))
    with pytest.raises(ConfigError, match="--teacher: .* is a kdqat student folder"):
        analyze(
            AnalyzeOptions(
                teacher=str(models_dir / "map"),
                students=[str(models_dir / "out")],
                out=str(tmp_path / "x"),
                config="tiny_debug",
                samples=2,
                hessian_samples=0,
            )
        )
    # deeper student
    deep = _tiny_checkpoint(tmp_path / "deep", num_layers=3)
    m = prepare(load_classifier(str(deep), 2), QuantConfig())
    save_student(m, tmp_path / "deep_student", QuantConfig())
    with pytest.raises(ConfigError, match="architecture differs .*num_hidden_layers: teacher 2, student 3"):
        analyze(opts(tmp_path / "deep_student"))
    # same architecture, another vocabulary
    other = make_tiny_checkpoint(tmp_path / "other", num_layers=N_LAYERS, num_heads=N_HEADS)
    from transformers import BertTokenizer

    words = (other / "vocab.txt").read_text().splitlines()
    (other / "vocab.txt").write_text("\n".join(words[:-3] + ["zzz", "yyy", "xxx"]) + "\n")
    tok = BertTokenizer(vocab=str(other / "vocab.txt"), do_lower_case=True)
    m = prepare(load_classifier(str(teacher), 2), QuantConfig())
    save_student(m, tmp_path / "other_student", QuantConfig(), tok)
    with pytest.raises(ConfigError, match="tokenizer does not match"):
        analyze(opts(tmp_path / "other_student"))
    # a task with no dev split
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\nthe plot was good,1\nthe plot was bad,0\n")
    with pytest.raises(ConfigError, match="no dev split"):
        analyze(opts(models_dir / "map", "data.task=custom", f"data.train_file={train}", "data.label_list=['0','1']"))
    # the CLI prints one line and exits 2
    rc, err = _cli(
        [
            "analyze",
            "--teacher",
            str(teacher),
            "--student",
            str(teacher),
            "--out",
            str(tmp_path / "y"),
            "--config",
            "tiny_debug",
        ],
        capsys,
    )
    assert rc == 2 and err.count("\n") == 1 and err.startswith("kdqat: error: --student")
    # a bad analysis value, as a flag or as a key: one line naming what the user typed
    base = [
        "analyze",
        "--teacher",
        str(teacher),
        "--student",
        str(models_dir / "map"),
        "--out",
        str(tmp_path / "y"),
        "--config",
        "tiny_debug",
    ]
    rc, err = _cli([*base, "--samples", "0"], capsys)
    assert rc == 2 and err == "kdqat: error: --samples (analysis.samples: got 0; must be >= 1)\n"
    rc, err = _cli([*base, "analysis.hessian_tol=0"], capsys)
    assert rc == 2 and err == "kdqat: error: analysis.hessian_tol: got 0.0; must be > 0\n"
    assert not (tmp_path / "y").exists()


def test_run_config_layers_recipe_overrides_and_options(tmp_path):
    from kdqat_dist.config import AnalysisConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  task: demo\nanalysis:\n  samples: 7\n  top_k: 4\n  hessian_iters: 9\n")
    opts = AnalyzeOptions(
        teacher="t",
        students=["s"],
        out="o",
        config=str(recipe),
        overrides=["analysis.top_k=2", "analysis.hessian_tol=1e-2"],
        hessian_iters=11,
        task="rte",
    )
    cfg = run_config(opts)
    a = cfg.analysis
    # recipe < key=value overrides < options (flags); the rest keeps the defaults
    assert (a.samples, a.top_k, a.hessian_iters, a.hessian_tol) == (7, 2, 11, 0.01)
    assert a.hessian_samples == AnalysisConfig().hessian_samples and cfg.data.task == "rte"
    with pytest.raises(ConfigError, match=r"^--hessian-tol \(analysis.hessian_tol: got -1.0; must be > 0\)$"):
        run_config(AnalyzeOptions(teacher="t", students=["s"], out="o", hessian_tol=-1.0))
