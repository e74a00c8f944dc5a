"""Ray Tune plumbing: the trial function (one KD-QAT run per trial) and the sweep driver.

Each trial:

1. resolves its config once (base recipe + overrides + variant + sampled point) and writes it as
   ``<output_dir>/trials/<trial>/resolved.yaml`` - every rank of the trial loads that same file, so the
   ranks can never disagree on a hyperparameter (the transformers#34641 class of bugs);
2. runs :func:`kdqat_dist.engine.loop.run` in-process (``tune.num_workers: 1``) or launches a Ray Train
   ``TorchTrainer`` with N DeepSpeed workers (``tune.num_workers > 1``; gloo on CPU, nccl on GPU);
3. reports every evaluation to Tune (``tune.report``), so ASHA can stop it early.

The run itself lives in ``trials/<trial>/run/`` (metrics.json, tb/, student/), a path that survives
``--resume``; a trial whose ``metrics.json`` already exists is never trained again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from kdqat_dist.config import ConfigError, RunConfig, load_config, save_config
from kdqat_dist.tune.spec import SweepSpec, check_resources, spec_from_dict, trial_resources

EXPERIMENT = "tune"  # <output_dir>/tune holds the Tune experiment state
EVENTS = "events.jsonl"  # evaluation records written by rank 0 of a distributed trial
PROGRESS = "progress.json"  # the evaluations so far (the partial result of a stopped trial)


def _short_key(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]


def trial_dirname(trial_id: str, point: dict[str, Any], variant: str | None) -> str:
    """A readable, stable folder name: ``<trial_id>_variant_key=value...``."""
    bits = [variant] if variant else []
    for k, v in point.items():
        v = f"{v:.4g}" if isinstance(v, float) else str(v)
        bits.append(f"{_short_key(k)}={v}")
    name = "_".join([trial_id, *bits])
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", name)[:120]


def _numeric(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- the trial


def train_trial(config: dict, spec: dict | None = None) -> None:
    """The Tune function trainable. ``config`` = {"point": {dotted key: value}, "variant": name | None}."""
    from ray import tune

    sweep = spec_from_dict(spec)
    point, variant = dict(config.get("point") or {}), config.get("variant")
    trial_id = tune.get_context().get_trial_id() or "local"
    tdir = sweep.output_dir / "trials" / trial_dirname(trial_id, point, variant)
    tdir.mkdir(parents=True, exist_ok=True)
    with open(tdir / "starts.log", "a") as f:  # one line per attempt (resume tests count them)
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()}\n")
    run_dir = tdir / "run"
    cfg = sweep.resolve(point, variant, output_dir=run_dir)
    if cfg.tune.num_workers > 1:
        cfg.engine.backend = "deepspeed"  # every worker is a DeepSpeed rank
    resolved = tdir / "resolved.yaml"
    save_config(cfg, resolved)
    (tdir / "point.json").write_text(json.dumps({"trial_id": trial_id, "point": point, "variant": variant,
                                                 "sweep": sweep.name}, indent=2))
    finished = run_dir / "metrics.json"
    if finished.exists():  # trained before the sweep state was saved: replay, do not retrain
        _replay(json.loads(finished.read_text()))
        return
    resume = _prepare_run_dir(run_dir, tdir)
    cfg = load_config(resolved)  # exactly what the workers read
    if cfg.tune.num_workers == 1:
        from kdqat_dist.engine.loop import run

        progress = Progress(tdir / PROGRESS)
        run(cfg, "train", resume=resume, on_eval=lambda rec: tune.report(progress.add(rec)))
    else:
        _run_distributed(cfg, resolved, tdir, resume)


class Progress:
    """Every evaluation record so far, in ``progress.json`` - the trial's own partial result, which the
    table uses when a trial never wrote metrics.json (stopped early by ASHA, or failed)."""

    def __init__(self, path: Path):
        self.path, self.history = path, []

    def add(self, rec: dict) -> dict[str, float]:
        rec = _numeric(rec)
        self.history.append(rec)
        best = max(self.history, key=lambda r: r.get("selection", float("-inf")))
        data = {"best": best, "history": self.history}
        if "teacher_selection" in rec:
            data["teacher"] = {"selection": rec["teacher_selection"]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)
        return rec


def _replay(metrics: dict) -> None:
    from ray import tune

    best = metrics.get("best") or {}
    teacher = (metrics.get("teacher") or {}).get("selection")
    for rec in metrics.get("history") or [best]:
        extra = {"best_selection": best.get("selection"), "best_step": best.get("step")}
        if teacher is not None:
            extra["teacher_selection"] = teacher
        tune.report(_numeric({**rec, **extra}))


def _prepare_run_dir(run_dir: Path, tdir: Path) -> bool:
    """A retried trial: resume from its engine checkpoints if it wrote any, else start over (the failed
    attempt is kept as ``run.failed<N>``). Returns the ``resume`` flag for the loop."""
    if not (run_dir / "config.yaml").exists():
        return False
    if any((run_dir / "checkpoints").glob("step*")):
        return True
    n = 1
    while (tdir / f"run.failed{n}").exists():
        n += 1
    shutil.move(str(run_dir), str(tdir / f"run.failed{n}"))
    return False


def _run_distributed(cfg: RunConfig, resolved: Path, tdir: Path, resume: bool) -> None:
    """N DeepSpeed workers through Ray Train; rank 0's evaluations are relayed to Tune from this thread."""
    from ray import train, tune
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.tune
    use_gpu = t.gpus_per_worker > 0
    per_worker = {"CPU": float(t.cpus_per_worker)}
    if use_gpu:
        per_worker["GPU"] = float(t.gpus_per_worker)
    events = tdir / EVENTS
    events.unlink(missing_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config_path": str(resolved), "resume": resume, "events": str(events)},
        scaling_config=train.ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                           resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=train.RunConfig(name="train", storage_path=str(tdir / "ray_train"),
                                   failure_config=train.FailureConfig(max_failures=0)),
    )
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised below, in the trial's thread
            box["error"] = exc

    th = threading.Thread(target=fit, name="torchtrainer-fit", daemon=True)
    th.start()
    seen, progress = 0, Progress(tdir / PROGRESS)
    while True:
        alive = th.is_alive()
        seen = _relay(events, seen, lambda rec: tune.report(progress.add(rec)))
        if not alive:
            break
        th.join(timeout=1.0)
    if "error" in box:
        raise box["error"]
    err = getattr(box.get("result"), "error", None)
    if err is not None:
        raise err
    if not (cfg_run := Path(cfg.train.output_dir) / "metrics.json").exists():
        raise RuntimeError(f"distributed trial finished without {cfg_run}")


