"""The Hub path (issue #36 item 3): what a user WITHOUT kdqat_dist gets from a kdqat folder.

- a ``bitdistill_w158a8`` student exported with ``--format hf-bitnet`` loads with transformers alone and
  gives the student's logits (SubLN: with ``trust_remote_code=True``; without it, an error);
- a kdqat student folder and a packed export raise in ``from_pretrained`` (no float latent model).

"Without kdqat_dist" is a fresh interpreter started with ``-I -S``: no PYTHONPATH, no user site, and no
``.pth`` files, so the editable install's finder is not there; the venv's site-packages is put on sys.path
by hand, and the script first asserts that ``kdqat_dist`` cannot be found.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForQuestionAnswering as AutoModelForQA
from transformers import AutoModelForTokenClassification

from kdqat_dist.config import QuantConfig, load_config, save_config
from kdqat_dist.export import export_student
from kdqat_dist.export.artifact import logits_of, probe_batch
from kdqat_dist.export.hf_bitnet import HF_RTOL, bitnet_problems, bitnet_recipes, export_hf_bitnet, pack_ternary
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant.api import prepare
from kdqat_dist.quant.student import load_student, save_student

CLEAN = """
import importlib.util, json, sys
sys.path.append(SITE)
assert importlib.util.find_spec("kdqat_dist") is None, "kdqat_dist is importable: not a clean environment"
import torch
import transformers
from transformers import AutoTokenizer
result = {}
for job in json.loads(sys.argv[1]):
    res = result[job["name"]] = {}
    head = job.get("head", "SequenceClassification")  # the task head's classes: Auto... and Bert...
    for how in job["calls"]:
        try:
            if how == "bert":
                model = getattr(transformers, "BertFor" + head).from_pretrained(job["folder"])
            else:
                auto = getattr(transformers, "AutoModelFor" + head)
                model = auto.from_pretrained(job["folder"], trust_remote_code=how == "auto_remote")
        except Exception as exc:
            res[how] = {"error": type(exc).__name__, "message": str(exc)}
            continue
        probe = torch.load(job["probe"])
        with torch.no_grad():
            out = model.eval()(**probe["batch"])
        # QA: start and end logits as [B, 2, S], as kdqat's logits_of writes them
        logits = out.logits if "logits" in out else torch.stack([out.start_logits, out.end_logits], 1)
        res[how] = {
            "diff": float((logits - probe["logits"]).abs().max()),
            "scale": float(probe["logits"].abs().max()),
            "bitlinear": sum(type(m).__name__ == "BitLinear" for m in model.modules()),
            "class": type(model).__name__,
        }
for job in json.loads(sys.argv[1]):  # the tokenizer reads config.json too, and must still load
    result[job["name"]]["tokenizer"] = type(AutoTokenizer.from_pretrained(job["folder"])).__name__
assert "kdqat_dist" not in sys.modules
print("RESULT " + json.dumps(result))
"""


def _without_kdqat(jobs: list[dict], tmp_path: Path) -> dict:
    """Run :data:`CLEAN` on ``jobs`` in an interpreter that cannot import kdqat_dist."""
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")  # remote code is copied there, not into ~
    # BitLinear's torch.compile'd helpers, run eagerly: compiling them on a CPU takes a minute here (the
    # compiled run gives the same logits: bench/results/hub.md)
    env["TORCHDYNAMO_DISABLE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"SITE = {site!r}\n" + CLEAN, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,  # transformers' "run the custom code? [y/N]" prompt: no answer
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # not at a line start: transformers' unanswered "[y/N]" prompt (AutoTokenizer on a SubLN folder) ends
    # without a newline
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1].splitlines()[0])


def _student(root: Path, quant: QuantConfig, seed: int = 0, auto_class: type | None = None) -> Path:
    """A tiny prepared student saved as `kdqat train` saves one (untrained; SubLN gains and biases made
    random, so that a model without them gives other logits); ``auto_class``: another task head's."""
    base = make_tiny_checkpoint(root / "base", seed=seed)
    model = load_classifier(str(base), 2, **({"auto_class": auto_class} if auto_class else {}))
    model.config.architectures = [type(model).__name__]  # as a fine-tuned teacher's config.json names it
    prepare(model, quant)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".dense.LayerNorm." in name:  # the SubLNs
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    save_student(model, root / "run" / "student", quant, load_tokenizer(str(base)), extra={"task": "demo"})
    return root / "run" / "student"


def _probe(student_dir: Path, path: Path) -> Path:
    student = load_student(student_dir)
    batch = probe_batch(student.config, n=5, seq=20, seed=3)
    torch.save({"batch": batch, "logits": logits_of(student, batch)}, path)
    return path


