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

Interrupting the driver (Ctrl-C = SIGINT, or SIGTERM as Slurm sends on preemption / scancel) stops the
sweep gracefully: Tune saves its state, the running trials are stopped, and :func:`run_sweep` raises
:class:`SweepInterrupted`; ``kdqat sweep --resume`` then reruns only the trials that had not finished. A
second signal aborts at once (the state saved last is kept).

Ray is imported inside the functions that use it: its import takes seconds and starts nothing we need
until a sweep runs (``kdqat --help`` imports this package to register ``sweep``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdqat_dist.config import ConfigError, RunConfig, load_config, save_config
from kdqat_dist.engine.loop import run
from kdqat_dist.errors import TrainingError
from kdqat_dist.tune.results import _sweep_meta
from kdqat_dist.tune.spec import SweepSpec, check_resources, spec_from_dict, trial_resources

if TYPE_CHECKING:
    from ray.tune import ResultGrid, Tuner

EXPERIMENT = "tune"  # <output_dir>/tune holds the Tune experiment state
EVENTS = "events.jsonl"  # evaluation records written by rank 0 of a distributed trial
PROGRESS = "progress.json"  # the evaluations so far (the partial result of a stopped trial)
_TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


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
    if cfg.tune.num_workers > 1 and cfg.engine.backend == "none":
        cfg.engine.backend = "deepspeed"  # every worker is a rank of a sharded engine (FSDP2 when asked)
    resolved = tdir / "resolved.yaml"
    save_config(cfg, resolved)
    (tdir / "point.json").write_text(
        json.dumps({"trial_id": trial_id, "point": point, "variant": variant, "sweep": sweep.name}, indent=2)
    )
    finished = run_dir / "metrics.json"
    if finished.exists():  # trained before the sweep state was saved: replay, do not retrain
        _replay(json.loads(finished.read_text()))
        return
    resume = _prepare_run_dir(run_dir, tdir)
    cfg = load_config(resolved)  # exactly what the workers read
    if cfg.tune.num_workers == 1:
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
        scaling_config=train.ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=train.RunConfig(
            name="train", storage_path=str(tdir / "ray_train"), failure_config=train.FailureConfig(max_failures=0)
        ),
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
    err = box.get("error") or getattr(box.get("result"), "error", None)
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


def _init_ray(address: str | None, num_cpus: int | None, base: RunConfig, log_to_driver: bool = True) -> None:
    """Join the cluster at ``address`` or start a local instance; ``log_to_driver``: stream the trials'
    output here. A failure to start or reach Ray is one line with what to try
    (:class:`~kdqat_dist.errors.TrainingError`), not Ray's traceback."""
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            ray.init(num_cpus=num_cpus or default_num_cpus(base), include_dashboard=False, log_to_driver=log_to_driver)
    except Exception as exc:  # whatever stops Ray from starting: a start-up timeout, a port in use, /tmp
        ray.shutdown()  # the processes a half-started local instance left
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        if address:
            what = f"could not join the Ray cluster at {address}"
            hint = (
                "check that it is running and reachable from here (`ray status --address ...`), or leave out "
                "--address to start a local instance"
            )
        else:
            what = "could not start a local Ray instance"
            hint = (
                "Ray's start-up has fixed time limits that a loaded machine can miss: retry when it is "
                "quieter, or start Ray yourself (`ray start --head --num-cpus N`) and pass --address auto; "
                "`ray stop` ends a stale instance; Ray's logs: /tmp/ray/session_latest/logs (or under $RAY_TMPDIR)"
            )
        raise TrainingError(f"sweep: {what} ({type(exc).__name__}: {first}); {hint}") from None


def _cluster() -> tuple[dict[str, float], dict[str, float]]:
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items()}
    alive = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    largest = {k: max(float(res.get(k, 0.0)) for res in alive) for k in ("CPU", "GPU")} if alive else {}
    return total, largest


def _param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
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


class SweepInterrupted(Exception):
    """The driver got SIGINT/SIGTERM before every trial finished. Tune saved the sweep state, so
    ``kdqat sweep --resume`` continues it; ``exit_code`` is the shell convention 128 + signal number."""

    def __init__(self, signum: int, finished: int, total: int | None, grid: ResultGrid | None):
        self.signum, self.finished, self.total, self.grid = signum, finished, total, grid
        self.exit_code = 128 + signum
        of = "" if total is None else f" of {total}"
        super().__init__(f"interrupted by {signal.Signals(signum).name} with {finished}{of} trials finished training")


_SAME_STOP_S = 2.0  # the same signal again within this long is the same stop, not "abort now"


