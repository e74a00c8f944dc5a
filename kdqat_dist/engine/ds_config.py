"""DeepSpeed JSON configs with one source of truth: the run config fills every ``"auto"`` field.

``kdqat_dist/ds_configs/*.json`` (shipped in the package) hold the ZeRO policy only. Everything the run
config already says (batch sizes, gradient accumulation, clipping, precision, optimizer settings) is
``"auto"`` there and filled here.
A field the JSON sets explicitly must agree with the run config, or :func:`resolve` raises a
:class:`~kdqat_dist.config.ConfigError` naming both keys; a silent disagreement between the two is the
bug this module exists to prevent.

The resolved JSON is written once into the run directory (``ds_config_student.json``,
``ds_config_teacher.json``) by rank 0, and every rank then reads that same file
(:func:`kdqat_dist.engine.ds_backend.DeepSpeedBackend`), so the ranks cannot disagree either.

ZeRO-3 buffer sizes that depend on the model (``stage3_param_persistence_threshold``,
``stage3_prefetch_bucket_size``, ``reduce_bucket_size``) are ``"auto"`` too and are derived from the
hidden size, following the usual rule: parameters under 10·hidden elements (biases, LayerNorms) stay
whole on every rank; matrices are partitioned.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from kdqat_dist.config import RunConfig, shipped_dir
from kdqat_dist.engine.optim import global_clip, make_optimizer
from kdqat_dist.errors import ConfigError

AUTO = "auto"
KINDS = ("student", "teacher")


def shipped_configs() -> Path:
    """The JSONs shipped in the package (``kdqat_dist/ds_configs``). A ``./ds_configs`` in the working
    directory is not looked at: a stray copy there must not change a run; name a file in
    ``engine.deepspeed.config`` / ``engine.deepspeed.teacher_config`` to use your own."""
    return shipped_dir("ds_configs")


def base_config_path(cfg: RunConfig, kind: str) -> Path:
    """The base JSON for the student (``engine.deepspeed.config`` or ``zero{stage}.json``) or the teacher."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    opts = cfg.engine.deepspeed
    key = "engine.deepspeed.config" if kind == "student" else "engine.deepspeed.teacher_config"
    explicit = opts.config if kind == "student" else opts.teacher_config
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            shipped = ", ".join(sorted(x.name for x in shipped_configs().glob("*.json")))
            raise ConfigError(
                f"{key}: {explicit} {'is not a file' if p.exists() else 'does not exist'}; give a DeepSpeed JSON "
                f"file, or leave it empty for the shipped one ({shipped})"
            )
        return p
    name = f"zero{opts.zero_stage}.json" if kind == "student" else "teacher_zero3.json"
    path = shipped_configs() / name
    if not path.is_file():
        raise ConfigError(f"{key}: {name} is missing from {shipped_configs()} (a broken install); reinstall kdqat-dist")
    return path


