"""The integer form (quant/integer.py): codes and scales reproduce every quantizer's fake-quant output,
``convert`` keeps the student's logits, ``to_linear``/``to_embedding`` give float modules back, and a
converted student traces with ``torch.export``."""

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from kdqat_dist.config import ActQuantConfig, QuantConfig, QuantRule
from kdqat_dist.export.artifact import probe_batches
from kdqat_dist.quant.api import calibrate_activations, convert, is_converted, prepare
from kdqat_dist.quant.fake_quant import ActFakeQuant, QuantEmbedding, QuantLinear, WeightFakeQuant
from kdqat_dist.quant.integer import (
    QuantizedAct,
    QuantizedEmbedding,
    QuantizedInputLinear,
    QuantizedLinear,
    code_dtype,
)


def tiny_model(layers=2, seed=0, vocab=60):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    return BertForSequenceClassification(cfg).eval()


def _quant(**changes) -> QuantConfig:
    q = QuantConfig()
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(q, section), field, value)
    return q


# every weight method x granularity, and the three activation methods
CONFIGS = {
    "twn_sym": _quant(),
    "sym8_row_emb": _quant(embedding__method="sym", embedding__bits=8),
    "lsq_lsq": _quant(weight__method="lsq", weight__bits=4, act__method="lsq", attention__method="lsq"),
    "mean_clip_row": _quant(weight__method="mean_clip", weight__bits=4, weight__granularity="row"),
    "absmean_token": _quant(weight__method="absmean", weight__clip=None, act__method="absmax_token", act__clip=None),
    "seq2_row": _quant(weight__method="seq", weight__narrow_range=False, weight__granularity="row"),
}
_subln = QuantConfig()
_subln.weight.method, _subln.subln = "seq", True
CONFIGS["seq_ternary_subln"] = _subln
_rules = QuantConfig()
_rules.rules = [
    QuantRule(pattern=r"intermediate\.dense", weight_bits=8, weight_method="mean_clip"),  # 257 levels: int16
    QuantRule(pattern=r"output\.dense", weight_bits=8, weight_method="sym", weight_granularity="row"),
    QuantRule(pattern=r"pooler", quantize=False),
]
CONFIGS["rules_mixed"] = _rules


def _student(quant: QuantConfig, seed=0) -> nn.Module:
    model = prepare(tiny_model(seed=seed), quant)
    with torch.no_grad():  # learned steps/clips off their init, as training would leave them
        for m in model.modules():
            if isinstance(m, WeightFakeQuant) and hasattr(m, "step"):
                m.step.mul_(0.8)
    calibrate_activations(model, probe_batches(model.config)[0])
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_convert_keeps_the_logits_and_holds_integer_codes(name):
    quant = CONFIGS[name]
    student = _student(quant)
    converted = convert(copy.deepcopy(student))
    assert is_converted(converted) and not any(
        isinstance(m, (QuantLinear, QuantEmbedding, ActFakeQuant)) for m in converted.modules()
    )
    exact = name not in ("sym8_row_emb", "rules_mixed")  # max-abs weights: codes · (1/s) vs codes / s
    fq = dict(student.named_modules())
    for mod_name, m in converted.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            src = fq[mod_name]
            assert m.weight_codes.dtype == code_dtype(src.weight_quant.quantizer)
            assert m.weight_codes.dtype in (torch.int8, torch.int16)
            with torch.no_grad():
                target = src.weight_quant(src.weight)
            if exact:
                assert torch.equal(m.dequantized_weight(), target), mod_name
            else:
                torch.testing.assert_close(m.dequantized_weight(), target, rtol=2.5e-7, atol=0)
    for batch in probe_batches(student.config):
        with torch.no_grad():
            a, b = student(**batch).logits, converted(**batch).logits
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if name == "rules_mixed":
        inter = converted.bert.encoder.layer[0].intermediate.dense
        assert inter.weight_codes.dtype == torch.int16 and int(inter.weight_codes.abs().max()) <= 128
        assert type(converted.bert.pooler.dense) is nn.Linear


