"""The KD-QAT objective with a streaming teacher.

Order of work per batch:

1. the student's forward, keeping only the taps the active terms need (autograd keeps them anyway);
2. the teacher's forward under ``no_grad``; each teacher tap goes straight into its loss term against the
   mapped student tap as soon as its layer produces it, and is then dropped. The teacher never holds
   all layers' hidden states or attention maps at once, which is what lets a ZeRO-3-sharded teacher
   stream its activations layer by layer.

What the backward needs is kept in its smallest form, and recomputed there with the same operations, so
values and gradients are those of the plain formulas:

- the teacher keeps, per layer, only its attention block's input (the hidden state the hidden term needs
  anyway); the map and attention-output terms call the block again in their backward
  (:class:`_TeacherBlock`) instead of keeping the teacher's Q, K and block output. The last layer the
  teacher taps is the exception: its map and block output are kept, as its backward runs at the step's
  memory peak, where its block's temporaries would weigh more;
- the hidden (after the embeddings) and attention-output terms keep nothing of the student's: their tap
  is a LayerNorm output, which is recomputed from the LayerNorm's input, which autograd keeps for the
  LayerNorm's own backward (:class:`_MseSlot`, :class:`_MseAtNorm`);
- the other MSE terms keep ``s - t``; the map term's student side is the softmax output autograd keeps.

Per layer that is one [B, S, D] tensor instead of four (hidden and output differences, Q and K), for one
extra call of each teacher attention block but the last in the backward.

A term whose weight is 0 taps nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from kdqat_dist.config import DistillConfig
from kdqat_dist.distill import losses as L
from kdqat_dist.models.attention import MapInputs
from kdqat_dist.models.encoders import encoder_layers, unwrap
from kdqat_dist.models.layer_map import hidden_map, layer_map
from kdqat_dist.models.taps import AttentionCall, NormInputs, NormTap, TapStore, supports_norm_taps, tapped

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


def _teacher_probs(query, key, attention_mask, *, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return MapInputs(query, key, attention_mask, scaling).probs().to(dtype)


class _TeacherBlock:
    """One teacher layer's attention block, called again in the backward by the terms that need it.

    The KD backward of the attention-output term needs the teacher block's output and the map term needs
    the teacher's map; instead of keeping those (a [B, S, D] output, Q and K: three [B, S, D] tensors), the
    objective keeps the block's call (its [B, S, D] input, which the hidden term keeps anyway) and calls the
    block again when the backward gets to that layer. The output term's backward runs first there; the map
    its call makes is kept for the map term that follows in the same layer's backward (one call per layer;
    keeping Q and K instead and rebuilding the map from them cost a second product and softmax, and
    measured no lower peak). A map term on its own makes its own call. When the last term has used the
    block, its input is dropped.
    """

    def __init__(self, call: AttentionCall, uses: int, map_uses: int):
        self.call, self.uses, self.map_uses = call, uses, map_uses
        self.map: torch.Tensor | None = None

    def output(self) -> torch.Tensor:
        out, _, self.map = self.call.run(with_map=self.map_uses > 0)
        self._used()
        return out

    def probs(self, dtype: torch.dtype) -> torch.Tensor:
        pt = self.map if self.map is not None else self.call.run(with_map=True)[2]
        self.map_uses -= 1
        self._used()
        return pt.to(dtype)

    def _used(self) -> None:
        self.uses -= 1
        if self.map_uses <= 0:
            self.map = None
        if self.uses <= 0:
            self.call.release()


class _MseSlot:
    """What the backward of one [B, S, D] MSE term at a LayerNorm output needs, outside autograd.

    The student's side is the LayerNorm's input (kept by autograd for the LayerNorm's backward anyway) and
    the teacher's is its tap tensor or a :class:`_TeacherBlock` to rebuild it from. Dropped when used, so
    nothing outlives the backward even while a caller keeps the loss.
    """

    def __init__(self, norm: NormInputs):
        self.norm: NormInputs | None = norm
        self.target: torch.Tensor | None = None
        self.block: _TeacherBlock | None = None
        self.weight: torch.Tensor | None = None  # per-token weights (distill.mse_tokens=valid)

    def take_grad(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The term's gradient for the student's LayerNorm output, given d(loss)/d(term) = ``grad``."""
        s = self.norm.output()
        t = self.target if self.block is None else self.block.output()
        self.norm = self.target = self.block = None
        t = t.to(s.dtype)
        compute = L._compute_dtype(s, t)
        # s is this call's own recompute: the difference and the gradient are written over it, so the first
        # KD gradient of the backward (the top layer's, at the step's memory peak) makes one [B, S, D] tensor
        weight, self.weight = self.weight, None
        return L.mse_grad(s.to(compute).sub_(t.to(compute)), grad, overwrite=True, weight=weight).to(dtype)


class _MseAtNorm(torch.autograd.Function):
    """A 0-dim zero standing for one MSE term at a student LayerNorm output: ``value = node + mse(...)``.

    It is made in the student's forward, as a consumer of the LayerNorm output but keeping nothing of it,
    so the term needs no reference to the tap afterwards: the value is computed from the recomputed
    output when the teacher's tap arrives, and the gradient ``grad·2/N·(s − t)`` in this node's backward,
    from the slot. The node is given the sequence number of the next tapped LayerNorm, so autograd runs it
    when the backward gets there: its gradient is made one block before it is used, and is the first
    term of the tap's gradient sum, as with an ordinary MSE node (the same float sums as before, and as
    under any engine).
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, slot: _MseSlot) -> torch.Tensor:
        ctx.slot = slot
        ctx.dtype = s.dtype
        return torch.zeros((), dtype=torch.float32, device=s.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return ctx.slot.take_grad(grad, ctx.dtype), None


def _run_backward_at(loss: torch.Tensor, student_tap: torch.Tensor) -> None:
    """Have autograd run ``loss``'s backward when the backward reaches ``student_tap``, not at its start.

    Autograd runs the ready node created last first. A loss made during the teacher's forward is created
    after the whole student, so its backward would run first and its gradient for the student tap (for
    the map term a [B, H, S, S] tensor per layer) would wait there until the backward reached that layer:
    all layers' at once. With the tap's sequence number the loss node runs just before the tap's own
    backward, and the gradient is made when it is used. Only the order changes, never the values; on a
    torch without this (private) setter the order is simply autograd's default.

    Used for the [B, H, S, S] taps (probabilities, scores), where the tap has one other consumer, so its
    gradient is a sum of two terms whatever the order. A [B, S, D] tap has several consumers; a loss node
    there must still add its gradient first, as one made after the whole student does, or the order of a
    float sum would change (and a sharded run drift from a single-process one): the LayerNorm-output terms
    get the *next* tapped LayerNorm's number, which is above every consumer of their own tap.
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

    def __init__(
        self,
        cfg: DistillConfig,
        n_student: int,
        n_teacher: int,
        regression: bool = False,
        norm_taps: bool = False,
        recompute_teacher: bool = True,
    ):
        self.cfg = cfg
        self.weights = effective_weights(cfg)
        self.regression = regression
        # hidden (after the embeddings) and attn_output terms at the student's LayerNorm outputs, holding
        # nothing of the student's until the backward (see _MseSlot); else their s − t is kept.
        self.norm_taps = norm_taps
        # Call the teacher's attention blocks again in the backward (_TeacherBlock), or keep their outputs
        # and Q, K. Off for a ZeRO-3 teacher: calling its modules outside its forward re-gathers their
        # parameters and upsets DeepSpeed's prefetch trace (a resumed run then differed in the last bit).
        self.recompute_teacher = recompute_teacher
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
        recompute_teacher: bool = True,
    ) -> DistillObjective:
        """The objective for these models; norm taps where the student's layers have the LayerNorms."""
        s, t = unwrap(student), unwrap(teacher)
        return cls(
            cfg, len(encoder_layers(s)), len(encoder_layers(t)), regression, supports_norm_taps(s), recompute_teacher
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

    def _slotted(self, tap: str) -> bool:
        return self.norm_taps and tap in ("hidden", "attn_output")

    def student_taps(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for tap, by_t in self.t2s.items():
            layers = {s for ss in by_t.values() for s in ss}
            if self._slotted(tap):
                norm = layers - {0} if tap == "hidden" else set(layers)  # the embedding output: no LN output
                if norm:
                    out[f"{tap}_norm"] = norm
                layers = layers - norm
            if layers:
                out[tap] = layers
        return out

    def teacher_taps(self) -> dict[str, set[int]]:
        taps = {tap: set(by_t) for tap, by_t in self.t2s.items()}
        if not self.recompute_teacher:
            if "probs" in taps:  # the map term keeps the teacher's Q and K, and recomputes the map from them
                taps["map_inputs"] = set(taps["probs"])
            return taps
        # the map term (and with norm taps the output term) calls the teacher's attention block again in
        # its backward instead of keeping the teacher's Q and K (and block output), except in the last
        # layer the teacher taps (see _kept_layer)
        calls = {t for tap in self._block_taps() for t in taps.get(tap, ())}
        calls.discard(self._kept_layer())
        if calls:
            taps["attention_call"] = calls
        return taps

    def _block_taps(self) -> tuple[str, ...]:
        """The teacher taps whose terms are fed by a teacher block call (the output term only at norm taps)."""
        return ("probs", "attn_output") if self.norm_taps else ("probs",)

    def _kept_layer(self) -> int | None:
        """The teacher layer whose map and block output are kept, not recomputed: the one whose terms the
        backward reaches first (those of the top student layer with a map or output term), if no other
        student layer learns from it.

        The backward reaches those terms while all the student's activations are still alive: a call of the
        block there would add its temporaries (Q, K, V, scores, map) at the step's peak, while the kept map
        and output (alive from the end of the teacher's forward) weigh less. Every other layer's call runs
        after the student's top layer has freed its activations.
        """
        if not self.recompute_teacher:
            return None
        pairs = {(s, t) for tap in self._block_taps() for t, ss in self.t2s.get(tap, {}).items() for s in ss}
        if not pairs:
            return None
        top = max(s for s, _ in pairs)
        (t_top, *more) = {t for s, t in pairs if s == top}
        if more or any(s != top for s, t in pairs if t == t_top):
            return None  # kept, it would stay alive through the other layers' backward
        return t_top

    # ------------------------------------------------------------------ one term

    def mse_weight(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights of the MSE terms: None (every position, the reference) or real tokens only."""
        return L.token_weights(mask, like) if self.cfg.mse_tokens == "valid" else None

    def term_loss(
        self, term: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, recompute_teacher=None
    ) -> torch.Tensor:
        if term == "hidden":
            return L.hidden_mse(s, t, self.mse_weight(mask, s))
        if term == "attn_score":
            return L.attention_score_mse(s, t)
        if term == "attn_map":
            return L.attention_map_kl(s, t, mask, recompute_teacher=recompute_teacher)
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

    # ------------------------------------------------------------------ streaming

    def __call__(self, student: Callable, teacher: Callable, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Student forward, then the teacher streamed into the per-layer terms. Returns the LossOutput."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        mask = batch["attention_mask"]
        store = TapStore()
        slots: dict[tuple[str, int], tuple[_MseSlot, torch.Tensor]] = {}
        last: list[torch.Tensor] = []  # the previous tap's node

        def student_sink(layer: int, name: str, tap) -> None:
            if not isinstance(tap, NormTap):
                store(layer, name, tap)
                return
            slot = _MseSlot(tap.inputs)
            node = _MseAtNorm.apply(tap.output, slot)
            if last and node.grad_fn is not None and tap.output.grad_fn is not None:
                _run_backward_at(last.pop(), tap.output)
            last[:] = [node]
            slots[(name.removesuffix("_norm"), layer)] = (slot, node)

        with tapped(unwrap(student), self.student_taps(), student_sink):
            s_logits = student(**inputs).logits
        out = LossOutput(total=torch.zeros(()), student_logits=s_logits)
        sums: dict[str, torch.Tensor] = {}
        blocks: dict[int, _TeacherBlock] = {}
        map_inputs: dict[int, MapInputs] = {}

        def map_recompute(t_layer: int, dtype: torch.dtype):
            if self.recompute_teacher:
                if t_layer not in blocks:  # the kept layer: the map term keeps the teacher's map itself
                    return None
                return partial(blocks[t_layer].probs, dtype=dtype), ()
            q = map_inputs[t_layer]
            return partial(_teacher_probs, scaling=q.scaling, dtype=dtype), (q.query, q.key, q.attention_mask)

        def sink(t_layer: int, tap: str, t_tensor) -> None:
            if tap == "map_inputs":  # arrives just before the same layer's probs
                map_inputs[t_layer] = t_tensor
                return
            if tap == "attention_call":  # arrives before the same layer's probs and attention output
                map_uses = len(self.t2s.get("probs", {}).get(t_layer, ()))
                out_uses = len(self.t2s.get("attn_output", {}).get(t_layer, ())) if self.norm_taps else 0
                blocks[t_layer] = _TeacherBlock(t_tensor, map_uses + out_uses, map_uses)
                return
            term = self.tap_term[tap]
            # The teacher runs under no_grad; the loss must still build a graph to the student.
            with torch.enable_grad():
                for s_layer in self.t2s[tap][t_layer]:
                    slotted = slots.pop((tap, s_layer), None)
                    if slotted is not None:
                        slot, handle = slotted
                        slot.weight = self.mse_weight(mask, t_tensor)
                        with torch.no_grad():
                            value = L.mse(slot.norm.output(), t_tensor.to(slot.norm.input.dtype), slot.weight)
                        if tap == "hidden" or t_layer not in blocks:
                            slot.target = t_tensor
                        else:
                            slot.block = blocks[t_layer]
                        value = handle + value
                    else:
                        s_tensor = store.data[tap].pop(s_layer)
                        recompute = map_recompute(t_layer, s_tensor.dtype) if term == "attn_map" else None
                        # (the relation term takes Q, K, V tuples and computes in float32 from either dtype)
                        t_in = t_tensor if tap == "qkv" else t_tensor.to(s_tensor.dtype)
                        value = self.term_loss(term, s_tensor, t_in, mask, recompute)
                        if tap in ("probs", "scores"):
                            _run_backward_at(value, s_tensor)
                    sums[term] = value if term not in sums else sums[term] + value
                    out.per_layer.setdefault(term, {})[s_layer] = value.detach()

        with torch.no_grad(), tapped(unwrap(teacher), self.teacher_taps(), sink):
            t_logits = teacher(**inputs).logits if self._needs_teacher() else None
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
