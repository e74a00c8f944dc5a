"""Small file helpers shared by the writers of model folders and the caches, and the checks on the user's
folders that every command makes before it writes anything."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from kdqat_dist.errors import ConfigError


def ordinary_permissions(path: str | Path) -> None:
    """Give a written file the mode a plain ``open(..., "w")`` would (0666 less the umask).

    safetensors' ``save_file`` creates its file 0600, so a model folder shared with a group, a serving
    container or another user would not be readable there.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def cache_root() -> Path:
    """``$KDQAT_CACHE`` if set, else ``~/.cache/kdqat_dist``: where tokenized data and tiny models are cached."""
    root = os.environ.get("KDQAT_CACHE")
    if root and Path(root).expanduser().is_file():  # else mkdir below it fails mid-run with a traceback
        raise ConfigError(f"$KDQAT_CACHE: {root} is a file; set it to a folder (the cache is created there)")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kdqat_dist"


# --------------------------------------------------------------------------- the user's folders
# Checks made before a command writes anything: an output folder must not be (or be inside, or contain) a
# model the run reads, must be a folder that can be written, and a model that must be full precision must
# not be a quantized student or a packed export. Each raises ConfigError with one line naming the key.

# The marker files of a `kdqat train` student folder and of a `kdqat export` folder (the same names as
# quant.student.STUDENT_META and export.artifact.EXPORT_META, which sit in higher layers; a test keeps
# them equal).
STUDENT_MARKER = "kdqat_student.json"
EXPORT_MARKER = "kdqat_export.json"
# the packed, ONNX and transformers-BitNet exports: each is a quantized model, never a teacher
EXPORT_MARKERS = (EXPORT_MARKER, "kdqat_onnx.json", "kdqat_hf_bitnet.json")
_ROLE = {
    "teacher.path": "the teacher",
    "student.init_from": "the student's starting point",
    "model.name_or_path": "the model to fine-tune",
}
_RUN_HEADER = re.compile(r"#\s*kdqat (train|finetune) run\b")


def _exists(p: Path, key: str) -> bool:
    """``p.exists()``, with a folder on the way that may not be searched reported as one line."""
    try:
        return p.exists()
    except PermissionError:
        raise ConfigError(f"{key}: no permission to look into a folder on the way to {p}") from None


