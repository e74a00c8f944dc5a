"""Sweep specs (shipped ones in ``kdqat_dist/sweeps/*.yaml``): parsing and validation, without importing Ray.

A spec names a base recipe, optional base overrides, a search space over dotted config keys and optional
named variants (bundles of overrides, e.g. the loss-choice comparison)::

    name: gamma_sweep
    base: bert_base_w2a8_kd            # a recipe path or a shipped recipe name
    output_dir: runs/sweeps/gamma      # Tune state (tune/), one folder per trial (trials/), the tables
    teacher_path: "models/{data.task}" # optional; {dotted.key} is filled from each trial's config
    overrides: {train.epochs: 3}
    search:
      task: "grid[rte, sst2]"          # short for data.task (the only alias)
      distill.gamma: {grid: [0.1, 0.5, 0.9]}
      train.lr: {loguniform: [1.0e-5, 1.0e-4]}
      train.seed: "grid[42, 52, 62]"   # the short form works too
    variants:                          # optional: one grid dimension over named override bundles
      map: {distill.attn_map.weight: 1.0, distill.attn_output.weight: 0.0}
    tune: {num_workers: 1, scheduler: none}   # the config's tune section (resources, retries, ASHA)
    max_concurrent: 0                  # 0 = as many as the resources allow

Keys are dotted config names (``distill.attn_map.weight``); ``task`` is accepted as an alias of
``data.task`` everywhere a key is named (search, overrides, variants, ``{task}`` in teacher_path, CLI
``task=rte``). Domains: ``{grid: [...]}`` (every value), ``{choice: [...]}`` (one value drawn per sample),
``{uniform: [lo, hi]}`` and ``{loguniform: [lo, hi]}`` (a float drawn per sample), each also in the short
string form ``"choice[a, b]"`` / ``"uniform[lo, hi]"``, or a plain list (a grid). ``tune.num_samples``
repeats the whole grid that many times, drawing the sampled dimensions afresh each time.

Every problem raises :class:`~kdqat_dist.config.ConfigError` with one line, before any trial starts.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdqat_dist.config import (
    ConfigError,
    RunConfig,
    flat_keys,
    load_config,
    load_yaml,
    parse_override,
    path_exists,
    resolve_recipe,
    resolve_shipped,
    shipped_dir,
)
from kdqat_dist.data.tasks import get_task
from kdqat_dist.files import check_full_precision, check_writable

SPEC_DIR = shipped_dir("sweeps")  # the specs shipped in the package, named without a path (`tiny_demo`)
DOMAINS = ("grid", "choice", "uniform", "loguniform")
SPEC_KEYS = "name base output_dir teacher_path overrides search variants tune max_concurrent metric".split()
# Keys whose relative values are paths, made absolute against the directory `kdqat sweep` runs in
# (Ray changes each trial's working directory).
PATH_KEYS = (
    "teacher.path student.init_from data.source data.train_file data.dev_file data.cache_dir engine.deepspeed.config "
    "engine.deepspeed.teacher_config model.name_or_path"
).split()
MAX_GRID_CHECK = 2000
# Short names the examples use (``task: grid[rte, sst2, cola]``) -> the dotted config key.
KEY_ALIASES = {"task": "data.task"}
_SHORT = re.compile(r"^\s*(grid|choice|uniform|loguniform)\s*(\[.*\])\s*$", re.S)
_TEMPLATE = re.compile(r"\{([A-Za-z_][\w.]*)\}")


@dataclass
class Dim:
    """One search dimension: ``kind`` in grid | choice | uniform | loguniform."""

    key: str
    kind: str
    values: list


@dataclass
class SweepSpec:
    name: str
    base: str  # absolute path of the base recipe
    output_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    search: list[Dim] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher_path: str = ""
    max_concurrent: int = 0
    cwd: str = ""  # where relative paths are resolved
    path: str = ""  # the spec file

    # ------------------------------------------------------------------ derived

    @property
    def grid_dims(self) -> list[Dim]:
        return [d for d in self.search if d.kind == "grid"]

    @property
    def num_grid_points(self) -> int:
        n = math.prod(len(d.values) for d in self.grid_dims)
        return n * (len(self.variants) or 1)

    def base_config(self) -> RunConfig:
        return self.resolve({}, None)

    def grid_points(self) -> list[tuple[dict[str, Any], str | None]]:
        """Every grid combination (sampled dimensions at their first value), with its variant."""
        keys = [d.key for d in self.grid_dims]
        fixed = {d.key: d.values[0] for d in self.search if d.kind != "grid"}
        variants: list[str | None] = list(self.variants) or [None]
        out = []
        for combo in itertools.product(*(d.values for d in self.grid_dims)):
            for v in variants:
                out.append(({**fixed, **dict(zip(keys, combo, strict=True))}, v))
        return out

    def resolve(self, point: dict[str, Any], variant: str | None, output_dir: str | Path | None = None) -> RunConfig:
        """The full config of one trial: base recipe + overrides + variant + point (+ teacher template)."""
        ov = dict(self.overrides)
        if variant is not None:
            if variant not in self.variants:
                raise ConfigError(f"variants: unknown variant {variant!r}; defined: {', '.join(self.variants)}")
            ov.update(self.variants[variant])
        ov.update(point)
        if output_dir is not None:
            ov["train.output_dir"] = str(output_dir)
        cfg = load_config(self.base, ov)
        if self.teacher_path:
            ov["teacher.path"] = fill_template(self.teacher_path, cfg)
        ov = self._absolute_paths(ov, cfg)
        return load_config(self.base, ov)

    def _absolute_paths(self, ov: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
        base = Path(self.cwd or ".")
        out = dict(ov)
        for key in PATH_KEYS:
            val = get_dotted(cfg, key) if key not in ov else ov[key]
            if not isinstance(val, str) or not val or Path(val).expanduser().is_absolute():
                continue
            cand = base / val
            # teacher.path is always a path; others only when the file exists (model names, "minilm"...)
            if key == "teacher.path" or cand.exists():
                out[key] = str(cand.resolve())
        return out

    def to_dict(self) -> dict:
        """Plain data for shipping to Ray trials (re-read with :func:`spec_from_dict`)."""
        search = [[d.key, d.kind, d.values] for d in self.search]
        return {**asdict(self), "output_dir": str(self.output_dir), "search": search}


def spec_from_dict(d: dict) -> SweepSpec:
    return SweepSpec(**{**d, "output_dir": Path(d["output_dir"]), "search": [Dim(*x) for x in d["search"]]})


# --------------------------------------------------------------------------- helpers


def get_dotted(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def fill_template(template: str, cfg: RunConfig) -> str:
    """``"models/{data.task}"`` -> ``"models/rte"`` using the trial's config values."""

    def sub(m: re.Match) -> str:
        key = canonical_key(m.group(1))
        if key not in flat_keys():
            raise ConfigError(f"teacher_path: unknown config key {{{key}}} in {template!r}{_suggest(key)}")
        return str(get_dotted(cfg, key))

    return _TEMPLATE.sub(sub, template)


