"""The task-head seam: what one kind of task (sequence, token, qa) adds to an encoder.

A :class:`TaskHead` knows its Hugging Face model class, how a split's raw rows become model features, how
features are batched (label keys only; non-tensor feature columns such as offsets stay out of the batch),
what the KD terms read from a model's output (:class:`HeadOutput`) and how per-feature logits become the
task's metrics. Everything above data/ (models, quant, distill, engine, pipeline) goes through it, so a new
kind of task is one module here and a line in the registry (:func:`kdqat_dist.data.heads.get_head`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from datasets import Dataset

from kdqat_dist.data.tasks import TaskSpec

INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")  # what the model's forward takes
LABEL_KEYS = frozenset({"labels", "start_positions", "end_positions"})  # batch keys for the head, not the model


@dataclass(frozen=True)
class HeadOutput:
    """What the task head gives the KD terms on its outputs: ``logits`` [B, C] (C = 1 for regression), or any
    [..., C] of which ``valid`` (a bool mask of ``logits.shape[:-1]``; None: all) picks the rows the terms
    average over, e.g. [B, S, C] token logits or [B, 2, S] start/end logits; ``labels``: one per row."""

    logits: torch.Tensor
    labels: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., C] (or labels [...]) at the valid rows: [N, C] (or [N])."""
        return x if self.valid is None else x[self.valid]


Head = Callable[[Any, dict[str, torch.Tensor]], HeadOutput]  # (model output, batch) -> HeadOutput


class TaskHead:
    """One kind of task on top of an encoder; subclasses set the class attributes and override the methods.

    Attributes:
        kind: ``"sequence"``, ``"token"`` or ``"qa"`` (``TaskSpec.head``).
        auto_class_name: the ``transformers`` Auto class that builds teacher, student and fine-tuned models.
        label_keys: the batch keys :meth:`collate_labels` adds (popped before the model's forward).
        cache_version: part of the tokenisation cache key; bump when :meth:`tokenize`'s output changes.
    """

    kind: ClassVar[str] = ""
    auto_class_name: ClassVar[str] = ""
    label_keys: ClassVar[tuple[str, ...]] = ("labels",)
    cache_version: ClassVar[str] = "1"

    def __init__(self, spec: TaskSpec):
        self.spec = spec

    @property
    def auto_class(self) -> Any:
        """``transformers.<auto_class_name>`` (``from_pretrained`` / ``from_config``)."""
        return getattr(transformers, self.auto_class_name)

    @property
    def num_labels(self) -> int:
        """``config.num_labels`` of the head's model (the classes; 1 for regression; 2 for QA start/end)."""
        return self.spec.num_labels

    @property
    def regression(self) -> bool:
        """Whether the logit KD and ground truth are MSEs (one float output per row) instead of cross-entropies."""
        return False

    @property
    def selection_metric(self) -> str:
        return self.spec.selection_metric

    def cache_key(self) -> str:
        """What besides the rows, the tokenizer and max_len decides :meth:`tokenize`'s output."""
        return f"{self.kind}|{self.cache_version}"

    # ------------------------------------------------------------------ data

    def load_raw(self, cfg: Any) -> dict[str, Dataset] | None:
        """The raw splits of ``cfg`` (the ``data`` section) in this head's normalised columns, or None: the
        default loaders (:mod:`kdqat_dist.data.loaders`: GLUE folders, files, the hub; ``text_a``/``text_b``/
        ``label`` rows). Split names: ``train``, ``dev`` (and others of ``spec.eval_splits``)."""
        return None

    def tokenize(self, split: str, raw: Dataset, tokenizer: Any, max_len: int) -> Dataset:
        """Features of one normalised split (:func:`~kdqat_dist.data.loaders.load_splits`): the model's input
        columns (:data:`INPUT_COLUMNS` the tokenizer makes), the label keys, and any non-tensor columns
        :meth:`evaluate` needs (e.g. offsets, example ids). ``split`` is ``"train"`` or an eval split's name."""
        raise NotImplementedError

    def collate_labels(self, rows: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
        """Add the label tensors of ``rows`` to ``batch`` (inputs already padded, ``[B, S]``), in place."""
        raise NotImplementedError

    # ------------------------------------------------------------------ model outputs

    def outputs(self, model_output: Any, batch: dict[str, torch.Tensor]) -> HeadOutput:
        """What the logit-KD and ground-truth terms read (:data:`Head`)."""
        raise NotImplementedError

    def feature_logits(self, model_output: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """One float32 array per batch row for :meth:`evaluate` ([C], or [S_i, ...] cut to the row's length)."""
        raise NotImplementedError

    def evaluate(self, logits: Sequence[np.ndarray], features: Dataset, raw: Dataset | None) -> dict[str, float]:
        """The metrics (fractions) of one eval split from its per-feature logits (:meth:`feature_logits`, in
        feature order), its features (:meth:`tokenize`) and its raw split (None when the caller has none)."""
        raise NotImplementedError


def tokenize_rows(raw: Dataset, split: str, encode: Callable[..., dict[str, list]], **kwargs: Any) -> Dataset:
    """``raw`` through ``encode``, a batched ``datasets`` map function called with ``kwargs``; the raw columns
    are dropped, so a head's features hold only what ``encode`` returns (:meth:`TaskHead.tokenize`)."""
    return raw.map(encode, batched=True, remove_columns=raw.column_names, desc=f"Tokenizing {split}", fn_kwargs=kwargs)


def row_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Each row's real length (right padding)."""
    return batch["attention_mask"].sum(-1).tolist()


def column(ds: Dataset, name: str) -> list:
    """A whole column as a list (a datasets ``Column`` read at once, not row by row)."""
    values = ds[name]
    return values if isinstance(values, list) else values[:]
