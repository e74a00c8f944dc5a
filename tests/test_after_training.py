"""The commands a user runs after training: `kdqat eval` and `kdqat analyze` on run folders, with each
run's own config by default, and `analyze` on a student of every shipped recipe.

One tiny student per shipped training recipe, trained for one step on the tiny teacher (the real build
path of each recipe: its quantizers, SubLN, embedding settings), is shared by the module.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kdqat_dist.analysis.report import AnalyzeOptions, analyze
from kdqat_dist.cli import main
from kdqat_dist.config import RECIPES_DIR, ConfigError, load_config
from kdqat_dist.engine.loop import run
from kdqat_dist.run_folder import model_run, run_config_path

# the recipes that train a student (the *_finetune ones fine-tune the FP teacher)
TRAIN_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.endswith("finetune"))
TINY = [
    "model.name_or_path=tiny-bert",
    "data.task=demo",
    "data.source=",
    "data.demo_level=easy",
    "data.demo_size=100",  # 30 dev rows: another size is other dev data
    "data.max_seq_length=32",
    "train.max_steps=1",
    "train.eval_every=1",
    "train.batch_size=8",
    "train.progress=false",
    "train.diagnostics=false",
    "engine.backend=none",
    "engine.precision=fp32",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds synchronisation on a loaded box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs(tiny_teacher, tmp_path_factory) -> dict[str, Path]:
    """recipe -> its run folder (config.yaml, metrics.json, student/) after one KD-QAT step."""
    root = tmp_path_factory.mktemp("recipe_runs")
    out = {}
    for recipe in TRAIN_RECIPES:
        cfg = load_config(recipe, [*TINY, f"teacher.path={tiny_teacher}", f"train.output_dir={root / recipe}"])
        run(cfg, "train")
        out[recipe] = root / recipe
    return out


def _eval_json(capsys, *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main(["eval", *args, "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def test_eval_scores_a_run_on_its_own_dev_set(runs, capsys):
    run_dir = runs["tiny_debug"]
    best = json.loads((run_dir / "metrics.json").read_text())["best"]
    for model in (run_dir, run_dir / "student"):  # the run folder stands for its student/
        rc, res, err = _eval_json(capsys, "--model", str(model))
        assert rc == 0 and err == "", err
        assert res["model"] == str(run_dir / "student") and res["config"] == str(run_dir / "config.yaml")
        assert res["task"] == "demo" and res["notes"] == []
        # the same dev rows as the run's own evaluation: the same numbers, exactly
        assert res["metrics"]["selection"] == best["selection"] and res["metrics"]["acc"] == best["acc"]
    # the table form names the model, the task and the config used
    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kdqat eval: {run_dir / 'student'} on demo (config: {run_dir / 'config.yaml'})\n")
    assert f"| selection | {best['selection']:.4f} |" in out


def test_eval_states_other_data_and_refuses_another_task(runs, capsys):
    run_dir = runs["tiny_debug"]
    # the recipe's own data (400 demo rows) is not the run's (100): scored, and said on stderr
    rc, res, err = _eval_json(capsys, "--model", str(run_dir), "--config", "tiny_debug")
    assert rc == 0 and res["config"] == "tiny_debug"
    note = f"kdqat eval: note: the data differs from the run's ({run_dir / 'config.yaml'}): "
    assert err.startswith(note) and "data.demo_size: 100 in the run, 400 here" in err and err.count("\n") == 1
    assert res["notes"] == [err.removeprefix("kdqat eval: note: ").strip()]
    # another task: the classifier head belongs to the run's task
    for args in (["--config", "bert_base_w2a8_kd"], ["data.task=sst2"]):
        rc, _, err = _eval_json(capsys, "--model", str(run_dir), *args)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"kdqat: error: data.task: {run_dir / 'student'} was trained on demo"), err


def test_eval_without_a_run_config_needs_config(runs, tmp_path, capsys):
    alone = tmp_path / "alone"
    shutil.copytree(runs["tiny_debug"] / "student", alone)
    rc, _, err = _eval_json(capsys, "--model", str(alone))
    assert rc == 2 and err.startswith(f"kdqat: error: --config: no run config.yaml for {alone}"), err
    rc, res, err = _eval_json(capsys, "--model", str(alone), "--config", str(runs["tiny_debug"] / "config.yaml"))
    assert rc == 0 and res["notes"] == [] and err == ""
    rc, _, err = _eval_json(capsys, "--model", str(tmp_path))
    assert rc == 2 and "is neither a model folder (no config.json) nor a kdqat run folder" in err


def test_an_export_finds_the_run_config_of_its_student(runs, tmp_path):
    from kdqat_dist.export.artifact import EXPORT_META, export_student
    from kdqat_dist.run_folder import EXPORT_META as LOOKED_FOR

    assert LOOKED_FOR == EXPORT_META
    student = runs["tiny_debug"] / "student"
    export_student(student, tmp_path / "export")
    assert run_config_path(tmp_path / "export") == runs["tiny_debug"] / "config.yaml"
    r = model_run(tmp_path / "export", None, ["data.max_eval_samples=10"])
    assert r.config.data.demo_size == 100 and r.config_source == str(runs["tiny_debug"] / "config.yaml")
    assert r.notes == (
        f"the data differs from the run's ({r.run_config}): data.max_eval_samples: None in the run, 10 here",
    )
    with pytest.raises(ConfigError, match="does not exist"):
        model_run(tmp_path / "nothing")


def test_analyze_runs_on_a_student_of_every_recipe(runs, tiny_teacher, tmp_path, capsys):
    """Every shipped recipe's student (SubLN, absmean/LSQ/TWN weights, per-token activations, FP
    embeddings) through the whole analysis, with the first student's run config (no --config)."""
    out = tmp_path / "an"
    students = [f"{r}={runs[r]}" for r in TRAIN_RECIPES]
    opts = AnalyzeOptions(
        teacher=str(tiny_teacher.parent),  # the finetune run folder stands for its model/
        students=students,
        out=str(out),
        samples=2,
        hessian_samples=1,
        hessian_iters=2,
        figures=False,
    )
    res = analyze(opts)
    assert capsys.readouterr().err == ""  # every run has the first one's data: nothing to state
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["meta"]["config_source"] == str(runs[TRAIN_RECIPES[0]] / "config.yaml")
    assert doc["meta"]["task"] == "demo" and doc["meta"]["figures"] == [] and len(doc["lengths"]) == 2
    assert set(doc["norms"]) == {"teacher", *TRAIN_RECIPES} and set(doc["hessian"]) == set(doc["norms"])

    def finite(x) -> bool:
        return all(finite(v) for v in x) if isinstance(x, list) else (x is None or math.isfinite(x))

    for name in TRAIN_RECIPES:
        assert finite(doc["distance"][name]["kl"]["mean"]), name
        assert finite(doc["norms"][name]["f_norm"]) and finite(doc["norms"][name]["sum_af_norm"]), name
        assert all(math.isfinite(e) for row in doc["hessian"][name]["eigenvalues"] for e in row), name
    md = (out / "summary.md").read_text()
    assert "![" not in md and "| bitdistill_w158a8 | all tokens |" in md
    assert sorted(Path(f).name for f in res["files"]) == ["analysis.json", "summary.md"]


