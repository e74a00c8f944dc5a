"""``kdqat export``: the packed artifact reloads into exactly the fake-quant student; bad input is refused."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdqat_dist.config import ConfigError, QuantConfig, QuantRule, load_config, save_config
from kdqat_dist.export import export_model, export_student, load, read_meta
from kdqat_dist.export.artifact import logits_of, probe_batch
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant.api import calibrate_activations, prepare
from kdqat_dist.quant.fake_quant import ActFakeQuant, QuantEmbedding, QuantLinear
from kdqat_dist.quant.student import load_student, save_student


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tiny fake-quant student folder (untrained: export does not care) with the run's config.yaml."""
    root = tmp_path_factory.mktemp("run")
    base = make_tiny_checkpoint(root / "base")
    model = load_classifier(str(base), 2)
    quant = QuantConfig()
    prepare(model, quant)
    save_student(
        model, root / "run" / "student", quant, load_tokenizer(str(base)), extra={"task": "demo", "metrics": {}}
    )
    cfg = load_config("tiny_debug", [f"data.cache_dir={root / 'tok'}", "data.demo_size=120"])
    save_config(cfg, root / "run" / "config.yaml")
    return root / "run" / "student"


@pytest.fixture(scope="module")
def exported(student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "export"
    report = export_student(student_dir, out)
    return out, report


def text_batch(folder):
    tok = load_tokenizer(str(folder))
    return dict(tok(["the movie was great", "a dull , boring film and bad acting"], padding=True, return_tensors="pt"))


def test_exported_student_gives_identical_logits(student_dir, exported):
    out, report = exported
    student, model = load_student(student_dir), load(out)
    for batch in (probe_batch(model.config), text_batch(out)):
        assert torch.equal(logits_of(student, batch), logits_of(model, batch))
    # weights bit-identical to the fake-quant weights, activation quantizers as in training
    sm = dict(student.named_modules())
    n_packed = 0
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and hasattr(m, "frozen_weight_cfg"):
            with torch.no_grad():
                assert torch.equal(m.weight, sm[name].weight_quant(sm[name].weight))
            n_packed += 1
    assert n_packed == report.modules == len(read_meta(out)["modules"])
    acts = [n for n, m in model.named_modules() if isinstance(m, ActFakeQuant) and m.enabled]
    assert acts == [n for n, m in student.named_modules() if isinstance(m, ActFakeQuant) and m.enabled]
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "kdqat_export.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert report.file_bytes == (out / "model.safetensors").stat().st_size < report.fp32_bytes


def test_base3_is_smaller_and_identical(student_dir, exported, tmp_path):
    out3 = tmp_path / "b3"
    r3 = export_student(student_dir, out3, base3=True)
    assert r3.quantized_packed_bytes < exported[1].quantized_packed_bytes
    assert {i["packing"] for i in read_meta(out3)["modules"].values()} == {"base3"}
    batch = text_batch(out3)
    assert torch.equal(logits_of(load(out3), batch), logits_of(load(exported[0]), batch))


def tiny_model(vocab=60, hidden=32, layers=1, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    return BertForSequenceClassification(cfg).eval()


def test_every_method_and_granularity_round_trips(tmp_path):
    """LSQ weights and activations, per-row sym, mean_clip 3/4 bits and an FP module, in one model."""
    quant = QuantConfig()
    quant.weight.method, quant.weight.bits = "lsq", 2
    quant.act.method = "lsq"
    quant.rules = [
        QuantRule(pattern=r"attention\.output\.dense", weight_bits=4, weight_method="mean_clip"),
        QuantRule(pattern=r"intermediate\.dense", weight_bits=8, weight_method="sym", weight_granularity="row"),
        QuantRule(pattern=r"output\.dense", weight_bits=3, weight_method="mean_clip", weight_granularity="row"),
        QuantRule(pattern=r"pooler", quantize=False),
    ]
    model = prepare(tiny_model(), quant)
    batch = probe_batch(model.config)
    calibrate_activations(model, batch)
    out = tmp_path / "e"
    export_model(model, quant, out)
    mods = read_meta(out)["modules"]
    kinds = {(i["method"], i["bits"], i["granularity"]) for i in mods.values()}
    assert {
        ("lsq", 2, "tensor"),
        ("mean_clip", 4, "tensor"),
        ("sym", 8, "row"),
        ("mean_clip", 3, "row"),
        ("twn", 2, "row"),
    } <= kinds
    assert not any("pooler" in n for n in mods)
    loaded = load(out)
    assert torch.equal(logits_of(model, batch), logits_of(loaded, batch))
    steps = [float(m.step.detach()) for m in loaded.modules() if isinstance(m, ActFakeQuant) and m.cfg.method == "lsq"]
    assert steps and all(s != 1.0 for s in steps)  # the calibrated steps, not a fresh init
    # the size the training summary prints agrees with what export stores (mean_clip: 2^b + 1 levels)
    from kdqat_dist.quant.size import quantized_packed_bytes

    assert (
        quantized_packed_bytes(model)
        == export_model(model, quant, tmp_path / "e2", verify=False).quantized_packed_bytes
    )


@pytest.mark.parametrize("method,narrow", [("absmean", True), ("seq", True), ("seq", False)])
def test_bitnet_and_paretoq_weights_round_trip(tmp_path, method, narrow):
    """absmean (per tensor) and SEQ (learned α, per row) weights, per-token A8, exported and reloaded."""
    quant = QuantConfig()
    quant.weight.method, quant.weight.bits, quant.weight.narrow_range = method, 2, narrow
    quant.weight.granularity = "row" if method == "seq" else "tensor"
    quant.act.method, quant.act.clip = "absmax_token", None
    quant.embedding.method, quant.embedding.narrow_range = method, narrow
    model = prepare(tiny_model(), quant)
    with torch.no_grad():  # move the learned clips off their init, as training would
        for m in model.modules():
            if hasattr(m, "step") and m.step.dim() == 2:
                m.step.mul_(0.7)
    batch = probe_batch(model.config)
    out = tmp_path / "e"
    export_model(model, quant, out)
    mods = read_meta(out)["modules"]
    assert {i["method"] for i in mods.values()} == {method}
    assert {i["storage_bits"] for i in mods.values()} == {2}
    assert {i["dequant"] for i in mods.values()} == {"mul" if narrow else "mul_half"}
    loaded = load(out)
    assert torch.equal(logits_of(model, batch), logits_of(loaded, batch))


def test_size_ratio_ternary_with_2bit_embeddings(tmp_path):
    model = prepare(tiny_model(vocab=3000, hidden=128, layers=2), QuantConfig())
    report = export_model(model, QuantConfig(), tmp_path / "e", verify=False)  # logits: tests above
    assert report.weight_ratio >= 14.0, report.lines()
    assert report.ratio > 8.0  # the whole file, FP LayerNorms/biases/positions included
    r3 = export_model(model, QuantConfig(), tmp_path / "b3", base3=True, verify=False)
    assert r3.weight_ratio >= 18.0, r3.lines()


# --------------------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_truncated_or_corrupt_file_is_refused(exported, tmp_path):
    out = _copy(exported[0], tmp_path / "t")
    w = out / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-100])
    with pytest.raises(ConfigError, match="truncated"):
        load(out)
    flipped = bytearray(data)
    flipped[-7] ^= 0x10
    w.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="corrupt"):
        load(out)
    w.unlink()
    with pytest.raises(ConfigError, match="missing"):
        load(out)


