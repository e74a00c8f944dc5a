"""The streaming KD objective equals the naive computation; gradients reach the student only."""

import copy
import dataclasses
import itertools

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdqat_dist.config import DistillConfig, LossTerm, QuantConfig
from kdqat_dist.distill import losses as L
from kdqat_dist.distill.objective import DistillObjective
from kdqat_dist.distill.terms import TERMS as DECLARED
from kdqat_dist.distill.terms import effective_weights
from kdqat_dist.models.attention import use_kdqat_attention
from kdqat_dist.quant.api import prepare

TERMS = ["logits", "hidden", "attn_score", "attn_map", "attn_output", "context", "sa_output", "ground_truth"]


def make_pair(layers=2, student_layers=None, lsq=False):
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    teacher = BertForSequenceClassification(cfg).eval()
    student = copy.deepcopy(teacher)
    if student_layers is not None:
        student.bert.encoder.layer = torch.nn.ModuleList(student.bert.encoder.layer[:student_layers])
        student.config.num_hidden_layers = student_layers
    q = QuantConfig()
    if lsq:
        q.weight.method, q.weight.bits = "lsq", 4
    prepare(student, q)
    use_kdqat_attention(teacher)
    teacher.requires_grad_(False)
    # Dropout off so that two forwards of the student are identical (the comparison needs it).
    student.eval()
    return student, teacher


def batch():
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    return {
        "input_ids": torch.randint(1, 50, (4, 10), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.zeros(4, 10, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0]),
    }


def cfg_with(active):
    d = DistillConfig()
    for t in TERMS:
        setattr(d, t, LossTerm(1.0 if t in active else 0.0))
    return d


@pytest.mark.parametrize(
    "active",
    [
        *[(t,) for t in TERMS],
        ("logits", "hidden", "attn_map", "attn_output"),
        ("logits", "hidden", "attn_score"),
        tuple(TERMS),
    ],
)
def test_streaming_equals_naive(active):
    student, teacher = make_pair()
    obj = DistillObjective.for_models(cfg_with(active), student, teacher)
    b = batch()
    s = obj(student, teacher, b)
    n = obj.naive(student, teacher, b)
    assert set(s.terms) == set(active)
    for k in active:
        torch.testing.assert_close(s.terms[k], n.terms[k], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.total, n.total, rtol=1e-6, atol=1e-6)


def test_every_combination_of_tap_terms_matches_naive():
    student, teacher = make_pair()
    b = batch()
    tap_terms = [t.name for t in DECLARED if t.tap is not None]
    for r in (2, 3):
        for combo in itertools.combinations(tap_terms, r):
            obj = DistillObjective.for_models(cfg_with(combo), student, teacher)
            torch.testing.assert_close(
                obj(student, teacher, b).total, obj.naive(student, teacher, b).total, rtol=1e-6, atol=1e-6
            )


def test_naive_matches_hf_outputs_for_hidden_and_attention():
    """The naive path itself agrees with transformers' own output_hidden_states/output_attentions."""
    student, teacher = make_pair()
    b = batch()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    obj = DistillObjective.for_models(cfg_with(("hidden", "attn_map")), student, teacher)
    with torch.no_grad():
        so = student(**inputs, output_hidden_states=True, output_attentions=True)
        to = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    w = L.token_weights(b["attention_mask"], so.hidden_states[0])  # distill.mse_tokens=valid, the default
    hidden = sum(L.hidden_mse(a, c, w) for a, c in zip(so.hidden_states, to.hidden_states, strict=True))
    amap = sum(L.attention_map_kl(a, c, b["attention_mask"]) for a, c in zip(so.attentions, to.attentions, strict=True))
    out = obj(student, teacher, b)
    torch.testing.assert_close(out.terms["hidden"], hidden, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.terms["attn_map"], amap, rtol=1e-6, atol=1e-7)


