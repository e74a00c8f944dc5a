"""The KD-QAT objective with a streaming teacher.

Order of work per batch:

1. the student's forward, keeping only the taps the active terms need (autograd keeps them anyway);
2. the teacher's forward under ``no_grad``; each teacher tap goes straight into its loss term against the
   mapped student tap as soon as its layer produces it, and is then dropped. The teacher never holds
   all layers' hidden states or attention maps at once, which is what lets a ZeRO-3-sharded teacher
   stream its activations layer by layer. What the backward needs is kept in its smallest form: the
   MSE terms keep ``s - t``; the map term keeps the teacher's Q and K (2·B·S·D numbers) and recomputes
   the map (B·H·S·S) from them in its backward, with the same operations, so the gradient is unchanged.

A term whose weight is 0 taps nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from kdqat_dist.config import DistillConfig
from kdqat_dist.distill import losses as L
from kdqat_dist.models.attention import MapInputs
from kdqat_dist.models.encoders import encoder_layers
from kdqat_dist.models.layer_map import hidden_map, layer_map
from kdqat_dist.models.taps import TapStore, tapped

# term -> tap it reads
TERM_TAPS = {
    "hidden": "hidden",
    "attn_score": "scores",
    "attn_map": "probs",
    "attn_output": "attn_output",
    "context": "context",
    "sa_output": "sa_output",
}
TERMS = ("logits", "ground_truth") + tuple(TERM_TAPS)


def _recompute(inputs: MapInputs | None, dtype: torch.dtype):
    """``(fn, tensors)`` rebuilding the teacher map from its layer's Q, K and mask, in the student's dtype."""
    if inputs is None:
        return None
    return partial(_teacher_probs, scaling=inputs.scaling, dtype=dtype), (inputs.query, inputs.key,
                                                                          inputs.attention_mask)


def _teacher_probs(query, key, attention_mask, *, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return MapInputs(query, key, attention_mask, scaling).probs().to(dtype)


def _run_backward_at(loss: torch.Tensor, student_tap: torch.Tensor) -> None:
    """Have autograd run ``loss``'s backward when the backward reaches ``student_tap``, not at its start.

    Autograd runs the ready node created last first. A loss made during the teacher's forward is created
    after the whole student, so its backward would run first and its gradient for the student tap (for
    the map term a [B, H, S, S] tensor per layer) would wait there until the backward reached that layer:
    all layers' at once. With the tap's sequence number the loss node runs just before the tap's own
    backward, and the gradient is made when it is used. Only the order changes, never the values; on a
    torch without this (private) setter the order is simply autograd's default.

    Used for the [B, H, S, S] taps only (probabilities, scores), where it matters and where the tap has one
    other consumer, so its gradient is a sum of two terms whatever the order. A [B, S, D] tap has several
    consumers; moving its loss node would let the order of a three-term float sum depend on the graph
    around it (a ZeRO-3 engine adds nodes), and a sharded run would drift from a single-process one.
    """
    node, tap_node = loss.grad_fn, student_tap.grad_fn
    if node is not None and tap_node is not None and hasattr(node, "_set_sequence_nr"):
        node._set_sequence_nr(tap_node._sequence_nr())


@dataclass
class LossOutput:
    """The total loss and every term (unweighted, summed over layers) plus per-layer contributions."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    per_layer: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # detached
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None

    def scalars(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach())}
        out.update({f"loss/{k}": float(v.detach()) for k, v in self.terms.items()})
        return out


def effective_weights(cfg: DistillConfig) -> dict[str, float]:
    """Weights of every term; the unified form sets map = γ and output = 1 − γ."""
    w = {t: float(getattr(cfg, t).weight) for t in TERMS}
    if cfg.gamma is not None:
        w["attn_map"], w["attn_output"] = cfg.gamma, 1.0 - cfg.gamma
    return w


