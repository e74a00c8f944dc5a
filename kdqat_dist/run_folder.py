"""A model folder and the run that wrote it: which folder holds the model, and which config it was trained with.

``kdqat eval``, ``analyze``, ``export`` and ``predict`` take a model folder (a ``student/``, a fine-tuned
``model/``, an export) or the run folder around it, and score it on the run's own task and data by
default: the ``config.yaml`` that ``kdqat train``/``finetune`` wrote beside the model. Without it a
command would fall back to the built-in defaults and score another data set without saying so.

    run = model_run("runs/x")                  # runs/x/student, runs/x/config.yaml
    run = model_run("runs/x/student", "tiny_debug", ["data.max_eval_samples=100"])

An explicit ``--config`` (or overrides) whose task differs from the run's is refused: the model's head
was trained for the run's task. Other data differences (another dev file, demo level, sequence length)
are allowed and listed in :attr:`ModelRun.notes`, for the command to state.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from kdqat_dist.config import DataConfig, RunConfig, load_config
from kdqat_dist.data.tasks import get_task
from kdqat_dist.errors import ConfigError

__all__ = [
    "RUN_CONFIG",
    "ModelRun",
    "check_against_run",
    "data_differences",
    "model_run",
    "resolve_model_dir",
    "run_config_path",
]

RUN_CONFIG = "config.yaml"  # written by the training loop into every run folder
MODEL_DIRS = ("student", "model")  # the model a `kdqat train` / `kdqat finetune` run folder holds
EXPORT_META = "kdqat_export.json"  # kdqat_dist.export.artifact.EXPORT_META (a test keeps the two equal)
ONNX_META = "kdqat_onnx.json"  # kdqat_dist.export.onnx_export.ONNX_META: an ONNX export names its student too
# data settings that change neither which examples are scored nor how they are tokenised
_NEUTRAL_DATA = ("cache_dir", "max_train_samples")


@dataclass(frozen=True)
class ModelRun:
    """A model folder with the config to score it with.

    Attributes:
        model_dir: the folder holding the model (``config.json``): a student, a fine-tuned model, an export.
        config: the run's config (or the explicit one), overrides applied.
        config_source: where ``config`` came from: the run's ``config.yaml`` or the ``--config`` given.
        run_config: the run's ``config.yaml``, None when the model has none beside it.
        notes: how the data of ``config`` differs from the run's, one sentence each (empty: the same).
    """

    model_dir: Path
    config: RunConfig
    config_source: str
    run_config: Path | None
    notes: tuple[str, ...] = field(default_factory=tuple)


def resolve_model_dir(path: str | Path, flag: str = "--model") -> Path:
    """``path`` if it holds a model (``config.json``), else the ``student/`` or ``model/`` of a run folder.

    Raises:
        ConfigError: ``path`` does not exist, or is neither a model folder nor a run folder with a model.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{flag}: {p} does not exist")
    if (p / "config.json").is_file():
        return p
    for sub in MODEL_DIRS:
        if (p / sub / "config.json").is_file():
            return p / sub
    if (p / RUN_CONFIG).is_file():
        raise ConfigError(
            f"{flag}: {p} is a run folder without a model yet (the run writes student/ or model/ at its first "
            "evaluation)"
        )
    raise ConfigError(
        f"{flag}: {p} is neither a model folder (no config.json) nor a kdqat run folder (no student/ or model/)"
    )


