"""Sentence(-pair) classification and regression: one label per row, the [CLS] head's [B, C] logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from kdqat_dist.data.heads.base import INPUT_COLUMNS, HeadOutput, TaskHead, column, tokenize_rows
from kdqat_dist.data.tasks import compute_metrics
from kdqat_dist.errors import DataError


def encode_pairs(batch: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    """``text_a`` (and ``text_b``) rows -> input columns (pairs truncated longest-first) plus ``labels``."""
    has_b = [b is not None for b in batch["text_b"]]
    if any(has_b) and not all(has_b):
        raise DataError("text_b: a split mixes sentence pairs and single sentences")
    enc = tokenizer(
        batch["text_a"], batch["text_b"] if all(has_b) else None, truncation="longest_first", max_length=max_length
    )
    out = {k: enc[k] for k in INPUT_COLUMNS if k in enc}
    out["labels"] = batch["label"]
    return out


def collate_scalar_labels(rows: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
    """``labels`` [B]: float32 for regression (float labels), int64 for classification."""
    if not rows or "labels" not in rows[0]:
        return
    labels = [r["labels"] for r in rows]
    if torch.as_tensor(labels[0]).is_floating_point():  # regression
        batch["labels"] = torch.tensor([float(x) for x in labels], dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor([int(x) for x in labels], dtype=torch.long)


class SequenceHead(TaskHead):
    """GLUE-style tasks: ``AutoModelForSequenceClassification``, labels one per row, logit KD over rows."""

    kind = "sequence"
    auto_class_name = "AutoModelForSequenceClassification"

    @property
    def regression(self) -> bool:
        return self.spec.is_regression

    def tokenize(self, split: str, raw: Dataset, tokenizer: Any, max_len: int) -> Dataset:
        return tokenize_rows(raw, split, encode_pairs, tokenizer=tokenizer, max_length=max_len)

    def collate_labels(self, rows: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
        collate_scalar_labels(rows, batch)

    def outputs(self, model_output: Any, batch: dict[str, torch.Tensor]) -> HeadOutput:
        return HeadOutput(model_output.logits, batch.get("labels"))

    def feature_logits(self, model_output: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        return list(model_output.logits.float().cpu().numpy())

    def evaluate(self, logits: Sequence[np.ndarray], features: Dataset, raw: Dataset | None) -> dict[str, float]:
        return compute_metrics(self.spec, np.stack(logits), np.asarray(column(features, "labels")))


def classifier_head(output: Any, batch: dict[str, torch.Tensor]) -> HeadOutput:
    """Sequence classification and regression: the model's [B, C] logits, one row per sample."""
    return HeadOutput(output.logits, batch.get("labels"))