def _unwrap(m: nn.Module) -> nn.Module:
    """A DeepSpeed engine's model (``engine.module``), or the model itself."""
    inner = getattr(m, "module", None)
    return inner if isinstance(inner, nn.Module) else m


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
            pairs = self.hidden_pairs if tap == "hidden" else self.pairs
            for s, t in pairs:
                self.t2s.setdefault(tap, {}).setdefault(t, []).append(s)
        self.tap_term = {tap: term for term, tap in TERM_TAPS.items()}

    @classmethod
    def for_models(cls, cfg: DistillConfig, student: nn.Module, teacher: nn.Module,
                   regression: bool = False) -> DistillObjective:
        return cls(cfg, len(encoder_layers(_unwrap(student))), len(encoder_layers(_unwrap(teacher))), regression)

    def student_taps(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for tap, by_t in self.t2s.items():
            out[tap] = {s for ss in by_t.values() for s in ss}
        return out

    def teacher_taps(self) -> dict[str, set[int]]:
        taps = {tap: set(by_t) for tap, by_t in self.t2s.items()}
        if "probs" in taps:  # the map loss keeps the teacher's Q and K for its backward, not its map
            taps["map_inputs"] = set(taps["probs"])
        return taps

    # ------------------------------------------------------------------ one term

    def term_loss(self, term: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                  recompute_teacher=None) -> torch.Tensor:
        if term == "hidden":
            return L.hidden_mse(s, t)
        if term == "attn_score":
            return L.attention_score_mse(s, t)
        if term == "attn_map":
            return L.attention_map_kl(s, t, mask, recompute_teacher=recompute_teacher)
        return L.mse(s, t)

    def logit_terms(self, out: LossOutput, s_logits: torch.Tensor, t_logits: torch.Tensor | None,
                    labels: torch.Tensor | None) -> None:
        if "logits" in self.active and t_logits is not None:
            out.terms["logits"] = (L.logits_mse(s_logits, t_logits) if self.regression
                                   else L.soft_cross_entropy(s_logits, t_logits, self.cfg.temperature))
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

    # ------------------------------------------------------------------ streaming

    def __call__(self, student: Callable, teacher: Callable, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Student forward, then the teacher streamed into the per-layer terms. Returns the LossOutput."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        mask = batch["attention_mask"]
        store = TapStore()
        with tapped(_unwrap(student), self.student_taps(), store):
            s_logits = student(**inputs).logits
        out = LossOutput(total=torch.zeros(()), student_logits=s_logits)
        sums: dict[str, torch.Tensor] = {}
        map_inputs: dict[int, MapInputs] = {}

        def sink(t_layer: int, tap: str, t_tensor) -> None:
            if tap == "map_inputs":  # arrives just before the same layer's probs
                map_inputs[t_layer] = t_tensor
                return
            term = self.tap_term[tap]
            # The teacher runs under no_grad; the loss must still build a graph to the student.
            with torch.enable_grad():
                for s_layer in self.t2s[tap][t_layer]:
                    s_tensor = store.data[tap].pop(s_layer)
                    recompute = _recompute(map_inputs.get(t_layer), s_tensor.dtype) if term == "attn_map" else None
                    value = self.term_loss(term, s_tensor, t_tensor.to(s_tensor.dtype), mask, recompute)
                    if tap in ("probs", "scores"):
                        _run_backward_at(value, s_tensor)
                    sums[term] = value if term not in sums else sums[term] + value
                    out.per_layer.setdefault(term, {})[s_layer] = value.detach()

        with torch.no_grad(), tapped(_unwrap(teacher), self.teacher_taps(), sink):
            t_logits = teacher(**inputs).logits if self._needs_teacher() else None
        map_inputs.clear()
        out.teacher_logits = t_logits
        out.terms.update(sums)
        self.logit_terms(out, s_logits, t_logits, batch.get("labels"))
        return self._finish(out)

    def _needs_teacher(self) -> bool:
        return bool(self.active - {"ground_truth"})

    # ------------------------------------------------------------------ naive (reference / benchmark)

    def naive(self, student: Callable, teacher: Callable, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Same objective, computed the usual way: every tap of both models materialised, then losses."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        mask = batch["attention_mask"]
        s_store, t_store = TapStore(), TapStore()
        everything = {tap: set(range(64)) for tap in TERM_TAPS.values()}
        with tapped(_unwrap(student), everything, s_store):
            s_logits = student(**inputs).logits
        with torch.no_grad(), tapped(_unwrap(teacher), everything, t_store):
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
