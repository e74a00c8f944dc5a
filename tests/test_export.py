"""``kdqat export``: the packed artifact reloads into the integer form of the fake-quant student, with its logits;
bad input is refused."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdqat_dist.config import ConfigError, QuantConfig, QuantRule, load_config, save_config
from kdqat_dist.export import export_model, export_student, load, read_meta
from kdqat_dist.export.artifact import WEIGHTS_FILE, logits_of, probe_batch
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant.api import calibrate_activations, prepare
from kdqat_dist.quant.fake_quant import ActFakeQuant
from kdqat_dist.quant.integer import QuantizedAct, QuantizedEmbedding, QuantizedLinear
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
    # the integer form: int8 codes whose codes · scale are the fake-quant weights bit for bit (TWN),
    # activation quantizers as in training
    sm = dict(student.named_modules())
    n_packed = 0
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            assert m.weight_codes.dtype == torch.int8
            with torch.no_grad():
                assert torch.equal(m.dequantized_weight(), sm[name].weight_quant(sm[name].weight))
            n_packed += 1
    assert n_packed == report.modules == len(read_meta(out)["modules"])
    assert not any(isinstance(m, ActFakeQuant) for m in model.modules())
    acts = [n for n, m in model.named_modules() if isinstance(m, QuantizedAct)]
    assert acts == [n for n, m in student.named_modules() if isinstance(m, ActFakeQuant) and m.enabled]
    assert {p.name for p in out.iterdir()} >= {"config.json", "kdqat_export.json", WEIGHTS_FILE, "tokenizer.json"}
    assert report.file_bytes == (out / WEIGHTS_FILE).stat().st_size < report.fp32_bytes
    assert read_meta(out)["probe"]["max_abs_logit_diff"] == 0.0


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
    steps = [float(m.step) for m in loaded.modules() if isinstance(m, QuantizedAct) and m.cfg.method == "lsq"]
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
    assert {i["stride"] for i in mods.values()} == {1 if narrow else 2}  # 2-bit SEQ: odd codes
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
    w = out / WEIGHTS_FILE
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
    assert err.count("\n") == 1 and "packed kdqat export" in err and "kdqat_dist.export.load" in err


def test_cli_fails_when_metrics_differ(student_dir, tmp_path, capsys, monkeypatch):
    from kdqat_dist import pipeline
    from kdqat_dist.cli import main

    calls = iter([{"acc": 0.5, "selection": 0.5}, {"acc": 0.25, "selection": 0.25}])
    monkeypatch.setattr(pipeline, "evaluate_folder", lambda cfg, path: next(calls))
    out = tmp_path / "bad"
    assert main(["export", "--student", str(student_dir), "--out", str(out)]) == 1  # a bug, not the user's input
    err = capsys.readouterr().err
    assert "Traceback" in err and "InternalError: export: the exported model scores 0.25" in err
    assert "artifact removed" in err and "this is a bug in kdqat-dist" in err.strip().splitlines()[-1]
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
        exported[0] / WEIGHTS_FILE,
        student_dir / "model.safetensors",
        tiny_teacher / "model.safetensors",
    ):  # export, student, fine-tuned model
        assert stat.S_IMODE(f.stat().st_mode) == want, f


def _as_format_1(src: Path, dst: Path) -> Path:
    """A format-1 folder made from a format-2 one: model.safetensors, sym scales s with codes / s, 2-bit SEQ
    codes k with (k + ½)·s, a "dequant" op per module (what kdqat_dist wrote before format 2)."""
    from safetensors.torch import load_file, save_file

    from kdqat_dist.export import packing as P
    from kdqat_dist.export.artifact import _sha256

    dst.mkdir()
    for p in src.iterdir():
        if p.name not in (WEIGHTS_FILE, "kdqat_export.json"):
            (dst / p.name).write_bytes(p.read_bytes())
    meta = json.loads((src / "kdqat_export.json").read_text())
    state = load_file(str(src / WEIGHTS_FILE))
    for name, info in meta["modules"].items():
        op = P.legacy_dequant_op(info["method"], info["narrow_range"])
        enc = P.Encoding(info["packing"], 0 if info["packing"] == "base3" else info["storage_bits"], info["zero"], 2)
        if op == "div":
            state[f"{name}.weight.scale"] = state[f"{name}.weight.scale"].reciprocal()
        if op == "mul_half":
            n = int(torch.tensor(info["shape"]).prod())
            k = (P.decode(state[f"{name}.weight.codes"], enc, n) - 1) // 2
            enc1 = P.choose_encoding(k, info["bits"])
            state[f"{name}.weight.codes"] = P.encode(k, enc1)
            state[f"{name}.weight.scale"] = state[f"{name}.weight.scale"] * 2
            info["zero"] = enc1.zero
        info["dequant"] = op
        info.pop("stride")
    save_file(state, str(dst / "model.safetensors"))
    meta.update(format_version=1, weights_file="model.safetensors")
    meta["weights_bytes"] = (dst / "model.safetensors").stat().st_size
    meta["weights_sha256"] = _sha256(dst / "model.safetensors")
    (dst / "kdqat_export.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("method", ["sym", "seq"])
def test_format_1_exports_still_load(tmp_path, method):
    quant = QuantConfig()
    quant.embedding.method, quant.embedding.bits = "sym", 8  # scales stored as s, codes / s
    if method == "seq":
        quant.weight.method, quant.weight.narrow_range = "seq", False  # (k + ½)·s
    model = prepare(tiny_model(), quant)
    export_model(model, quant, tmp_path / "v2")
    v1 = _as_format_1(tmp_path / "v2", tmp_path / "v1")
    assert read_meta(v1)["format_version"] == 1
    for batch in (probe_batch(model.config), probe_batch(model.config, 3, 9, 1)):
        torch.testing.assert_close(logits_of(load(v1), batch), logits_of(model, batch), rtol=0, atol=1e-5)
        assert torch.equal(logits_of(load(v1), batch), logits_of(load(tmp_path / "v2"), batch))


def test_from_pretrained_refuses_an_export_folder_instead_of_random_weights(exported):
    """Issue #34 item 6: with kdqat imported, the registered quantizer names the loader; without it,
    transformers finds no weights file it knows. Never a randomly initialised model with a warning."""
    import subprocess

    from transformers import AutoModelForSequenceClassification

    out = exported[0]
    with pytest.raises(ConfigError, match=r"packed kdqat export .*kdqat_dist\.export\.load"):
        AutoModelForSequenceClassification.from_pretrained(out)
    code = (
        "import sys; from transformers import AutoModelForSequenceClassification as A\n"
        f"A.from_pretrained({str(out)!r})\n"
        "assert 'kdqat_dist' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no file named model.safetensors" in proc.stderr.splitlines()[-1]