def run_config_path(model_dir: str | Path) -> Path | None:
    """The ``config.yaml`` of the run that wrote ``model_dir``, or None.

    A run's ``student/`` or ``model/`` has it in its parent; an export (``kdqat export``) names the student
    it was packed from, whose run has it.
    """
    p = Path(model_dir)
    if p.name in MODEL_DIRS and (p.parent / RUN_CONFIG).is_file():
        return p.parent / RUN_CONFIG
    meta = next((p / m for m in (EXPORT_META, ONNX_META) if (p / m).is_file()), None)
    if meta is not None:
        try:
            source = json.loads(meta.read_text()).get("source") or {}
            student = Path(source["student"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # an export without a readable source: its config cannot be found
        if student != p and student.name in MODEL_DIRS:
            return run_config_path(student)
    return None


def _task_name(task: str) -> str:
    """The canonical name of a task (``SST-2`` and ``sst2`` are one task)."""
    try:
        return get_task(task).name
    except ConfigError:  # DataError: an unknown name compares as written
        return task


def data_differences(run: DataConfig, given: DataConfig) -> list[str]:
    """The ``data.*`` settings of ``given`` that differ from the run's, as ``data.key: A in the run, B here``."""
    a, b = dataclasses.asdict(run), dataclasses.asdict(given)
    return [f"data.{k}: {a[k]!r} in the run, {b[k]!r} here" for k in a if k not in _NEUTRAL_DATA and a[k] != b[k]]


def check_against_run(
    cfg: RunConfig, model_dir: Path, run_yaml: Path, given: str, data: bool = True, remedy: str | None = None
) -> list[str]:
    """Refuse a task other than the one ``model_dir`` was trained on; list the other data differences.

    Args:
        cfg: the config the model is about to be scored with.
        model_dir: the model folder, for the messages.
        run_yaml: its run's ``config.yaml``.
        given: what chose ``cfg``'s data, for the messages (``--config tiny_debug``, ``the override data.x=y``).
        data: also compare the other ``data.*`` settings (False: the task alone, e.g. for a teacher).
        remedy: what to do about another task, for the message (default: leave out ``given``).

    Returns:
        One note when the data differs (empty when it does not).

    Raises:
        ConfigError: the tasks differ: the model's classifier head belongs to the run's task.
    """
    run_data = load_config(run_yaml).data
    if _task_name(run_data.task) != _task_name(cfg.data.task):
        raise ConfigError(
            f"data.task: {model_dir} was trained on {run_data.task} ({run_yaml}) but {given} gives "
            f"{cfg.data.task}; its classifier head belongs to {run_data.task}: "
            + (remedy or f"leave out {given} to use the run's own config, or give a model of that task")
        )
    diffs = data_differences(run_data, cfg.data) if data else []
    return [f"the data differs from the run's ({run_yaml}): " + "; ".join(diffs)] if diffs else []


def model_run(
    path: str | Path, config: str | Path | None = None, overrides: list[str] | None = None, flag: str = "--model"
) -> ModelRun:
    """The model folder behind ``path`` and the config to score it with.

    Args:
        path: a model folder, or a run folder (its ``student/`` or ``model/`` is used).
        config: a recipe (path or shipped name) to use instead of the run's ``config.yaml``.
        overrides: ``key=value`` overrides, applied to either.
        flag: the CLI flag that gave ``path``, for the messages.

    Raises:
        ConfigError: one line: the folder is not a model; there is no run config and no ``config``; the
            task of ``config``/``overrides`` differs from the run's.
    """
    model_dir = resolve_model_dir(path, flag)
    run_yaml = run_config_path(model_dir)
    if config is None and run_yaml is None:
        raise ConfigError(
            f"--config: no run config.yaml for {model_dir} (it is looked for beside a run's student/ or "
            "model/ folder); pass --config RECIPE (and data.* overrides) to say which task and data to use"
        )
    cfg = load_config(config if config is not None else run_yaml, overrides)
    notes: list[str] = []
    if run_yaml is not None and (config is not None or overrides):
        task_override = [o for o in overrides or [] if o.replace(" ", "").startswith("data.task=")]
        given = f"the override {task_override[-1]}" if task_override else f"--config {config}"
        notes = check_against_run(cfg, model_dir, run_yaml, given)
    source = str(config) if config is not None else str(run_yaml)
    return ModelRun(model_dir, cfg, source, run_yaml, tuple(notes))
