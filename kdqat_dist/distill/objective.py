"""The KD-QAT objective computed the plain way: every tap of both models materialised, then the losses.

This is the reference; :mod:`kdqat_dist.distill.streaming` computes the same values and gradients keeping far
less, and :meth:`DistillObjective.for_models` builds that one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from kdqat_dist.config import DistillConfig
from kdqat_dist.distill import losses as L
from kdqat_dist.models.encoders import encoder_layers, unwrap
from kdqat_dist.models.layer_map import hidden_map, layer_map
from kdqat_dist.models.taps import TapStore, supports_norm_taps, tapped

_unwrap = unwrap  # the name bench/gpu_check.py imports from here; new code imports models.encoders.unwrap

# term -> tap it reads
TERM_TAPS = {
    "hidden": "hidden",
    "attn_score": "scores",
    "attn_map": "probs",
    "attn_output": "attn_output",
    "context": "context",
    "sa_output": "sa_output",
    "attn_relation": "qkv",
}
RELATION_INDEX = {"qq": 0, "kk": 1, "vv": 2}  # position of Q, K, V in the qkv tap
TERMS = ("logits", "ground_truth") + tuple(TERM_TAPS)


@dataclass
class LossOutput:
    """The total loss and every term (unweighted, summed over layers) plus per-layer contributions."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    per_layer: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # detached
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None


def effective_weights(cfg: DistillConfig) -> dict[str, float]:
    """Weights of every term; the unified form sets map = γ and output = 1 − γ."""
    w = {t: float(getattr(cfg, t).weight) for t in TERMS}
    if cfg.gamma is not None:
        w["attn_map"], w["attn_output"] = cfg.gamma, 1.0 - cfg.gamma
    return w


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, d_h] -> [B, S, H·d_h]: the projection's output before the attention heads split it."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


