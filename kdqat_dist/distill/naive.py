"""The KD objective computed the plain way: every KD tap of both models kept, at every layer, then the losses.

The reference that the streaming :class:`~kdqat_dist.distill.objective.DistillObjective` (whose ``naive`` this
is) is tested against, and the all-taps baseline the memory benchmarks compare it with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdqat_dist.distill.terms import LossOutput, Plan, depths
from kdqat_dist.models.encoders import unwrap
from kdqat_dist.models.taps import TapStore, tapped


class NaiveObjective:
    """The terms of ``plan`` on one batch, from the taps of every declared term at every layer of both models."""

    def __init__(self, plan: Plan):
        self.plan, self.weights = plan, plan.weights

    def term_loss(self, name: str, s, t, mask: torch.Tensor) -> torch.Tensor:
        """One term's value for one layer pair, or for the head's outputs."""
        return self.plan.active[name].loss(self.plan, s, t, mask)

    def __call__(self, student: Callable, teacher: Callable, batch: dict[str, torch.Tensor]) -> LossOutput:
        plan, mask = self.plan, batch["attention_mask"]
        plan.check(student, teacher)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        every = {t.tap for t in plan.terms if t.tap is not None}
        n_layers = max(depths(student, teacher)) + 1  # the hidden tap has the embeddings too
        s_taps, t_taps = TapStore(), TapStore()
        with tapped(unwrap(student), {tap: set(range(n_layers)) for tap in every}, s_taps):
            s_head = plan.head(student(**inputs), batch)
        with torch.no_grad(), tapped(unwrap(teacher), {tap: set(range(n_layers)) for tap in every}, t_taps):
            t_head = plan.head(teacher(**inputs), batch)
        out = LossOutput(total=torch.zeros(()), student_logits=s_head.logits, teacher_logits=t_head.logits)
        for term in plan.layer_terms:
            for t_layer, s_layers in plan.t2s[term.name].items():
                for s_layer in s_layers:
                    s, t = s_taps[term.tap][s_layer], t_taps[term.tap][t_layer]
                    out.add(term.name, self.term_loss(term.name, s, t, mask), s_layer)
        for term in plan.head_terms:
            out.add(term.name, self.term_loss(term.name, s_head, t_head, mask))
        return plan.finish(out)