def test_zero_weight_taps_nothing():
    student, teacher = make_pair()
    obj = DistillObjective.for_models(cfg_with(("logits",)), student, teacher)
    assert obj.student_taps() == {} and obj.teacher_taps() == {}
    obj = DistillObjective.for_models(cfg_with(("attn_map",)), student, teacher)
    # the map term also keeps the teacher's attention-block calls, to recompute its map in the backward,
    # except in the last layer (its map is kept: that layer's backward runs at the step's memory peak)
    assert obj.teacher_taps() == {"probs": {0, 1}, "attention_call": {0}}
    keep = cfg_with(("attn_map",))
    keep.recompute_teacher = False
    obj = DistillObjective.for_models(keep, student, teacher)
    assert obj.teacher_taps() == {"probs": {0, 1}, "map_inputs": {0, 1}}  # or its Q and K
    obj = DistillObjective.for_models(cfg_with(("hidden", "attn_output")), student, teacher)
    # student: the embedding output as a tensor, the LayerNorm outputs as recomputable NormTaps
    assert obj.student_taps() == {"hidden": {0}, "hidden_norm": {1, 2}, "attn_output_norm": {0, 1}}


@pytest.mark.parametrize(
    "layer_map, calls",
    [
        ([1, 0], {1}),  # the top student layer learns from teacher layer 0: that one is kept
        ([1, 1], {1}),  # teacher layer 1 serves both student layers: kept, it would outlive the top layer's backward
        ([0, 1], {0}),
    ],
)
def test_the_kept_teacher_layer_is_the_one_the_backward_reaches_first(layer_map, calls):
    student, teacher = make_pair()
    cfg = cfg_with(("attn_map", "attn_output"))
    cfg.layer_map = layer_map
    obj = DistillObjective.for_models(cfg, student, teacher)
    assert obj.teacher_taps()["attention_call"] == calls
    out, naive = obj(student, teacher, batch()), obj.naive(student, teacher, batch())
    torch.testing.assert_close(out.total, naive.total, rtol=1e-6, atol=1e-7)


def test_teacher_taps_are_consumed_as_produced(monkeypatch):
    """Streaming: each layer's terms are computed while the teacher runs that layer, before the next."""
    import kdqat_dist.distill.kernels as kernels_mod
    import kdqat_dist.distill.losses as losses_mod

    student, teacher = make_pair()
    obj = DistillObjective.for_models(cfg_with(("hidden", "attn_map", "attn_output")), student, teacher)
    seen = []
    for mod, name, label in (
        (losses_mod, "mse", "mse"),
        (losses_mod, "attention_map_kl", "attention_map_kl"),
        (kernels_mod, "attention_map_kl_recomputed", "attention_map_kl"),  # the map term with its recompute
    ):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=label, **k: seen.append(_n) or _o(*a, **k))
    for i, layer in enumerate(teacher.bert.encoder.layer):
        layer.register_forward_pre_hook(lambda *_a, _i=i: seen.append(f"teacher layer {_i}"))
    obj(student, teacher, batch())
    # embeddings, then per layer: probs -> attention output -> layer output
    assert seen == [
        "mse",
        "teacher layer 0",
        "attention_map_kl",
        "mse",
        "mse",
        "teacher layer 1",
        "attention_map_kl",
        "mse",
        "mse",
    ]


def test_gradients_reach_student_weights_and_steps_never_teacher():
    student, teacher = make_pair(lsq=True)
    student.train()
    obj = DistillObjective.for_models(cfg_with(TERMS), student, teacher)
    out = obj(student, teacher, batch())
    out.total.backward()
    q = student.bert.encoder.layer[0].attention.self.query
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    assert q.weight_quant.step.grad is not None and q.weight_quant.step.grad.abs() > 0
    assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_unified_gamma_and_per_layer_contributions():
    d = DistillConfig(gamma=0.3)
    w = effective_weights(d)
    assert w["attn_map"] == 0.3 and abs(w["attn_output"] - 0.7) < 1e-12
    student, teacher = make_pair()
    obj = DistillObjective.for_models(d, student, teacher)
    out = obj(student, teacher, batch())
    expected = sum(w[k] * v for k, v in out.terms.items())
    torch.testing.assert_close(out.total, expected)
    assert set(out.per_layer["attn_map"]) == {0, 1}
    torch.testing.assert_close(sum(out.per_layer["attn_output"].values()), out.terms["attn_output"])


