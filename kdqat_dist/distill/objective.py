"""The KD-QAT objective: two executors of one :class:`~kdqat_dist.distill.terms.Plan` of term declarations,
neither a subclass of the other. :class:`NaiveObjective` keeps every KD tap of both models, then computes the
losses: the reference. :class:`DistillObjective`, what training uses, streams the teacher with the same values
and gradients, taking each term's :class:`~kdqat_dist.distill.terms.Lean` form: the student's forward keeps only
the taps the active terms need, then each teacher tap goes into its terms as soon as its layer makes it and is
dropped (so a ZeRO-3 teacher streams its layers), and what the backward needs is kept in its smallest form and
recomputed there (:class:`_TeacherBlock`, :class:`_MseSlot`; docs/design.md, "The KD terms and the streaming
teacher").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import torch
from torch.autograd.function import once_differentiable

from kdqat_dist.config import DistillConfig
from kdqat_dist.data.heads.base import LABEL_KEYS, Head
from kdqat_dist.data.heads.sequence import classifier_head
from kdqat_dist.distill import kernels as K
from kdqat_dist.distill import losses as L
from kdqat_dist.distill.terms import TERMS, LossOutput, Plan, Term, depths
from kdqat_dist.models.attention import MapInputs
from kdqat_dist.models.encoders import unwrap
from kdqat_dist.models.taps import AttentionCall, NormInputs, TapStore, supports_norm_taps, tapped


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
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
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
        compute = K.compute_dtype(s, t)
        # s is this call's own recompute: the difference and the gradient are written over it, so the first
        # KD gradient of the backward (the top layer's, at the step's memory peak) makes one [B, S, D] tensor
        weight, self.weight = self.weight, None
        return K.mse_grad(s.to(compute).sub_(t.to(compute)), grad, overwrite=True, weight=weight).to(dtype)


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
            f"kdqat_dist.distill.objective needs torch's private autograd Node._set_sequence_nr (written for "
            f"torch 2.13); torch {torch.__version__} has none"
        )
    node._set_sequence_nr(tap_node._sequence_nr())


class DistillObjective:
    """The KD-QAT objective of a :class:`~kdqat_dist.distill.terms.Plan` with the streaming teacher (module
    docstring); :attr:`naive` computes the same the plain way. ``norm_taps``: the terms with a LayerNorm form
    (``Lean.norm_tap``) take it; ``recompute_teacher``: those that can (``Lean.rebuild``) call the teacher's
    attention blocks again in the backward instead of keeping their outputs (and Q, K).
    """

    def __init__(self, plan: Plan, norm_taps: bool = False, recompute_teacher: bool = True):
        self.plan, self.weights, self.naive = plan, plan.weights, NaiveObjective(plan)
        self.norm_taps, self.recompute_teacher = norm_taps, recompute_teacher
        # per layer term: the student layers it reads at its LayerNorm tap (from Lean.norm_from on), and the others
        self.norm = {
            t.name: {s for s in plan.student_layers(t.name) if s >= t.lean.norm_from}
            for t in plan.layer_terms
            if norm_taps and t.lean and t.lean.norm_tap
        }
        self.plain = {t.name: plan.student_layers(t.name) - self.norm.get(t.name, set()) for t in plan.layer_terms}
        # the terms whose backward takes their teacher tap rebuilt by a call of the teacher's attention block
        self.fed = [
            t for t in plan.layer_terms if t.lean and t.lean.rebuild and (t.lean.map_loss or t.name in self.norm)
        ]

    @classmethod
    def for_models(
        cls,
        cfg: DistillConfig,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        regression: bool = False,
        teacher_sharded: bool = False,
        terms: tuple[Term, ...] = TERMS,
        head: Head = classifier_head,
    ) -> DistillObjective:
        """The objective of ``cfg`` (the ``distill`` section) for these models (DeepSpeed engines or modules);
        ``terms`` and ``head``: see :class:`~kdqat_dist.distill.terms.Plan`. Norm taps where the student's layers
        have the LayerNorms; no recompute of a sharded (ZeRO-3) teacher: calling its modules outside its forward
        re-gathers their parameters and upsets DeepSpeed's prefetch trace (a resumed run differed in the last bit).
        """
        plan = Plan(cfg, *depths(student, teacher), regression, tuple(terms), head)
        recompute = cfg.recompute_teacher and not teacher_sharded
        return cls(plan, norm_taps=supports_norm_taps(unwrap(student)), recompute_teacher=recompute)

    def term_loss(self, name: str, s, t, mask: torch.Tensor, rebuild: K.Recompute | None = None) -> torch.Tensor:
        """One term's value for one layer pair (or the head's outputs); with ``rebuild``, its map-loss form."""
        term = self.plan.active[name]
        if rebuild is None:
            return term.loss(self.plan, s, t, mask)
        return term.lean.map_loss(self.plan, s, t, mask, rebuild)

    def student_taps(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for t in self.plan.layer_terms:
            for tap, layers in ((t.lean and t.lean.norm_tap, self.norm.get(t.name)), (t.tap, self.plain[t.name])):
                if layers:
                    out.setdefault(tap, set()).update(layers)
        return out

    def teacher_taps(self) -> dict[str, set[int]]:
        taps: dict[str, set[int]] = {}
        for term in self.plan.layer_terms:
            taps.setdefault(term.tap, set()).update(self.plan.t2s[term.name])
        # what rebuilds a fed term's teacher tap in the backward: the block's call (but in the kept layer), or
        # without those calls, the teacher's Q and K for a map loss
        for term in self.fed:
            if self.recompute_teacher:
                rebuilt, source = set(self.plan.t2s[term.name]) - {self._kept_layer()}, "attention_call"
            else:
                rebuilt, source = (set(self.plan.t2s[term.name]) if term.lean.map_loss else set()), "map_inputs"
            if rebuilt:
                taps.setdefault(source, set()).update(rebuilt)
        return taps

    def _kept_layer(self) -> int | None:
        """The teacher layer whose map and block output are kept, not recomputed: the one whose terms the
        backward reaches first (those of the top student layer with a fed term), if no other student layer
        learns from it.

        The backward reaches those terms while all the student's activations are still alive: a call of the
        block there would add its temporaries (Q, K, V, scores, map) at the step's peak, while the kept map
        and output (alive from the end of the teacher's forward) weigh less. Every other layer's call runs
        after the student's top layer has freed its activations.
        """
        pairs = {(s, t) for term in self.fed for t, ss in self.plan.t2s[term.name].items() for s in ss}
        if not self.recompute_teacher or not pairs:
            return None
        top = max(s for s, _ in pairs)
        (t_top, *more) = {t for s, t in pairs if s == top}
        if more or any(s != top for s, t in pairs if t == t_top):
            return None  # kept, it would stay alive through the other layers' backward
        return t_top

    def __call__(self, student: Callable, teacher: Callable, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Student forward, then the teacher streamed into the per-layer terms. Returns the LossOutput."""
        self.plan.check(student, teacher)
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        run = _Pass(self, batch["attention_mask"])
        with tapped(unwrap(student), self.student_taps(), run.student):
            s_head = self.plan.head(student(**inputs), batch)
        with torch.no_grad(), tapped(unwrap(teacher), self.teacher_taps(), run.teacher):
            t_head = self.plan.head(teacher(**inputs), batch) if self.plan.needs_teacher else None
        run.out.student_logits, run.out.teacher_logits = s_head.logits, t_head and t_head.logits
        for term in self.plan.head_terms:
            run.out.add(term.name, self.term_loss(term.name, s_head, t_head, run.mask))
        return self.plan.finish(run.out)


class _Pass:
    """One batch through the streaming objective: the state its student and teacher tap sinks share."""

    def __init__(self, obj: DistillObjective, mask: torch.Tensor):
        self.obj, self.plan, self.mask, self.out = obj, obj.plan, mask, LossOutput(total=torch.zeros(()))
        self.store = TapStore()  # the student's plain taps, each dropped when its last term has read it
        self.reads = Counter((t.tap, s) for t in self.plan.layer_terms for s in obj.plain[t.name])
        self.slots: dict[tuple[str, int], tuple[_MseSlot, torch.Tensor]] = {}  # (term, student layer)
        self.last: torch.Tensor | None = None  # the node of the last term at a LayerNorm
        self.blocks: dict[int, _TeacherBlock] = {}  # teacher layer -> its attention block's call
        self.map_inputs: dict[int, MapInputs] = {}  # teacher layer -> its Q and K

    def student(self, layer: int, name: str, tap) -> None:
        """The student's sink: a plain tap is kept; a LayerNorm tap makes its terms' :class:`_MseAtNorm`."""
        terms = [t for t in self.plan.layer_terms if t.lean and t.lean.norm_tap == name]
        if not terms:
            self.store(layer, name, tap)
        for term in (t for t in terms if layer in self.obj.norm.get(t.name, ())):
            slot = _MseSlot(tap.inputs)
            node = _MseAtNorm.apply(tap.output, slot)
            if self.last is not None and node.grad_fn is not None and tap.output.grad_fn is not None:
                _run_backward_at(self.last, tap.output)
            self.last = node
            self.slots[(term.name, layer)] = (slot, node)

    def teacher(self, layer: int, name: str, tap) -> None:
        """The teacher's sink: what rebuilds a tap in the backward is kept; a term's tap goes into its terms."""
        if name == "map_inputs":  # arrives just before the same layer's probs
            self.map_inputs[layer] = tap
            return
        if name == "attention_call":  # arrives before the same layer's other taps
            uses = {t: len(self.plan.t2s[t.name].get(layer, ())) for t in self.obj.fed}
            self.blocks[layer] = _TeacherBlock(
                tap, sum(uses.values()), sum(n for t, n in uses.items() if t.lean.map_loss)
            )
            return
        with torch.enable_grad():  # the teacher runs under no_grad; the loss must still build a graph to the student
            for term in (t for t in self.plan.layer_terms if t.tap == name):
                for s_layer in self.plan.t2s[term.name].get(layer, ()):
                    self.out.add(term.name, self._value(term, s_layer, layer, tap), s_layer)

    def _value(self, term: Term, s_layer: int, t_layer: int, t: torch.Tensor) -> torch.Tensor:
        """``term``'s value for (student layer, teacher layer), in its lean form where it has one."""
        slotted = self.slots.pop((term.name, s_layer), None)
        if slotted is not None:  # at the student's LayerNorm output
            slot, node = slotted
            slot.weight = self.plan.mse_weight(self.mask, t)
            with torch.no_grad():
                value = L.mse(slot.norm.output(), t.to(slot.norm.input.dtype), slot.weight)
            block = self.blocks.get(t_layer) if term.lean.rebuild else None
            slot.target, slot.block = (t, None) if block is None else (None, block)
            return node + value
        self.reads[(term.tap, s_layer)] -= 1  # the student's tap is dropped once its last term has read it
        s = self.store[term.tap][s_layer] if self.reads[(term.tap, s_layer)] else self.store.data[term.tap].pop(s_layer)
        # (the relation term takes Q, K, V tuples and computes in float32 from either dtype)
        t_in = t.to(s.dtype) if isinstance(t, torch.Tensor) else t
        rebuild = None  # for a map loss: what rebuilds the teacher's map (none in the kept layer: it keeps the map)
        if term.lean and term.lean.map_loss and self.obj.recompute_teacher and t_layer in self.blocks:
            rebuild = partial(self.blocks[t_layer].probs, dtype=s.dtype), ()
        elif term.lean and term.lean.map_loss and not self.obj.recompute_teacher:
            q = self.map_inputs[t_layer]
            rebuild = partial(_teacher_probs, scaling=q.scaling, dtype=s.dtype), (q.query, q.key, q.attention_mask)
        value = self.obj.term_loss(term.name, s, t_in, self.mask, rebuild)
        if term.lean and term.lean.ordered:
            _run_backward_at(value, s)
        return value
