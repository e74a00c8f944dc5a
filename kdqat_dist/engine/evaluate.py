"""Dev-split evaluation shared by the training loop and ``kdqat eval``: per-feature logits through the task
head, then the head's metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from kdqat_dist.data.heads import LABEL_KEYS, TaskHead, get_head
from kdqat_dist.data.tasks import TaskSpec, selection_value


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Restore every module's own mode afterwards, not the wrapper's flag: a DeepSpeed engine's ``eval()``
    # leaves the engine's own ``training`` flag set, and ``model.train(model.training)`` would then put
    # a frozen ZeRO-3 teacher into training mode (dropout on) for the rest of the run.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _batches(dataset: Sequence, collate: Callable, batch_size: int, device) -> Iterator[dict[str, torch.Tensor]]:
    for i in range(0, len(dataset), batch_size):
        b = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        yield {k: v.to(device) for k, v in b.items()}


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Sequence, collate: Callable, task: TaskSpec, batch_size: int, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) of a sequence task over ``dataset``: argmax classes, or the scalar output for
    regression.

    Every rank of a distributed run calls this on every batch (ZeRO-3 forwards are collective).
    """
    preds, labels = [], []
    with _eval_mode(model):
        for b in _batches(dataset, collate, batch_size, device):
            lab = b.pop("labels")
            logits = model(**b).logits.float()
            preds.append(logits.squeeze(-1) if task.is_regression else logits.argmax(-1))
            labels.append(lab)
    return torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy()


@torch.no_grad()
def feature_logits(
    model: nn.Module, dataset: Sequence, collate: Callable, head: TaskHead, batch_size: int, device: torch.device | str
) -> list[np.ndarray]:
    """The head's per-feature logits (:meth:`~kdqat_dist.data.heads.base.TaskHead.feature_logits`) over
    ``dataset``, in order. Every rank of a distributed run calls this on every batch (ZeRO-3 forwards are
    collective)."""
    out: list[np.ndarray] = []
    with _eval_mode(model):
        for b in _batches(dataset, collate, batch_size, device):
            inputs = {k: v for k, v in b.items() if k not in LABEL_KEYS}
            out.extend(head.feature_logits(model(**inputs), b))
    return out


def split_prefix(task: TaskSpec, split: str) -> str:
    """Metric-name prefix of an eval split: none for the first, ``mm_`` for MNLI's mismatched, else ``<split>_``."""
    if split == task.eval_splits[0]:
        return ""
    return "mm_" if split == "dev_mm" else f"{split}_"


def evaluate(
    model: nn.Module,
    task: TaskSpec,
    data: Mapping[str, Sequence],
    collate: Callable,
    batch_size: int,
    device: torch.device | str,
    raw: Mapping[str, Sequence] | None = None,
    head: TaskHead | None = None,
) -> dict[str, float]:
    """The task's metrics on each of its evaluation splits present in ``data`` (MNLI's mismatched split
    with an ``mm_`` prefix), plus ``selection``: the value model selection maximises.

    ``raw``: the untokenized splits, for heads that score against them (token: every word's tag; QA: the
    answers); ``head`` None: the task's own (:func:`~kdqat_dist.data.heads.get_head`).
    """
    head = head or get_head(task)
    metrics: dict[str, float] = {}
    for split in task.eval_splits:
        if split not in data:
            continue
        logits = feature_logits(model, data[split], collate, head, batch_size, device)
        m = head.evaluate(logits, data[split], raw.get(split) if raw else None)
        metrics.update({split_prefix(task, split) + k: v for k, v in m.items()})
    metrics["selection"] = selection_value(task, metrics)
    return metrics
