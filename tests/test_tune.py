"""`kdqat sweep`: real Ray Tune sweeps on a local CPU Ray instance, with tiny encoders.

One Ray session (3 logical CPUs: a 2-worker trial needs its driver + 2 workers) and one tiny teacher
are shared by the module. Trials cost ~5-10 s each on 2 cores (a fresh Ray worker imports torch), so the
tests share what they can: the interrupt test's sweep also exercises choice/uniform sampling, num_samples
and the ``task`` alias end to end; the ASHA sweep also exercises retries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

for _k, _v in (
    ("HF_HUB_OFFLINE", "1"),
    ("RAY_AUTH_MODE", "disabled"),
    ("MPLBACKEND", "Agg"),
    ("KDQAT_CACHE", "/tmp/kdq_tune_cache"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_k, _v)

from kdqat_dist.config import ConfigError, flat_keys  # noqa: E402
from kdqat_dist.tune.results import collect_rows, write_report  # noqa: E402
from kdqat_dist.tune.spec import KEY_ALIASES, SPEC_DIR, load_spec, parse_spec  # noqa: E402

HAS_DS_BACKEND = importlib.util.find_spec("kdqat_dist.engine.ds_backend") is not None
FAST = {"train.max_steps": 6, "train.eval_every": 3, "data.demo_size": 200}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from kdqat_dist.config import load_config
    from kdqat_dist.engine.loop import run

    out = tmp_path_factory.mktemp("teacher") / "t"
    # a teacher that learned its task (tiny_finetune), so trials differ in what they lose of it
    run(load_config("tiny_finetune", {"train.output_dir": str(out)}), "finetune")
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
    return {
        json.loads((d / "point.json").read_text())["point"]["train.seed"]: len(
            (d / "starts.log").read_text().splitlines()
        )
        for d in (out / "trials").iterdir()
    }


def _attempts(tdir: Path) -> list[str]:
    """The pid of every attempt of a trial (train_trial appends one line per start)."""
    return [line.split("pid=")[1] for line in (tdir / "starts.log").read_text().splitlines()]


def _tune_records(result) -> list[dict]:
    """What Ray Tune itself received from a trial: its own result.json in Tune's trial folder."""
    lines = (Path(result.path) / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _expand(spec, n: int = 1) -> list[dict]:
    """Ray Tune's own expansion of the spec's param space (what the Tuner turns into trials): every grid
    combination, ``n`` times, with the sampled dimensions drawn each time."""
    from ray.tune.search.variant_generator import generate_variants

    from kdqat_dist.tune.trainable import _param_space

    return [cfg for _ in range(n) for _, cfg in generate_variants(_param_space(spec))]


# --------------------------------------------------------------------------- bad input (no trial starts)


@pytest.mark.parametrize(
    "search, message",
    [
        (
            {"distill.gama": {"grid": [0.1, 0.5]}},
            "search: unknown config key 'distill.gama' (did you mean distill.gamma?)",
        ),
        ({"distill.gamma": {"grid": []}}, "search.distill.gamma.grid: empty list"),
        ({"distill.gamma": "grid[]"}, "search.distill.gamma.grid: empty list"),
        ({"train.lr": {"loguniform": [0, 1e-4]}}, "search.train.lr.loguniform: bounds must be > 0"),
        ({"quant.weight.bits": {"grid": [2, 5]}}, "sweep point (quant.weight.bits=5): quant.weight.bits: got 5"),
        (
            {"distill.gamma": {"grid": [0.5, 1.5]}},
            "sweep point (distill.gamma=1.5): distill.gamma: got 1.5; must be in",
        ),
        ({"tune.num_workers": {"grid": [1, 2]}}, "cannot vary per trial"),
        ({}, "search: empty"),
    ],
)
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
    assert err == (
        "kdqat: error: search: unknown config key 'distill.attn_mapp.weight' (did you mean distill.attn_map.weight?)"
    )
    assert not (tmp_path / "sweep").exists()


def test_ray_that_cannot_start_is_one_line_with_what_to_try(tmp_path):
    """A local Ray instance that cannot start (here: its temp folder is a file) is one line naming Ray's
    error and what to try, exit 2, instead of Ray's traceback. A separate process: no Ray session here."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    path = _spec(tmp_path, search={"train.seed": [42]})
    r = subprocess.run(
        [sys.executable, "-m", "kdqat_dist.cli", "sweep", "--config", str(path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=dict(os.environ, RAY_TMPDIR=str(not_a_dir)),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdqat: error: sweep: could not start a local Ray instance (NotADirectoryError: "), last
    assert "`ray start --head --num-cpus N`) and pass --address auto" in last


def test_spec_syntax_and_resolution(tmp_path):
    spec = parse_spec(
        {
            "base": "tiny_debug",
            "teacher_path": "models/{data.task}",
            "overrides": {"train.lr": "1e-4"},
            "search": {
                "train.seed": "grid[42, 52, 62]",
                "distill.attn_output.weight": [0.1, 0.9],
                "train.lr": {"loguniform": ["1e-5", "1e-4"]},
            },
            "variants": {"map": {"distill.attn_map.weight": 1.0}, "unified": {"distill.gamma": 0.5}},
        },
        cwd=tmp_path,
    )
    assert spec.num_grid_points == 3 * 2 * 2
    assert [d.kind for d in spec.search] == ["grid", "grid", "loguniform"]
    assert spec.search[2].values == [1e-5, 1e-4]
    cfg = spec.resolve({"train.seed": 52, "distill.attn_output.weight": 0.1}, "unified")
    assert cfg.teacher.path == str(tmp_path / "models" / "demo")
    assert cfg.train.seed == 52 and cfg.distill.gamma == 0.5 and cfg.train.lr == 1e-4


@pytest.mark.parametrize("name", sorted(p.stem for p in SPEC_DIR.glob("*.yaml")))
def test_shipped_specs_parse_expand_and_name_only_config_keys(name, tmp_path):
    raw = yaml.safe_load((SPEC_DIR / f"{name}.yaml").read_text())
    named = [
        *raw.get("search", {}),
        *raw.get("overrides", {}),
        *(k if k.startswith("tune.") else f"tune.{k}" for k in raw.get("tune", {})),
        *(k for bundle in raw.get("variants", {}).values() for k in bundle),
    ]
    unknown = [k for k in named if KEY_ALIASES.get(k, k) not in flat_keys()]
    assert not unknown, f"kdqat_dist/sweeps/{name}.yaml names keys that are not config keys: {unknown}"
    spec = load_spec(name, cwd=tmp_path)  # validates every grid point's full config, starts nothing
    assert spec.name == raw["name"] and spec.output_dir == tmp_path / raw["output_dir"]
    tune_cfg = spec.base_config().tune
    assert tune_cfg.scheduler in ("none", "asha") and tune_cfg.num_samples >= 1
    variants = _expand(spec)
    assert len(variants) == spec.num_grid_points > 1
    keys = {d.key for d in spec.search}
    assert all(set(v["point"]) == keys for v in variants)
    if spec.variants:
        assert {v["variant"] for v in variants} == set(spec.variants)
    for dim in spec.search:
        drawn = [v["point"][dim.key] for v in variants]
        if dim.kind in ("uniform", "loguniform"):
            assert all(dim.values[0] <= x <= dim.values[1] for x in drawn)
        else:
            assert set(drawn) <= set(dim.values)
    # an expanded trial resolves to a config; a relative teacher template is filled per trial under cwd
    cfg = spec.resolve(variants[-1]["point"], variants[-1]["variant"])
    template = spec.teacher_path.replace("{data.task}", cfg.data.task)
    assert cfg.teacher.path == str(tmp_path / template)


@pytest.mark.parametrize(
    "search",
    [
        {
            "train.lr": {"uniform": [1.0e-4, 1.0e-3]},
            "quant.weight.bits": {"choice": [2, 4, 8]},
            "distill.gamma": {"loguniform": [0.05, 0.5]},
        },
        {
            "train.lr": "uniform[1.0e-4, 1.0e-3]",
            "quant.weight.bits": "choice[2, 4, 8]",
            "distill.gamma": "loguniform[0.05, 0.5]",
        },
    ],
    ids=["long", "short"],
)
def test_sampled_domains_draw_within_their_range(search):
    spec = parse_spec(
        {
            "base": "tiny_debug",
            "overrides": {"quant.weight.method": "sym"},
            "search": search,
            "tune": {"num_samples": 3},
        }
    )
    kinds = {d.key: (d.kind, d.values) for d in spec.search}
    assert kinds == {
        "train.lr": ("uniform", [1e-4, 1e-3]),
        "quant.weight.bits": ("choice", [2, 4, 8]),
        "distill.gamma": ("loguniform", [0.05, 0.5]),
    }
    assert spec.num_grid_points == 1 and spec.base_config().tune.num_samples == 3
    drawn = [v["point"] for v in _expand(spec, 300)]
    lrs, bits, gammas = ([p[k] for p in drawn] for k in ("train.lr", "quant.weight.bits", "distill.gamma"))
    assert all(1e-4 <= x <= 1e-3 for x in lrs) and all(0.05 <= x <= 0.5 for x in gammas)
    assert set(bits) == {2, 4, 8}  # every choice is drawn (300 draws), nothing else
    # really sampled: spread over the range (a constant or a bound would fail), log-uniform skewed low
    assert len(set(lrs)) == 300 and min(lrs) < 2e-4 and max(lrs) > 9e-4
    assert sum(g < 0.158 for g in gammas) > 100  # half of log-uniform mass lies below sqrt(0.05 * 0.5)
    for point in drawn[:5]:  # drawn values make valid configs
        cfg = spec.resolve(point, None)
        assert cfg.train.lr == point["train.lr"] and cfg.quant.weight.bits == point["quant.weight.bits"]


@pytest.mark.parametrize(
    "search, message",
    [
        ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "search.train.lr.uniform: low must be < high"),
        ({"train.lr": "uniform[1e-4]"}, "search.train.lr.uniform: expected [low, high]"),
        ({"train.lr": {"uniform": ["a", 1]}}, "search.train.lr.uniform: expected a number, got 'a'"),
        ({"train.seed": {"choice": []}}, "search.train.seed.choice: empty list"),
        ({"train.seed": "choice[]"}, "search.train.seed.choice: empty list"),
        ({"train.seed": "choice(1, 2)"}, "search.train.seed: expected {grid: [...]}"),
        ({"quant.weight.bits": "choice[2, 3]"}, "sweep point (quant.weight.bits=3)"),
        ({"train.seed": {"choice": [1], "grid": [2]}}, "search.train.seed: expected exactly one of"),
    ],
)
def test_bad_sampled_domains_fail_fast(search, message):
    with pytest.raises(ConfigError) as exc:
        parse_spec({"base": "tiny_debug", "search": search})
    assert message in str(exc.value)


def test_task_is_an_alias_of_data_task(tmp_path):
    spec = parse_spec(
        {
            "base": "tiny_debug",
            "teacher_path": "models/{task}",
            "search": {"task": "grid[rte, sst2, cola]", "train.seed": "grid[42, 52]"},
            "variants": {"a": {"train.lr": 1e-4}},
        },
        cwd=tmp_path,
    )
    assert [(d.key, d.values) for d in spec.search][0] == ("data.task", ["rte", "sst2", "cola"])
    assert spec.num_grid_points == 6
    cfg = spec.resolve({"data.task": "cola", "train.seed": 52}, "a")
    assert cfg.data.task == "cola" and cfg.teacher.path == str(tmp_path / "models" / "cola")
    assert {v["point"]["data.task"] for v in _expand(spec)} == {"rte", "sst2", "cola"}
    # also in overrides, variants and on the command line
    spec = parse_spec(
        {"base": "tiny_debug", "overrides": {"task": "rte"}, "variants": {"s": {"task": "sst2"}, "d": {}}},
        base_overrides=["train.seed=1"],
    )
    assert spec.resolve({}, "d").data.task == "rte" and spec.resolve({}, "s").data.task == "sst2"
    spec = parse_spec({"base": "tiny_debug", "search": {"train.seed": [1]}}, base_overrides=["task=mrpc"])
    assert spec.base_config().data.task == "mrpc"
    with pytest.raises(ConfigError, match="search: 'task' and 'data.task' name the same key"):
        parse_spec({"base": "tiny_debug", "search": {"data.task": ["rte"], "task": ["sst2"]}})
    with pytest.raises(ConfigError, match=r"search.data.task.grid: empty list"):
        parse_spec({"base": "tiny_debug", "search": {"task": "grid[]"}})


def test_sigterm_stops_like_ctrl_c():
    """Outside Tune's fit (no graceful stop available) SIGTERM and SIGINT both raise KeyboardInterrupt
    through the same handler, which records the signal; the previous handlers come back afterwards."""
    from kdqat_dist.tune.trainable import _graceful_signals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with _graceful_signals() as got:
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
                time.sleep(1)  # the handler runs between bytecodes; never reached
        assert got == {"signum": sig}
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
        assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def test_one_stop_delivered_twice_is_one_graceful_stop():
    # scancel signals the job step and the Slurm script forwards its own SIGTERM: the sweep must stop
    # gracefully once, not take the second copy for "abort now". A different signal still aborts.
    from kdqat_dist.tune.trainable import _graceful_signals

    stops = []
    with _graceful_signals() as got:
        signal.signal(signal.SIGUSR1, lambda *a: stops.append(1))  # stands in for Tune's graceful stop
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert stops == [1] and got["signum"] == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)


def test_resources_the_cluster_cannot_provide(tmp_path, ray_session, teacher):
    from kdqat_dist.tune.trainable import run_sweep

    spec = load_spec(_spec(tmp_path, teacher_path=str(teacher), search={"train.seed": [42]}, tune={"num_workers": 4}))
    msg = r"tune: a trial needs 5 CPUs \(1 trial driver \+ tune.num_workers 4 .* but the Ray cluster has 3"
    with pytest.raises(ConfigError, match=msg):
        run_sweep(spec)
    assert not (tmp_path / "sweep" / "tune").exists()


# --------------------------------------------------------------------------- real sweeps


def test_four_trial_sweep_and_table(tmp_path, ray_session, teacher):
    from kdqat_dist.tune.trainable import run_sweep

    spec = load_spec(
        _spec(
            tmp_path,
            teacher_path=str(teacher),
            search={"distill.gamma": {"grid": [0.2, 0.8]}, "train.seed": {"grid": [42, 52]}},
            tune={"num_workers": 1, "max_failures": 0},
        )
    )
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
    # Cross-check against what Ray Tune itself received from each trial (its own result.json): the row of
    # Tune's trial X is trial X's folder, with X's searched values and the evaluations X reported.
    by_id = {json.loads((Path(r["run_dir"]).parent / "point.json").read_text())["trial_id"]: r for r in rows}
    assert sorted(by_id) == sorted(res.metrics["trial_id"] for res in grid)
    for res in grid:
        row = by_id[res.metrics["trial_id"]]
        assert res.config["point"] == {"distill.gamma": row["gamma"], "train.seed": row["seed"]}
        tune_seen = _tune_records(res)
        history = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())["history"]
        assert [(t["step"], t["acc"], t["selection"]) for t in tune_seen] == [
            (h["step"], h["acc"], h["selection"]) for h in history
        ]
        assert row["selection"] == max(t["selection"] for t in tune_seen)
        assert row["best_step"] == tune_seen[-1]["best_step"]
        assert row["teacher_selection"] == tune_seen[-1]["teacher_selection"]
    summary = (spec.output_dir / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "n_seeds" in summary[0]
    assert paths["png"].stat().st_size > 0
    md = paths["md"].read_text()
    assert md.count("| demo |") == 6 and "± " in md


def test_bitdistill_recipe_as_a_sweep_base(tmp_path, ray_session, teacher):
    """The 2025 recipe runs as a sweep's base: absmean and SEQ weights, each trial's student saved with its
    SubLN LayerNorms and the quantizer the trial asked for."""
    from kdqat_dist.models.subln import SubLNLinear
    from kdqat_dist.quant.student import load_student
    from kdqat_dist.tune.trainable import run_sweep

    tiny = {  # bitdistill_w158a8 is a BERT-base recipe: the tiny model and task of tiny_debug instead
        "model.name_or_path": "tiny-bert",
        "data.task": "demo",
        "data.demo_level": "easy",
        "data.max_seq_length": 32,
        "train.batch_size": 16,
        "train.lr": 1e-3,
        "train.epochs": 1,
        "train.progress": False,
    }
    spec = load_spec(
        _spec(
            tmp_path,
            base="bitdistill_w158a8",
            teacher_path=str(teacher),
            overrides=tiny,
            search={"quant.weight.method": {"grid": ["absmean", "seq"]}},
            tune={"num_workers": 1, "max_failures": 0},
        )
    )
    grid = run_sweep(spec, verbose=0)
    assert len(grid) == 2 and grid.num_errors == 0
    rows, _ = collect_rows(spec.output_dir)
    assert {r["status"] for r in rows} == {"ok"}
    methods = set()
    for r in rows:
        layer = load_student(Path(r["run_dir"]) / "student").bert.encoder.layer[0]
        assert isinstance(layer.output.dense, SubLNLinear)
        methods.add(layer.output.dense.linear.weight_quant.cfg.method)
        history = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["history"]
        assert [h["step"] for h in history] == [3, 6]
    assert methods == {"absmean", "seq"}


def test_resume_reruns_only_the_failed_trial(tmp_path, ray_session, teacher):
    """Seed 52's teacher is missing: its trial fails (the sweep ends with one finished and one errored
    trial, exit status 1); after the teacher appears, --resume reruns only that trial."""
    from kdqat_dist.cli import main

    teachers = tmp_path / "teachers"
    teachers.mkdir()
    (teachers / "42").symlink_to(teacher)
    path = _spec(
        tmp_path,
        teacher_path=str(teachers / "{train.seed}"),
        search={"train.seed": [42, 52]},
        tune={"max_failures": 0},
        max_concurrent=1,
    )
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


def test_ctrl_c_stops_the_driver_and_resume_skips_finished_trials(tmp_path, ray_session, teacher):
    """`kdqat sweep` as a real process (joining this module's Ray cluster with --address, which saves
    starting another); SIGINT once one trial has finished and the next is running. The sweep samples
    train.lr (uniform) and train.seed (choice) with num_samples 2 and names the task by its alias."""
    from kdqat_dist.cli import main

    path = _spec(
        tmp_path,
        teacher_path=str(teacher),
        max_concurrent=1,
        search={"task": "grid[demo]", "train.lr": "uniform[1.0e-4, 1.0e-3]", "train.seed": {"choice": [42, 52]}},
        tune={"num_samples": 2, "max_failures": 0},
    )
    out = tmp_path / "sweep"
    address = ray_session.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdqat_dist.cli", "sweep", "--config", str(path), "--quiet", "--address", address],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=dict(os.environ),
        )
    try:
        deadline = time.monotonic() + 240
        while True:  # until one trial has finished training and the second has started
            tdirs = sorted((out / "trials").glob("*")) if (out / "trials").exists() else []
            done = [d for d in tdirs if (d / "run" / "metrics.json").exists()]
            if done and sum((d / "starts.log").exists() for d in tdirs) == 2:
                break
            assert proc.poll() is None, f"the sweep ended before the interrupt:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no trial finished in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert rc == 130, text[-4000:]
    # --quiet: the trials' own output (training logs, progress bars; "(train_trial pid=...)") stays away
    assert "pid=" not in text and "step 3:" not in text, text[-4000:]
    assert took < 45, f"exit took {took:.0f} s after SIGINT"
    assert (
        "kdqat sweep: interrupted by SIGINT with 1 of 2 trials finished training; the sweep state is "
        f"saved in {out / 'tune'}. Continue with: kdqat sweep --config {path} --address {address} --resume" in text
    ), text[-4000:]
    assert (out / "results.md").exists()  # the tables were written for the trials so far
    (first,) = done
    rest = next(d for d in (out / "trials").iterdir() if d != first)
    first_metrics = (first / "run" / "metrics.json").stat().st_mtime_ns
    first_student = (first / "run" / "student").stat().st_mtime_ns
    assert _attempts(first) == [_attempts(first)[0]] and len(_attempts(rest)) == 1
    assert not (rest / "run" / "metrics.json").exists()
    rest_lr = yaml.safe_load((rest / "resolved.yaml").read_text())["train"]["lr"]

    assert main(["sweep", "--config", str(path), "--quiet", "--resume"]) == 0
    assert len(_attempts(first)) == 1, "a trial that had finished before the interrupt ran again"
    assert (first / "run" / "metrics.json").stat().st_mtime_ns == first_metrics
    assert (first / "run" / "student").stat().st_mtime_ns == first_student
    assert len(_attempts(rest)) == 2 and (rest / "run" / "metrics.json").exists()
    # Tune kept the interrupted trial's sampled lr rather than drawing a new one
    assert yaml.safe_load((rest / "resolved.yaml").read_text())["train"]["lr"] == rest_lr
    rows, _ = collect_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]  # num_samples 2 -> 2 trials, both in the table
    assert {r["task"] for r in rows} == {"demo"} and {r["seed"] for r in rows} <= {42, 52}
    lrs = [r["lr"] for r in rows]
    assert all(1e-4 <= lr <= 1e-3 for lr in lrs) and lrs[0] != lrs[1] and rest_lr in lrs
    assert len((out / "results.csv").read_text().splitlines()) == 3


def _custom_task(tmp_path: Path) -> dict:
    """A 2-class custom task from demo sentences, with two dev files of the same 29 sentences: every label
    negative / every label positive. Whatever a student predicts, its accuracy on one is 1 - that on the
    other, so the two can never tie (29 is odd)."""
    from kdqat_dist.data.demo import make_demo

    names = ("negative", "positive")
    demo = make_demo(200, 0)
    (tmp_path / "train.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{r['text_a']}\t{names[r['label']]}\n" for r in demo["train"])
    )
    for label in names:
        (tmp_path / f"dev_{label}.tsv").write_text(
            "sentence\tlabel\n" + "".join(f"{r['text_a']}\t{label}\n" for r in demo["dev"][:29])
        )
    return {"data.task": "custom", "data.train_file": str(tmp_path / "train.tsv"), "data.label_list": list(names)}


def _asha_decisions(histories: list[list[float]]) -> list[bool]:
    """Which trials ASHA stops (Ray's rule, grace_period 1, reduction_factor 2: rungs at iterations
    1, 2, 4...; a result below the median of the results recorded earlier at its rung stops the trial),
    given the values each trial reported, for trials that run one after the other."""
    import numpy as np

    rungs: dict[int, list[float]] = {}
    stopped = []
    for values in histories:
        stop = False
        for it, v in enumerate(values, 1):
            if it & (it - 1) == 0:  # a power of two: a rung
                seen = rungs.setdefault(it, [])
                stop = bool(seen) and v < np.nanpercentile(seen, 50)
                seen.append(v)
                if stop:
                    break
        stopped.append(stop)
    return stopped


def test_asha_stops_trials_early_and_a_crashed_trial_is_retried(tmp_path, ray_session, teacher):
    """Three trials one after the other, evaluated on [all-negative, all-positive, all-negative] dev
    labels: the third repeats the first, so whichever of the first two scores lower, one trial reports
    below the running median at the first rung and ASHA must stop it. The first trial's worker process
    is killed (SIGKILL, as a node loss or the OOM killer would) on its first attempt; max_failures 1
    retries it."""
    from kdqat_dist.cli import main
    from kdqat_dist.tune.trainable import run_sweep

    dev = [str(tmp_path / f"dev_{x}.tsv") for x in ("negative", "positive", "negative")]
    path = _spec(
        tmp_path,
        teacher_path=str(teacher),
        max_concurrent=1,
        overrides={**_custom_task(tmp_path), "train.max_steps": 4, "train.eval_every": 2},
        search={"data.dev_file": {"grid": dev}},
        tune={"scheduler": "asha", "grace_period": 1, "max_failures": 1},
    )
    spec = load_spec(path)
    trials = spec.output_dir / "trials"
    killed: list[str] = []

    def kill_first_attempt() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            logs = sorted(trials.glob("*/starts.log")) if trials.exists() else []
            if logs and logs[0].read_text().strip():
                pid = _attempts(logs[0].parent)[0]
                os.kill(int(pid), signal.SIGKILL)  # the Ray worker running the trial
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_attempt, daemon=True)
    killer.start()
    grid = run_sweep(spec, verbose=0)
    killer.join()
    assert killed, "the first trial never started"
    # the retry: the killed attempt failed, Tune started the trial again, and it finished
    assert grid.num_errors == 0 and len(grid) == 3, [r.error for r in grid]
    ordered = sorted(grid, key=lambda r: r.metrics["trial_id"])  # trial ids number them in start order
    first_dir = next(trials.glob(f"{ordered[0].metrics['trial_id']}_*"))
    attempts = _attempts(first_dir)
    assert len(attempts) == 2 and attempts[0] == killed[0] and attempts[1] != killed[0]
    # ASHA: Tune's own records, replayed through ASHA's rule, say which trials it stops
    histories = [[t["selection"] for t in _tune_records(r)] for r in ordered]
    expected = _asha_decisions(histories)
    assert sum(expected) >= 1, histories  # the dev files guarantee a result below a rung's median
    rows = {r["trial"]: r for r in collect_rows(spec.output_dir)[0]}
    assert len(rows) == 3
    for res, values, stop in zip(ordered, histories, expected, strict=True):
        tdir = next(trials.glob(f"{res.metrics['trial_id']}_*"))
        row = rows[tdir.name]
        progress = json.loads((tdir / "progress.json").read_text())["history"]
        assert [p["selection"] for p in progress] == values  # Tune saw every evaluation the trial made
        if stop:  # stopped at the rung: no metrics.json; the table row is the partial result so far
            assert not (tdir / "run" / "metrics.json").exists()
            assert row["status"] == "partial" and row["selection"] == max(values)
        else:
            assert len(values) == 2 and row["status"] == "ok"
    # a trial ASHA stopped is a normal outcome, not a failure: the sweep's exit status stays 0
    assert main(["sweep", "--config", str(path), "--report-only"]) == 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DS_BACKEND, reason="kdqat_dist.engine.ds_backend (DeepSpeed backend) not present")
def test_two_deepspeed_workers_per_trial(tmp_path, ray_session, teacher):
    from kdqat_dist.tune.trainable import run_sweep

    spec = load_spec(
        _spec(
            tmp_path,
            teacher_path=str(teacher),
            search={"train.seed": [42]},
            overrides={"engine.deepspeed.zero_stage": 2},
            tune={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0},
        )
    )
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


def test_csv_numbers_are_rounded_for_reading(tmp_path):
    from kdqat_dist.tune.results import _write_csv

    _write_csv(
        tmp_path / "r.csv",
        [{"gamma": 0.09999999999999998, "acc": 0.8765432109876, "seed": 42, "run_dir": "x"}],
        ["gamma", "acc", "seed", "run_dir"],
    )
    assert (tmp_path / "r.csv").read_text().splitlines()[1] == "0.1,0.876543,42,x"