def test_shallower_student_uniform_layer_map():
    student, teacher = make_pair(layers=4, student_layers=2)
    d = cfg_with(("hidden", "attn_map"))
    d.layer_map = "uniform"
    obj = DistillObjective.for_models(d, student, teacher)
    assert obj.teacher_taps() == {"hidden": {0, 2, 4}, "probs": {1, 3}, "attention_call": {1}}
    b = batch()
    torch.testing.assert_close(obj(student, teacher, b).total, obj.naive(student, teacher, b).total)


@pytest.mark.parametrize(
    "active",
    [("hidden",), ("attn_output",), ("context",), ("sa_output",), ("logits", "hidden", "attn_map", "attn_output")],
)
@pytest.mark.parametrize("recompute", [True, False])
def test_valid_token_mse_streaming_equals_naive_and_its_formula(active, recompute):
    b = batch()
    grads, totals = [], []
    for path in ("stream", "naive"):
        student, teacher = make_pair(layers=3)
        d = cfg_with(active)
        d.mse_tokens = "valid"
        d.recompute_teacher = recompute
        obj = DistillObjective.for_models(d, student, teacher)
        out = obj(student, teacher, b) if path == "stream" else obj.naive(student, teacher, b)
        (out.total * 3.0).backward()
        totals.append({k: v.detach() for k, v in out.terms.items()})
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    for k in totals[0]:
        torch.testing.assert_close(totals[0][k], totals[1][k], rtol=1e-6, atol=1e-7)
    for n in grads[0]:
        scale = float(grads[1][n].abs().max())
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6 * scale + 1e-9, msg=n)
    # and the masked value differs from the all-positions one (the batch has padding)
    student, teacher = make_pair(layers=3)
    d_all = cfg_with(active)
    d_all.mse_tokens = "all"
    plain = DistillObjective.for_models(d_all, student, teacher).naive(student, teacher, b)
    term = next(t for t in active if t != "logits")
    assert float(plain.terms[term].detach()) != pytest.approx(float(totals[0][term]), rel=1e-3)


def test_soft_ce_over_batch_and_classes_is_kdlsqs_mean():
    student, teacher = make_pair()
    b = batch()
    d = cfg_with(("logits",))
    plain = DistillObjective.for_models(d, student, teacher)(student, teacher, b).terms["logits"]
    d.soft_ce_reduction = "batch_classes"
    out = DistillObjective.for_models(d, student, teacher)(student, teacher, b)
    s_logits, t_logits = out.student_logits.detach(), out.teacher_logits
    naive = (-(t_logits.softmax(-1) * s_logits.log_softmax(-1))).mean()  # KDLSQ: .mean() over B x C
    torch.testing.assert_close(out.terms["logits"].detach(), naive)
    torch.testing.assert_close(out.terms["logits"].detach(), plain.detach() / 2)


def test_token_weighted_mse_is_the_mean_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, generator=g, requires_grad=True), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    got = L.mse(s, t, L.token_weights(mask, s))
    naive = sum(((s[b, i] - t[b, i]) ** 2).sum() for b in range(3) for i in range(5) if mask[b, i]) / (8 * 4)
    torch.testing.assert_close(got, naive)
    (g1,) = torch.autograd.grad(got, s)
    (g2,) = torch.autograd.grad(naive, s)
    torch.testing.assert_close(g1, g2)
    assert float(g1[1, 3].abs().sum()) == 0.0  # padded positions get no gradient
    # per-head context [B, H, S, d]: the same mean over real tokens
    c_s, c_t = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    naive_c = sum(((c_s[b, :, i] - c_t[b, :, i]) ** 2).sum() for b in range(3) for i in range(5) if mask[b, i])
    torch.testing.assert_close(L.mse(c_s, c_t, L.token_weights(mask, c_s)), naive_c / (8 * 2 * 4))


