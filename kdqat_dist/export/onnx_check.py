"""The dev-set check of an ONNX export: ONNX Runtime and the fake-quant student on the same batches.

Both models see identical batches (the task's dev split, tokenized and padded as ``kdqat eval`` does, in
file order), through the same :func:`~kdqat_dist.engine.evaluate.feature_logits` and the task head's
metrics; the check reports both metric sets and how many predictions agree (rows, tokens or QA windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from kdqat_dist.config import RunConfig
from kdqat_dist.data.heads import get_head
from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
from kdqat_dist.data.tasks import get_task, selection_value
from kdqat_dist.engine.evaluate import feature_logits, split_prefix
from kdqat_dist.export.onnx_export import read_onnx_meta, run_outputs, session
from kdqat_dist.models.encoders import load_tokenizer
from kdqat_dist.quant.student import load_student

# what a dev check counts per task head (:func:`_choices`)
UNITS = {"sequence": "rows", "token": "tokens", "qa": "windows"}
# the share of dev rows whose ONNX prediction may differ from the student's (issue #31's target: 99.5 %
# agreement); at least one row, so a small dev set is not refused for a single near-tie
MAX_DISAGREEMENT = 0.005


class OrtModel(nn.Module):
    """An ONNX Runtime session called like a transformers model: ``model(**batch).logits`` (QA:
    ``.start_logits`` and ``.end_logits``)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        super().__init__()
        meta = read_onnx_meta(folder)
        self.session = session(Path(folder) / meta["model_file"], threads)

    def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(**{k: torch.from_numpy(v) for k, v in run_outputs(self.session, batch).items()})


@dataclass
class DevCheck:
    """Metrics of the student and of the ONNX model on the dev split(s), and their agreement."""

    student: dict[str, float]
    onnx: dict[str, float]
    rows: int
    agree: int
    max_abs_diff: float | None  # regression: largest |output difference|
    unit: str = "rows"  # what ``rows`` counts: rows, tokens (token head) or windows (QA)

    @property
    def agreement(self) -> float:
        return self.agree / max(self.rows, 1)

    def ok(self) -> bool:
        allowed = max(1, int(MAX_DISAGREEMENT * self.rows))
        return self.rows - self.agree <= allowed

    def as_dict(self) -> dict:
        return {
            "student": self.student,
            "onnx": self.onnx,
            "rows": self.rows,
            "agree": self.agree,
            "agreement": self.agreement,
            "max_abs_diff": self.max_abs_diff,
            "unit": self.unit,
        }


def dev_check(
    cfg: RunConfig, student_dir: str | Path, onnx_dir: str | Path, model: nn.Module | None = None
) -> DevCheck:
    """Run the fake-quant student and the ONNX model over the task's dev split(s) of ``cfg`` (``model``: another
    exported model in its place, e.g. the hf-bitnet one; its metrics are reported as ``onnx``).

    Agreement, per task head: a sequence classifier's predicted class (regression: the output within 1 % of
    the labels' spread) per row; a token classifier's tag per real token; an extractive-QA model's start and
    end position (both) per window."""
    task = get_task(cfg.data)
    head = get_head(task)
    tokenizer = load_tokenizer(str(student_dir))
    max_len = cfg.data.max_seq_length or task.max_seq_length
    dev = {k: v for k, v in load_splits(cfg.data, task).items() if k != "train"}
    data = tokenize_splits(dev, tokenizer, max_len, cfg.data.cache_dir or None, head)
    collate = Collator(tokenizer, max_length=max_len if cfg.data.padding == "max_length" else None, head=head)
    student, ort_model = load_student(student_dir), model if model is not None else OrtModel(onnx_dir)
    ms, mo, rows, agree, diff = {}, {}, 0, 0, None
    for split in task.eval_splits:
        if split not in data:
            continue
        size = cfg.train.eval_batch_size
        ls, lo = (feature_logits(m, data[split], collate, head, size, "cpu") for m in (student, ort_model))
        prefix = split_prefix(task, split)
        ms.update({prefix + k: v for k, v in head.evaluate(ls, data[split], dev.get(split)).items()})
        mo.update({prefix + k: v for k, v in head.evaluate(lo, data[split], dev.get(split)).items()})
        if task.is_regression:
            d = np.abs(np.concatenate(ls) - np.concatenate(lo))
            diff = max(diff or 0.0, float(d.max()) if len(d) else 0.0)
            labels = np.asarray(data[split]["labels"], dtype=np.float64)
            rows, agree = rows + len(d), agree + int((d <= 0.01 * max(float(np.ptp(labels)), 1e-6)).sum())
        else:
            same = [(_choices(head.kind, a) == _choices(head.kind, b)).all(-1) for a, b in zip(ls, lo, strict=True)]
            rows, agree = rows + sum(s.size for s in same), agree + int(sum(s.sum() for s in same))
    ms["selection"], mo["selection"] = selection_value(task, ms), selection_value(task, mo)
    return DevCheck(ms, mo, rows, agree, diff, UNITS[head.kind])


def _choices(kind: str, logits: np.ndarray) -> np.ndarray:
    """What one feature's logits predict, one row per item: a sequence row's class [1, 1], a token window's
    tags [S, 1], a QA window's (start, end) [1, 2] (a span agrees only when both of its ends do)."""
    if kind == "qa":
        return logits.argmax(0)[None, :]
    return np.atleast_1d(logits.argmax(-1))[:, None]