class DistillObjective:
    """Weights, layer map and loss functions, applied to a student and a teacher on one batch.

    Args:
        cfg: the ``distill`` section.
        n_student: student Transformer layers.
        n_teacher: teacher Transformer layers.
        regression: MSE instead of soft cross-entropy on logits / ground truth.
    """

    def __init__(self, cfg: DistillConfig, n_student: int, n_teacher: int, regression: bool = False):
        self.cfg = cfg
        self.weights = effective_weights(cfg)
        self.regression = regression
        self.pairs = layer_map(n_teacher, n_student, cfg.layer_map)
        self.hidden_pairs = hidden_map(n_teacher, n_student, cfg.layer_map)
        self.active = {t for t, w in self.weights.items() if w > 0}
        # tap -> teacher layer -> student layers that learn from it
        self.t2s: dict[str, dict[int, list[int]]] = {}
        for term, tap in TERM_TAPS.items():
            if term not in self.active:
                continue
            pairs = {"hidden": self.hidden_pairs, "qkv": self._relation_pairs(n_student)}.get(tap, self.pairs)
            for s, t in pairs:
                self.t2s.setdefault(tap, {}).setdefault(t, []).append(s)
        self.tap_term = {tap: term for term, tap in TERM_TAPS.items()}

    @classmethod
    def for_models(
        cls,
        cfg: DistillConfig,
        student: nn.Module,
        teacher: nn.Module,
        regression: bool = False,
        teacher_sharded: bool = False,
    ) -> DistillObjective:
        """The streaming objective for these models (:class:`~kdqat_dist.distill.streaming.StreamingObjective`).

        Norm taps where the student's layers have the LayerNorms. The teacher's attention blocks are called
        again in the backward if ``cfg.recompute_teacher``, unless the teacher is sharded (ZeRO-3): calling
        its modules outside its forward re-gathers their parameters and upsets DeepSpeed's prefetch trace (a
        resumed run then differed in the last bit).
        """
        from kdqat_dist.distill.streaming import StreamingObjective  # it builds on this module

        s, t = unwrap(student), unwrap(teacher)
        recompute = cfg.recompute_teacher and not teacher_sharded
        n_s, n_t = len(encoder_layers(s)), len(encoder_layers(t))
        return StreamingObjective(
            cfg, n_s, n_t, regression, norm_taps=supports_norm_taps(s), recompute_teacher=recompute
        )

    def _relation_pairs(self, n_student: int) -> list[tuple[int, int]]:
        """The (student, teacher) layers of the relation term: ``distill.attn_relation.layers`` of the
        layer map's pairs."""
        layers = self.cfg.attn_relation.layers
        if layers == "all":
            return list(self.pairs)
        keep = {n_student - 1} if layers == "last" else set(layers)
        bad = sorted(i for i in keep if not 0 <= i < n_student)
        if bad:
            raise ValueError(
                f"distill.attn_relation.layers: student layers {bad} do not exist "
                f"(the student has {n_student}: 0..{n_student - 1})"
            )
        return [(s, t) for s, t in self.pairs if s in keep]

    # ------------------------------------------------------------------ one term

    def mse_weight(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights of the MSE terms: None (every position, the reference) or real tokens only."""
        return L.token_weights(mask, like) if self.cfg.mse_tokens == "valid" else None

    def term_loss(self, term: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if term == "hidden":
            return L.hidden_mse(s, t, self.mse_weight(mask, s))
        if term == "attn_score":
            return L.attention_score_mse(s, t)
        if term == "attn_map":
            return L.attention_map_kl(s, t, mask)
        if term == "attn_relation":
            return self.relation_loss(s, t, mask)
        return L.mse(s, t, self.mse_weight(mask, s))

    def relation_loss(
        self, s_qkv: tuple[torch.Tensor, ...], t_qkv: tuple[torch.Tensor, ...], mask: torch.Tensor
    ) -> torch.Tensor:
        """One layer's relation term: the sum over ``distill.attn_relation.relations`` of
        :func:`~kdqat_dist.distill.losses.attention_relation_kl` on the heads-merged [B, S, D] Q, K or V.

        Args:
            s_qkv, t_qkv: the ``qkv`` taps, (Q, K, V) each [B, H, S, d_h] (H and d_h may differ).
            mask: [B, S].
        """
        rc = self.cfg.attn_relation
        heads = rc.relation_heads or s_qkv[0].shape[1]  # null: the student's attention heads
        total = None
        for rel in rc.relations:
            s, t = (_merge_heads(x[RELATION_INDEX[rel]]) for x in (s_qkv, t_qkv))
            value = L.attention_relation_kl(s, t, mask, heads)
            total = value if total is None else total + value
        return total

    def logit_terms(
        self, out: LossOutput, s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels: torch.Tensor | None
    ) -> None:
        if "logits" in self.active and t_logits is not None:
            if self.regression:
                out.terms["logits"] = L.logits_mse(s_logits, t_logits)
            else:
                ce = L.soft_cross_entropy(s_logits, t_logits, self.cfg.temperature)
                # KDLSQ-BERT averages over batch x classes: the batch mean over the number of classes
                out.terms["logits"] = ce / s_logits.shape[-1] if self.cfg.soft_ce_reduction == "batch_classes" else ce
        if "ground_truth" in self.active:
            if labels is None:
                raise ValueError("distill.ground_truth needs labels in the batch")
            out.terms["ground_truth"] = L.ground_truth_loss(s_logits, labels, self.regression)

    def _finish(self, out: LossOutput) -> LossOutput:
        total = None
        for term, value in out.terms.items():
            contrib = self.weights[term] * value
            total = contrib if total is None else total + contrib
        out.total = total if total is not None else torch.zeros(())
        return out

    # ------------------------------------------------------------------ the whole objective

    def __call__(self, student: Callable, teacher: Callable, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Every tap of both models materialised, then the losses. Returns the LossOutput."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        mask = batch["attention_mask"]
        s_store, t_store = TapStore(), TapStore()
        everything = {tap: set(range(64)) for tap in TERM_TAPS.values()}
        with tapped(unwrap(student), everything, s_store):
            s_logits = student(**inputs).logits
        with torch.no_grad(), tapped(unwrap(teacher), everything, t_store):
            t_logits = teacher(**inputs).logits
        out = LossOutput(total=torch.zeros(()), student_logits=s_logits, teacher_logits=t_logits)
        for tap, by_t in self.t2s.items():
            term = self.tap_term[tap]
            for t_layer, s_layers in by_t.items():
                for s_layer in s_layers:
                    v = self.term_loss(term, s_store[tap][s_layer], t_store[tap][t_layer], mask)
                    out.terms[term] = v if term not in out.terms else out.terms[term] + v
                    out.per_layer.setdefault(term, {})[s_layer] = v.detach()
        self.logit_terms(out, s_logits, t_logits, batch.get("labels"))
        return self._finish(out)

    naive = __call__  # the plain computation, under a name the streaming objective keeps for it
