"""Token-classification splits: CoNLL column files, ``tokens`` + ``tags`` JSON/JSONL/CSV files, or the hub.

Every split becomes a :class:`datasets.Dataset` with ``tokens`` (list of words) and ``tags`` (list of tag ids
into the task's ``label_list``). Sources, in order:

* ``data.train_file`` / ``data.dev_file``: one file each;
* ``data.source`` a folder: ``train``, ``dev`` and ``test`` files found by name (CoNLL-2003's
  ``train.txt``/``valid.txt``/``test.txt`` or ``eng.train``/``eng.testa``/``eng.testb``; ``.json``, ``.jsonl``,
  ``.csv`` and ``.conll`` versions of the same stems);
* otherwise the hub (``eriktks/conll2003`` for conll2003, or ``data.source`` as a hub name), when reachable.

A CoNLL column file has one word per line, the word first and its tag last (``word POS chunk tag``), a blank
line between sentences, and ``-DOCSTART-`` lines (document breaks) skipped. Bad input raises
:class:`DataError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, Features, Sequence, Value

from kdqat_dist.config import DataConfig
from kdqat_dist.data.tasks import TaskSpec
from kdqat_dist.errors import DataError

TABLE_SUFFIXES = (".json", ".jsonl", ".csv")
# split -> file stems tried in a folder, in order
SPLIT_STEMS = {
    "train": ("train", "eng.train"),
    "dev": ("valid", "dev", "validation", "eng.testa"),
    "test": ("test", "eng.testb"),
}
HUB_NAMES = {"conll2003": "eriktks/conll2003"}
_HUB_SPLITS = {"train": "train", "validation": "dev", "test": "test"}


def _features() -> Features:
    return Features({"tokens": Sequence(Value("string")), "tags": Sequence(Value("int64"))})


def _tag_id(value: Any, task: TaskSpec, where: str, names: list[str] | None = None, note: str = "") -> int:
    labels = task.label_list or ()
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        value = names[value]  # a hub ClassLabel id: its name, mapped onto our order
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    raise DataError(
        f"{where}: tag {value!r}{note} is not in the tag set of task {task.name}; allowed: {', '.join(labels)}"
    )


def read_conll(path: Path, task: TaskSpec) -> Dataset:
    """Sentences of a CoNLL column file (word first, tag last; blank lines between sentences)."""
    tokens: list[list[str]] = []
    tags: list[list[int]] = []
    words: list[str] = []
    ids: list[int] = []

    def close() -> None:
        if words:
            tokens.append(list(words))
            tags.append(list(ids))
            words.clear()
            ids.clear()

    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                cols = line.split()
                if not cols:
                    close()
                    continue
                if cols[0] == "-DOCSTART-":
                    close()
                    continue
                if len(cols) < 2:
                    raise DataError(f"{path}:{line_no}: expected 'word ... tag' columns, got {line.strip()!r}")
                words.append(cols[0])
                # named as the last column: a file without its tag column has a POS or chunk tag there
                ids.append(_tag_id(cols[-1], task, f"{path}:{line_no}", note=" (the line's last column)"))
        close()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not tokens:
        raise DataError(f"{path}: no sentences (a CoNLL file has 'word ... tag' lines)")
    return Dataset.from_dict({"tokens": tokens, "tags": tags}, features=_features())


def _as_list(value: Any, where: str, col: str) -> list:
    """A list column's value; a CSV cell holds a JSON list or space-separated items."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                out = json.loads(text)
            except ValueError:
                raise DataError(f"{where}: column {col!r} is not a JSON list") from None
            if isinstance(out, list):
                return out
        return text.split()
    raise DataError(f"{where}: column {col!r} must be a list (got {type(value).__name__})")