def canonical_key(key: Any) -> Any:
    """``task`` -> ``data.task``; every other key unchanged."""
    return KEY_ALIASES.get(key, key) if isinstance(key, str) else key


def _canonical_keys(raw: dict, where: str) -> dict:
    """Apply :data:`KEY_ALIASES` to a mapping's keys; an alias and its target together is an error
    (which value would win would depend on the YAML's key order)."""
    out: dict = {}
    given: dict = {}  # canonical key -> the key as written
    for k, v in raw.items():
        ck = canonical_key(k)
        if ck in out:
            alias = k if k != ck else given[ck]  # named first, whichever order the YAML has them in
            raise ConfigError(f"{where}: '{alias}' and '{ck}' name the same key; keep one")
        out[ck], given[ck] = v, k
    return out


def _suggest(key: str) -> str:
    near = difflib.get_close_matches(key, sorted(flat_keys()), n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


def _check_key(key: Any, where: str, allow_tune: bool = False) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"{where}: keys must be dotted config names, got {key!r}")
    if key not in flat_keys():
        raise ConfigError(f"{where}: unknown config key '{key}'{_suggest(key)}")
    if key.startswith("tune.") and not allow_tune:
        raise ConfigError(
            f"{where}: '{key}' sets trial resources and cannot vary per trial; set it under the spec's tune: section"
        )
    if key == "train.output_dir":
        raise ConfigError(f"{where}: train.output_dir is set per trial by the sweep (use output_dir: instead)")
    return key


def _number(v: Any, where: str) -> float:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    return float(v)


