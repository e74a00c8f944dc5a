"""A saved student is a Hugging Face model that knows it is quantized (config.json's quantization_config):
with kdqat_dist imported, AutoModelForSequenceClassification.from_pretrained returns the quantized student."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import kdqat_dist  # noqa: F401  (registers quant_method "kdqat" with transformers)
from kdqat_dist.config import QuantConfig, QuantRule
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant.api import calibrate_activations, prepare
from kdqat_dist.quant.fake_quant import QuantLinear
from kdqat_dist.quant.student import load_student, save_student

TEXTS = ["the film was great", "a dull , boring film and bad acting", "not bad at all"]


def _student(tmp_path, quant: QuantConfig):
    base = make_tiny_checkpoint(tmp_path / "base")
    tok = load_tokenizer(str(base))
    model = load_classifier(str(base), 2)
    prepare(model, quant)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    calibrate_activations(model, batch)
    with torch.no_grad():  # move the learned steps off their initial values, as training does
        for name, p in model.named_parameters():
            if name.endswith(".step"):
                p.mul_(1.3)
    save_student(model, tmp_path / "student", quant, tok)
    return tmp_path / "student", batch


def _lsq_rules() -> QuantConfig:
    q = QuantConfig()
    q.weight.method, q.weight.bits, q.act.method = "lsq", 4, "lsq"
    q.rules = [QuantRule(pattern=r"intermediate\.dense$", weight_bits=8, weight_method="sym")]
    return q


@pytest.mark.parametrize("quant", [QuantConfig(), _lsq_rules()], ids=["twn", "lsq_rules"])
def test_from_pretrained_returns_the_quantized_student(tmp_path, quant):
    folder, batch = _student(tmp_path, quant)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "kdqat" and cfg["quant"]["weight"]["method"] == quant.weight.method
    assert cfg["quant"]["rules"] == [r.__dict__ for r in quant.rules]
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ours = load_student(folder)
    assert isinstance(hf.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert hf.is_quantized and hf.config.quantization_config.quant_method == "kdqat"
    with torch.no_grad():
        assert torch.equal(hf(**batch).logits, ours(**batch).logits)
        plain = load_classifier(str(tmp_path / "base"), 2).eval()
        assert not torch.allclose(hf(**batch).logits, plain(**batch).logits)  # really quantized
    for (n, a), (_, b) in zip(sorted(hf.state_dict().items()), sorted(ours.state_dict().items()), strict=True):
        assert torch.equal(a, b), n


def test_a_folder_saved_before_quantization_config_still_loads_through_kdqat(tmp_path):
    folder, batch = _student(tmp_path, QuantConfig())
    ref = load_student(folder)
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["quantization_config"]
    (old / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        assert torch.equal(load_student(old)(**batch).logits, ref(**batch).logits)


def test_import_kdqat_dist_is_light_and_registers_before_from_pretrained(tmp_path):
    """`import kdqat_dist` imports neither torch nor transformers (kdqat --version stays fast); the method is
    registered when transformers' quantizers load, so from_pretrained still returns the student."""
    folder, _ = _student(tmp_path, QuantConfig())
    code = """
import sys
import kdqat_dist
assert "torch" not in sys.modules and "transformers" not in sys.modules, "import kdqat_dist is not light"
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from kdqat_dist.quant.student import load_student
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
batch = dict(AutoTokenizer.from_pretrained(sys.argv[1])(["not bad at all"], return_tensors="pt"))
with torch.no_grad():
    assert torch.equal(model(**batch).logits, load_student(sys.argv[1])(**batch).logits)
print(type(model.bert.encoder.layer[0].attention.self.query).__name__)
"""
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["QuantLinear"]


def test_without_kdqat_dist_from_pretrained_raises_instead_of_skipping_the_quantization(tmp_path):
    """Issue #36: transformers only warns about an unknown quant_method and would build the float latent
    model; the student's config.json names a model type it does not know instead (tests/test_hub.py runs
    this in an interpreter that cannot import kdqat_dist at all)."""
    folder, _ = _student(tmp_path, QuantConfig())
    code = (
        "import sys; from transformers import AutoModelForSequenceClassification as A; "
        f"A.from_pretrained({str(folder)!r})"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "has model type `kdqat_dist`" in r.stderr, r.stderr[-2000:]


def test_a_student_saved_with_0d_lsq_steps_still_loads_both_ways(tmp_path):
    # format_version 1 (before per-tensor steps had shape (1,)): 0-d steps in model.safetensors
    from safetensors.torch import load_file, save_file

    folder, batch = _student(tmp_path, _lsq_rules())
    ref = load_student(folder)
    state = load_file(str(folder / "model.safetensors"))
    old = {k: v.reshape(()).contiguous() if k.endswith(".step") and v.shape == (1,) else v for k, v in state.items()}
    assert sum(v.dim() == 0 for v in old.values()) > 10
    save_file(old, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    for model in (load_student(folder), AutoModelForSequenceClassification.from_pretrained(folder).eval()):
        assert all(p.shape == (1,) for n, p in model.named_parameters() if n.endswith(".step"))
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, ref(**batch).logits)
