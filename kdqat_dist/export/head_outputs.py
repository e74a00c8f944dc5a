"""What an exported model outputs for each task head, and when a copy reproduces the student's outputs.

    sequence: ``logits`` [batch, labels]
    token:    ``logits`` [batch, sequence, labels]
    qa:       ``start_logits``, ``end_logits`` [batch, sequence]

Token and QA outputs are compared over real tokens only: a padded position's output is computed from a pad
token nobody reads, and the export checks (ONNX Runtime, transformers' BitLinear) must neither fail on it
nor let it hide a wrong real one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdqat_dist.export.artifact import compare_logits
from kdqat_dist.files import head_kind

HEAD_OUTPUTS: dict[str, tuple[str, ...]] = {
    "sequence": ("logits",),
    "token": ("logits",),
    "qa": ("start_logits", "end_logits"),
}


def head_of(folder: str | Path) -> str:
    """``sequence``, ``token`` or ``qa``: the task head of the model saved in ``folder``."""
    return head_kind(folder)[0]


@torch.no_grad()
def outputs_of(model: nn.Module, batch: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """The head's outputs (:data:`HEAD_OUTPUTS`) of ``model`` on ``batch``, float32, in eval mode."""
    was = model.training
    model.eval()
    out = model(**batch)
    model.train(was)
    return {name: getattr(out, name).float() for name in HEAD_OUTPUTS[head]}


def _real(head: str, outputs: dict[str, torch.Tensor], mask: torch.Tensor, fill: float) -> torch.Tensor:
    """One tensor for :func:`~kdqat_dist.export.artifact.compare_logits`: sequence as it is; token: the real
    tokens' rows [tokens, labels]; QA: [batch, 2, sequence] with padded positions set to ``fill``."""
    if head == "sequence":
        return outputs["logits"]
    real = mask.bool()
    if head == "token":
        return outputs["logits"][real]
    both = torch.stack([outputs["start_logits"], outputs["end_logits"]], 1)
    return both.masked_fill(~real[:, None, :], fill)


def compare_outputs(
    head: str, want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], mask: torch.Tensor, rel: float
) -> tuple[str | None, float]:
    """(None when ``got`` reproduces ``want`` else what differs in words, the largest |difference|) over the
    real tokens of ``mask`` [batch, sequence]: within ``rel`` of the largest |output| and the same argmax
    where the margin is clear (token: each token's label; QA: each row's start and end position)."""
    missing = [n for n in HEAD_OUTPUTS[head] if n not in got]
    if missing:
        return f"no output {missing[0]!r}", float("inf")
    for n in HEAD_OUTPUTS[head]:
        if got[n].shape != want[n].shape:
            return f"{n} of shape {tuple(got[n].shape)}, expected {tuple(want[n].shape)}", float("inf")
    # a padded QA position takes the smallest real logit in both: it can tie a real position, never beat it,
    # and neither widens the tolerance nor differs
    fill = float(min(want[n][mask.bool()].min() for n in HEAD_OUTPUTS[head])) if head == "qa" else 0.0
    a, b = _real(head, want, mask, fill), _real(head, got, mask, fill)
    problem = compare_logits(a, b, rel)
    diff = float((a - b).abs().max()) if a.shape == b.shape and a.numel() else float("inf")
    return problem, diff
