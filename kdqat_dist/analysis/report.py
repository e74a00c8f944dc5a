"""``kdqat analyze``: load a teacher and its students, analyse a dev sample, write figures, JSON and Markdown.

Output folder (``--out``):

- ``analysis.json``: every number behind the figures (arrays as nested lists, 0-based layer/head
  indices, ``null`` where a token class never occurs), with the shape of each array under ``dims``;
- ``summary.md``: a short report with the figures embedded;
- the PNG figures listed in :data:`FIGURES` (``norms_heads_<class>.png`` once per key-token class).

Bad input (a folder that is not a model or not a kdqat student, architectures or tokenizers that differ,
a task without a dev split) raises :class:`~kdqat_dist.config.ConfigError` with one line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from kdqat_dist.analysis.by_length import by_length, length_edges
from kdqat_dist.analysis.collect import DISTANCES, collect
from kdqat_dist.analysis.hessian import max_eigenvalue_spectrum
from kdqat_dist.analysis.norms import CLASS_LABELS, TOKEN_CLASSES, layer_summary
from kdqat_dist.config import AnalysisConfig, ConfigError, RunConfig, load_config, parse_override
from kdqat_dist.data.heads import TaskHead, get_head
from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
from kdqat_dist.data.tasks import get_task
from kdqat_dist.engine.backend import pick_device
from kdqat_dist.errors import DataError
from kdqat_dist.files import check_apart, check_full_precision, check_writable
from kdqat_dist.models.attention import use_kdqat_attention
from kdqat_dist.models.encoders import AUTO_CLASSES, auto_class_of, load_classifier
from kdqat_dist.models.positions import check_max_length
from kdqat_dist.quant.student import STUDENT_META, is_student_dir, load_student
from kdqat_dist.run_folder import check_against_run, run_config_path

__all__ = [
    "FIGURES",
    "AnalyzeOptions",
    "analyze",
    "analyze_models",
    "load_models",
    "parse_student_spec",
    "run_config",
    "resolve_run_config",
    "student_names",
    "write_report",
]

FIGURES = (
    "attention_distance_heatmaps.png",
    "attention_distance_layers.png",
    "attention_distance_by_length.png",
    "dynamic_range_layers.png",
    "dynamic_range_tokens.png",
    *(f"norms_heads_{c}.png" for c in TOKEN_CLASSES),
    "norms_layers_values.png",
    "norms_layers_difference.png",
    "hessian_spectrum.png",
)
ARCH_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
)


@dataclass
class AnalyzeOptions:
    """Everything ``kdqat analyze`` takes; the CLI flags have the same names (``--hessian-iters`` ...).

    The numeric knobs default to None: the config's ``analysis`` section decides (its recipe, then
    ``analysis.*`` overrides); a value given here (a CLI flag) overrides that. :func:`run_config` resolves
    and validates them.
    """

    teacher: str
    students: list[str]  # "DIR" or "NAME=DIR"
    out: str
    task: str | None = None  # overrides data.task of the config
    config: str | None = None  # a recipe, for the data and analysis sections
    overrides: list[str] = field(default_factory=list)
    samples: int | None = None  # dev examples for the attention and norm analyses
    seed: int | None = None  # which dev examples, and the power iteration's start vectors
    top_k: int | None = None  # cover length: the teacher's top-k keys
    hessian_samples: int | None = None  # the first N of the sample; 0 skips the Hessian
    hessian_iters: int | None = None
    hessian_tol: float | None = None
    hessian_top_n: int | None = None
    hessian_norm_weight: float | None = None  # the reference's 0.01·Σ‖p‖₂ term (default 0: the loss alone)
    device: str | None = None
    figures: bool = True  # False: analysis.json and summary.md only (the figures take most of the time)
    progress: bool = False  # progress bars on stderr (the CLI turns them on)


def run_config(opts: AnalyzeOptions) -> RunConfig:
    """The validated :class:`~kdqat_dist.config.RunConfig` (see :func:`resolve_run_config`)."""
    return resolve_run_config(opts)[0]


def resolve_run_config(opts: AnalyzeOptions) -> tuple[RunConfig, str, list[str]]:
    """The validated :class:`~kdqat_dist.config.RunConfig`: ``opts.config`` (default: the ``config.yaml`` of
    the first student's training run, else the built-in defaults), then ``opts.overrides``, then
    ``opts.task`` and every option that is not None (as ``analysis.<name>``), each overriding the last;
    where it came from (a recipe, a run's config.yaml, or "built-in"); and the notes to state (data that
    differs from a student's run, no run config found).

    Raises:
        ConfigError: one line; a bad option given here names its flag (``--samples (analysis.samples: ...)``);
            a task other than the one a student or the teacher was trained on.
    """
    if not opts.students:
        raise ConfigError("--student: give at least one student folder")
    # A mapping keeps the order and lets a later key replace an earlier one, as the override list does.
    tree = dict(parse_override(o) for o in opts.overrides)
    if opts.task:
        tree["data.task"] = opts.task
    given = [f.name for f in fields(AnalysisConfig) if getattr(opts, f.name, None) is not None]
    tree.update({f"analysis.{name}": getattr(opts, name) for name in given})
    # the students' own runs, first to last; a folder that does not exist or is no model fails later, at loading
    runs = [run for path in student_names(opts.students).values() if (run := _run_of(path, _resolve_student))]
    config, notes = opts.config, []
    if config is None and runs:
        config = runs[0][1]
    elif config is None and all(p.exists() for p in student_names(opts.students).values()):
        notes.append("no run config.yaml found beside the students; the data comes from the built-in defaults")
    try:
        cfg = load_config(config, tree)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        name = key.removeprefix("analysis.")
        if key.startswith("analysis.") and name in given:  # the user typed the flag, not the key
            raise ConfigError(f"--{name.replace('_', '-')} ({exc})") from None
        raise
    chose = f"--config {opts.config}" if opts.config is not None else str(config or "the built-in config")
    if any(k.startswith("data.") for k in tree):
        chose += " with the overrides"
    one_task = "the teacher and every student are compared on one task's dev set, the one they were trained on"
    for model_dir, run_yaml in runs:
        notes += check_against_run(cfg, model_dir, run_yaml, chose, remedy=one_task)
    teacher = _run_of(opts.teacher, _resolve_teacher)
    if teacher is not None:
        check_against_run(cfg, *teacher, chose, data=False, remedy=one_task)
    return cfg, str(config or "built-in"), list(dict.fromkeys(notes))


def _run_of(path: str | Path, resolve) -> tuple[Path, Path] | None:
    """(model folder, its run's config.yaml) of an existing model or run folder that has one; else None
    (a folder that does not exist or is no model is reported when the models load)."""
    try:
        model_dir = resolve(Path(path).expanduser())
    except ConfigError:
        return None
    run_yaml = run_config_path(model_dir)
    return None if run_yaml is None else (model_dir, run_yaml)


# --------------------------------------------------------------------------- loading and checks


def parse_student_spec(spec: str) -> tuple[str | None, Path]:
    """``"NAME=DIR"`` -> (NAME, DIR); ``"DIR"`` -> (None, DIR): named later after its folder."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path).expanduser()
    return None, Path(spec).expanduser()


def student_names(specs: Sequence[str]) -> dict[str, Path]:
    """Name -> folder. A bare DIR is named after its folder (a run's ``student/`` after the run), made
    unique with a suffix; an explicit NAME must be unique and not ``teacher``."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, path = parse_student_spec(spec)
        if name is not None:
            if name == "teacher" or name in out:
                raise ConfigError(
                    f"--student {spec}: the name {name!r} is "
                    f"{'reserved' if name == 'teacher' else 'used twice'}; choose another NAME"
                )
            out[name] = path
            continue
        p = path.resolve()
        base = (p.parent.name if p.name == "student" else p.name) or "student"
        name, i = base, 2
        while name in out or name == "teacher":
            name, i = f"{base}-{i}", i + 1
        out[name] = path
    return out


def _resolve_teacher(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"--teacher: {path} does not exist (expected a `kdqat finetune` model folder)")
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return path / "model"  # a finetune run folder
    if not (path / "config.json").exists():
        raise ConfigError(f"--teacher: {path} has no config.json (not a Hugging Face model folder)")
    check_full_precision(path, "--teacher")  # not a quantized student, nor a packed export
    return path


def _resolve_student(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"--student: {path} does not exist (expected the student/ folder of `kdqat train`)")
    if not is_student_dir(path) and is_student_dir(path / "student"):
        return path / "student"  # a train run folder
    if not is_student_dir(path):
        raise ConfigError(
            f"--student: {path} is not a kdqat student folder (no {STUDENT_META}); give the "
            "student/ folder written by `kdqat train`"
        )
    return path


def _check_architecture(name: str, t_cfg, s_cfg) -> None:
    for f in ARCH_FIELDS:
        tv, sv = getattr(t_cfg, f, None), getattr(s_cfg, f, None)
        if tv != sv:
            raise ConfigError(
                f"--student {name}: architecture differs from the teacher ({f}: teacher {tv}, "
                f"student {sv}); the analysis compares layer by layer and head by head"
            )


def _tokenizer_spec(tok) -> dict:
    ids = {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id}
    spec: dict[str, Any] = {"vocab": tok.get_vocab(), **ids}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        full = json.loads(backend.to_str())
        spec.update({k: full.get(k) for k in ("normalizer", "pre_tokenizer", "model")})
    return spec


def _check_tokenizer(name: str, t_tok, s_tok) -> None:
    a, b = _tokenizer_spec(t_tok), _tokenizer_spec(s_tok)
    for key in ("vocab", "cls", "sep", "pad", "normalizer", "pre_tokenizer", "model"):
        if a.get(key) != b.get(key):
            what = f"{key} differs"
            if key == "vocab":
                what = f"vocabularies differ ({len(a['vocab'])} vs {len(b['vocab'])} tokens)"
            raise ConfigError(
                f"--student {name}: its tokenizer does not match the teacher's ({what}); "
                "both must tokenize the dev set identically"
            )


def _check_model_class(flag: str, path: Path, cfg, head: TaskHead | None) -> None:
    """A model saved with a task head's class (``...ForTokenClassification``) must be the task's class."""
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    if head is not None and any(arch.endswith(s) for s in AUTO_CLASSES) and auto_class_of(cfg) is not head.auto_class:
        raise ConfigError(f"{flag}: {path} is a {arch} but task {head.spec.name} needs an {head.auto_class_name} model")


def load_models(
    teacher: str | Path,
    students: Sequence[str],
    num_labels: int,
    device: str | torch.device = "cpu",
    head: TaskHead | None = None,
) -> tuple[nn.Module, dict[str, nn.Module], Any]:
    """Load and check the teacher (FP, ``kdqat`` attention) and the students; returns them and the tokenizer.

    ``head``: the task head whose model class the teacher is built with (None: sequence classification);
    a student is rebuilt with the class it was saved as.

    Raises:
        ConfigError: a missing or wrong folder, a model class or label count that differs from the task's, a student
            whose architecture or tokenizer differs from the teacher's, or two students with one name.
    """
    t_dir = _resolve_teacher(Path(teacher).expanduser())
    t_cfg = AutoConfig.from_pretrained(t_dir)
    _check_model_class("--teacher", t_dir, t_cfg, head)
    if t_cfg.num_labels != num_labels:
        raise ConfigError(f"--teacher: {t_dir} has {t_cfg.num_labels} labels but the task has {num_labels}")
    try:
        t_tok = AutoTokenizer.from_pretrained(t_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--teacher: no usable tokenizer in {t_dir} ({str(exc).splitlines()[0]})") from None
    specs = {name: _resolve_student(path) for name, path in student_names(students).items()}
    for name, path in specs.items():
        s_cfg = AutoConfig.from_pretrained(path)
        _check_architecture(name, t_cfg, s_cfg)
        _check_model_class(f"--student {name}", path, s_cfg, head)
        if s_cfg.num_labels != num_labels:
            raise ConfigError(f"--student {name}: {path} has {s_cfg.num_labels} labels but the task has {num_labels}")
        if any((path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            _check_tokenizer(name, t_tok, AutoTokenizer.from_pretrained(path))
    kw = {} if head is None else {"auto_class": head.auto_class}
    t_model = load_classifier(str(t_dir), num_labels, "eager", **kw)
    loaded = {name: load_student(path, device) for name, path in specs.items()}
    for m in (t_model, *loaded.values()):
        use_kdqat_attention(m)
    return t_model.to(device).eval(), loaded, t_tok


def _dev_sample(cfg, samples: int, seed: int):
    """(data config, task, the sampled dev rows as a Dataset, their row ids); checks the dev split first."""
    task = get_task(cfg.data)
    try:
        splits = load_splits(cfg.data, task)
    except DataError as exc:
        if "no dev split" in str(exc):
            where = str(exc).split(": no dev split")[0]
            where = f"{where} is not set" if where.startswith("data.") else f"{where} not found"
            raise ConfigError(
                f"data: task {task.name} has no dev split ({where}); `kdqat analyze` "
                "runs on dev examples: add the dev file (a GLUE folder's dev.tsv, or "
                "data.dev_file beside data.train_file)"
            ) from None
        raise
    dev = splits["dev"]
    n = min(samples, len(dev))
    rows = sorted(np.random.default_rng(seed).choice(len(dev), size=n, replace=False).tolist())
    return cfg.data, task, dev.select(rows), rows


def _tokenize(data_cfg, task, rows, tokenizer, head: TaskHead | None = None) -> list[dict[str, torch.Tensor]]:
    """Each feature as its own unpadded batch of 1 (``input_ids`` [1, S] ... and the head's label keys:
    ``labels`` [1] for a sentence task, [1, S] for token classification, ``start_positions``/``end_positions``
    [1] for QA, one batch per window of a long context). ``head`` None or a sequence head: the sentence
    path. Non-tensor feature columns (QA ``offset_mapping``, ``example_id``) stay out of the batches."""
    max_len = data_cfg.max_seq_length or task.max_seq_length
    head = head if head is not None and head.kind != "sequence" else None
    tok = tokenize_splits({"dev": rows}, tokenizer, max_len, data_cfg.cache_dir or None, head)["dev"]
    collate = Collator(tokenizer, head=head)
    return [collate([tok[i]]) for i in range(len(tok))]


# --------------------------------------------------------------------------- analysis


def analyze_models(
    teacher: nn.Module,
    students: Mapping[str, nn.Module],
    examples: Sequence[Mapping[str, torch.Tensor]],
    tokenizer,
    top_k: int = 5,
    hessian_samples: int = 8,
    hessian_iters: int = 100,
    hessian_tol: float = 1e-3,
    hessian_top_n: int = 1,
    hessian_norm_weight: float = 0.0,
    length_buckets: int = 4,
    regression: bool = False,
    seed: int = 0,
    progress: bool = False,
    head: TaskHead | None = None,
) -> dict[str, Any]:
    """Every analysis on in-memory models; returns the results as numpy arrays (see :func:`write_report`).

    ``head``: the task head whose loss the Hessian differentiates (its masked CE on
    :meth:`~kdqat_dist.data.heads.base.TaskHead.outputs`); None: the sentence loss (CE, MSE if ``regression``).

    Returns:
        ``distance``: per student, per metric: ``mean``/``std`` [L, H] over samples, ``layer_mean``/
        ``layer_std`` [L] (head mean, its s.d. over samples) and ``per_sample`` [N, L, H];
        ``distance_by_length``: per student, the KL by length bucket (:func:`~kdqat_dist.analysis.by_length.
        by_length`: ``labels``/``edges``/``count``/``mean_length``/``mean``/``std`` [B], ``sample_mean`` [N],
        ``spearman``);
        ``dynamic_range``: per model ``min``/``max`` [N, L], ``example_min``/``example_max`` [L, S_0];
        ``norms``: per model ``alpha``/``f_norm``/``af_norm`` [L, H, C], ``sum_af_norm`` [L, C],
        ``layer`` (per-layer [L, C] curves), ``tokens`` [C];
        ``norm_difference``: per student, teacher − student of those arrays and ``layer_abs`` |Δ| [L, C];
        ``hessian``: per model ``eigenvalues``/``iterations``/``converged`` [N_h, top_n] (absent when
        ``hessian_samples`` is 0); ``lengths`` [N]; ``identical_cover`` (the cover ratio of equal maps).
    """
    torch.manual_seed(seed)
    raw = collect(teacher, students, examples, tokenizer, top_k, progress)
    out: dict[str, Any] = {"lengths": raw["lengths"], "dynamic_range": raw["dynamic_range"]}
    lengths = raw["lengths"].astype(np.float64)
    out["identical_cover"] = float(np.mean(np.minimum(top_k, lengths) / lengths))
    out["distance"] = {s: {m: _distance_stats(v) for m, v in metrics.items()} for s, metrics in raw["distance"].items()}
    edges = length_edges(raw["lengths"], length_buckets)
    out["distance_by_length"] = {s: by_length(d["kl"], raw["lengths"], edges) for s, d in raw["distance"].items()}
    out["norms"] = {name: {**r, "layer": layer_summary(r)} for name, r in raw["norms"].items()}
    t = out["norms"]["teacher"]
    out["norm_difference"] = {}
    for s in students:
        r = out["norms"][s]
        diff = {q: t[q] - r[q] for q in ("alpha", "f_norm", "af_norm", "sum_af_norm")}
        diff["layer_abs"] = {q: np.abs(t["layer"][q] - r["layer"][q]) for q in t["layer"]}
        out["norm_difference"][s] = diff
    if hessian_samples > 0:
        hx = list(examples)[:hessian_samples]
        loss_head = head if head is not None and head.kind != "sequence" else None  # sentences: CE/MSE as before
        knobs = (hessian_top_n, hessian_iters, hessian_tol, hessian_norm_weight, regression, seed)
        out["hessian"] = {
            name: max_eigenvalue_spectrum(m, hx, *knobs, f"Hessian {name}" if progress else None, head=loss_head)
            for name, m in {"teacher": teacher, **students}.items()
        }
    return out


def _distance_stats(v: np.ndarray) -> dict[str, np.ndarray]:
    """One metric's per-sample values [N, L, H] with their means and s.d. over samples."""
    h = v.mean(axis=2)  # the head mean [N, L]
    return {"mean": v.mean(0), "std": v.std(0), "layer_mean": h.mean(0), "layer_std": h.std(0), "per_sample": v}


# --------------------------------------------------------------------------- output


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.ndarray, np.generic)):
        x = x.tolist()  # nested lists of Python scalars
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


DIMS = {
    "distance.<student>.<metric>.mean/std": ["layer", "head"],
    "distance.<student>.<metric>.layer_mean/layer_std": ["layer"],
    "distance.<student>.<metric>.per_sample": ["sample", "layer", "head"],
    "distance_by_length.<student>.labels/edges/count/mean_length/mean/std": ["length bucket"],
    "distance_by_length.<student>.sample_mean": ["sample"],
    "dynamic_range.<model>.min/max": ["sample", "layer"],
    "dynamic_range.<model>.example_min/example_max": ["layer", "token of the first sample"],
    "norms.<model>.alpha/f_norm/af_norm": ["layer", "head", "key-token class"],
    "norms.<model>.sum_af_norm": ["layer", "key-token class"],
    "norms.<model>.layer.*": ["layer", "key-token class"],
    "norms.<model>.tokens": ["key-token class"],
    "norm_difference.<student>.*": ["as in norms; teacher − student"],
    "norm_difference.<student>.layer_abs.*": ["layer", "key-token class"],
    "hessian.<model>.eigenvalues/iterations/converged": ["hessian sample", "eigenvalue rank"],
    "hessian.<model>.norm_term_eigenvalue": [],
}


def write_report(
    results: Mapping[str, Any],
    out_dir: str | Path,
    meta: Mapping[str, Any],
    example_tokens: Sequence[str],
    figures: bool = True,
) -> list[Path]:
    """Write ``analysis.json``, the PNG figures (unless ``figures`` is false) and ``summary.md`` into
    ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_figures(results, out, meta, example_tokens) if figures else []
    names = [p.name for p in written]
    doc = {
        "meta": {**meta, "classes": list(TOKEN_CLASSES), "dims": DIMS, "figures": names},
        "example_tokens": list(example_tokens),
        **results,
    }
    json_path = out / "analysis.json"
    json_path.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    md_path = out / "summary.md"
    md_path.write_text(_markdown(results, meta, names if figures else None))
    return [json_path, md_path, *written]


def _write_figures(
    results: Mapping[str, Any], out: Path, meta: Mapping[str, Any], example_tokens: Sequence[str]
) -> list[Path]:
    """The PNG figures of :data:`FIGURES` (the Hessian's only when it ran); most of the command's time."""
    from kdqat_dist.analysis import plots as P  # lazy: matplotlib is slow to import

    top_k = int(meta.get("top_k", 5))

    def dist(key: str) -> dict[str, dict[str, np.ndarray]]:  # student -> metric -> one statistic
        return {s: {m: d[m][key] for m in DISTANCES} for s, d in results["distance"].items()}

    rng, norms = results["dynamic_range"], results["norms"]
    written = [
        P.plot_distance_heatmaps(dist("mean"), out / "attention_distance_heatmaps.png", top_k),
        P.plot_distance_layers(
            dist("layer_mean"),
            dist("layer_std"),
            len(results["lengths"]),
            out / "attention_distance_layers.png",
            top_k,
            results["identical_cover"],
        ),
        P.plot_distance_by_length(
            results["distance_by_length"], results["lengths"], out / "attention_distance_by_length.png"
        ),
        P.plot_dynamic_range_layers(rng, out / "dynamic_range_layers.png"),
        P.plot_dynamic_range_tokens(rng, example_tokens, out / "dynamic_range_tokens.png"),
        *(P.plot_norm_heads(norms, c, out / f"norms_heads_{c}.png") for c in TOKEN_CLASSES),
        P.plot_norm_layers(
            {m: r["layer"] for m, r in norms.items()}, out / "norms_layers_values.png", difference=False
        ),
        P.plot_norm_layers(
            {s: d["layer_abs"] for s, d in results["norm_difference"].items()},
            out / "norms_layers_difference.png",
            difference=True,
        ),
    ]
    if "hessian" in results:
        hess = results["hessian"]
        eigs = {m: h["eigenvalues"][:, 0] for m, h in hess.items()}
        norm_term = {m: float(h["norm_term_eigenvalue"]) for m, h in hess.items()}
        written.append(P.plot_hessian_spectrum(eigs, out / "hessian_spectrum.png", norm_term))
    return written


def _fmt(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.4g}"


def _by_length_markdown(by_len: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The KL table by length bucket: one row per student, mean ± s.d. over the bucket's samples."""
    first = next(iter(by_len.values()))
    heads = [f"{lab} tokens ({int(n)})" for lab, n in zip(first["labels"], first["count"], strict=True)]
    lines = [
        "### By input length",
        "",
        "KL(teacher ‖ student) averaged over layers and heads per sample, then over the samples of each "
        "length bucket (quantiles of this sample's lengths; count in brackets): mean ± s.d. Spearman ρ: "
        "rank correlation of a sample's KL with its length over all samples (> 0: long inputs drift more).",
        "",
        "| student | " + " | ".join(heads) + " | Spearman ρ |",
        "|---" * (len(heads) + 2) + "|",
    ]
    for s, d in by_len.items():
        cells = [f"{_fmt(float(m))} ± {_fmt(float(e))}" for m, e in zip(d["mean"], d["std"], strict=True)]
        rho = float(d["spearman"])
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {'–' if not np.isfinite(rho) else f'{rho:+.2f}'} |")
    return [*lines, "", "![attention distance by input length](attention_distance_by_length.png)", ""]


def _markdown(results: Mapping[str, Any], meta: Mapping[str, Any], figures: Sequence[str] | None) -> str:
    top_k = int(meta.get("top_k", 5))
    lengths = np.asarray(results["lengths"])
    lines = [
        "# kdqat analyze",
        "",
        f"- teacher: `{meta.get('teacher')}`",
        f"- config: `{meta.get('config_source')}`",
        *[f"- note: {n}" for n in meta.get("notes", [])],
        *[f"- student **{s}**: `{p}`" for s, p in meta.get("students", {}).items()],
        f"- task: {meta.get('task')}, {len(lengths)} dev examples (seed {meta.get('seed')}), each run alone at "
        f"its true length: {int(lengths.min())}–{int(lengths.max())} tokens (mean {lengths.mean():.1f})",
        "- layer and head indices are 0-based (as in `analysis.json` and TensorBoard)",
        "",
        "## Attention-map distance to the teacher (Exp1)",
        "",
        f"Mean over layers, heads and samples. The top-{top_k} cover length ratio of identical maps is "
        f"{results['identical_cover']:.3f} on this sample (its minimum).",
        "",
        f"| student | KL(teacher ‖ student) | ranking loss | top-{top_k} cover length ratio |",
        "|---|---|---|---|",
    ]
    for s, d in results["distance"].items():
        lines.append(f"| {s} | " + " | ".join(_fmt(float(d[m]["mean"].mean())) for m in DISTANCES) + " |")
    lines += [
        "",
        "![attention distance heat maps](attention_distance_heatmaps.png)",
        "",
        "![attention distance per layer](attention_distance_layers.png)",
        "",
        *_by_length_markdown(results["distance_by_length"]),
        "## Attention-output dynamic range (Exp3)",
        "",
        "Min and max of the attention-block output (after the residual and LayerNorm) over all tokens, "
        "hidden units, layers and samples.",
        "",
        "| model | min | max |",
        "|---|---|---|",
    ]
    for m, r in results["dynamic_range"].items():
        lines.append(f"| {m} | {_fmt(float(np.min(r['min'])))} | {_fmt(float(np.max(r['max'])))} |")
    lines += [
        "",
        "![dynamic range per layer](dynamic_range_layers.png)",
        "",
        "![dynamic range per token](dynamic_range_tokens.png)",
        "",
        "## Norm-based analysis (Kobayashi et al.; Exp3)",
        "",
        "Mean |teacher − student| over layers of the per-layer curves (α and ‖f(x)‖ averaged over heads).",
        "",
        "| student | key tokens | Δα | Δ‖f(x)‖ | Δ‖Σ_h αf(x)‖ |",
        "|---|---|---|---|---|",
    ]
    for s, d in results["norm_difference"].items():
        for c, cls in enumerate(TOKEN_CLASSES):
            cols = [d["layer_abs"][q][:, c] for q in ("alpha", "f_norm", "sum_af_norm")]
            # a class absent from the sample is all NaN: "–", without nanmean's empty-slice warning
            cells = [_fmt(float(np.nanmean(x)) if np.isfinite(x).any() else None) for x in cols]
            lines.append(f"| {s} | {CLASS_LABELS[cls]} | " + " | ".join(cells) + " |")
    tokens = results["norms"]["teacher"]["tokens"]
    lines += [
        "",
        "Key tokens seen: "
        + ", ".join(f"{CLASS_LABELS[c]} {int(tokens[i])}" for i, c in enumerate(TOKEN_CLASSES))
        + ". Over all "
        "tokens α averages 1/S for every model (each query row sums to 1), so its Δ is rounding.",
        "",
        "![norms per layer: values](norms_layers_values.png)",
        "",
        "![norms per layer: differences](norms_layers_difference.png)",
        "",
    ]
    for c in TOKEN_CLASSES:
        lines += [f"![norms per head: {CLASS_LABELS[c]}](norms_heads_{c}.png)", ""]
    lines += ["", "## Hessian max-eigenvalue spectrum (Exp2)", ""]
    if "hessian" in results:
        h0 = next(iter(results["hessian"].values()))
        lines += [
            f"Power iteration per example (batch 1, eval mode) on CE + {meta.get('hessian_norm_weight')}"
            f"·Σ‖p‖₂, at most {meta.get('hessian_iters')} iterations, relative tolerance "
            f"{meta.get('hessian_tol')}, {h0['eigenvalues'].shape[0]} examples.",
            "",
            "| model | median λ_max | norm term alone | positive | negative | converged |",
            "|---|---|---|---|---|---|",
        ]
        floor_bound = []
        for m, h in results["hessian"].items():
            e = h["eigenvalues"][:, 0]
            lam = float(h["norm_term_eigenvalue"])
            lines.append(
                f"| {m} | {_fmt(float(np.median(e)))} | {_fmt(lam)} | {int((e > 0).sum())} | "
                f"{int((e < 0).sum())} | {int(h['converged'][:, 0].sum())}/{len(e)} |"
            )
            if lam > 0 and np.allclose(e, lam, rtol=1e-3):
                floor_bound.append(m)
        if floor_bound:
            lines += [
                "",
                f"For {', '.join(floor_bound)} every example's λ_max equals the norm term's own "
                "(weight / smallest parameter-tensor norm, independent of the data): the loss adds less "
                "curvature than that term, as for a confident model whose CE Hessian nearly vanishes. "
                "Rerun with `--hessian-norm-weight 0` to see the loss term's own spectrum.",
            ]
        lines += ["", "![Hessian spectrum](hessian_spectrum.png)"]
    else:
        lines.append("Skipped (`--hessian-samples 0`).")
    if figures is None:  # --no-figures: the tables alone
        lines = [line for line in lines if not line.startswith("![")]
    else:
        missing = [f for f in figures if f not in "\n".join(lines)]
        lines += [f"![{f}]({f})" for f in missing]
    return "\n".join(lines) + "\n"


def analyze(opts: AnalyzeOptions) -> dict[str, Any]:
    """The whole ``kdqat analyze`` command; returns ``{"out": folder, "files": [...], "seconds": ...}``."""
    cfg, source, notes = resolve_run_config(opts)  # every config problem fails before any data or model loads
    for note in notes:
        print(f"kdqat analyze: note: {note}", file=sys.stderr)
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # an earlier analysis would be half replaced (a figure it has and this one does not stays stale)
        raise ConfigError(f"--out: {out} already exists and is not empty; choose a new folder")
    check_writable(out, "--out")
    check_apart(
        out,
        "--out",
        {"--teacher": opts.teacher, **{f"--student {n}": str(p) for n, p in student_names(opts.students).items()}},
    )
    a = cfg.analysis
    t0 = time.perf_counter()
    device = pick_device(a.device, "analysis.device")
    data_cfg, task, dev_rows, row_ids = _dev_sample(cfg, a.samples, a.seed)  # before any model loads
    head = get_head(task)
    teacher, students, tokenizer = load_models(opts.teacher, opts.students, head.num_labels, device, head)
    check_max_length(
        data_cfg.max_seq_length or task.max_seq_length, tokenizer.name_or_path, data_cfg.max_seq_length is not None
    )
    dev = _tokenize(data_cfg, task, dev_rows, tokenizer, head)
    examples = [{k: v.to(device) for k, v in ex.items()} for ex in dev]
    knobs = {k: v for k, v in asdict(a).items() if k not in ("samples", "device")}  # analyze_models' keywords
    results = analyze_models(
        teacher,
        students,
        examples,
        tokenizer,
        regression=head.regression,
        progress=opts.progress,
        head=head,
        **knobs,
    )
    # the resolved values, not the options (None where the config decided)
    meta = {
        **asdict(opts),
        **asdict(a),
        "task": task.name,
        "config_source": source,
        "notes": notes,
        "dev_rows": row_ids,
        "students": {k: str(v) for k, v in student_names(opts.students).items()},
    }
    tokens = tokenizer.convert_ids_to_tokens(examples[0]["input_ids"][0].tolist())
    files = write_report(results, opts.out, meta, tokens, figures=opts.figures)
    return {"out": str(Path(opts.out)), "files": [str(f) for f in files], "seconds": time.perf_counter() - t0}
