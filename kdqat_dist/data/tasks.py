"""Task registry (GLUE, the built-in demo, custom tasks) and exact evaluation metrics.

Per-task defaults follow the reference code's recipe (max_seq_len, eval every) and GLUE (labels, metrics). One
deliberate change: MRPC and QQP are selected on (acc + F1) / 2, the number that is reported, where the
reference selected on accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import rankdata

from kdqat_dist.config import DataConfig
from kdqat_dist.errors import ConfigError, DataError


@dataclass(frozen=True)
class TaskSpec:
    """What a task's data looks like and how it is evaluated.

    ``text_a``/``text_b``/``label`` name the columns of hub datasets and custom files. ``label_list`` is
    None for regression (one output) and QA. ``eval_splits`` are the split names scored at every evaluation.
    ``head`` is the task head's kind (:func:`kdqat_dist.data.heads.get_head`).
    """

    name: str
    text_a: str
    text_b: str | None
    label_list: tuple[str, ...] | None
    max_seq_length: int
    eval_every: int
    selection_metric: str
    eval_splits: tuple[str, ...] = ("dev",)
    label: str = "label"
    batch_size: int = 32  # the reference's per-task training batch (used when train.batch_size is null)
    head: str = "sequence"  # the task head's kind (data/heads): sequence, token or qa
    doc_stride: int = 128  # QA: tokens shared by consecutive windows of a long context (data.doc_stride)
    null_score_diff_threshold: float = 0.0  # SQuAD v2.0: answer "" above it (data.null_score_diff_threshold)

    @property
    def num_labels(self) -> int:
        """The model's outputs per row (per token for token tasks): the labels, 1 for regression, 2 for QA."""
        if self.label_list is not None:
            return len(self.label_list)
        return 2 if self.head == "qa" else 1

    @property
    def is_regression(self) -> bool:
        return self.label_list is None and self.head == "sequence"


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_MNLI = ("contradiction", "entailment", "neutral")
CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")

# Column names are those of the hub's nyu-mll/glue; label orders are those of the reference (utils_glue.py).
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("cola", "sentence", None, _BINARY, 64, 50, "mcc", batch_size=16),
        TaskSpec("sst2", "sentence", None, _BINARY, 64, 100, "acc"),
        TaskSpec("mrpc", "sentence1", "sentence2", _BINARY, 128, 50, "acc_and_f1"),
        TaskSpec("stsb", "sentence1", "sentence2", None, 128, 100, "corr"),
        TaskSpec("qqp", "question1", "question2", _BINARY, 128, 1000, "acc_and_f1"),
        TaskSpec("mnli", "premise", "hypothesis", _MNLI, 128, 8000, "acc", ("dev", "dev_mm")),
        TaskSpec("qnli", "question", "sentence", _NLI2, 128, 1000, "acc"),
        TaskSpec("rte", "sentence1", "sentence2", _NLI2, 128, 20, "acc"),
        TaskSpec("demo", "text_a", None, ("negative", "positive"), 64, 50, "acc"),
        # Hugging Face conll2003's tag order; its files' IOB1 tags use the same names (no B- at a chunk's start)
        TaskSpec("conll2003", "tokens", None, CONLL_TAGS, 128, 200, "f1", label="tags", head="token"),
        # extractive QA (the QA head): num_labels 2 (start, end); eval_every as the reference's QA runs
        TaskSpec("squad", "question", "context", None, 384, 1000, "f1", label="answers", batch_size=32, head="qa"),
        TaskSpec("squad_v2", "question", "context", None, 384, 1000, "f1", label="answers", batch_size=32, head="qa"),
    )
}
ALIASES = {"ner": "conll2003", "squadv11": "squad", "squadv1": "squad", "squadv2": "squad_v2", "squadv20": "squad_v2"}
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
CUSTOM_DEFAULT_MAX_LEN = 128
CUSTOM_DEFAULT_EVAL_EVERY = 100


def _canonical(name: str) -> str:
    """``"SST-2"``, ``"sst_2"``, ``"sst2"`` -> ``"sst2"``."""
    return name.strip().lower().replace("-", "").replace("_", "")


def _custom_token_task(cfg: DataConfig) -> TaskSpec:
    """``custom_tokens``: a ``tokens`` + ``tags`` folder or files (JSON/JSONL/CSV/CoNLL columns), tags named
    by ``data.label_list`` (IOB1 or IOB2 names; ``O`` outside any entity)."""
    if not cfg.label_list:
        raise DataError("data.label_list: a custom_tokens task needs its tag names, e.g. [O, B-PER, I-PER]")
    labels = tuple(str(x) for x in cfg.label_list)
    if len(set(labels)) != len(labels):
        raise DataError(f"data.label_list: got {list(labels)}; tag names must be distinct")
    default = DataConfig()
    return TaskSpec(
        name="custom_tokens",
        text_a=cfg.text_a if cfg.text_a != default.text_a else "tokens",
        text_b=None,
        label_list=labels,
        max_seq_length=cfg.max_seq_length or CUSTOM_DEFAULT_MAX_LEN,
        eval_every=CUSTOM_DEFAULT_EVAL_EVERY,
        selection_metric="f1",
        label=cfg.label if cfg.label != default.label else "tags",
        head="token",
    )