def parse_domain(key: str, raw: Any) -> Dim:
    """``{grid: [..]}``, ``{choice: [..]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, the short
    strings ``"grid[a, b]"``, or a plain list (a grid)."""
    where = f"search.{key}"
    if isinstance(raw, str):
        m = _SHORT.match(raw)
        if not m:
            raise ConfigError(
                f"{where}: expected {{grid: [...]}}, {{choice: [...]}}, {{uniform: [lo, hi]}}, "
                f"{{loguniform: [lo, hi]}} or 'grid[a, b]', got {raw!r}"
            )
        try:
            raw = {m.group(1): yaml.safe_load(m.group(2))}
        except yaml.YAMLError:
            raise ConfigError(f"{where}: cannot parse the list in {raw!r}") from None
    elif isinstance(raw, list):
        raw = {"grid": raw}
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{where}: expected exactly one of {', '.join(DOMAINS)}, got {raw!r}")
    kind, values = next(iter(raw.items()))
    if kind not in DOMAINS:
        raise ConfigError(f"{where}: unknown search domain {kind!r}; allowed: {', '.join(DOMAINS)}")
    if not isinstance(values, list):
        raise ConfigError(f"{where}.{kind}: expected a list, got {values!r}")
    if kind in ("grid", "choice"):
        if not values:
            raise ConfigError(f"{where}.{kind}: empty list; give at least one value")
        values = [_yaml_number(v) for v in values]
    else:
        if len(values) != 2:
            raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
        lo, hi = (_number(v, f"{where}.{kind}") for v in values)
        if not lo < hi:
            raise ConfigError(f"{where}.{kind}: low must be < high, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}.{kind}: bounds must be > 0, got [{lo}, {hi}]")
        values = [lo, hi]
    return Dim(key, kind, values)