@contextlib.contextmanager
def _graceful_signals() -> Iterator[dict[str, int]]:
    """While the sweep runs: SIGINT and SIGTERM both stop it gracefully, and we know that they came.

    Tune's graceful stop (save the experiment state one last time, stop the running trials, return from
    ``fit``) is triggered by its SIGINT and SIGUSR1 handlers, installed inside ``fit``. Its SIGINT handler
    would leave no trace for us - and the ResultGrid it returns shows the stopped trials as TERMINATED,
    like finished ones - and SIGTERM (Slurm preemption, ``scancel``) would hit ``ray.init``'s handler
    (``sys.exit``), which skips the save. So Tune's SIGINT handler is switched off (its documented
    ``TUNE_DISABLE_SIGINT_HANDLER``) and our handler, for both signals, records the signal and calls Tune's
    SIGUSR1 handler. Before Tune has installed that handler, or on a second signal (not the same one
    again within 2 s: Slurm can deliver one stop twice), it raises KeyboardInterrupt: stop now, the state
    saved last is kept. Handlers can only be set from the main thread; elsewhere this does nothing (Tune's
    defaults apply)."""
    got: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    env_before = os.environ.get(_TUNE_SIGINT_ENV)

    first_at: list[float] = []

    def on_signal(signum: int, frame: Any) -> None:
        first = not got
        if not first and signum == got["signum"] and time.monotonic() - first_at[0] < _SAME_STOP_S:
            return  # one stop delivered twice (scancel signals the job step and the batch script forwards it)
        got.setdefault("signum", signum)
        first_at.append(time.monotonic())
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if first and callable(tune_stop) and tune_stop is not before[signal.SIGUSR1]:
            tune_stop(signal.SIGUSR1, frame)
        else:
            raise KeyboardInterrupt

    os.environ[_TUNE_SIGINT_ENV] = "1"
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        yield got
    finally:
        if env_before is None:
            os.environ.pop(_TUNE_SIGINT_ENV, None)
        else:
            os.environ[_TUNE_SIGINT_ENV] = env_before
        # Tune leaves its SIGUSR1 handler installed after fit; a stale one must not look live to the next
        # sweep in this process, and Ctrl-C after the sweep must interrupt again.
        for sig, handler in before.items():
            if handler is not None:
                signal.signal(sig, handler)


def _finished_trials(output_dir: Path) -> int:
    """Trials whose run wrote metrics.json (the trial folders are the sweep's own record of them)."""
    return sum(1 for _ in (output_dir / "trials").glob("*/run/metrics.json"))


def _expected_trials(spec: SweepSpec) -> int:
    """How many trials the sweep has: grid points x num_samples, of the spec it started with, which
    :func:`_record_spec` keeps in sweep.json (a resumed sweep keeps its original search space even when
    the spec file changed since)."""
    recorded = _sweep_meta(spec.output_dir)
    if recorded:
        spec = spec_from_dict(recorded)
    return spec.num_grid_points * spec.base_config().tune.num_samples


def run_sweep(
    spec: SweepSpec, resume: bool = False, address: str | None = None, num_cpus: int | None = None, verbose: int = 1
) -> ResultGrid:
    """Run (or ``resume``) the sweep; returns the Tune ``ResultGrid``. Tables are written by the caller
    (:func:`kdqat_dist.tune.results.write_report`). Raises :class:`SweepInterrupted` when SIGINT/SIGTERM
    stopped it before every trial finished (the state is saved: continue with ``resume=True``).
    ``verbose`` 0 also keeps the trials' own output (logs, progress bars) off this console: it stays in
    each trial's folder."""
    from ray import tune

    base = spec.base_config()
    exp = spec.output_dir / EXPERIMENT
    exists = exp.exists() and tune.Tuner.can_restore(str(exp))
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep state under {exp} (run the sweep without --resume first)")
    if not resume and exists:
        raise ConfigError(
            f"output_dir: {spec.output_dir} already holds this sweep; pass --resume to "
            "continue it or choose another output_dir"
        )
    _init_ray(address, num_cpus, base, log_to_driver=verbose > 0)  # quiet: no trial output streamed here
    # From here on Ctrl-C and SIGTERM stop the sweep gracefully (see _graceful_signals).
    n_trials: int | None = None
    with _graceful_signals() as got:
        try:
            tuner = _make_tuner(spec, base, resume, exp, verbose)
            n_trials = _expected_trials(spec)
            grid = tuner.fit()
        except KeyboardInterrupt:
            # a signal before Tune could stop gracefully, or a second one: the state saved last is kept
            if not got:
                raise
            raise SweepInterrupted(got["signum"], _finished_trials(spec.output_dir), n_trials, None) from None
    finished = _finished_trials(spec.output_dir)
    # Tune stopped gracefully and returned normally (its grid shows stopped trials as TERMINATED); a signal
    # that came only after the last trial had finished stopped nothing
    if got and (n_trials is None or finished < n_trials):
        raise SweepInterrupted(got["signum"], finished, n_trials, grid)
    return grid


def _make_tuner(spec: SweepSpec, base: RunConfig, resume: bool, exp: Path, verbose: int) -> Tuner:
    """A new Tuner for the spec, or the saved one under ``exp`` (``resume``) with errored and unfinished
    trials to run again."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cluster, largest = _cluster()
    check_resources(base, cluster, largest)
    t = base.tune
    # N>1 workers: the trial holds 1 CPU for its driver; the workers are Ray Train's actors
    res: dict[str, float] = {"cpu": 1} if t.num_workers > 1 else {"cpu": t.cpus_per_worker, "gpu": t.gpus_per_worker}
    trainable = tune.with_resources(tune.with_parameters(train_trial, spec=spec.to_dict()), res)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    _record_spec(spec, resume)
    if resume:
        return tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=10_000, grace_period=t.grace_period, reduction_factor=2
        )
    return tune.Tuner(
        trainable,
        param_space=_param_space(spec),
        tune_config=tune.TuneConfig(
            metric="selection",
            mode="max",
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=max_concurrent(spec, base, cluster.get("CPU", 1)),
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(spec.output_dir),
            verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
        ),
    )


def _record_spec(spec: SweepSpec, resume: bool) -> None:
    path = spec.output_dir / "sweep.json"
    now = spec.to_dict()
    if resume and path.exists():
        if json.loads(path.read_text()) != json.loads(json.dumps(now)):
            print(
                f"kdqat sweep: warning: the spec differs from the one this sweep started with ({path}); "
                "--resume continues the original trials"
            )
        return
    path.write_text(json.dumps(now, indent=2))