def load_base(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror if isinstance(exc, OSError) else exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


def _adam_defaults(cfg: RunConfig) -> dict[str, Any]:
    """betas/eps/weight decay exactly as ``engine.optim.make_optimizer`` builds them (one source)."""
    d = make_optimizer(nn.Linear(1, 1), cfg.train).defaults
    return {"lr": cfg.train.lr, "betas": list(d["betas"]), "eps": d["eps"], "weight_decay": cfg.train.weight_decay}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


class _Filler:
    """Fills ``"auto"`` (or missing) fields of one JSON tree and checks the explicit ones."""

    def __init__(self, tree: dict, source: str):
        self.tree, self.source = tree, source

    def fill(self, path: str, value: Any, run_key: str) -> None:
        """Set ``path`` (dotted) to ``value`` if it is "auto" or missing; else require equality.

        ``run_key`` names the run-config key the value comes from, so the error tells the user which of
        the two places to change.
        """
        *parents, leaf = path.split(".")
        node = self.tree
        for p in parents:
            node = node.setdefault(p, {})
        current = node.get(leaf, AUTO)  # missing counts as "auto"
        if current == AUTO:
            node[leaf] = value
        elif not _same(current, value):
            raise ConfigError(
                f"{self.source}: {path} is {current!r} but {run_key} gives {value!r}; "
                f'set {path} to "auto" (recommended) or change {run_key}'
            )


def resolve(
    base: dict,
    cfg: RunConfig,
    world_size: int,
    kind: str = "student",
    hidden_size: int | None = None,
    source: str = "ds_config",
) -> dict:
    """A copy of ``base`` with its ``"auto"`` fields filled from the run config: none is left.

    ``kind``: ``student`` (a training engine) or ``teacher`` (an optimizer-free ZeRO-3 engine).
    ``hidden_size`` sizes the ZeRO-3 buffers (None: DeepSpeed's defaults where the JSON says "auto").
    ``source`` (the JSON's file name) names it in errors. ConfigError: an explicit JSON value contradicts
    the run config, or a section the run config owns (``scheduler``) is present.
    """
    t, e = cfg.train, cfg.engine
    out = copy.deepcopy(base)
    f = _Filler(out, source)
    micro = t.micro_batch_size(world_size)
    if "scheduler" in out:
        raise ConfigError(
            f"{source}: remove the 'scheduler' section; the learning-rate schedule comes from "
            "train.lr / train.warmup_ratio (linear warmup and decay, as in one process)"
        )
    f.fill("train_batch_size", t.batch_size, "train.batch_size")
    f.fill("train_micro_batch_size_per_gpu", micro, "train.batch_size / (world size x train.grad_accum)")
    f.fill("gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    f.fill("bf16.enabled", e.precision == "bf16", "engine.precision")
    f.fill("fp16.enabled", e.precision == "fp16", "engine.precision")
    stage = e.deepspeed.zero_stage if kind == "student" else 3
    key = "engine.deepspeed.zero_stage" if kind == "student" else "engine.deepspeed.teacher"
    f.fill("zero_optimization.stage", stage, key)
    _fill_zero_sizes(out, hidden_size)
    if kind == "teacher":
        out.pop("optimizer", None)
        out.pop("gradient_clipping", None)
        return _no_auto_left(out, source)
    # BertAdam clips each tensor itself (the backend does it on whole gradients): no global clip then
    f.fill("gradient_clipping", float(global_clip(t)), "train.max_grad_norm")
    _fill_optimizer(f, out, cfg, source)
    return _no_auto_left(out, source)


def _fill_zero_sizes(out: dict, hidden_size: int | None) -> None:
    z = out.get("zero_optimization", {})
    h = hidden_size or 0
    derived = {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }
    for key in [k for k in derived if z.get(k) == AUTO]:
        if hidden_size and z.get("stage") == 3:
            z[key] = derived[key]
        else:  # no model at hand, or not ZeRO-3: DeepSpeed's own default
            del z[key]


def _fill_optimizer(f: _Filler, out: dict, cfg: RunConfig, source: str) -> None:
    adam = _adam_defaults(cfg)
    keys = {
        "lr": "train.lr",
        "betas": "engine.optim (betas)",
        "eps": "train.adam_eps",
        "weight_decay": "train.weight_decay",
    }
    if cfg.engine.deepspeed.optimizer != "torch":
        out.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if "optimizer" in out:
        for name, value in adam.items():
            f.fill(f"optimizer.params.{name}", value, keys[name])
    # (BertAdam, our own optimizer object, is on DeepSpeed's list of tested ZeRO optimizers:
    # ds_workarounds.declare_tested_optimizers)
    if cfg.engine.deepspeed.optimizer == "torch":
        # A torch AdamW object with our parameter groups is passed to deepspeed.initialize instead (no JIT
        # build); the section has been checked against the run config above, so dropping it loses nothing.
        out.pop("optimizer", None)
        return
    opt = out["optimizer"]
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(
            f"{source}: optimizer.type {opt.get('type')!r} is not supported; use AdamW "
            "(the run's parameter groups and learning rates assume it)"
        )


def _no_auto_left(tree: dict, source: str, prefix: str = "") -> dict:
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if v == AUTO:
            raise ConfigError(f'{source}: {path} is "auto" but nothing in the run config fills it; give it a value')
        if isinstance(v, dict):
            _no_auto_left(v, source, path + ".")
    return tree


def resolved_path(run_dir: str | Path, kind: str) -> Path:
    return Path(run_dir) / f"ds_config_{kind}.json"


def write_resolved(resolved: dict, run_dir: str | Path, kind: str) -> Path:
    """Write the resolved config atomically (a reader never sees half a file); returns its path."""
    path = resolved_path(run_dir, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_resolved(run_dir: str | Path, kind: str) -> dict:
    path = resolved_path(run_dir, kind)
    if not path.is_file():
        raise ConfigError(
            f"train.output_dir: {path} (written by rank 0) is not visible on this rank; "
            "the run directory must be on a filesystem shared by all nodes"
        )
    return json.loads(path.read_text())


def build(cfg: RunConfig, world_size: int, kind: str, hidden_size: int | None = None) -> dict:
    """Base JSON for ``kind`` + the run config -> the resolved dict (nothing written)."""
    path = base_config_path(cfg, kind)
    return resolve(load_base(path), cfg, world_size, kind, hidden_size, source=path.name)