def _custom_task(cfg: DataConfig) -> TaskSpec:
    labels = tuple(str(x) for x in cfg.label_list) if cfg.label_list is not None else None
    n = cfg.num_labels
    if labels is None:
        if n is None:
            raise DataError(
                "data.label_list: a custom task needs data.label_list (classification) "
                "or data.num_labels: 1 (regression)"
            )
        if n < 1:
            raise DataError(f"data.num_labels: got {n}; allowed: 1 (regression) or >= 2 (classes '0'..'n-1')")
        # num_labels >= 2 without names: the labels in the files are the class ids 0..n-1.
        labels = None if n == 1 else tuple(str(i) for i in range(n))
    else:
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise DataError(
                f"data.label_list: got {list(labels)}; need >= 2 distinct labels "
                "(use num_labels: 1 with no label_list for regression)"
            )
        if n is not None and n != len(labels):
            raise DataError(f"data.num_labels: got {n} but data.label_list has {len(labels)} labels")
    if not cfg.text_a:
        raise DataError("data.text_a: a custom task needs the name of its text column")
    return TaskSpec(
        name="custom",
        text_a=cfg.text_a,
        text_b=cfg.text_b or None,
        label_list=labels,
        max_seq_length=cfg.max_seq_length or CUSTOM_DEFAULT_MAX_LEN,
        eval_every=CUSTOM_DEFAULT_EVAL_EVERY,
        selection_metric="corr" if labels is None else "acc",
        label=cfg.label,
    )


def get_task(data_cfg: DataConfig | str) -> TaskSpec:
    """The :class:`TaskSpec` for ``data.task`` (a GLUE name or alias, ``demo`` or ``custom``).

    ``data.max_seq_length`` overrides the per-task default when set.
    """
    cfg = DataConfig(task=data_cfg) if isinstance(data_cfg, str) else data_cfg
    if cfg.max_seq_length is not None and cfg.max_seq_length < 8:
        raise DataError(f"data.max_seq_length: got {cfg.max_seq_length}; must be >= 8 or null (task default)")
    key = _canonical(cfg.task)
    key = ALIASES.get(key, key)
    if cfg.null_score_diff_threshold != 0.0 and key != "squad_v2":
        raise ConfigError(
            f"data.null_score_diff_threshold: got {cfg.null_score_diff_threshold:g} for task {cfg.task!r}; only "
            "SQuAD v2.0 (data.task: squad_v2) has no-answer questions, leave it at 0 for other tasks"
        )
    if key == "custom":
        return _custom_task(cfg)
    if key == "customtokens":
        return _custom_token_task(cfg)
    if key not in TASKS:
        allowed = ", ".join([*TASKS, "ner", "custom", "custom_tokens"])
        raise DataError(f"data.task: unknown task {cfg.task!r}; allowed: {allowed}")
    spec = TASKS[key]
    if cfg.max_seq_length is not None:
        spec = replace(spec, max_seq_length=cfg.max_seq_length)
    if cfg.doc_stride is not None:
        spec = replace(spec, doc_stride=cfg.doc_stride)
    return replace(spec, null_score_diff_threshold=cfg.null_score_diff_threshold)


def _resolve(task: TaskSpec | str) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    key = _canonical(task)
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown task {task!r} (pass the TaskSpec for custom tasks); allowed: {', '.join(TASKS)}")
    return TASKS[key]


# --------------------------------------------------------------------------- metrics


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def f1_binary(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (1); 0.0 when there are no true positives."""
    tp = float(np.sum((preds == 1) & (labels == 1)))
    fp = float(np.sum((preds == 1) & (labels != 1)))
    fn = float(np.sum((preds != 1) & (labels == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multi-class form, equal to the binary formula for two classes).

    0.0 when it is undefined (a constant prediction or a single label class), as in scikit-learn.
    """
    classes = np.union1d(preds, labels)
    idx_p, idx_l = np.searchsorted(classes, preds), np.searchsorted(classes, labels)
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(conf, (idx_l, idx_p), 1.0)
    t, p = conf.sum(axis=1), conf.sum(axis=0)  # true / predicted counts per class
    n, c = conf.sum(), np.trace(conf)
    denom = (n * n - p @ p) * (n * n - t @ t)
    return 0.0 if denom == 0 else float((c * n - t @ p) / np.sqrt(denom))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant (undefined)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt((x @ x) * (y @ y))
    return 0.0 if denom == 0 else float(np.clip((x @ y) / denom, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson on average ranks (ties share their mean rank)."""
    return pearson(rankdata(x), rankdata(y))


def compute_metrics(task: TaskSpec | str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's dev metrics as fractions (not percent).

    ``preds`` are class ids, or logits of shape (N, C) (argmax is taken), or regression outputs of shape
    (N,) or (N, 1). MNLI returns ``{"acc"}`` for one split; the caller prefixes dev_mm's with ``mm_``.
    """
    spec = _resolve(task)
    preds, labels = np.asarray(preds), np.asarray(labels)
    if spec.is_regression:
        preds = preds.reshape(len(preds), -1)[:, 0] if preds.ndim == 2 else preds
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.shape != labels.shape or preds.ndim != 1:
        raise ValueError(f"preds {preds.shape} and labels {labels.shape} must be equal-length 1-D arrays")
    if len(labels) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    if spec.is_regression:
        p, s = pearson(preds, labels), spearman(preds, labels)
        return {"pearson": p, "spearman": s, "corr": (p + s) / 2}
    preds, labels = preds.astype(np.int64), labels.astype(np.int64)
    if spec.name == "cola":
        return {"mcc": matthews_corrcoef(preds, labels)}
    acc = accuracy(preds, labels)
    if spec.name in ("mrpc", "qqp"):
        f1 = f1_binary(preds, labels)
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}
    return {"acc": acc}


def selection_value(task: TaskSpec | str, metrics: dict[str, float]) -> float:
    """The number model selection maximises (the same number that is reported)."""
    spec = _resolve(task)
    if spec.selection_metric not in metrics:
        raise KeyError(f"task {spec.name} selects on {spec.selection_metric!r}, missing from metrics {sorted(metrics)}")
    return float(metrics[spec.selection_metric])