@pytest.mark.parametrize(
    "active,layer_map,lsq,recompute",
    [
        (("hidden",), "identity", False, True),  # nothing but the term reaches the top layer: its gradient must
        (("attn_output",), "identity", False, True),
        (("attn_map",), "identity", False, True),
        (("logits", "hidden", "attn_map", "attn_output"), "identity", True, True),
        (("logits", "hidden", "attn_map", "attn_output"), "identity", True, False),  # as for a ZeRO-3 teacher
        (tuple(TERMS), "identity", False, True),
        (tuple(TERMS), "identity", False, False),
        (("hidden", "attn_map", "attn_output"), "uniform", False, True),
    ],
)
def test_streaming_gradients_equal_naive(active, layer_map, lsq, recompute):
    # Streaming recomputes the student's LayerNorm outputs and the teacher's attention blocks in the
    # backward; the naive path keeps every tensor. The student must get the same gradients.
    b = batch()
    grads = []
    for path in ("stream", "naive"):
        student, teacher = make_pair(layers=4, student_layers=2 if layer_map == "uniform" else None, lsq=lsq)
        d = cfg_with(active)
        d.layer_map = layer_map
        d.recompute_teacher = recompute
        obj = DistillObjective.for_models(d, student, teacher)
        out = obj(student, teacher, b) if path == "stream" else obj.naive(student, teacher, b)
        (out.total * 3.0).backward()  # a scale that is not 1, as loss scaling or accumulation gives
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:  # float32 sums in another order: close to the size of the gradient, not exactly equal
        scale = float(grads[1][n].abs().max())
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6 * scale + 1e-9, msg=n)


def test_each_teacher_block_is_called_once_more_in_the_backward(monkeypatch):
    from kdqat_dist.models.taps import AttentionCall

    calls = []
    orig = AttentionCall.run
    monkeypatch.setattr(
        AttentionCall, "run", lambda self, with_map=False: calls.append((self.layer, with_map)) or orig(self, with_map)
    )
    student, teacher = make_pair()
    obj = DistillObjective.for_models(cfg_with(("hidden", "attn_map", "attn_output")), student, teacher)
    out = obj(student, teacher, batch())
    assert calls == []
    out.total.backward()
    # not the top layer (its map and block output are kept); one call per layer, whose map the map term
    # of the same layer takes
    assert calls == [(0, True)]


def test_recomputed_teacher_block_equals_its_taps_exactly():
    from kdqat_dist.models.taps import TapStore, tapped

    _, teacher = make_pair()
    store = TapStore()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad(), tapped(teacher, {"probs": {0, 1}, "attn_output": {0, 1}, "attention_call": {0, 1}}, store):
        teacher(**inputs)
    for layer in (0, 1):
        out, map_inputs, probs = store["attention_call"][layer].run(with_map=True)
        assert torch.equal(out, store["attn_output"][layer])
        assert torch.equal(map_inputs.probs(), store["probs"][layer])
        assert torch.equal(probs, store["probs"][layer])


def test_student_layernorm_outputs_are_not_kept_for_the_teacher_or_the_backward():
    # The hidden and attention-output terms recompute them from the LayerNorms' inputs (which autograd keeps
    # for the LayerNorm's backward anyway), so none is alive once the next layer has used it.
    import gc
    import weakref

    student, teacher = make_pair()
    obj = DistillObjective.for_models(cfg_with(("hidden", "attn_output")), student, teacher)
    refs, alive_when_teacher_starts = [], []
    layer0 = student.bert.encoder.layer[0]
    for m in (layer0.attention.output.LayerNorm, layer0.output.LayerNorm):
        m.register_forward_hook(lambda _m, _i, o: refs.append(weakref.ref(o)))

    def check(*_):
        gc.collect()
        alive_when_teacher_starts.extend(r() is not None for r in refs)

    teacher.bert.embeddings.register_forward_pre_hook(check)
    out = obj(student, teacher, batch())
    assert alive_when_teacher_starts == [False, False]
    out.total.backward()
    assert layer0.output.LayerNorm.weight.grad.abs().sum() > 0


def test_map_inputs_recompute_the_probs_tap_exactly():
    from kdqat_dist.models.taps import TapStore, tapped

    _, teacher = make_pair()
    store = TapStore()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad(), tapped(teacher, {"probs": {0, 1}, "map_inputs": {0, 1}}, store):
        teacher(**inputs)
    for layer in (0, 1):
        assert torch.equal(store["map_inputs"][layer].probs(), store["probs"][layer])