def _bitdistill(subln: bool) -> QuantConfig:
    return load_config("bitdistill_w158a8", [f"quant.subln={str(subln).lower()}"]).quant


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for name, subln in (("plain", False), ("subln", True)):
        out[f"{name}_student"] = _student(root / name, _bitdistill(subln))
        out[name] = root / name / "hf"
        export_hf_bitnet(out[f"{name}_student"], out[name])
    # the other task heads: a token classifier (transformers only) and a QA model with SubLN (remote code)
    for name, subln, auto in (("token", False, AutoModelForTokenClassification), ("qa", True, AutoModelForQA)):
        out[f"{name}_student"] = _student(root / name, _bitdistill(subln), auto_class=auto)
        out[name] = root / name / "hf"
        export_hf_bitnet(out[f"{name}_student"], out[name])
    out["kdqat_student"] = _student(root / "twn", QuantConfig())
    out["packed"] = root / "twn" / "packed"
    export_student(out["kdqat_student"], out["packed"])
    return out


def test_without_kdqat_a_bitnet_export_loads_and_everything_else_raises(folders, tmp_path):
    jobs = [
        {"name": "plain", "folder": str(folders["plain"]), "calls": ["auto", "bert"]},
        {"name": "subln", "folder": str(folders["subln"]), "calls": ["auto", "bert", "auto_remote"]},
        {"name": "student", "folder": str(folders["kdqat_student"]), "calls": ["auto", "bert"]},
        {"name": "packed", "folder": str(folders["packed"]), "calls": ["auto", "bert"]},
        {"name": "token", "folder": str(folders["token"]), "calls": ["auto", "bert"], "head": "TokenClassification"},
        {"name": "qa", "folder": str(folders["qa"]), "calls": ["auto_remote"], "head": "QuestionAnswering"},
    ]
    for job in jobs:
        source = folders.get(f"{job['name']}_student", folders["kdqat_student"])
        job["probe"] = str(_probe(source, tmp_path / f"{job['name']}.pt"))
    r = _without_kdqat(jobs, tmp_path)
    # 2 layers x 6 Linears + the pooler are BitLinear; the classifier stays full precision
    for got in (r["plain"]["auto"], r["plain"]["bert"], r["subln"]["auto_remote"]):
        assert got["diff"] <= HF_RTOL * got["scale"] and got["bitlinear"] == 13, got
    assert r["subln"]["auto_remote"]["class"] == "BertSubLNForSequenceClassification"
    # token and QA models have no pooler: 12 BitLinear, the head's Linear (classifier, qa_outputs) full precision
    for got in (r["token"]["auto"], r["token"]["bert"], r["qa"]["auto_remote"]):
        assert got["diff"] <= HF_RTOL * got["scale"] and got["bitlinear"] == 12, got
    assert r["token"]["auto"]["class"] == "BertForTokenClassification"
    assert r["qa"]["auto_remote"]["class"] == "BertSubLNForQuestionAnswering"
    assert "trust_remote_code=True" in r["subln"]["auto"]["message"]
    assert "trust_remote_code=True" in r["subln"]["bert"]["message"]  # the hidden_size guard names it
    assert "model type `kdqat_dist`" in r["student"]["auto"]["message"]
    assert "pip install kdqat-dist" in r["student"]["bert"]["message"]
    for how in ("auto", "bert"):
        assert "no file named model.safetensors" in r["packed"][how]["message"]
    assert {job["tokenizer"] for job in r.values()} == {"BertTokenizer"}


def test_with_kdqat_the_guarded_student_loads_as_before(folders):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = folders["kdqat_student"]
    on_disk = json.loads((folder / "config.json").read_text())
    assert on_disk["model_type"] == "kdqat_dist" and on_disk["kdqat_model_type"] == "bert"
    config = AutoConfig.from_pretrained(folder)
    assert type(config).__name__ == "BertConfig" and config.problem_type is None
    assert config.quantization_config["quant_method"] == "kdqat"
    batch = probe_batch(config)
    hf = AutoModelForSequenceClassification.from_pretrained(folder)
    assert torch.equal(logits_of(hf, batch), logits_of(load_student(folder), batch))


def test_the_subln_export_is_refused_by_plain_classes_and_the_student_needs_its_sublns(folders):
    """A missing SubLN must matter: BERT without the SubLNs (their weights dropped) gives other logits."""
    student = load_student(folders["subln_student"])
    batch = probe_batch(student.config)
    ref = logits_of(student, batch)
    from kdqat_dist.models.subln import SubLNLinear

    for m in student.modules():
        for name, child in list(m.named_children()):
            if isinstance(child, SubLNLinear):
                setattr(m, name, child.linear)
    assert (logits_of(student, batch) - ref).abs().max() > 100 * HF_RTOL * ref.abs().max()
    meta = json.loads((folders["subln"] / "kdqat_hf_bitnet.json").read_text())
    assert meta["subln"] and meta["probe"]["max_abs_logit_diff"] <= HF_RTOL * 10