def _yaml_number(v: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` as a string; make it the number the user meant."""
    if isinstance(v, str):
        _, parsed = parse_override(f"x={v}")
        return parsed
    return v


def _mapping(raw: Any, where: str) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, list):  # ["a.b=c", ...]
        return _canonical_keys(dict(parse_override(str(x)) for x in raw), where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of dotted keys, got {raw!r}")
    return _canonical_keys({k: _yaml_number(v) for k, v in raw.items()}, where)


# --------------------------------------------------------------------------- loading


def load_spec(
    path: str | Path,
    base_overrides: list[str] | dict | None = None,
    output_dir: str | None = None,
    cwd: str | Path | None = None,
) -> SweepSpec:
    """Parse and validate a sweep spec (see the module docstring). ``base_overrides`` (CLI ``key=value``)
    are applied on top of the spec's ``overrides``. Raises :class:`ConfigError` (one line)."""
    p = resolve_shipped(path, SPEC_DIR, "sweep spec")
    raw = load_yaml(p, top_level="a mapping (base, search, ...)")
    return parse_spec(raw, path=p, base_overrides=base_overrides, output_dir=output_dir, cwd=cwd)


def parse_spec(
    raw: dict,
    path: str | Path = "<spec>",
    base_overrides: list[str] | dict | None = None,
    output_dir: str | None = None,
    cwd: str | Path | None = None,
) -> SweepSpec:
    raw = copy.deepcopy(raw)
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"sweep spec: unknown top-level key '{unknown[0]}'; allowed: {', '.join(SPEC_KEYS)}")
    if "metric" in raw:  # accepted once but never read: a value here would be silently ignored
        raise ConfigError(
            "metric: trials are ranked by their task's own selection metric (acc, mcc, acc_and_f1, corr); "
            "remove the metric key"
        )
    if not raw.get("base"):
        raise ConfigError("base: required (a recipe path or a shipped recipe name, e.g. tiny_debug)")
    cwd = Path(cwd or Path.cwd()).resolve()
    base_path = Path(raw["base"])
    spec_dir = Path(path).parent if path != "<spec>" else cwd
    base_path = next((c for c in (cwd / base_path, spec_dir / base_path) if path_exists(c)), base_path)
    base = str(resolve_recipe(base_path).resolve())
    load_yaml(base)

    overrides = _mapping(raw.get("overrides"), "overrides")
    for k, v in _mapping(raw.get("tune"), "tune").items():
        overrides[k if k.startswith("tune.") else f"tune.{k}"] = v
    cli = base_overrides if isinstance(base_overrides, dict) else dict(parse_override(o) for o in base_overrides or [])
    cli = _canonical_keys(cli, "overrides (command line)")
    overrides.update(cli)
    for k in overrides:
        _check_key(k, "overrides", allow_tune=True)

    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise ConfigError(f"search: expected a mapping of dotted keys to domains, got {search_raw!r}")
    search_raw = _canonical_keys(search_raw, "search")
    search = [parse_domain(_check_key(k, "search"), v) for k, v in search_raw.items()]

    variants_raw = raw.get("variants") or {}
    if not isinstance(variants_raw, dict):
        raise ConfigError("variants: expected a mapping of names to override mappings")
    variants = {}
    for name, ov in variants_raw.items():
        ov = _mapping(ov, f"variants.{name}")
        for k in ov:
            _check_key(k, f"variants.{name}")
            if k in search_raw:
                raise ConfigError(f"variants.{name}: '{k}' is also in search; a key can vary in one place only")
        variants[str(name)] = ov
    if not search and not variants:
        raise ConfigError("search: empty; give at least one key to sweep (or variants)")

    max_conc = raw.get("max_concurrent") or 0
    if isinstance(max_conc, bool) or not isinstance(max_conc, int) or max_conc < 0:
        raise ConfigError(f"max_concurrent: got {max_conc!r}; must be an integer >= 0 (0: as many as fit)")
    teacher = raw.get("teacher_path") or ""
    if not isinstance(teacher, str):
        raise ConfigError(f"teacher_path: expected a string template, got {teacher!r}")
    if "teacher.path" in cli:
        teacher = ""  # an explicit teacher.path on the command line wins over the template
    out = output_dir or raw.get("output_dir") or f"runs/sweeps/{raw.get('name') or Path(path).stem}"
    spec = SweepSpec(
        name=str(raw.get("name") or Path(path).stem),
        base=base,
        output_dir=(cwd / Path(out).expanduser()).resolve(),
        overrides=overrides,
        search=search,
        variants=variants,
        teacher_path=teacher,
        max_concurrent=max_conc,
        cwd=str(cwd),
        path=str(Path(path).resolve()) if path != "<spec>" else "",
    )
    check_writable(spec.output_dir, "output_dir")
    validate_points(spec)
    return spec


def validate_points(spec: SweepSpec) -> None:
    """Build the config of the first grid point (and of every grid point, up to a limit, and the
    sampled bounds), so a bad value fails here and not in trial 17."""
    points = spec.grid_points()
    checks = points[:MAX_GRID_CHECK]
    for d in spec.search:
        if d.kind in ("uniform", "loguniform"):
            checks += [({**points[0][0], d.key: d.values[1]}, points[0][1])]
        elif d.kind == "choice":
            checks += [({**points[0][0], d.key: v}, points[0][1]) for v in d.values[1:]]
    for point, variant in checks:
        try:
            cfg = spec.resolve(point, variant)
            # what a trial would only find out after Ray has started: its task, a quantized "teacher"
            get_task(cfg.data)
            check_full_precision(cfg.teacher.path, "teacher.path")
        except ConfigError as exc:
            where = ([f"variant={variant}"] if variant else []) + [f"{k}={v}" for k, v in point.items()]
            raise ConfigError(f"sweep point ({', '.join(where)}): {exc}") from None


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What one trial holds: 1 CPU for the trial driver when it launches N>1 workers, plus the workers."""
    t = cfg.tune
    cpus = t.cpus_per_worker * t.num_workers + (1 if t.num_workers > 1 else 0)
    return {"CPU": float(cpus), "GPU": float(t.gpus_per_worker * t.num_workers)}


def check_resources(cfg: RunConfig, cluster: dict[str, float], largest_node: dict[str, float] | None = None) -> None:
    """Raise a ConfigError when a trial can never be scheduled on ``cluster`` (total resources)."""
    t = cfg.tune
    need = trial_resources(cfg)
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if need["CPU"] > have_cpu:
        driver = "1 trial driver + " if t.num_workers > 1 else ""
        raise ConfigError(
            f"tune: a trial needs {need['CPU']:g} CPUs ({driver}tune.num_workers {t.num_workers} x "
            f"tune.cpus_per_worker {t.cpus_per_worker}) but the Ray cluster has {have_cpu:g}; "
            "lower them or add nodes / --num-cpus"
        )
    if need["GPU"] > have_gpu:
        raise ConfigError(
            f"tune: a trial needs {need['GPU']:g} GPUs = tune.num_workers {t.num_workers} x "
            f"tune.gpus_per_worker {t.gpus_per_worker:g}, but the Ray cluster has {have_gpu:g}"
        )
    if not largest_node:
        return
    for res, per_worker in (("CPU", t.cpus_per_worker), ("GPU", t.gpus_per_worker)):
        if per_worker > (node_has := largest_node.get(res, 0.0)):
            raise ConfigError(
                f"tune.{res.lower()}s_per_worker: {per_worker:g} is more than the largest node has "
                f"({node_has:g} {res}s)"
            )
