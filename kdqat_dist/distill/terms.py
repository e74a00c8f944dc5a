"""The KD terms, one declaration each (:data:`TERMS`), and the :class:`Plan` of a run's active terms.

A :class:`Term` gives the tap it reads from both models (models/taps.py; none for the terms on the task
head's outputs), which student layer learns from which teacher layer, its loss for one pair, and its
memory-lean form (:class:`Lean`). Derived from them: the no-KD set (:data:`KD_TERMS`), the taps to install,
and both executors, :class:`~kdqat_dist.distill.objective.NaiveObjective` (the reference) and the streaming
:class:`~kdqat_dist.distill.objective.DistillObjective`, which compose a :class:`Plan`.

A new term is a loss function and a declaration, switched on by its ``distill.<name>`` weight (a
:class:`~kdqat_dist.config.LossTerm` field of DistillConfig, which ``config.loss_terms`` and the config checks go
over; config sits below this package, and tests/test_objective.py keeps the two lists equal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdqat_dist.config import ConfigError, DistillConfig
from kdqat_dist.data.heads.base import Head, HeadOutput
from kdqat_dist.data.heads.sequence import classifier_head
from kdqat_dist.distill import kernels as K
from kdqat_dist.distill import losses as L
from kdqat_dist.models.encoders import encoder_layers, unwrap
from kdqat_dist.models.layer_map import hidden_map, layer_map


def layer_pairs(cfg: DistillConfig, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """The Transformer layers' (student, teacher) pairs of ``distill.layer_map``."""
    return layer_map(n_teacher, n_student, cfg.layer_map)