def test_what_the_backward_keeps_is_freed_by_it_even_while_the_loss_is_kept(monkeypatch):
    # Kept on ctx instead of saved, tensors would live as long as the graph's root: a whole extra step in a
    # loop that keeps `loss` until it is reassigned. The teacher's block inputs (its hidden states) are
    # what this objective keeps for the backward.
    import gc
    import weakref

    import kdqat_dist.distill.objective as objective_mod

    refs = []
    orig = objective_mod._TeacherBlock.__init__

    def spy(self, call, uses, map_uses):
        refs.append(weakref.ref(call.args[0]))
        orig(self, call, uses, map_uses)

    monkeypatch.setattr(objective_mod._TeacherBlock, "__init__", spy)
    orig_tapped = objective_mod.tapped

    def tapped_spy(model, wanted, sink):  # the kept (top) layer's map and block output
        def spying(layer, name, t):
            if layer == 1 and name in ("probs", "attn_output"):
                refs.append(weakref.ref(t))
            sink(layer, name, t)

        return orig_tapped(model, wanted, spying if not torch.is_grad_enabled() else sink)

    monkeypatch.setattr(objective_mod, "tapped", tapped_spy)
    student, teacher = make_pair()
    obj = DistillObjective.for_models(cfg_with(("hidden", "attn_map", "attn_output")), student, teacher)
    out = obj(student, teacher, batch())
    gc.collect()
    assert len(refs) == 3 and all(r() is not None for r in refs)  # kept for the backward
    out.total.backward()
    gc.collect()
    assert all(r() is None for r in refs)
    assert out.total.grad_fn is not None  # the graph's root is still alive


def test_streaming_fails_loudly_on_a_torch_without_the_private_sequence_setter():
    from types import SimpleNamespace

    from kdqat_dist.distill.objective import _run_backward_at

    node = SimpleNamespace(grad_fn=object())  # a grad_fn without Node._set_sequence_nr
    with pytest.raises(RuntimeError, match=r"Node._set_sequence_nr \(written for torch 2.13\)"):
        _run_backward_at(node, node)


# ---- attention-relation KD (distill.attn_relation)


def relation_cfg(layers="last", relations=("qq", "kk", "vv"), heads=None, **extra):
    from kdqat_dist.config import RelationTerm

    d = cfg_with(extra.pop("active", ()))
    d.attn_relation = RelationTerm(1.0, relations=list(relations), relation_heads=heads, layers=layers)
    return d


@pytest.mark.parametrize("layers,expected", [("last", {2}), ("all", {0, 1, 2}), ([0, 2], {0, 2})])
@pytest.mark.parametrize("recompute", [True, False])
def test_relation_term_streaming_equals_naive_values_and_gradients(layers, expected, recompute):
    b = batch()
    results = []
    for path in ("stream", "naive"):
        student, teacher = make_pair(layers=3, lsq=True)
        d = relation_cfg(layers, heads=4, active=("logits", "attn_map", "attn_output"))
        d.recompute_teacher = recompute
        obj = DistillObjective.for_models(d, student, teacher)
        assert obj.student_taps()["qkv"] == expected and obj.teacher_taps()["qkv"] == expected
        out = obj(student, teacher, b) if path == "stream" else obj.naive(student, teacher, b)
        (out.total * 3.0).backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (s, gs), (n, gn) = results
    assert set(s.per_layer["attn_relation"]) == expected and float(s.terms["attn_relation"].detach()) > 0
    for k in s.terms:
        torch.testing.assert_close(s.terms[k], n.terms[k], rtol=1e-6, atol=1e-7)
    assert gs.keys() == gn.keys()
    for name in gs:
        scale = float(gn[name].abs().max())
        torch.testing.assert_close(gs[name], gn[name], rtol=1e-5, atol=1e-6 * scale + 1e-9, msg=name)