def test_bad_metadata_is_refused(exported, tmp_path):
    out = _copy(exported[0], tmp_path / "m")
    meta = json.loads((out / "kdqat_export.json").read_text())
    name = next(iter(meta["modules"]))
    meta["modules"][name]["bits"] = 5
    (out / "kdqat_export.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="unsupported bits 5"):
        load(out)
    meta["format_version"] = 99
    (out / "kdqat_export.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="format_version 99"):
        load(out)
    (out / "kdqat_export.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load(out)
    with pytest.raises(ConfigError, match="not a kdqat export folder"):
        load(tmp_path)


def test_never_quantized_unsupported_bits_and_existing_out_are_refused(student_dir, tmp_path):
    fp = tiny_model()
    with pytest.raises(ConfigError, match="never quantized"):
        export_model(fp, QuantConfig(), tmp_path / "a")
    fp_dir = make_tiny_checkpoint(tmp_path / "fp")
    with pytest.raises(ConfigError, match="never quantized"):
        export_student(fp_dir, tmp_path / "b")
    q5 = QuantConfig()
    q5.weight.method, q5.weight.bits = "sym", 5
    with pytest.raises(ConfigError, match="5-bit weights"):
        export_model(prepare(tiny_model(), q5), q5, tmp_path / "c")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        export_student(student_dir, busy)
    assert (busy / "x").read_text() == "keep me"
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- command line


def test_cli_export_round_trip_and_eval(student_dir, tmp_path, capsys):
    from kdqat_dist.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--student", str(student_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "round trip OK" in text and "smaller on disk" in text
    meta = read_meta(out)
    assert meta["round_trip"]["student"] == meta["round_trip"]["export"]
    cfg_yaml = str(student_dir.parent / "config.yaml")
    assert main(["eval", "--model", str(out), "--config", cfg_yaml]) == 0
    assert main(["export", "--student", str(student_dir), "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    # without its kdqat_export.json the folder is not evaluated as a partly random model
    (out / "kdqat_export.json").unlink()
    assert main(["eval", "--model", str(out), "--config", cfg_yaml]) == 2
    err = capsys.readouterr().err
    assert "weights do not match the model" in err and "needs its kdqat_export.json" in err


def test_cli_fails_when_metrics_differ(student_dir, tmp_path, capsys, monkeypatch):
    from kdqat_dist import pipeline
    from kdqat_dist.cli import main

    calls = iter([{"acc": 0.5, "selection": 0.5}, {"acc": 0.25, "selection": 0.25}])
    monkeypatch.setattr(pipeline, "evaluate_folder", lambda cfg, path: next(calls))
    out = tmp_path / "bad"
    assert main(["export", "--student", str(student_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scores 0.25" in err and "artifact removed" in err
    assert not out.exists()


def test_load_never_imports_deepspeed(exported, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("deepspeed is not installed (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    assert isinstance(load(exported[0]), BertForSequenceClassification)
    src = Path(__file__).parents[1] / "kdqat_dist" / "export"
    assert not any("import deepspeed" in p.read_text() or "from deepspeed" in p.read_text() for p in src.glob("*.py"))


def test_written_weight_files_get_ordinary_permissions(student_dir, exported, tiny_teacher):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    for f in (
        exported[0] / "model.safetensors",
        student_dir / "model.safetensors",
        tiny_teacher / "model.safetensors",
    ):  # export, student, fine-tuned model
        assert stat.S_IMODE(f.stat().st_mode) == want, f