def check_writable(path: str | Path, key: str) -> None:
    """Refuse an output folder that cannot be created or written: an existing file, a file on the way to
    it, a dangling symbolic link, or a folder without write permission (the nearest existing one)."""
    p = Path(path).expanduser()
    try:
        dangling = p.is_symlink() and not p.exists()
    except PermissionError:
        raise ConfigError(f"{key}: no permission to look into a folder on the way to {p}") from None
    if dangling:
        raise ConfigError(f"{key}: {p} is a symbolic link to nothing ({os.readlink(p)}); give a folder")
    if _exists(p, key) and not p.is_dir():
        raise ConfigError(f"{key}: {p} is a file, not a folder; give a folder path (it is created if missing)")
    nearest = p.absolute()
    while not _exists(nearest, key) and nearest.parent != nearest:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"{key}: {nearest} is a file, so {p} cannot be created as a folder")
    # effective ids: what the process may do (the same as the real ones unless it runs setuid)
    if not os.access(nearest, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise ConfigError(f"{key}: no permission to write in {nearest}; give a folder you can write to")


def check_apart(out: str | Path, key: str, inputs: dict[str, str]) -> None:
    """Refuse an output folder that is, is inside, or contains one of the ``inputs`` (config key -> folder
    the command reads, e.g. ``{"teacher.path": ...}``): writing there could overwrite or mix with it.
    Inputs that are not existing local folders (hub names, built-in model names) are skipped."""
    o = Path(out).expanduser().resolve()
    for in_key, src in inputs.items():
        s = Path(src).expanduser() if src else None
        if s is None or not _exists(s, in_key) or not s.is_dir():
            continue
        s = s.resolve()
        if o == s:
            where = "is"
        elif s in o.parents:
            where = "is inside"
        elif o in s.parents:
            where = "contains"
        else:
            continue
        raise ConfigError(
            f"{key}: {out} {where} the folder of {in_key} ({src}); the files written there could overwrite "
            "or mix with it, so give an output folder apart from the models it reads"
        )


def model_kind(folder: str | Path) -> str | None:
    """``"student"`` (a `kdqat train` student), ``"export"`` (any `kdqat export` folder), ``"run"`` (a run
    folder: its model is in model/ or student/), or None (anything else, e.g. a full-precision model)."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        return None
    if any((p / m).exists() for m in EXPORT_MARKERS) or _quant_method(p / "config.json") == "bitnet":
        return "export"
    if (p / STUDENT_MARKER).exists() or _quant_method(p / "config.json") == "kdqat":
        return "student"
    if not (p / "config.json").exists() and any((p / d / "config.json").exists() for d in ("model", "student")):
        return "run"
    return None


def _quant_method(config_json: Path) -> str | None:
    try:
        q = json.loads(config_json.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return q.get("quant_method") if isinstance(q, dict) else None


def check_full_precision(folder: str | Path, key: str, what: str = "the teacher") -> None:
    """Refuse a quantized student, a packed export or a run folder where a full-precision model folder is
    expected (``what``: e.g. "the teacher"); anything else is left to the model loader."""
    kind = model_kind(folder)
    if kind is None:
        return
    p = Path(folder)
    fix = f"{what} must be a full-precision model folder, e.g. the model/ folder `kdqat finetune` writes"
    if kind == "student":
        raise ConfigError(f"{key}: {p} is a kdqat student folder (quantized; {STUDENT_MARKER}); {fix}")
    if kind == "export":
        raise ConfigError(f"{key}: {p} is a kdqat export folder (quantized weights); {fix}")
    if (p / "model" / "config.json").exists():
        raise ConfigError(f"{key}: {p} is a `kdqat finetune` run folder; its model is {p / 'model'}")
    raise ConfigError(f"{key}: {p} is a `kdqat train` run folder (its student/ is quantized); {fix}")


def run_header(mode: str) -> str:
    """The first line of a run folder's config.yaml, which says which command made the run."""
    return f"# kdqat {mode} run: the fully resolved config (every key)"


def run_mode(run_dir: str | Path) -> str | None:
    """Which command made the run in ``run_dir`` (``train`` or ``finetune``): the header of its config.yaml,
    else its saved model (student/ or model/); None when that cannot be told (nothing saved yet)."""
    p = Path(run_dir)
    try:
        with open(p / "config.yaml", encoding="utf-8") as f:
            m = _RUN_HEADER.match(f.readline())
    except (OSError, UnicodeDecodeError):
        m = None
    if m:
        return m.group(1)
    if (p / "student" / STUDENT_MARKER).exists():
        return "train"
    if (p / "model" / "config.json").exists():
        return "finetune"
    return None


def check_resume_mode(run_dir: str | Path, mode: str) -> None:
    """Refuse ``kdqat <mode> --resume`` on a run folder made by the other command."""
    made_by = run_mode(run_dir)
    if made_by is not None and made_by != mode:
        raise ConfigError(
            f"--resume: {run_dir} holds a `kdqat {made_by}` run, not a `kdqat {mode}` one; resume it with "
            f"`kdqat {made_by} --resume`, or give `kdqat {mode}` another train.output_dir"
        )


def model_folders(cfg: Any, mode: str) -> dict[str, str]:
    """The model folders (config key -> path) a ``kdqat <mode>`` run of the RunConfig ``cfg`` reads: the
    pretrained model of ``finetune``; the teacher and the student's starting point of ``train``. Values
    may be hub or built-in names, which the checks skip."""
    if mode == "finetune":
        return {"model.name_or_path": cfg.model.name_or_path}
    return {"teacher.path": cfg.teacher.path, "student.init_from": cfg.student.init_from}


def check_run_folder(cfg: Any, mode: str, resume: bool) -> None:
    """Everything about the folders of a ``kdqat train``/``finetune`` run (RunConfig ``cfg``) that can be
    checked before anything is written: train.output_dir can be written, is apart from the models the run
    reads and, for a new run, is not a model folder; those models are full precision; a resumed run folder
    was made by the same command."""
    key, run_dir = "train.output_dir", Path(cfg.train.output_dir)
    models = model_folders(cfg, mode)
    check_writable(run_dir, key)
    check_apart(run_dir, key, models)
    for model_key, folder in models.items():
        if folder:
            check_full_precision(folder, model_key, _ROLE.get(model_key, "the model"))
    if not resume and (run_dir / "config.json").exists():
        raise ConfigError(
            f"{key}: {run_dir} is a model folder (config.json); a run writes config.yaml, its model and "
            "checkpoints there, so give it a folder of its own"
        )
    if resume:
        check_resume_mode(run_dir, mode)


# --------------------------------------------------------------------------- config.json of a kdqat model
# A kdqat student's config.json names a model type plain transformers does not know and holds a text where
# the hidden size goes, so that a user without kdqat_dist gets an error instead of the float latent model
# (an unknown quantization_config is only a warning to transformers). kdqat_dist registers KDQAT_MODEL_TYPE
# with AutoConfig (quant.hf_config), which gives back the real config: unguard_hf_config.

KDQAT_MODEL_TYPE = "kdqat_dist"
# every model's config class checks that its hidden size is an int when it is built, printing the value:
# BertForSequenceClassification.from_pretrained(folder), which only warns about the model type, fails on
# it. (transformers does not check problem_type's values; vocab_size is compared with the token ids by the
# base config class, which AutoTokenizer falls back to, so the tokenizer would fail with a TypeError.)
NEEDS_KDQAT = "a kdqat-dist student: pip install kdqat-dist and import kdqat_dist before loading it"
# key -> what plain transformers sees (DistilBERT calls its hidden size dim)
_GUARDED = {"model_type": KDQAT_MODEL_TYPE, "hidden_size": NEEDS_KDQAT, "dim": NEEDS_KDQAT}
_REAL = "kdqat_{}"  # where the real value of a guarded key is kept (flat: a nested dict holding a
# model_type would be taken for the config by a concrete config class)


def guard_hf_config(config: dict) -> dict:
    """``config`` (a config.json's content) as plain transformers refuses to load it (see above)."""
    if config.get("model_type") == KDQAT_MODEL_TYPE:
        return config
    out = dict(_GUARDED)
    for key in _GUARDED:
        if key in config:
            out[_REAL.format(key)] = config[key]
    out.update((k, v) for k, v in config.items() if k not in _GUARDED)
    return out


def unguard_hf_config(config: dict) -> dict:
    """The real config of a guarded ``config`` (anything else is returned as it is). Every kept real value
    is restored, whichever keys the writing version guarded."""
    if config.get("model_type") != KDQAT_MODEL_TYPE or _REAL.format("model_type") not in config:
        return config
    prefix = _REAL.format("")
    out = {k: v for k, v in config.items() if not k.startswith(prefix) and v not in _GUARDED.values()}
    out.update((k[len(prefix) :], v) for k, v in config.items() if k.startswith(prefix))
    return out


def guard_config_file(path: str | Path) -> None:
    """Rewrite the config.json at ``path`` with :func:`guard_hf_config`."""
    p = Path(path)
    p.write_text(json.dumps(guard_hf_config(json.loads(p.read_text())), indent=2) + "\n")


# a model's architecture suffix -> its task head's kind, and the words for it in error messages
HEAD_KINDS = {
    "ForSequenceClassification": ("sequence", "sequence classification"),
    "ForTokenClassification": ("token", "token classification"),
    "ForQuestionAnswering": ("qa", "question answering"),
}


def head_kind(folder: str | Path) -> tuple[str, str]:
    """(kind, words) of the task head of the model in ``folder`` (``config.json``'s architectures);
    sequence classification when it names none."""
    try:
        arch = (json.loads((Path(folder) / "config.json").read_text()).get("architectures") or [""])[0]
    except (OSError, ValueError, AttributeError, IndexError):
        arch = ""
    return next(
        (v for suffix, v in HEAD_KINDS.items() if str(arch).endswith(suffix)), HEAD_KINDS["ForSequenceClassification"]
    )
