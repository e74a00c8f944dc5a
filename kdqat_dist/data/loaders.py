"""Load task splits into one normalised shape, tokenize them (cached on disk), batch them.

Every split becomes a :class:`datasets.Dataset` with columns ``text_a`` (str), ``text_b`` (str or None) and
``label`` (class id, or float for regression), whatever the source:

* ``data.task: demo``: the built-in synthetic task (:mod:`kdqat_dist.data.demo`);
* ``data.train_file`` / ``data.dev_file``: CSV, TSV, JSON, JSONL or Parquet files (custom tasks, or GLUE);
* ``data.source``: a local GLUE folder (train.tsv, dev.tsv; MNLI: dev_matched.tsv, dev_mismatched.tsv);
* otherwise the Hugging Face hub (``nyu-mll/glue`` for GLUE tasks, or ``data.source`` as a hub name).

Bad input is never skipped: it raises :class:`DataError` naming the file, line and column.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets.utils import logging as ds_logging

from kdqat_dist.config import DataConfig
from kdqat_dist.data.demo import make_demo
from kdqat_dist.data.heads.base import INPUT_COLUMNS, TaskHead
from kdqat_dist.data.heads.sequence import SequenceHead, collate_scalar_labels
from kdqat_dist.data.tasks import TaskSpec
from kdqat_dist.errors import DataError
from kdqat_dist.files import cache_root, check_writable

PROGRESS_MIN_ROWS = 5000  # splits larger than this show a progress bar while tokenizing
PROGRESS_MIN_BYTES = 50 * 2**20  # files larger than this show datasets' bar while they are read
_CACHE_FORMAT = "kdqat-tokenized-v1"  # bump when the tokenized layout changes, to invalidate old caches


# --------------------------------------------------------------------------- normalised splits


def _features(task: TaskSpec) -> Features:
    label = Value("float32") if task.is_regression else Value("int64")
    return Features({"text_a": Value("string"), "text_b": Value("string"), "label": label})


def _to_dataset(task: TaskSpec, a: list[str], b: list[str | None], labels: list[Any]) -> Dataset:
    return Dataset.from_dict({"text_a": a, "text_b": b, "label": labels}, features=_features(task))


def _label_key(value: Any, names: list[str] | None, label_list: tuple[str, ...]) -> str:
    """The label-list entry a raw label stands for: a name, or a class id written as int/float/str."""
    if names is not None and isinstance(value, (int, np.integer)) and 0 <= value < len(names):
        if names[value] in label_list:  # a ClassLabel whose names are our label names (MNLI on the hub)
            return names[value]
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return str(value).strip()


def _parse_label(value: Any, task: TaskSpec, where: str, names: list[str] | None = None) -> int | float:
    """Map a raw label to a class id (or a float for regression), or raise a DataError naming ``where``."""
    if task.is_regression:
        try:
            out = float(value)
        except (TypeError, ValueError):
            out = float("nan")
        if not np.isfinite(out):
            raise DataError(f"{where}: label {value!r} is not a finite number (task {task.name} is a regression)")
        return out
    assert task.label_list is not None
    key = _label_key(value, names, task.label_list)
    try:
        return task.label_list.index(key)
    except ValueError:
        raise DataError(
            f"{where}: label {value!r} is not in the label set of task {task.name}; "
            f"allowed: {', '.join(task.label_list)}"
        ) from None


# --------------------------------------------------------------------------- GLUE folders


@dataclass(frozen=True)
class _TsvFormat:
    """Column indices of a GLUE TSV (GLUE's layouts). label -1 = the last column."""

    header: bool
    a: int
    b: int | None
    label: int
    n_cols: int | None = None  # fixed column count of header-less files


_GLUE_TSV = {
    "cola": _TsvFormat(header=False, a=3, b=None, label=1, n_cols=4),
    "sst2": _TsvFormat(header=True, a=0, b=None, label=1),
    "mrpc": _TsvFormat(header=True, a=3, b=4, label=0),
    "stsb": _TsvFormat(header=True, a=7, b=8, label=-1),
    "qqp": _TsvFormat(header=True, a=3, b=4, label=5),
    "mnli": _TsvFormat(header=True, a=8, b=9, label=-1),
    "qnli": _TsvFormat(header=True, a=1, b=2, label=-1),
    "rte": _TsvFormat(header=True, a=1, b=2, label=-1),
}


def glue_files(task: TaskSpec) -> dict[str, str]:
    """Split name -> file name in a GLUE folder."""
    if task.name == "mnli":
        return {"train": "train.tsv", "dev": "dev_matched.tsv", "dev_mm": "dev_mismatched.tsv"}
    return {"train": "train.tsv", "dev": "dev.tsv"}


def read_glue_tsv(path: Path, task: TaskSpec) -> Dataset:
    """Parse one GLUE TSV with the reference's column rules; every row must have the header's width."""
    fmt = _GLUE_TSV[task.name]
    a, b, labels = [], [], []
    n_cols = fmt.n_cols
    try:
        # utf-8-sig: GLUE's MRPC files start with a byte-order mark.
        with open(path, encoding="utf-8-sig", newline="") as f:
            for line_no, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
                if line_no == 1 and fmt.header:
                    n_cols = len(row)
                    need = max(i + 1 if i >= 0 else -i for i in (fmt.a, fmt.b, fmt.label) if i is not None)
                    if n_cols < need:
                        raise DataError(
                            f"{path}:1: the header has {n_cols} column(s) ({', '.join(row)}); "
                            f"{task.name} files need at least {need} (the text and label columns "
                            "of GLUE's format)"
                        )
                    continue
                if not row:  # a blank line holds no record (typically the file's last line)
                    continue
                if len(row) != n_cols:
                    what = "as in the header" if fmt.header else f"{task.name} files have no header"
                    raise DataError(
                        f"{path}:{line_no}: malformed row: expected {n_cols} tab-separated "
                        f"columns ({what}), got {len(row)}"
                    )
                for col in (fmt.a, fmt.b):
                    if col is not None and not row[col].strip():
                        raise DataError(f"{path}:{line_no}: column {col % n_cols} is empty (a text is required)")
                a.append(row[fmt.a])
                b.append(row[fmt.b] if fmt.b is not None else None)
                where = f"{path}:{line_no}, column {fmt.label % n_cols}"
                labels.append(_parse_label(row[fmt.label], task, where))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: could not be parsed as TSV ({exc})") from None
    return _to_dataset(task, a, b, labels)


def _load_glue_dir(root: Path, task: TaskSpec) -> dict[str, Dataset]:
    if task.name not in _GLUE_TSV:
        raise DataError(
            f"data.source: {root} is a folder, which is read as GLUE TSVs; task {task.name} "
            "has no GLUE format (use data.train_file / data.dev_file)"
        )
    files = glue_files(task)
    if not (root / files["train"]).is_file():
        raise DataError(
            f"data.source: {root / files['train']} not found (a GLUE folder holds {', '.join(files.values())})"
        )
    out = {"train": read_glue_tsv(root / files["train"], task)}
    present = {s: root / f for s, f in files.items() if s != "train" and (root / f).is_file()}
    # Only "no dev file at all" can be completed by split_off_dev; half of MNLI's pair is an error.
    if present and len(present) != len(files) - 1:
        missing = [str(root / f) for s, f in files.items() if s != "train" and s not in present]
        raise DataError(
            f"data.source: {', '.join(missing)} not found (task {task.name} needs {', '.join(files.values())})"
        )
    for split, path in present.items():
        out[split] = read_glue_tsv(path, task)
    return out


# --------------------------------------------------------------------------- files and the hub


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def read_table(path: Path, key: str = "data.train_file") -> tuple[Dataset, Callable[[int], str]]:
    """Load a CSV/TSV/JSON/JSONL/Parquet file with ``datasets``; returns it and row index -> "file:line"."""
    # datasets logs a parser's error before raising it, and shows a bar even for a small file: the error
    # below says what is wrong in one line, and a bar is worth it for big files only
    with _datasets_quiet(bars=path.is_file() and path.stat().st_size > PROGRESS_MIN_BYTES):
        return _read_table(path, key)


@contextmanager
def _datasets_quiet(bars: bool) -> Iterator[None]:
    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        with _progress_bars(bars):
            yield
    finally:
        ds_logging.set_verbosity(level)


def _read_table(path: Path, key: str) -> tuple[Dataset, Callable[[int], str]]:
    if not path.is_file():
        raise DataError(f"{key}: {'not a file' if path.exists() else 'file not found'}: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = csv.reader(f, delimiter=sep, quoting=quoting)
                header, first = next(rows, []), next(rows, None)
            _check_header(header, path)
            if first is None:
                raise DataError(f"{path}: the header is the only line; there are no rows")
            # Every column as a string, so labels like "01" or texts like "1.50" arrive exactly as written.
            features = Features({c: Value("string") for c in header})
            kwargs: dict[str, Any] = {"sep": sep, "keep_default_na": False, "features": features}
            if sep == "\t":
                kwargs["quoting"] = quoting
            ds = datasets.load_dataset("csv", data_files=str(path), split="train", **kwargs)
            return ds, lambda i: f"{path}:{i + 2}"
        if suffix in (".json", ".jsonl"):
            with open(path, encoding="utf-8") as f:
                head = f.read(4096).lstrip()
            if not head or re.fullmatch(r"\[\s*\]\s*", head):  # datasets' reader fails on these obscurely
                raise DataError(
                    f"{path}: the file has no rows; a {suffix[1:].upper()} table holds one JSON object per row "
                    "(a JSON list of them, or one per line)"
                )
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
            if head.startswith("["):
                return ds, lambda i: f"{path}: record {i}"
            return ds, lambda i: f"{path}:{i + 1}"
        if suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            return ds, lambda i: f"{path}: row {i}"
    except DataError:
        raise
    except Exception as exc:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: could not be read as {suffix[1:].upper()} ({_first_line(exc)})") from None
    raise DataError(
        f"{key}: unsupported file type {suffix or '(none)'!r} for {path}; allowed: .csv, .tsv, .json, .jsonl, .parquet"
    )


def _check_header(header: list[str], path: Path) -> None:
    """A CSV/TSV header names each column once (a reader would keep one of two same-named columns, or
    rename the second, and the config's column name would then pick a column silently)."""
    if not header:
        raise DataError(f"{path}: the file is empty (a header line naming the columns is required)")
    for i, name in enumerate(header):
        if name.strip() and name in header[:i]:
            raise DataError(
                f"{path}:1: column {name!r} appears twice in the header (columns {header.index(name) + 1} and "
                f"{i + 1}); column names must be unique"
            )


def normalise(ds: Dataset, task: TaskSpec, where: Callable[[int], str], source: str) -> Dataset:
    """Pick ``task``'s text/label columns from ``ds`` and check every row (missing text, bad labels)."""
    present = list(ds.column_names)
    for key, col in (("data.text_a", task.text_a), ("data.text_b", task.text_b), ("data.label", task.label)):
        if col is not None and col not in present:
            raise DataError(f"{source}: column {col!r} ({key}) not found; columns present: {', '.join(present)}")
    feat = ds.features[task.label]
    names = list(feat.names) if isinstance(feat, ClassLabel) else None
    # ds[c][:] reads a whole column at once; iterating a Column goes row by row (~50x slower).
    cols = {c: ds[c][:] for c in {task.text_a, task.text_b, task.label} if c is not None}
    a_out, b_out, labels = [], [], []
    for i in range(len(ds)):
        texts = []
        for col in (task.text_a, task.text_b):
            if col is None:
                texts.append(None)
                continue
            v = cols[col][i]
            if v is None or (isinstance(v, str) and not v.strip()):
                raise DataError(f"{where(i)}: column {col!r} has no value (a text is required)")
            texts.append(v if isinstance(v, str) else str(v))
        a_out.append(texts[0])
        b_out.append(texts[1])
        labels.append(_parse_label(cols[task.label][i], task, f"{where(i)}, column {task.label!r}", names))
    return _to_dataset(task, a_out, b_out, labels)


def _file_task(cfg: DataConfig, task: TaskSpec) -> TaskSpec:
    """GLUE tasks read from files use the hub's column names unless data.text_a/text_b/label are set."""
    if task.name == "custom":
        return task
    default = DataConfig()
    changed = {k: getattr(cfg, k) for k in ("text_a", "text_b", "label") if getattr(cfg, k) != getattr(default, k)}
    return replace(task, **changed)


def _load_files(cfg: DataConfig, task: TaskSpec) -> dict[str, Dataset]:
    ftask = _file_task(cfg, task)
    out = {}
    files = (("train", "data.train_file", cfg.train_file), ("dev", "data.dev_file", cfg.dev_file))
    for split, key, name in files:
        if not name:
            continue
        path = Path(name).expanduser()
        ds, where = read_table(path, key)
        out[split] = normalise(ds, ftask, where, str(path))
    return out


_HUB_SPLITS = {
    "train": "train",
    "validation": "dev",
    "validation_matched": "dev",
    "validation_mismatched": "dev_mm",
    "dev": "dev",
}


def _load_hub(name: str, config: str | None, task: TaskSpec) -> dict[str, Dataset]:
    label = f"{name}/{config}" if config else name
    try:
        dd = datasets.load_dataset(name, config)
    except Exception as exc:
        raise DataError(
            f"data.source: could not load {label!r} from the Hugging Face hub "
            f"({_first_line(exc)}); the hub is unreachable or has no such dataset: "
            "set data.source to a local GLUE folder (train.tsv, dev.tsv) "
            "or use data.train_file / data.dev_file"
        ) from None
    out = {}
    for hub_split, split in _HUB_SPLITS.items():
        if hub_split in dd and split not in out:
            out[split] = normalise(dd[hub_split], task, lambda i, s=hub_split: f"{label}[{s}] row {i}", label)
    if "train" not in out:
        raise DataError(f"data.source: hub dataset {label!r} has no train split (splits: {', '.join(dd)})")
    return out


# --------------------------------------------------------------------------- load_splits


def split_off_dev(train_ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a random ``fraction`` of ``train_ds`` as dev (seeded); both keep the original row order."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"dev_fraction: got {fraction}; must be in (0, 1)")
    n = len(train_ds)
    n_dev = max(1, round(n * fraction))
    if n_dev >= n:
        raise DataError(f"dev_fraction: {fraction} of {n} rows leaves no training rows")
    perm = np.random.default_rng(seed).permutation(n)
    dev_idx, train_idx = np.sort(perm[:n_dev]), np.sort(perm[n_dev:])
    return train_ds.select(train_idx), train_ds.select(dev_idx)


def _load_demo(cfg: DataConfig, task: TaskSpec) -> dict[str, Dataset]:
    if cfg.source or cfg.train_file or cfg.dev_file:
        raise DataError(
            "data.task: demo is built in; leave data.source, data.train_file and data.dev_file "
            "empty (use task: custom for your own files)"
        )
    demo = make_demo(cfg.demo_size, cfg.demo_seed, cfg.demo_level)
    return {split: Dataset.from_list(recs, features=_features(task)) for split, recs in demo.items()}


def _load_raw(cfg: DataConfig, task: TaskSpec) -> tuple[dict[str, Dataset], str]:
    """The splits found, and the dev file that was expected (for the "no dev split" error)."""
    from kdqat_dist.data.heads import get_head  # lazy: the heads' own loaders read files with this module

    if (own := get_head(task).load_raw(cfg)) is not None:
        return own, "a dev split (data.dev_file, or dev/valid/validation files in data.source)"
    if task.name == "demo":
        return _load_demo(cfg, task), ""
    if cfg.train_file:
        return _load_files(cfg, task), "data.dev_file"
    if cfg.dev_file:
        raise DataError("data.train_file: data.dev_file is set but data.train_file is not")
    if task.name == "custom" and not cfg.source:
        raise DataError(
            "data.train_file: a custom task needs data.train_file (and data.dev_file), "
            "or data.source naming a hub dataset"
        )
    source = Path(cfg.source).expanduser() if cfg.source else None
    if source is not None and source.is_dir():
        return _load_glue_dir(source, task), str(source / glue_files(task)["dev"])
    if source is not None and (source.exists() or cfg.source.startswith((".", "/", "~"))):
        raise DataError(f"data.source: {cfg.source} is not a folder (a GLUE folder holds train.tsv and dev.tsv)")
    if task.name == "custom":
        return _load_hub(cfg.source, None, task), f"a validation split of {cfg.source}"
    hub = _load_hub(cfg.source or "nyu-mll/glue", None if cfg.source else task.name, task)
    return hub, "a validation split"


def _truncate(ds: Dataset, n: int | None) -> Dataset:
    return ds if n is None or n >= len(ds) else ds.select(range(n))


def load_splits(
    data_cfg: DataConfig, task: TaskSpec, dev_fraction: float | None = None, split_seed: int = 0
) -> dict[str, Dataset]:
    """The task's splits (``train``, ``dev``, and ``dev_mm`` for MNLI) with normalised columns.

    When the source has no dev split (e.g. a GLUE folder with only train.tsv), ``dev_fraction`` of train is
    held out as ``dev`` (seeded by ``split_seed``); without it that is an error. ``max_train_samples`` /
    ``max_eval_samples`` keep the first N rows of train / every eval split. An MNLI dev split made with
    ``dev_fraction`` has no ``dev_mm``: evaluate the splits of ``task.eval_splits`` that are present.
    """
    for key in ("max_train_samples", "max_eval_samples"):
        n = getattr(data_cfg, key)
        if n is not None and n < 1:
            raise DataError(f"data.{key}: got {n}; must be >= 1 or null (all rows)")
    splits, dev_source = _load_raw(data_cfg, task)
    if "dev" not in splits:
        if dev_fraction is None:
            raise DataError(
                f"{dev_source or 'dev split'}: no dev split found; provide one, "
                "or pass dev_fraction to hold out part of train"
            )
        splits["train"], splits["dev"] = split_off_dev(splits["train"], dev_fraction, split_seed)
    splits = {
        name: _truncate(ds, data_cfg.max_train_samples if name == "train" else data_cfg.max_eval_samples)
        for name, ds in splits.items()
    }
    for name, ds in splits.items():
        if len(ds) == 0:
            raise DataError(
                f"data: the {name} split of task {task.name} is empty "
                f"({data_cfg.source or data_cfg.train_file or 'built-in'})"
            )
    return splits


# --------------------------------------------------------------------------- tokenization


def default_cache_dir() -> Path:
    return cache_root() / "tokenized"


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    was = ds_logging.is_progress_bar_enabled()
    if was and not enabled:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            ds_logging.enable_progress_bar()


def content_hash(ds: Dataset) -> str:
    """A hash of a split's schema and rows (stable across processes, unlike object ids)."""
    h = hashlib.sha256(json.dumps(ds.features.to_dict(), sort_keys=True).encode())
    for batch in ds.iter(batch_size=10_000):
        h.update(json.dumps(batch, sort_keys=True).encode())
    return h.hexdigest()


def tokenizer_key(tokenizer: Any) -> str:
    """Identify a tokenizer by class, name, vocabulary size and (fast tokenizers) its full pipeline.

    The pipeline JSON catches two tokenizers with the same name and size but different vocabularies;
    its truncation/padding state is dropped because calling the tokenizer changes it.
    """
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def _tokenize_to(ds: Dataset, head: TaskHead, split: str, tokenizer: Any, max_length: int, target: Path) -> None:
    """Tokenize into a temporary folder, then rename it into place (atomic; concurrent ranks are safe)."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    head.tokenize(split, ds, tokenizer, max_length).save_to_disk(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize_splits(
    splits: dict[str, Dataset],
    tokenizer: Any,
    max_length: int,
    cache_dir: str | Path | None = None,
    head: TaskHead | None = None,
) -> dict[str, Dataset]:
    """Tokenize every split with the task head's :meth:`~kdqat_dist.data.heads.base.TaskHead.tokenize` (no
    padding), cached on disk. ``head`` None: sentence(-pair) rows (:class:`SequenceHead`; pairs truncated
    longest-first).

    Output columns: input_ids, attention_mask, token_type_ids (when the tokenizer makes them), the head's
    label keys and its own columns. The cache key hashes the split's content, the tokenizer
    (:func:`tokenizer_key`), ``max_length`` and the head; a second call with the same inputs loads the saved
    copy. ``cache_dir`` None or "" means :func:`default_cache_dir`.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    check_writable(root, "data.cache_dir" if cache_dir else "the tokenization cache ($KDQAT_CACHE/tokenized)")
    root.mkdir(parents=True, exist_ok=True)
    tok_key = tokenizer_key(tokenizer)
    head = head or SequenceHead(TaskSpec("rows", "text_a", "text_b", None, max_length, 0, ""))
    # sentence rows keep the key they had before task heads (their caches stay valid)
    head_key = "" if isinstance(head, SequenceHead) else f"|{head.cache_key()}"
    out = {}
    for name, ds in splits.items():
        key = hashlib.sha256(f"{_CACHE_FORMAT}|{content_hash(ds)}|{tok_key}|{max_length}{head_key}".encode())
        target = root / key.hexdigest()[:24]
        with _progress_bars(len(ds) > PROGRESS_MIN_ROWS):
            if not (target / "dataset_info.json").is_file():
                _tokenize_to(ds, head, name, tokenizer, max_length, target)
            out[name] = datasets.load_from_disk(str(target))
    return out


# --------------------------------------------------------------------------- batching


class Collator:
    """List of tokenized rows -> dict of tensors, padded to the longest row of the batch, or to
    ``max_length`` (``data.padding=max_length``: every batch the same width, as the reference code pads;
    the KD means over all positions then include the padded ones).

    The model's input columns are padded; the task head adds its label keys
    (:meth:`~kdqat_dist.data.heads.base.TaskHead.collate_labels`; ``head`` None: one label per row, float32
    for regression and int64 for classification). Other feature columns (word ids, offsets) stay out.
    """

    def __init__(
        self,
        tokenizer: Any,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        head: TaskHead | None = None,
    ):
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.head = head

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = [{k: r[k] for k in INPUT_COLUMNS if k in r} for r in rows]
        padding = "longest" if self.max_length is None else "max_length"
        batch = dict(
            self.tokenizer.pad(
                inputs,
                padding=padding,
                max_length=self.max_length,
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
        )
        if self.head is None:
            collate_scalar_labels(rows, batch)
        else:
            self.head.collate_labels(rows, batch)
        return batch
