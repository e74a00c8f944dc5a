"""quant.subln: BitNet's SubLN in front of the attention output and FFN down projections, inserted by
prepare, trained, saved and loaded with the student (kdqat and Hugging Face paths) and exported."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

import kdqat_dist  # noqa: F401  (registers quant_method "kdqat" with transformers)
from kdqat_dist.config import QuantConfig, TrainConfig
from kdqat_dist.engine.optim import param_groups
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.subln import SubLNLinear, insert_subln
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant.api import calibrate_activations, prepare
from kdqat_dist.quant.fake_quant import QuantLinear
from kdqat_dist.quant.student import load_student, save_student

TEXTS = ["the film was great", "a dull , boring film and bad acting", "not bad at all"]


def _quant(**weight) -> QuantConfig:
    q = QuantConfig(subln=True)
    for k, v in weight.items():
        setattr(q.weight, k, v)
    q.act.method, q.act.clip = "absmax_token", None
    return q


@pytest.fixture()
def base(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "base")
    tok = load_tokenizer(str(path))
    return path, dict(tok(TEXTS, padding=True, return_tensors="pt")), tok


def test_prepare_wraps_the_two_projections_and_computes_linear_of_layernorm(base):
    path, batch, _ = base
    plain = load_classifier(str(path), 2).eval()
    model = copy.deepcopy(plain)
    w_down = model.bert.encoder.layer[0].output.dense.weight
    prepare(model, _quant(method="absmean", clip=None))
    for layer in model.bert.encoder.layer:
        for dense in (layer.attention.output.dense, layer.output.dense):
            assert isinstance(dense, SubLNLinear) and isinstance(dense.linear, QuantLinear)
            assert torch.equal(dense.LayerNorm.weight, torch.ones(dense.linear.in_features))
            assert dense.LayerNorm.eps == layer.output.LayerNorm.eps
            x = torch.randn(2, 5, dense.linear.in_features)
            ref = dense.linear(F.layer_norm(x, (x.shape[-1],), eps=dense.LayerNorm.eps))
            assert torch.equal(dense(x), ref)
        assert isinstance(layer.intermediate.dense, QuantLinear)  # only the two projections
    assert insert_subln(model) == 0  # idempotent, and prepare again changes nothing
    assert prepare(model, _quant(method="absmean", clip=None)) is model
    assert sum(isinstance(m, SubLNLinear) for m in model.modules()) == 2 * len(model.bert.encoder.layer)
    # the parameters of the original projections are the same objects; the new norms are not decayed
    assert model.bert.encoder.layer[0].output.dense.linear.weight is w_down
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {
        names[id(p)] for g in param_groups(model, TrainConfig()) if g["name"] == "no_decay" for p in g["params"]
    }
    assert "bert.encoder.layer.0.output.dense.LayerNorm.weight" in no_decay
    # a fresh LayerNorm is not the identity: the prepared model's output changes before training
    unquantized = prepare(copy.deepcopy(plain), QuantConfig(enabled=True, subln=True))
    from kdqat_dist.quant.api import set_quant_enabled

    set_quant_enabled(unquantized, False)
    with torch.no_grad():
        assert not torch.allclose(unquantized(**batch).logits, plain(**batch).logits, atol=1e-4)


@pytest.mark.parametrize(
    "weight", [dict(method="absmean", clip=None), dict(method="seq", bits=2, granularity="row")], ids=["absmean", "seq"]
)
def test_student_with_subln_saves_and_loads_on_both_paths(base, tmp_path, weight):
    path, batch, tok = base
    quant = _quant(**weight)
    model = prepare(load_classifier(str(path), 2), quant)
    calibrate_activations(model, batch)
    with torch.no_grad():  # move the SubLN parameters (and SEQ's clips) off their fresh values, as training does
        for name, p in model.named_parameters():
            if ".dense.LayerNorm." in name or name.endswith(".step"):
                p.add_(torch.rand_like(p) * 0.3)
    model.eval()
    folder = save_student(model, tmp_path / "student", quant, tok)
    ours = load_student(folder)
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert isinstance(hf.bert.encoder.layer[0].output.dense, SubLNLinear)
    with torch.no_grad():
        want = model(**batch).logits
        assert torch.equal(ours(**batch).logits, want) and torch.equal(hf(**batch).logits, want)
    for (n, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(model.state_dict().items()), strict=True):
        assert torch.equal(a, b), n


def test_subln_student_exports_and_reloads_identically(base, tmp_path):
    from kdqat_dist.export import export_model, load
    from kdqat_dist.export.artifact import logits_of, probe_batch

    path, _, _ = base
    quant = _quant(method="absmean", clip=None)
    model = prepare(load_classifier(str(path), 2), quant).eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.LayerNorm.bias.add_(0.1)
    export_model(model, quant, tmp_path / "e")
    b = probe_batch(model.config)
    assert torch.equal(logits_of(model, b), logits_of(load(tmp_path / "e"), b))