def hidden_pairs(cfg: DistillConfig, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """The hidden states' pairs: the embedding output (0) and each layer's output (l + 1)."""
    return hidden_map(n_teacher, n_student, cfg.layer_map)


@dataclass(frozen=True)
class Lean:
    """A term's memory-lean form, taken by the streaming executor: same values and gradients, less kept.

    ``norm_tap``: an MSE at a student LayerNorm output reads the student at this ``*_norm`` tap, from student
    layer ``norm_from`` on, and recomputes it in the backward from the LayerNorm's input (kept by autograd
    anyway). ``map_loss(plan, s, t, mask, rebuild)``: a loss on the teacher's attention map that keeps what
    rebuilds the map (:data:`~kdqat_dist.distill.kernels.Recompute`), not the map. ``rebuild``: the teacher's
    tap (the map, or at a LayerNorm the block output) is rebuilt by calling its attention block again
    (``distill.recompute_teacher``), else a map_loss rebuilds it from Q and K. ``ordered``: the loss's backward
    runs when the backward reaches the student's tap, not first (with every layer's [B, H, S, S] gradient).
    """

    norm_tap: str | None = None
    norm_from: int = 0
    map_loss: Callable[..., torch.Tensor] | None = None
    rebuild: bool = False
    ordered: bool = False


@dataclass(frozen=True)
class Term:
    """One KD term: ``loss(plan, s, t, mask)`` for one (student, teacher) layer pair of ``tap``, or on both
    models' :class:`HeadOutput` when ``tap`` is None; ``teacher=False``: it reads the labels only."""

    name: str  # its weight: distill.<name>.weight
    tap: str | None
    loss: Callable[..., torch.Tensor]
    pairs: Callable[[DistillConfig, int, int], list[tuple[int, int]]] = layer_pairs
    teacher: bool = True
    lean: Lean | None = None


def _logit_kd(plan: Plan, s: HeadOutput, t: HeadOutput, _mask: torch.Tensor) -> torch.Tensor:
    zs, zt = s.rows(s.logits), s.rows(t.logits)
    if plan.regression:
        return L.logits_mse(zs, zt)
    ce = L.soft_cross_entropy(zs, zt, plan.cfg.temperature)
    # KDLSQ-BERT averages over batch x classes: the batch mean over the number of classes
    return ce / zs.shape[-1] if plan.cfg.soft_ce_reduction == "batch_classes" else ce


def _ground_truth(plan: Plan, s: HeadOutput, _t: Any, _mask: torch.Tensor) -> torch.Tensor:
    if s.labels is None:
        raise ValueError("distill.ground_truth needs labels in the batch")
    return L.ground_truth_loss(s.rows(s.logits), s.rows(s.labels), plan.regression)


def _relation(plan: Plan, s_qkv: tuple, t_qkv: tuple, mask: torch.Tensor) -> torch.Tensor:
    """The sum over ``distill.attn_relation.relations`` of :func:`~kdqat_dist.distill.losses.attention_relation_kl`
    on the ``qkv`` taps' Q, K or V ([B, H, S, d_h]; H, d_h may differ) merged to [B, S, H·d_h], the projection's
    output before the attention heads split it."""
    rc = plan.cfg.attn_relation
    heads = rc.relation_heads or s_qkv[0].shape[1]  # null: the student's attention heads
    total = None
    for rel in rc.relations:
        s, t = (x["qkv".index(rel[0])].transpose(1, 2).flatten(2) for x in (s_qkv, t_qkv))
        value = L.attention_relation_kl(s, t, mask, heads)
        total = value if total is None else total + value
    return total


def _relation_pairs(cfg: DistillConfig, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """``distill.attn_relation.layers`` of the layer map's pairs."""
    pairs, layers = layer_pairs(cfg, n_student, n_teacher), cfg.attn_relation.layers
    if layers == "all":
        return pairs
    keep = {n_student - 1} if layers == "last" else set(layers)
    if bad := sorted(i for i in keep if not 0 <= i < n_student):
        raise ConfigError(
            f"distill.attn_relation.layers: student layers {bad} do not exist "
            f"(the student has {n_student}: 0..{n_student - 1})"
        )
    return [(s, t) for s, t in pairs if s in keep]


def _mse(plan: Plan, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return L.mse(s, t, plan.mse_weight(mask, s))


def _map_kl(
    plan: Plan, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, rebuild: K.Recompute | None = None
) -> torch.Tensor:
    """Its lean form with ``rebuild``: what rebuilds the teacher's map for the backward, kept instead of it."""
    return L.attention_map_kl(s, t, mask) if rebuild is None else K.attention_map_kl_recomputed(s, t, mask, rebuild)


TERMS: tuple[Term, ...] = (
    Term("logits", None, _logit_kd),
    Term("hidden", "hidden", _mse, pairs=hidden_pairs, lean=Lean(norm_tap="hidden_norm", norm_from=1)),
    Term("attn_score", "scores", lambda plan, s, t, mask: L.attention_score_mse(s, t), lean=Lean(ordered=True)),
    Term("attn_map", "probs", _map_kl, lean=Lean(map_loss=_map_kl, rebuild=True, ordered=True)),
    Term("attn_output", "attn_output", _mse, lean=Lean(norm_tap="attn_output_norm", rebuild=True)),
    Term("context", "context", _mse),
    Term("sa_output", "sa_output", _mse),
    Term("attn_relation", "qkv", _relation, pairs=_relation_pairs),
    Term("ground_truth", None, _ground_truth, teacher=False),
)
KD_TERMS = tuple(t.name for t in TERMS if t.teacher)  # the terms QAT without KD switches off (pipeline.NO_KD)


def effective_weights(cfg: DistillConfig, terms: Iterable[Term] = TERMS) -> dict[str, float]:
    """Weights of every term; the unified form sets map = γ and output = 1 − γ."""
    w = {t.name: float(getattr(cfg, t.name).weight) for t in terms}
    if cfg.gamma is not None:
        w["attn_map"], w["attn_output"] = cfg.gamma, 1.0 - cfg.gamma
    return w


def depths(student: nn.Module, teacher: nn.Module) -> tuple[int, int]:
    """The Transformer layers of the student and of the teacher (also inside a DeepSpeed engine)."""
    return len(encoder_layers(unwrap(student))), len(encoder_layers(unwrap(teacher)))


@dataclass
class LossOutput:
    """The total loss and every term (unweighted, summed over layers) plus per-layer contributions."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    per_layer: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # detached
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None

    def add(self, term: str, value: torch.Tensor, layer: int | None = None) -> None:
        """Add one layer's (or the head's, ``layer=None``) value of ``term``."""
        self.terms[term] = value if term not in self.terms else self.terms[term] + value
        if layer is not None:
            self.per_layer.setdefault(term, {})[layer] = value.detach()


@dataclass
class Plan:
    """The terms the ``distill`` section ``cfg`` switches on for a student and a teacher of ``n_student`` and
    ``n_teacher`` layers, of the declared ``terms``: weights and layer pairs. ``regression``: MSE instead of
    soft cross-entropy on the logits and labels; ``head``: what the terms on the head read (:class:`Head`)."""

    cfg: DistillConfig
    n_student: int
    n_teacher: int
    regression: bool = False
    terms: tuple[Term, ...] = TERMS
    head: Head = classifier_head

    def __post_init__(self) -> None:
        self.weights = effective_weights(self.cfg, self.terms)
        layer_map(self.n_teacher, self.n_student, self.cfg.layer_map)  # checked even when no term pairs layers
        self.active = {t.name: t for t in self.terms if self.weights[t.name] > 0}
        self.layer_terms = [t for t in self.active.values() if t.tap is not None]
        self.head_terms = [t for t in self.active.values() if t.tap is None]
        self.needs_teacher = any(t.teacher for t in self.active.values())
        self.t2s: dict[str, dict[int, list[int]]] = {}  # term -> teacher layer -> student layers it teaches
        for term in self.layer_terms:
            for s, t in term.pairs(self.cfg, self.n_student, self.n_teacher):
                self.t2s.setdefault(term.name, {}).setdefault(t, []).append(s)

    def student_layers(self, term: str) -> set[int]:
        return {s for ss in self.t2s[term].values() for s in ss}

    def mse_weight(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights of the MSE terms: None (every position, the reference) or real tokens only."""
        return L.token_weights(mask, like) if self.cfg.mse_tokens == "valid" else None

    def check(self, student: nn.Module, teacher: nn.Module) -> None:
        """Refuse models of other depths than the plan's (a missing layer's terms would be left out)."""
        if (got := depths(student, teacher)) != (self.n_student, self.n_teacher):
            raise ValueError(
                f"the KD objective was built for a {self.n_student}-layer student and a {self.n_teacher}-layer "
                f"teacher, not for these ({got[0]} and {got[1]} layers)"
            )

    def finish(self, out: LossOutput) -> LossOutput:
        """``out`` with its total: the weighted sum of its terms."""
        total = None
        for term, value in out.terms.items():
            contrib = self.weights[term] * value
            total = contrib if total is None else total + contrib
        out.total = total if total is not None else torch.zeros(())
        return out
