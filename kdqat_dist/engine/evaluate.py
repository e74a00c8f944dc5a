"""Dev-split evaluation shared by the training loop and ``kdqat eval``: predictions, then the task's metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdqat_dist.data.tasks import TaskSpec, compute_metrics, selection_value


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Sequence, collate: Callable, task: TaskSpec, batch_size: int, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) over ``dataset``: argmax classes, or the scalar output for regression.

    Every rank of a distributed run calls this on every batch (ZeRO-3 forwards are collective).
    """
    # Restore every module's own mode afterwards, not the wrapper's flag: a DeepSpeed engine's ``eval()``
    # leaves the engine's own ``training`` flag set, and ``model.train(model.training)`` would then put
    # a frozen ZeRO-3 teacher into training mode (dropout on) for the rest of the run.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    preds, labels = [], []
    try:
        for i in range(0, len(dataset), batch_size):
            b = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            b = {k: v.to(device) for k, v in b.items()}
            lab = b.pop("labels")
            logits = model(**b).logits.float()
            preds.append(logits.squeeze(-1) if task.is_regression else logits.argmax(-1))
            labels.append(lab)
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy()


def evaluate(
    model: nn.Module,
    task: TaskSpec,
    data: Mapping[str, Sequence],
    collate: Callable,
    batch_size: int,
    device: torch.device | str,
) -> dict[str, float]:
    """The task's metrics on each of its evaluation splits present in ``data`` (MNLI's mismatched split
    with an ``mm_`` prefix), plus ``selection``: the value model selection maximises."""
    metrics: dict[str, float] = {}
    for split in task.eval_splits:
        if split not in data:
            continue
        m = compute_metrics(task, *predict(model, data[split], collate, task, batch_size, device))
        prefix = "" if split == "dev" else "mm_"
        metrics.update({prefix + k: v for k, v in m.items()})
    metrics["selection"] = selection_value(task, metrics)
    return metrics