def test_pack_ternary_is_what_transformers_unpacks():
    from transformers.integrations.bitnet import unpack_weights

    codes = torch.randint(-1, 2, (12, 5), dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    assert torch.equal(unpack_weights.__wrapped__(packed, torch.float32), codes.float())


def test_only_bitnet_recipes_qualify():
    assert bitnet_recipes() == ["bitdistill_w158a8"]
    assert bitnet_problems(_bitdistill(True)) == []
    problems = bitnet_problems(load_config("tiny_debug").quant)
    assert any("quant.act must be absmax_token" in p for p in problems)
    assert any("quantize_embedding" in p for p in problems)


def test_cli_hf_bitnet_on_another_recipe_is_one_line_and_writes_nothing(folders, tmp_path, capsys):
    from kdqat_dist.cli import main

    out = tmp_path / "hf"
    assert main(["export", "--format", "hf-bitnet", "--student", str(folders["kdqat_student"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a BitNet student" in err and "bitdistill_w158a8" in err, err
    assert not out.exists()


def test_cli_hf_bitnet_exports_and_checks_the_dev_set(folders, tmp_path, capsys):
    from kdqat_dist.cli import main

    student = folders["subln_student"]
    cfg = load_config("tiny_debug", [f"data.cache_dir={tmp_path / 'tok'}", "data.demo_size=120"])
    save_config(cfg, student.parent / "config.yaml")
    out = tmp_path / "hf"
    assert main(["export", "--format", "hf-bitnet", "--student", str(student), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trust_remote_code=True" in text and "hf-bitnet" in text
    meta = json.loads((out / "kdqat_hf_bitnet.json").read_text())
    assert meta["round_trip"]["agreement"] >= 0.995 and meta["round_trip"]["rows"] > 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "modeling_bert_subln.py"}


def test_hf_bitnet_bad_inputs_are_one_line_and_write_nothing(folders, tmp_path, capsys):
    from kdqat_dist.cli import main
    from kdqat_dist.errors import ConfigError

    student, out = str(folders["subln_student"]), tmp_path / "hf"
    for extra, says in ((["--base3"], "--base3: only for --format packed"), (["--weights", "2bit"], "--weights")):
        assert main(["export", "--format", "hf-bitnet", "--student", student, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    # BitLinear packs 4 output rows per byte: a hidden size of 30 cannot be written
    odd = tmp_path / "odd"
    base = make_tiny_checkpoint(odd / "base", hidden_size=30, intermediate_size=60)
    model = load_classifier(str(base), 2)
    prepare(model, _bitdistill(False))
    save_student(model, odd / "student", _bitdistill(False), load_tokenizer(str(base)))
    with pytest.raises(ConfigError, match=r"has 30 outputs; BitLinear needs a multiple of 4"):
        export_hf_bitnet(odd / "student", out)
    # the SubLN modeling file is BERT's: another architecture with SubLN is refused
    rob = tmp_path / "rob"
    base = make_tiny_checkpoint(rob / "base", arch="roberta")
    model = load_classifier(str(base), 2)
    prepare(model, _bitdistill(True))
    save_student(model, rob / "student", _bitdistill(True), load_tokenizer(str(base)))
    with pytest.raises(ConfigError, match=r"covers BERT only \(.*; this one: roberta"):
        export_hf_bitnet(rob / "student", out)
    assert not out.exists()


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "bert", "hidden_size": 32, "vocab_size": 9, "problem_type": "regression"},
        {"model_type": "distilbert", "dim": 64, "n_layers": 2},
        {"model_type": "bert"},
    ],
)
def test_guard_and_unguard_round_trip(config):
    from kdqat_dist.files import KDQAT_MODEL_TYPE, NEEDS_KDQAT, guard_hf_config, unguard_hf_config

    guarded = guard_hf_config(config)
    assert guarded["model_type"] == KDQAT_MODEL_TYPE and guarded["hidden_size"] == guarded["dim"] == NEEDS_KDQAT
    assert guard_hf_config(guarded) == guarded  # twice is once
    assert unguard_hf_config(guarded) == config and unguard_hf_config(config) == config


def test_no_export_folder_is_taken_for_a_full_precision_teacher(folders, tmp_path):
    """A transformers-BitNet export (and an ONNX export's marker) would load as a model: refused as a teacher."""
    from kdqat_dist.errors import ConfigError
    from kdqat_dist.files import check_full_precision

    onnx_like = tmp_path / "onnx"
    onnx_like.mkdir()
    (onnx_like / "config.json").write_text("{}")
    (onnx_like / "kdqat_onnx.json").write_text("{}")
    for folder in (folders["plain"], folders["subln"], folders["packed"], onnx_like):
        with pytest.raises(ConfigError, match=r"teacher.path: .* is a kdqat export folder"):
            check_full_precision(folder, "teacher.path")