def normalise_tokens(ds: Dataset, task: TaskSpec, where: Callable[[int], str], source: str) -> Dataset:
    """``task.text_a`` (words) and ``task.label`` (tags: names or ids) columns of ``ds``, checked row by row."""
    present = list(ds.column_names)
    for key, col in (("data.text_a", task.text_a), ("data.label", task.label)):
        if col not in present:
            raise DataError(f"{source}: column {col!r} ({key}) not found; columns present: {', '.join(present)}")
    feat = ds.features[task.label]
    inner = getattr(feat, "feature", None)
    names = list(inner.names) if isinstance(inner, ClassLabel) else None
    words_col, tags_col = ds[task.text_a][:], ds[task.label][:]
    tokens, tags = [], []
    for i, (w, t) in enumerate(zip(words_col, tags_col, strict=True)):
        w, t = _as_list(w, where(i), task.text_a), _as_list(t, where(i), task.label)
        if len(w) != len(t):
            raise DataError(f"{where(i)}: {len(w)} tokens but {len(t)} tags")
        if not w:
            raise DataError(f"{where(i)}: no tokens")
        tokens.append([str(x) for x in w])
        tags.append([_tag_id(_int_or_str(x), task, where(i), names) for x in t])
    return Dataset.from_dict({"tokens": tokens, "tags": tags}, features=_features())


def _int_or_str(x: Any) -> Any:
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return x


def read_token_file(path: Path, task: TaskSpec, key: str) -> Dataset:
    """One split from a JSON/JSONL/CSV table (``tokens`` + ``tags``) or a CoNLL column file (any other name)."""
    if not path.is_file():
        raise DataError(f"{key}: {'not a file' if path.exists() else 'file not found'}: {path}")
    if path.suffix.lower() in TABLE_SUFFIXES:
        from kdqat_dist.data.loaders import read_table  # lazy: loaders imports the task heads

        ds, where = read_table(path, key)
        return normalise_tokens(ds, task, where, str(path))
    return read_conll(path, task)


def _find(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".txt", ".conll", *TABLE_SUFFIXES):
            if (p := folder / f"{stem}{suffix}").is_file():
                return p
    return None


def _load_hub(name: str, task: TaskSpec) -> dict[str, Dataset]:
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"data.source: could not load {name!r} from the Hugging Face hub ({first}); set data.source to a "
            "CoNLL folder (train.txt, valid.txt, test.txt) or use data.train_file / data.dev_file"
        ) from None
    hub_task = replace(task, text_a="tokens", label="ner_tags")
    out = {}
    for hub_split, split in _HUB_SPLITS.items():
        if hub_split in dd:
            out[split] = normalise_tokens(dd[hub_split], hub_task, lambda i, s=hub_split: f"{name}[{s}] row {i}", name)
    return out


def load_token_splits(cfg: DataConfig, task: TaskSpec) -> dict[str, Dataset]:
    """The splits of a token-classification task (see the module docstring for the sources)."""
    if cfg.train_file:
        out = {"train": read_token_file(Path(cfg.train_file).expanduser(), task, "data.train_file")}
        if cfg.dev_file:
            out["dev"] = read_token_file(Path(cfg.dev_file).expanduser(), task, "data.dev_file")
        return out
    if cfg.dev_file:
        raise DataError("data.train_file: data.dev_file is set but data.train_file is not")
    source = Path(cfg.source).expanduser() if cfg.source else None
    if source is not None and source.is_dir():
        found = {split: _find(source, stems) for split, stems in SPLIT_STEMS.items()}
        if found["train"] is None:
            raise DataError(
                f"data.source: {source} has no training file (train.txt, eng.train, train.json, train.jsonl "
                "or train.csv)"
            )
        return {split: read_token_file(p, task, "data.source") for split, p in found.items() if p is not None}
    if source is not None and (source.exists() or cfg.source.startswith((".", "/", "~"))):
        raise DataError(f"data.source: {cfg.source} is not a folder (a CoNLL folder holds train.txt, valid.txt)")
    name = cfg.source or HUB_NAMES.get(task.name)
    if not name:
        raise DataError(f"data.train_file: task {task.name} needs data.train_file or a data.source folder")
    return _load_hub(name, task)