def test_relation_term_is_the_loss_of_the_projections_for_models_of_different_widths():
    """Teacher 48 wide with 4 heads, student 32 wide with 2: the term equals attention_relation_kl on the
    query/key/value Linear outputs of the last layers, summed over the relations."""
    torch.manual_seed(1)
    models = []
    for hidden, heads in ((32, 2), (48, 4)):
        cfg = BertConfig(
            vocab_size=50,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=heads,
            intermediate_size=64,
            max_position_embeddings=32,
            attn_implementation="eager",
        )
        m = BertForSequenceClassification(cfg).eval()
        use_kdqat_attention(m)
        models.append(m)
    student, teacher = models
    teacher.requires_grad_(False)
    b = batch()
    for rel_heads, relations in ((4, ("qq", "kk", "vv")), (8, ("vv",)), (None, ("qq", "kk"))):
        d = relation_cfg("last", relations, rel_heads, active=("logits",))
        obj = DistillObjective.for_models(d, student, teacher)
        got = obj(student, teacher, b).terms["attn_relation"]
        proj = {}
        for name, model in (("s", student), ("t", teacher)):
            attn = model.bert.encoder.layer[-1].attention.self
            hooks = [
                getattr(attn, p).register_forward_hook(
                    lambda _m, _i, o, key=(name, p[0] * 2), out=proj: out.__setitem__(key, o)
                )
                for p in ("query", "key", "value")
            ]
            with torch.no_grad():
                model(**{k: v for k, v in b.items() if k != "labels"})
            for h in hooks:
                h.remove()
        want = sum(
            L.attention_relation_kl(proj[("s", r)], proj[("t", r)], b["attention_mask"], rel_heads or 2)
            for r in relations
        )
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


def test_relation_layers_are_checked_against_the_student():
    student, teacher = make_pair(layers=2)
    with pytest.raises(ValueError, match=r"distill.attn_relation.layers: student layers \[5\] do not exist"):
        DistillObjective.for_models(relation_cfg([5]), student, teacher)
    from kdqat_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="distill.attn_relation.relations"):
        load_config(None, ["distill.attn_relation.weight=1", "distill.attn_relation.relations=[]"])
    with pytest.raises(ConfigError, match=r"distill.attn_relation.relations\[0\]: got 'qk'"):
        load_config(None, ["distill.attn_relation.relations=[qk]"])
    cfg = load_config(None, ["distill.attn_relation.weight=2", "distill.attn_relation.layers=[0,1]"])
    assert cfg.distill.attn_relation.layers == [0, 1] and effective_weights(cfg.distill)["attn_relation"] == 2


# ---- the term declarations (distill/terms.py)


def test_the_declared_terms_are_the_config_weights_and_no_kd_switches_every_teacher_term_off():
    from kdqat_dist.config import load_config, loss_terms
    from kdqat_dist.distill.terms import KD_TERMS, Plan
    from kdqat_dist.pipeline import NO_KD

    assert [t.name for t in DECLARED] == list(loss_terms(DistillConfig()))
    on = [f"distill.{t}.weight=1" for t in ("context", "sa_output", "attn_relation")]
    cfg = load_config(None, [*on, "distill.gamma=0.5", *NO_KD])
    assert set(KD_TERMS) == set(loss_terms(cfg.distill)) - {"ground_truth"}
    plan = Plan(cfg.distill, 2, 2)
    assert list(plan.active) == ["ground_truth"] and not plan.needs_teacher


@dataclasses.dataclass
class WithL1(DistillConfig):
    """The made-up term's weight: distill.hidden_l1.weight."""

    hidden_l1: LossTerm = dataclasses.field(default_factory=lambda: LossTerm(1.0))


def hidden_l1(plan, s, t, mask):
    """The made-up term's loss: mean |s - t| over the real tokens of one hidden state [B, S, D]."""
    m = mask.bool()
    return (s - t)[m].abs().mean()


