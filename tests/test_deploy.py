"""Deploying a student: ``kdqat export --format onnx`` (ONNX Runtime, int8 kernels) and ``kdqat predict`` on
each model kind, with bad input refused in one line."""

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from kdqat_dist.config import QuantConfig, QuantRule, load_config, save_config
from kdqat_dist.errors import InternalError
from kdqat_dist.export import export_student
from kdqat_dist.export.artifact import logits_of, probe_batches
from kdqat_dist.export.onnx_export import ONNX_RTOL, export_onnx, read_onnx_meta, run_outputs, session
from kdqat_dist.export.predict import Predictor
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant import onnx_form
from kdqat_dist.quant.api import calibrate_activations, prepare
from kdqat_dist.quant.student import load_student, save_student


def _student(
    root: Path,
    quant: QuantConfig,
    name: str = "student",
    auto_class: type = AutoModelForSequenceClassification,
    labels: tuple[str, ...] = ("negative", "positive"),
    data: tuple[str, ...] = (),
) -> Path:
    """A tiny fake-quant student folder (untrained: deployment does not care) of ``auto_class``'s task head,
    with the run's config.yaml (the demo task, or ``data`` overrides)."""
    base = root / "base"
    if not base.exists():
        make_tiny_checkpoint(base)
    torch.manual_seed(0)
    model = load_classifier(str(base), len(labels), id2label=dict(enumerate(labels)), auto_class=auto_class)
    model.config.architectures = [type(model).__name__]  # as a fine-tuned teacher's config.json names it
    model = prepare(model, quant)
    with torch.no_grad():  # learned steps off their init, as training leaves them
        for m in model.modules():
            if hasattr(m, "step") and m.step.requires_grad:
                m.step.mul_(0.8)
    calibrate_activations(model, probe_batches(model.config)[0])
    run = root / name
    save_student(model, run / "student", quant, load_tokenizer(str(base)), extra={"task": "demo", "metrics": {}})
    cfg = load_config("tiny_debug", [f"data.cache_dir={root / 'tok'}", "data.demo_size=120", *data])
    save_config(cfg, run / "config.yaml")
    return run / "student"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def student_dir(root):
    quant = QuantConfig()
    quant.embedding.method, quant.embedding.bits = "sym", 8  # per-row 8-bit table, as bert_base_w2e8a8_kd
    return _student(root, quant)


@pytest.fixture(scope="module")
def onnx_dir(student_dir, root):
    export_onnx(student_dir, root / "onnx")
    return root / "onnx"