def test_activation_codes_and_scales_reproduce_each_method():
    """x̂ = q · scale for the three activation methods (sym and absmax_token divide in training: an ulp)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=g) * 2
    x[0, 0, 0] = -4.0  # beyond the 2.5 clip
    for cfg in (
        ActQuantConfig(method="sym"),
        ActQuantConfig(method="sym", clip=None, bits=4),
        ActQuantConfig(method="absmax_token", clip=None),
        ActQuantConfig(method="lsq"),
    ):
        aq = ActFakeQuant(cfg)
        with torch.no_grad():
            want = aq(x)  # LSQ: calibrated on this first call
        qa = QuantizedAct.from_fake_quant(aq)
        q, scale = qa.codes(x)
        lo, hi = qa.quantizer.code_range()
        assert torch.equal(q, q.round()) and lo <= int(q.min()) and int(q.max()) <= hi
        assert torch.equal(qa(x), want)  # the inference forward: training's numbers, bit for bit
        torch.testing.assert_close(q * scale, want, rtol=2.5e-7, atol=0)
        if cfg.method == "sym" and cfg.clip:
            assert int(q.min()) == -127 and float(scale) == pytest.approx(2.5 / 127, rel=1e-7)
    assert QuantizedAct.from_fake_quant(ActFakeQuant(ActQuantConfig(enabled=False))) is None


def test_to_linear_and_to_embedding_round_trip():
    student = _student(CONFIGS["twn_sym"])
    q = student.bert.encoder.layer[0].attention.self.query
    emb = student.bert.embeddings.word_embeddings
    with torch.no_grad():
        w_hat, e_hat = q.weight_quant(q.weight), emb.weight_quant(emb.weight)
    converted = convert(copy.deepcopy(student))
    lin = converted.bert.encoder.layer[0].attention.self.query.to_linear()
    table = converted.bert.embeddings.word_embeddings.to_embedding()
    assert type(lin) is nn.Linear and type(table) is nn.Embedding
    assert torch.equal(lin.weight, w_hat) and torch.equal(lin.bias, q.bias)
    assert torch.equal(table.weight, e_hat) and table.padding_idx == emb.padding_idx
    # the float module computes what the integer one does without its input quantizer
    x = torch.randn(2, 7, 32)
    qlin = converted.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        assert torch.equal(lin(x), nn.functional.linear(x, qlin.dequantized_weight(), qlin.bias))
        qlin.act_quant = None
        assert torch.equal(lin(x), qlin(x))
    # weights kept in full precision, inputs quantized: the Parameters stay, the input quantizer converts
    quant = QuantConfig()
    quant.weight.enabled = False
    model = prepare(tiny_model(), quant)
    weight = model.bert.pooler.dense.weight
    convert(model)
    pooler = model.bert.pooler.dense
    assert isinstance(pooler, QuantizedInputLinear) and pooler.weight is weight
    assert pooler.to_linear().weight is weight and isinstance(pooler.act_quant, QuantizedAct)


def test_torch_export_of_a_converted_student():
    """No Python branch on tensor data on the inference path: torch.export traces the converted student,
    with dynamic batch and sequence sizes (issue #36 item 4)."""
    student = _student(CONFIGS["twn_sym"])
    converted = convert(copy.deepcopy(student))
    batches = probe_batches(student.config)
    ex = batches[0]
    batch_dim, seq_dim = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=38)
    dims = {"input_ids": {0: batch_dim, 1: seq_dim}, "attention_mask": {0: batch_dim, 1: seq_dim}}
    program = torch.export.export(converted, (), dict(ex), dynamic_shapes=dims)
    run = program.module()
    for batch in batches:  # other sizes than the traced one
        with torch.no_grad():
            assert torch.equal(run(**batch).logits, student(**batch).logits)