def test_a_new_term_is_one_declaration_and_its_loss_and_trains_through_both_executors():
    from kdqat_dist.config import loss_terms
    from kdqat_dist.distill.terms import Term, hidden_pairs

    # it reads the hidden tap, which the hidden term reads too (at the LayerNorm outputs in the streaming form)
    terms = (*DECLARED, Term("hidden_l1", "hidden", hidden_l1, pairs=hidden_pairs))
    d = WithL1(hidden=LossTerm(1.0), attn_map=LossTerm(1.0), attn_output=LossTerm(0.0))
    assert loss_terms(d)["hidden_l1"] == 1.0
    b, runs = batch(), []
    for path in ("stream", "naive"):
        student, teacher = make_pair(layers=2)
        obj = DistillObjective.for_models(d, student, teacher, terms=terms)
        opt = torch.optim.SGD(student.parameters(), lr=1e-3)
        losses = []
        for _ in range(2):
            out = obj(student, teacher, b) if path == "stream" else obj.naive(student, teacher, b)
            opt.zero_grad()
            out.total.backward()
            opt.step()
            losses.append({"total": float(out.total.detach()), **{k: float(v.detach()) for k, v in out.terms.items()}})
        runs.append((losses, out))
    (stream, s_out), (naive, n_out) = runs
    assert set(s_out.per_layer["hidden_l1"]) == {0, 1, 2}
    for a, c in zip(stream, naive, strict=True):
        assert a.keys() == c.keys() == {"total", "logits", "hidden", "attn_map", "hidden_l1"}
        assert a == pytest.approx(c, rel=1e-5)
    assert stream[-1]["total"] < stream[0]["total"]
    want = sum(hidden_l1(None, x, y, b["attention_mask"]) for x, y in zip(*_hidden_states(b), strict=True))
    assert stream[0]["hidden_l1"] == pytest.approx(float(want), rel=1e-6)


def _hidden_states(b):
    student, teacher = make_pair(layers=2)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        return tuple(m(**inputs, output_hidden_states=True).hidden_states for m in (student, teacher))


def test_token_logits_with_a_validity_mask_average_over_the_valid_positions():
    """The logit terms read what the head gives: here [B, S, C] token logits and the real tokens as rows."""
    from transformers import BertForTokenClassification

    from kdqat_dist.data.heads import HeadOutput

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    teacher = BertForTokenClassification(cfg).eval()
    teacher.classifier.weight.data.mul_(30)  # confident, position-dependent predictions
    student = copy.deepcopy(teacher)
    prepare(student, QuantConfig())
    for m in (student, teacher):
        use_kdqat_attention(m)
    teacher.requires_grad_(False)
    b = batch()
    b["labels"] = torch.randint(0, 3, (4, 10), generator=torch.Generator().manual_seed(1))
    head = lambda out, batch: HeadOutput(out.logits, batch["labels"], batch["attention_mask"].bool())  # noqa: E731
    obj = DistillObjective.for_models(cfg_with(("logits", "ground_truth", "hidden")), student, teacher, head=head)
    out, naive = obj(student, teacher, b), obj.naive(student, teacher, b)
    real = b["attention_mask"].bool()
    zs, zt = out.student_logits.detach(), out.teacher_logits
    soft_ce = -(zt.softmax(-1) * zs.log_softmax(-1)).sum(-1)  # [B, S]
    torch.testing.assert_close(out.terms["logits"].detach(), soft_ce[real].mean())
    ce = torch.nn.functional.cross_entropy(zs[real], b["labels"][real])
    torch.testing.assert_close(out.terms["ground_truth"].detach(), ce)
    assert float(out.terms["logits"].detach()) != pytest.approx(float(soft_ce.mean()), rel=1e-3)  # padding left out
    torch.testing.assert_close(out.total, naive.total)


def test_any_depth_is_tapped_and_models_of_another_depth_are_refused():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=66, num_attention_heads=2, intermediate_size=8
    )  # the plain path once tapped 64 layers at most
    teacher = BertForSequenceClassification(cfg).eval().requires_grad_(False)
    use_kdqat_attention(teacher)
    student = copy.deepcopy(teacher).requires_grad_(True)
    for p in student.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    obj = DistillObjective.for_models(cfg_with(("hidden", "attn_map")), student, teacher)
    out, naive = obj(student, teacher, batch()), obj.naive(student, teacher, batch())
    assert set(naive.per_layer["hidden"]) == set(range(67)) and set(naive.per_layer["attn_map"]) == set(range(66))
    torch.testing.assert_close(out.total, naive.total)
    small_student, small_teacher = make_pair(layers=2)
    for run in (obj, obj.naive):
        with pytest.raises(ValueError, match=r"built for a 66-layer student and a 66-layer teacher, not for these \(2"):
            run(small_student, small_teacher, batch())