def _random_batches(config, seed=5):
    """Batches of several sizes and lengths with padding, other than the export's probe batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, seq in ((1, 7), (5, 20), (8, 33)):
        ids = torch.randint(5, config.vocab_size, (n, seq), generator=g)
        mask = torch.ones_like(ids)
        for i in range(1, n):
            mask[i, int(torch.randint(1, seq, (1,), generator=g)) :] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def _check_against_student(student_dir: Path, onnx_path: Path) -> float:
    """ONNX Runtime vs the fake-quant student on random padded batches: within ONNX_RTOL of the largest logit,
    the same argmax; returns the largest difference relative to the largest logit."""
    student, sess = load_student(student_dir), session(onnx_path)
    worst = 0.0
    for batch in _random_batches(student.config):
        want, got = logits_of(student, batch), torch.from_numpy(run_outputs(sess, batch)["logits"])
        assert got.shape == want.shape
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=ONNX_RTOL * scale)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        worst = max(worst, float((got - want).abs().max()) / scale)
    return worst


def test_onnx_export_runs_on_int8_kernels_and_gives_the_students_logits(student_dir, onnx_dir):
    meta = read_onnx_meta(onnx_dir)
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and meta["weights"] == "int8"
    # 12 Linears of 2 layers + the pooler + 4 attention matmuls run as int8 x int8 -> int32 (ONNX Runtime's fusion)
    assert meta["probe"]["integer_ops"] == {"MatMulIntegerToFloat": 17}
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    int8 = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    }
    table = int8.pop("inner.bert.embeddings.word_embeddings.weight_codes")  # the 8-bit table, gathered as int8
    assert table.shape == (252, 32) and np.abs(table).max() == 127
    assert len(int8) == 13 and all(set(np.unique(a)) <= {-1, 0, 1} for a in int8.values())  # ternary Linears
    ops = Counter(n.op_type for n in graph.node)
    # the Linears as MatMulInteger (-> MatMulIntegerToFloat with the bias, onnx_graph); attention matmuls QDQ
    assert ops["QuantizeLinear"] >= 13 and ops["MatMulInteger"] == 13 and ops["DequantizeLinear"] >= 4
    assert {d.dim_param for d in graph.input[0].type.tensor_type.shape.dim} == {"batch", "sequence"}
    assert _check_against_student(student_dir, onnx_dir / "model.onnx") < 1e-4
    assert {p.name for p in onnx_dir.iterdir()} >= {"model.onnx", "kdqat_onnx.json", "config.json", "tokenizer.json"}


def test_every_activation_method_and_weight_storage_exports(root):
    """LSQ activations (static scale) and weights, 8-bit per-row weights (uint8 storage), per-token
    activations (MatMulInteger) with SubLN and absmean weights; and the 2-bit MatMulNBits layout."""
    lsq = QuantConfig()
    lsq.weight.method, lsq.weight.bits = "lsq", 2
    lsq.act.method, lsq.attention.method = "lsq", "lsq"
    lsq.rules = [QuantRule(r"intermediate\.dense", weight_bits=8, weight_method="sym", weight_granularity="row")]
    token = QuantConfig()
    token.weight.method, token.weight.clip, token.subln = "absmean", None, True
    token.act.method, token.act.clip = "absmax_token", None
    token.attention.method, token.attention.clip = "absmax_token", None
    for name, quant, weights, kernels in (
        ("lsq", lsq, "2bit", {"MatMulNBits", "MatMulIntegerToFloat"}),
        ("token", token, "int8", {"MatMulInteger"}),
    ):
        student = _student(root, quant, name)
        report = export_onnx(student, root / f"{name}_onnx", weights=weights)
        assert kernels <= set(report.integer_ops), report.integer_ops
        _check_against_student(student, root / f"{name}_onnx" / "model.onnx")
        if name == "lsq":
            graph = onnx.load(str(root / "lsq_onnx" / "model.onnx")).graph
            u8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 2]
            assert u8, "the 8-bit intermediate weight is stored as uint8 + 128"


def test_a_graph_that_does_not_reproduce_the_student_is_not_kept(student_dir, root, monkeypatch):
    real = onnx_form._weight_dq

    def wrong_scale(g, codes, scale, storage):  # a plausible bug: the weight scale applied twice
        flat = g.op("Reshape", scale, onnx_form._const(g, torch.tensor([-1])))
        return g.op("Mul", real(g, codes, scale, storage), flat)

    monkeypatch.setattr(onnx_form, "_weight_dq", wrong_scale)
    out = root / "wrong"
    with pytest.raises(InternalError, match="does not reproduce the fake-quant student") as err:
        export_onnx(student_dir, out)
    assert not out.exists()
    diff, tol = (float(x) for x in re.search(r"difference\| (\S+) > tolerance (\S+)\)", str(err.value)).groups())
    assert diff > 3 * tol, (diff, tol)  # far outside the tolerance, not a borderline catch


# --------------------------------------------------------------------------- kdqat predict


def _tsv(path: Path, rows: list[str], column: str = "text_a") -> Path:
    path.write_text("\n".join([f"{column}\tlabel", *[f"{r}\t1" for r in rows]]) + "\n")
    return path


TEXTS = ["the movie was great", "a dull , boring film and bad acting", "fine", "great great great fun"]


def test_predict_on_each_model_kind(student_dir, onnx_dir, root, capsys, monkeypatch):
    from kdqat_dist.cli import main

    packed = root / "packed"
    export_student(student_dir, packed)
    data = _tsv(root / "in.tsv", TEXTS)
    outputs = {}
    for model in (student_dir, student_dir.parent, packed, onnx_dir):
        assert main(["predict", "--model", str(model), "--input", str(data)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "label\tprobability\ttext" and len(lines) == 1 + len(TEXTS)
        outputs[str(model)] = [ln.split("\t") for ln in lines[1:]]
    labels = {tuple(r[0] for r in rows) for rows in outputs.values()}
    assert len(labels) == 1 and set(next(iter(labels))) <= {"negative", "positive"}
    probs = np.array([[float(r[1]) for r in rows] for rows in outputs.values()])
    assert np.all((probs >= 0.5) & (probs <= 1)) and np.ptp(probs, axis=0).max() < 1e-3
    assert [r[2] for r in outputs[str(onnx_dir)]] == TEXTS
    # the Python API: the same answers, and batch size 1 too
    p = Predictor(onnx_dir, batch_size=1)
    assert p.kind == "onnx" and [x.label for x in p.predict(TEXTS)] == [r[0] for r in outputs[str(onnx_dir)]]
    # stdin lines, JSONL in, CSV out
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS) + "\n"))
    assert main(["predict", "--model", str(onnx_dir)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(TEXTS)
    jsonl = root / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    out = root / "out.csv"
    assert main(["predict", "--model", str(onnx_dir), "--input", str(jsonl), "--output", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "label,probability,text" and len(out.read_text().splitlines()) == 5


def test_predict_bad_input_is_one_line_and_writes_nothing(student_dir, onnx_dir, root, capsys):
    from kdqat_dist.cli import main

    good = _tsv(root / "good.tsv", TEXTS)
    no_text = _tsv(root / "no_text.tsv", TEXTS, column="review")
    empty = root / "empty.tsv"
    empty.write_text("")
    existing = root / "existing.tsv"
    existing.write_text("keep me")
    broken = root / "broken"
    broken.mkdir()
    for p in onnx_dir.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    data = (onnx_dir / "model.onnx").read_bytes()
    meta = read_onnx_meta(onnx_dir)
    cases = [
        (["--model", str(root / "base"), "--input", str(good)], "not a kdqat student folder, packed export or ONNX"),
        (["--model", str(root / "nowhere"), "--input", str(good)], "does not exist"),
        (["--model", str(onnx_dir), "--input", str(no_text)], "no text column 'text_a'"),
        (["--model", str(onnx_dir), "--input", str(no_text), "--text-column", "body"], "no column 'body'"),
        (["--model", str(onnx_dir), "--input", str(empty)], "no rows to predict"),
        (["--model", str(onnx_dir), "--input", str(root / "missing.tsv")], "does not exist"),
        (["--model", str(onnx_dir), "--input", str(good), "--output", str(existing)], "refusing to overwrite"),
        (["--model", str(onnx_dir), "--input", str(good), "--output", str(root / "x.parquet")], "must end in"),
    ]
    for args, expected in cases:
        assert main(["predict", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, (args, err)
    assert existing.read_text() == "keep me" and not (root / "x.parquet").exists()
    # a truncated, a corrupted, and a garbled ONNX file whose metadata was made to match
    for content, fix_meta, expected in (
        (data[:-500], False, "truncated"),
        (data[:100] + bytes([data[100] ^ 0xFF]) + data[101:], False, "corrupt"),
        (b"\x08\x07" + b"not an onnx graph" * 50, True, "ONNX Runtime cannot load it"),
    ):
        (broken / "model.onnx").write_bytes(content)
        if fix_meta:
            from kdqat_dist.export.artifact import _sha256

            m = dict(meta, model_bytes=len(content), model_sha256=_sha256(broken / "model.onnx"))
            (broken / "kdqat_onnx.json").write_text(json.dumps(m))
        assert main(["predict", "--model", str(broken), "--input", str(good)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err


def test_cli_export_onnx_checks_the_dev_set_and_refuses_a_used_folder(student_dir, root, capsys):
    from kdqat_dist.cli import main

    out = root / "cli_onnx"
    assert main(["export", "--format", "onnx", "--student", str(student_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MatMulIntegerToFloat x17" in text and "predictions agree on 18/18" in text
    trip = read_onnx_meta(out)["round_trip"]
    assert trip["agree"] == trip["rows"] == 18 and trip["student"]["acc"] == trip["onnx"]["acc"]
    # kdqat eval scores the ONNX model on its run's dev set (run_folder finds the run through the metadata)
    from kdqat_dist.export.onnx_export import ONNX_META
    from kdqat_dist.run_folder import ONNX_META as LOOKED_FOR

    assert LOOKED_FOR == ONNX_META
    assert main(["eval", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["acc"] == trip["onnx"]["acc"]
    assert main(["export", "--format", "onnx", "--student", str(student_dir), "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["export", "--format", "packed", "--weights", "2bit", "--student", str(student_dir), "--out", "x"]) == 2
    assert "only for --format onnx" in capsys.readouterr().err
