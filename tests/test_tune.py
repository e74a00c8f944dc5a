"""`kdqat sweep`: real Ray Tune sweeps on a local CPU Ray instance, with tiny encoders.

One Ray session (3 logical CPUs: a 2-worker trial needs its driver + 2 workers) and one tiny teacher
are shared by the module.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"), ("MPLBACKEND", "Agg"),
               ("KDQAT_CACHE", "/tmp/kdq_tune_cache"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

from kdqat_dist.config import ConfigError  # noqa: E402
from kdqat_dist.tune.results import collect_rows, write_report  # noqa: E402
from kdqat_dist.tune.spec import load_spec, parse_spec  # noqa: E402

HAS_DS_BACKEND = importlib.util.find_spec("kdqat_dist.engine.ds_backend") is not None
FAST = {"train.max_steps": 6, "train.eval_every": 3, "data.demo_size": 200}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from kdqat_dist.config import load_config
    from kdqat_dist.engine.loop import run

    out = tmp_path_factory.mktemp("teacher") / "t"
    run(load_config("tiny_debug", {"train.output_dir": str(out), "data.demo_size": 200}), "finetune")
    return out / "model"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _spec(tmp_path: Path, **raw) -> Path:
    raw.setdefault("base", "tiny_debug")
    raw.setdefault("output_dir", str(tmp_path / "sweep"))
    raw["overrides"] = {**FAST, **raw.get("overrides", {})}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _starts(out: Path) -> dict[str, int]:
    return {json.loads((d / "point.json").read_text())["point"]["train.seed"]:
            len((d / "starts.log").read_text().splitlines()) for d in (out / "trials").iterdir()}


# --------------------------------------------------------------------------- bad input (no trial starts)


@pytest.mark.parametrize("search, message", [
    ({"distill.gama": {"grid": [0.1, 0.5]}}, "search: unknown config key 'distill.gama' (did you mean "
                                             "distill.gamma?)"),
    ({"distill.gamma": {"grid": []}}, "search.distill.gamma.grid: empty list"),
    ({"distill.gamma": "grid[]"}, "search.distill.gamma.grid: empty list"),
    ({"train.lr": {"loguniform": [0, 1e-4]}}, "search.train.lr.loguniform: bounds must be > 0"),
    ({"quant.weight.bits": {"grid": [2, 5]}}, "sweep point (quant.weight.bits=5): quant.weight.bits: got 5"),
    ({"distill.gamma": {"grid": [0.5, 1.5]}}, "sweep point (distill.gamma=1.5): distill.gamma: must be in"),
    ({"tune.num_workers": {"grid": [1, 2]}}, "cannot vary per trial"),
    ({}, "search: empty"),
])
def test_bad_search_space_fails_fast(tmp_path, search, message):
    with pytest.raises(ConfigError) as exc:
        load_spec(_spec(tmp_path, search=search))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_cli_bad_key_is_one_line_and_starts_nothing(tmp_path, capsys):
    from kdqat_dist.cli import main

    path = _spec(tmp_path, search={"distill.attn_mapp.weight": {"grid": [0.1]}})
    assert main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("kdqat: error: search: unknown config key 'distill.attn_mapp.weight' "
                   "(did you mean distill.attn_map.weight?)")
    assert not (tmp_path / "sweep").exists()


def test_spec_syntax_and_resolution(tmp_path):
    spec = parse_spec({
        "base": "tiny_debug", "teacher_path": "models/{data.task}",
        "overrides": {"train.lr": "1e-4"},
        "search": {"train.seed": "grid[42, 52, 62]", "distill.attn_output.weight": [0.1, 0.9],
                   "train.lr": {"loguniform": ["1e-5", "1e-4"]}},
        "variants": {"map": {"distill.attn_map.weight": 1.0}, "unified": {"distill.gamma": 0.5}},
    }, cwd=tmp_path)
    assert spec.num_grid_points == 3 * 2 * 2
    assert [d.kind for d in spec.search] == ["grid", "grid", "loguniform"]
    assert spec.search[2].values == [1e-5, 1e-4]
    cfg = spec.resolve({"train.seed": 52, "distill.attn_output.weight": 0.1}, "unified")
    assert cfg.teacher.path == str(tmp_path / "models" / "demo")
    assert cfg.train.seed == 52 and cfg.distill.gamma == 0.5 and cfg.train.lr == 1e-4


def test_resources_the_cluster_cannot_provide(tmp_path, ray_session, teacher):
    from kdqat_dist.tune.trainable import run_sweep

    spec = load_spec(_spec(tmp_path, teacher_path=str(teacher), search={"train.seed": [42]},
                           tune={"num_workers": 4}))
    msg = r"tune: a trial needs 5 CPUs \(1 trial driver \+ tune.num_workers 4 .* but the Ray cluster has 3"
    with pytest.raises(ConfigError, match=msg):
        run_sweep(spec)
    assert not (tmp_path / "sweep" / "tune").exists()


# --------------------------------------------------------------------------- real sweeps


def test_four_trial_sweep_and_table(tmp_path, ray_session, teacher):
    from kdqat_dist.tune.trainable import run_sweep

    spec = load_spec(_spec(tmp_path, teacher_path=str(teacher),
                           search={"distill.gamma": {"grid": [0.2, 0.8]}, "train.seed": {"grid": [42, 52]}},
                           tune={"num_workers": 1, "max_failures": 0}))
    grid = run_sweep(spec, verbose=0)
    assert len(grid) == 4 and grid.num_errors == 0
    paths = write_report(spec.output_dir)
    rows, metric_cols = collect_rows(spec.output_dir)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert sorted((r["gamma"], r["seed"]) for r in rows) == [(0.2, 42), (0.2, 52), (0.8, 42), (0.8, 52)]
    assert "acc" in metric_cols
    for r in rows:  # every value comes from the trial's own metrics.json and config
        m = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert r["selection"] == m["best"]["selection"] and r["acc"] == m["best"]["acc"]
        assert r["best_step"] == m["best"]["step"]
        assert r["teacher_selection"] == m["teacher"]["selection"]
        assert (r["map_w"], r["output_w"]) == (r["gamma"], pytest.approx(1 - r["gamma"]))
        assert (Path(r["run_dir"]) / "tb").is_dir()
        progress = json.loads((Path(r["run_dir"]).parent / "progress.json").read_text())
        assert [h["step"] for h in progress["history"]] == [3, 6]
        resolved = yaml.safe_load((Path(r["run_dir"]).parent / "resolved.yaml").read_text())
        assert resolved["distill"]["gamma"] == r["gamma"] and resolved["train"]["seed"] == r["seed"]
    # Tune saw every evaluation (steps 3 and 6) of each trial
    assert all(res.metrics["training_iteration"] == 2 for res in grid)
    summary = (spec.output_dir / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "n_seeds" in summary[0]
    assert paths["png"].stat().st_size > 0
    md = paths["md"].read_text()
    assert md.count("| demo |") == 6 and "± " in md


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, ray_session, teacher):
    """Seed 52's teacher is missing: its trial fails (the sweep is interrupted with one finished and one
    errored trial); after the teacher appears, --resume reruns only that trial."""
    from kdqat_dist.cli import main

    teachers = tmp_path / "teachers"
    teachers.mkdir()
    (teachers / "42").symlink_to(teacher)
    path = _spec(tmp_path, teacher_path=str(teachers / "{train.seed}"), search={"train.seed": [42, 52]},
                 tune={"max_failures": 0}, max_concurrent=1)
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(path), "--quiet"]) == 1
    assert _starts(out) == {42: 1, 52: 1}
    assert (out / "results.md").exists()
    rows, _ = collect_rows(out)
    assert [r["status"] for r in sorted(rows, key=lambda r: r["seed"])] == ["ok", "incomplete"]
    first_42 = next(r for r in rows if r["seed"] == 42)
    mtime = (Path(first_42["run_dir"]) / "metrics.json").stat().st_mtime_ns

    assert main(["sweep", "--config", str(path), "--quiet"]) == 2  # not without --resume
    (teachers / "52").symlink_to(teacher)
    assert main(["sweep", "--config", str(path), "--quiet", "--resume"]) == 0
    assert _starts(out) == {42: 1, 52: 2}
    assert (Path(first_42["run_dir"]) / "metrics.json").stat().st_mtime_ns == mtime
    rows, _ = collect_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DS_BACKEND, reason="kdqat_dist.engine.ds_backend (DeepSpeed backend) not present")
def test_two_deepspeed_workers_per_trial(tmp_path, ray_session, teacher):
    from kdqat_dist.tune.trainable import run_sweep

    spec = load_spec(_spec(tmp_path, teacher_path=str(teacher), search={"train.seed": [42]},
                           overrides={"engine.zero_stage": 2},
                           tune={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0}))
    grid = run_sweep(spec, verbose=0)
    assert grid.num_errors == 0, [r.error for r in grid]
    rows, _ = collect_rows(spec.output_dir)
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    tdir = Path(rows[0]["run_dir"]).parent
    resolved = yaml.safe_load((tdir / "resolved.yaml").read_text())
    assert resolved["engine"]["backend"] == "deepspeed" and resolved["tune"]["num_workers"] == 2
    assert len((tdir / "events.jsonl").read_text().splitlines()) == 2  # rank 0's evaluations, relayed
    assert grid[0].metrics["training_iteration"] == 2
    m = json.loads((Path(rows[0]["run_dir"]) / "metrics.json").read_text())
    assert rows[0]["selection"] == m["best"]["selection"]
