"""The KD-QAT objective computed with a streaming teacher: the memory-saving form of
:class:`~kdqat_dist.distill.objective.DistillObjective`, with the same values and gradients.

Order of work per batch:

1. the student's forward, keeping only the taps the active terms need (autograd keeps them anyway);
2. the teacher's forward under ``no_grad``; each teacher tap goes straight into its loss term against the
   mapped student tap as soon as its layer produces it, and is then dropped. The teacher never holds
   all layers' hidden states or attention maps at once, which is what lets a ZeRO-3-sharded teacher
   stream its activations layer by layer.

What the backward needs is kept in its smallest form, and recomputed there with the same operations, so
values and gradients are those of the plain formulas:

- with ``recompute_teacher``, the teacher keeps, per layer, only its attention block's input (the hidden
  state the hidden term needs anyway); the map and attention-output terms call the block again in their
  backward (:class:`_TeacherBlock`) instead of keeping the teacher's Q, K and block output. The last layer
  the teacher taps is the exception (:meth:`StreamingObjective._kept_layer`). Without it (a ZeRO-3
  teacher), the map term keeps the teacher's Q and K and rebuilds the map from them;
- the hidden (after the embeddings) and attention-output terms keep nothing of the student's: their tap
  is a LayerNorm output, which is recomputed from the LayerNorm's input, which autograd keeps for the
  LayerNorm's own backward (:class:`_MseSlot`, :class:`_MseAtNorm`);
- the other MSE terms keep ``s - t``; the map term's student side is the softmax output autograd keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.autograd.function import once_differentiable

from kdqat_dist.distill import losses as L
from kdqat_dist.distill.objective import DistillObjective, LossOutput
from kdqat_dist.models.attention import MapInputs
from kdqat_dist.models.encoders import unwrap
from kdqat_dist.models.taps import AttentionCall, NormInputs, NormTap, TapStore, tapped

# (fn, tensors) with fn(*tensors) the teacher's map: what the map term keeps for its backward instead
Recompute = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor | None, ...]]


def attention_map_kl_recomputed(
    student_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    attention_mask: torch.Tensor,
    recompute: Recompute,
    eps: float = 1e-8,
) -> torch.Tensor:
    """:func:`~kdqat_dist.distill.losses.attention_map_kl`, keeping for the backward not the teacher's map
    but the tensors ``recompute = (fn, tensors)`` rebuilds it from there (``fn(*tensors)``: its exact
    values), e.g. its Q and K (2·B·S·D numbers instead of B·H·S·S)."""
    return _RecomputedMapKL.apply(student_probs, teacher_probs, attention_mask, eps, recompute)


class _RecomputedMapKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ps, pt, attention_mask, eps: float, recompute: Recompute) -> torch.Tensor:
        loss, pair, scale = L.attention_map_kl_value(ps, pt, attention_mask, eps)
        # Only tensors saved through save_for_backward are freed by the backward; anything else on ctx
        # lives as long as the graph's root (often a whole extra step), so the recompute inputs go there.
        ctx.recompute_fn = recompute[0]
        ctx.save_for_backward(ps, pair, scale, *recompute[1])
        ctx.eps = eps
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        ps, pair, scale, *rest = ctx.saved_tensors
        pt = ctx.recompute_fn(*rest)
        return *L.attention_map_kl_grads(grad, ps, pt, pair, scale, ctx.eps, ctx.needs_input_grad[:2]), None, None, None


def _teacher_probs(query, key, attention_mask, *, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return MapInputs(query, key, attention_mask, scaling).probs().to(dtype)


class _TeacherBlock:
    """One teacher layer's attention block, called again in the backward by the terms that need it.

    The KD backward of the attention-output term needs the teacher block's output and the map term needs
    the teacher's map; instead of keeping those (a [B, S, D] output, Q and K: three [B, S, D] tensors), the
    objective keeps the block's call (its [B, S, D] input, which the hidden term keeps anyway) and calls the
    block again when the backward gets to that layer. The output term's backward runs first there; the map
    its call makes is kept for the map term that follows in the same layer's backward (one call per layer).
    A map term on its own makes its own call. When the last term has used the block, its input is dropped.
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
    term of the tap's gradient sum, as with an ordinary MSE node (the same float sums as under any engine).
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
    backward, and the gradient is made when it is used. Only the order changes, never the values.

    Used for the [B, H, S, S] taps (probabilities, scores), where the tap has one other consumer, so its
    gradient is a sum of two terms whatever the order. A [B, S, D] tap has several consumers; a loss node
    there must still add its gradient first, as one made after the whole student does, or the order of a
    float sum would change (and a sharded run drift from a single-process one): the LayerNorm-output terms
    get the *next* tapped LayerNorm's number, which is above every consumer of their own tap.
    """
    node, tap_node = loss.grad_fn, student_tap.grad_fn
    if node is None or tap_node is None:
        return
    if not hasattr(node, "_set_sequence_nr"):  # private autograd API: without it the backward order changes
        raise RuntimeError(
            f"kdqat_dist.distill.streaming needs torch's private autograd Node._set_sequence_nr (written for "
            f"torch 2.13); torch {torch.__version__} has none"
        )
    node._set_sequence_nr(tap_node._sequence_nr())


class StreamingObjective(DistillObjective):
    """:class:`~kdqat_dist.distill.objective.DistillObjective` with the streaming teacher (module docstring):
    the same call and result; :meth:`naive` is the plain computation.

    Args:
        *args: as for the plain objective.
        norm_taps: the hidden (after the embeddings) and attn_output terms at the student's LayerNorm
            outputs (:class:`_MseSlot`); else their s − t is kept.
        recompute_teacher: call the teacher's attention blocks again in the backward (:class:`_TeacherBlock`)
            instead of keeping their outputs and Q, K.
    """

    def __init__(self, *args, norm_taps: bool = False, recompute_teacher: bool = True):
        super().__init__(*args)
        self.norm_taps, self.recompute_teacher = norm_taps, recompute_teacher

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

    def term_loss(
        self, term: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, recompute: Recompute | None = None
    ) -> torch.Tensor:
        if term == "attn_map" and recompute is not None:
            return attention_map_kl_recomputed(s, t, mask, recompute)
        return super().term_loss(term, s, t, mask)

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

        def map_recompute(t_layer: int, dtype: torch.dtype) -> Recompute | None:
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
            t_logits = teacher(**inputs).logits if self.active - {"ground_truth"} else None
        out.teacher_logits = t_logits
        out.terms.update(sums)
        self.logit_terms(out, s_logits, t_logits, batch.get("labels"))
        return self._finish(out)