def test_analyze_refuses_another_task_and_says_when_there_is_no_run_config(runs, tiny_teacher, tmp_path):
    from kdqat_dist.analysis.report import resolve_run_config

    def opts(*students: str, **kw) -> AnalyzeOptions:
        return AnalyzeOptions(teacher=str(tiny_teacher), students=list(students), out=str(tmp_path / "x"), **kw)

    with pytest.raises(ConfigError, match=r"^data\.task: .*tiny_debug/student was trained on demo .* gives rte"):
        resolve_run_config(opts(str(runs["tiny_debug"]), task="rte"))
    # the first student's run config with an override: every student's run is told how the data differs
    cfg, source, notes = resolve_run_config(
        opts(str(runs["tiny_debug"]), str(runs["demo"]), overrides=["data.demo_size=60"])
    )
    assert cfg.data.demo_size == 60 and source == str(runs["tiny_debug"] / "config.yaml")
    assert [n.split(": ", 1)[0] for n in notes] == [
        f"the data differs from the run's ({runs[r] / 'config.yaml'})" for r in ("tiny_debug", "demo")
    ]
    assert all(n.endswith("data.demo_size: 100 in the run, 60 here") for n in notes)
    alone = tmp_path / "alone"
    shutil.copytree(runs["demo"] / "student", alone)
    cfg, source, notes = resolve_run_config(opts(str(alone)))
    assert source == "built-in" and notes == [
        "no run config.yaml found beside the students; the data comes from the built-in defaults"
    ]