def _relay(events: Path, seen: int, report) -> int:
    if not events.exists():
        return seen
    lines = events.read_text().splitlines()
    for line in lines[seen:]:
        if line.strip():
            report(_numeric(json.loads(line)))
    return len(lines)


def _worker_loop(conf: dict) -> None:
    """Runs on every Ray Train worker: load the trial's resolved config and train (DeepSpeed backend)."""
    from kdqat_dist.engine.loop import run

    cfg = load_config(conf["config_path"])
    events = Path(conf["events"])

    def on_eval(rec: dict) -> None:  # main rank only
        with open(events, "a") as f:
            f.write(json.dumps(_numeric(rec)) + "\n")

    run(cfg, "train", resume=conf["resume"], on_eval=on_eval)


# --------------------------------------------------------------------------- the driver


def default_num_cpus(base: RunConfig) -> int:
    """The local instance: the machine's cores, plus one logical CPU for the (mostly idle) trial driver
    when trials launch N>1 workers (ENVIRONMENT.md: logical CPUs >= 1 + num_workers)."""
    n = os.cpu_count() or 1
    return n + (1 if base.tune.num_workers > 1 else 0)


def _init_ray(address: str | None, num_cpus: int | None, base: RunConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or default_num_cpus(base), include_dashboard=False)
    return True


def _cluster() -> tuple[dict[str, float], dict[str, float]]:
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    largest: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        for k in ("CPU", "GPU"):
            largest[k] = max(largest.get(k, 0.0), float(res.get(k, 0.0)))
    return total, largest


def _param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    space: dict[str, Any] = {"point": {d.key: make[d.kind](d.values) for d in spec.search}}
    space["variant"] = tune.grid_search(list(spec.variants)) if spec.variants else None
    return space


def max_concurrent(spec: SweepSpec, base: RunConfig, cluster_cpus: float) -> int | None:
    """Trials that launch workers hold one CPU for their driver; cap concurrency so every running
    trial's workers also fit (otherwise drivers hold the CPUs their workers wait for)."""
    cap = spec.max_concurrent or None
    if base.tune.num_workers > 1:
        fit = max(1, int(cluster_cpus // trial_resources(base)["CPU"]))
        cap = min(cap or fit, fit)
    return cap


def run_sweep(spec: SweepSpec, resume: bool = False, address: str | None = None,
              num_cpus: int | None = None, verbose: int = 1):
    """Run (or ``resume``) the sweep; returns the Tune ``ResultGrid``. Tables are written by the caller
    (:func:`kdqat_dist.tune.results.write_report`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = spec.base_config()
    exp = spec.output_dir / EXPERIMENT
    exists = exp.exists() and tune.Tuner.can_restore(str(exp))
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep state under {exp} (run the sweep without --resume first)")
    if not resume and exists:
        raise ConfigError(f"output_dir: {spec.output_dir} already holds this sweep; pass --resume to "
                          "continue it or choose another output_dir")
    _init_ray(address, num_cpus, base)
    total, largest = _cluster()
    check_resources(base, total, largest)

    t = base.tune
    if t.num_workers > 1:
        res: dict[str, float] = {"cpu": 1}  # the trial driver; the workers are Ray Train's actors
    else:
        res = {"cpu": t.cpus_per_worker, "gpu": t.gpus_per_worker}
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec=spec.to_dict()), res)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    _record_spec(spec, resume)
    if resume:
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if t.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10_000,
                                      grace_period=t.grace_period, reduction_factor=2)
        cap = max_concurrent(spec, base, total.get("CPU", 1))
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec),
            tune_config=tune.TuneConfig(metric="selection", mode="max", scheduler=scheduler,
                                        num_samples=t.num_samples,
                                        max_concurrent_trials=cap),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(spec.output_dir), verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=t.max_failures)),
        )
    return tuner.fit()


def _record_spec(spec: SweepSpec, resume: bool) -> None:
    path = spec.output_dir / "sweep.json"
    now = spec.to_dict()
    if resume and path.exists():
        before = json.loads(path.read_text())
        if before != json.loads(json.dumps(now)):
            print(f"kdqat sweep: warning: the spec differs from the one this sweep started with ({path}); "
                  "--resume continues the original trials")
        return
    path.write_text(json.dumps(now, indent=2))
