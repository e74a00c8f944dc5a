"""Per-layer taps: where each KD tensor is read, delivered to a sink as soon as it is produced.

Tap names and where they come from (the terms they feed: docs/algorithms.md §2), for Transformer layer ``l`` (0-based):

=============  ============================================================  ==================
name           tensor                                                        shape
=============  ============================================================  ==================
hidden         index 0: embedding output; index l+1: output of layer l       [B, S, D]
qkv            (Q, K, V) as the attention matmuls see them (after fake       3 x [B, H, S, d_h]
               quantization in a prepared student)
scores         QKᵀ/√d_h + additive mask (attention function)                 [B, H, S, S]
probs          softmax probabilities (float32), before dropout/quantization  [B, H, S, S]
map_inputs     ``MapInputs(Q, K, mask, scaling)``: what ``probs`` is made    2 x [B, H, S, d_h]
               of (emitted just before it); ``.probs()`` recomputes it
context        per-head softmax(A)·V before the head merge                   [B, H, S, d_h]
sa_output      W_o·ctx + b_o (attention.output.dense), before residual/LN    [B, S, D]
attn_output    LayerNorm(Dropout(W_o·ctx + b_o) + X): the attention block    [B, S, D]
hidden_norm    index l+1 only: :class:`NormTap` of layer l's output          [B, S, D]
               LayerNorm (its output, and the input it can be recomputed from)
attn_output_   :class:`NormTap` of the attention block's LayerNorm           [B, S, D]
norm
attention_     :class:`AttentionCall`: layer l's attention block with the    [B, S, D] input
call           arguments it was called with; ``.run()`` calls it again
=============  ============================================================  ==================

A sink is any ``callable(layer: int, name: str, tensor) -> None`` (``map_inputs`` delivers a
:class:`~kdqat_dist.models.attention.MapInputs` instead of a tensor, ``qkv`` a tuple of three, the ``*_norm``
taps a :class:`NormTap` and ``attention_call`` an :class:`AttentionCall`). Only the (name, layer) pairs asked
for are tapped; the hooks are removed when the context manager exits. The same mechanism runs on a plain model,
a DeepSpeed ZeRO-3 engine's module, and in the analysis tools.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdqat_dist.models.attention import MapInputs
from kdqat_dist.models.encoders import embeddings_module, encoder_layers

Sink = Callable[[int, str, torch.Tensor], None]
FUNCTION_TAPS = ("qkv", "scores", "probs", "map_inputs", "context")
MODULE_TAPS = ("sa_output", "attn_output")
NORM_TAPS = ("hidden_norm", "attn_output_norm")
ALL_TAPS = ("hidden",) + FUNCTION_TAPS + MODULE_TAPS + NORM_TAPS + ("attention_call",)


@dataclass
class NormInputs:
    """What a LayerNorm's output is computed from; ``output()`` recomputes it with the same operation.

    The input is what autograd keeps for the LayerNorm's own backward anyway, so holding it costs nothing
    while the backward has not passed the LayerNorm; the affine parameters are copies (D numbers each),
    taken while a ZeRO-3 engine has them gathered.
    """

    input: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    normalized_shape: tuple[int, ...]

    def output(self) -> torch.Tensor:
        with torch.no_grad():
            return F.layer_norm(self.input, self.normalized_shape, self.weight, self.bias, self.eps)


@dataclass
class NormTap:
    """A ``*_norm`` tap: the LayerNorm's ``output`` (for use during the call only) and its ``inputs``."""

    output: torch.Tensor
    inputs: NormInputs


class AttentionCall:
    """One layer's attention block (``layer.attention``) with the arguments of its call, to call it again.

    ``run()`` gives the same attention-block output (the ``attn_output`` tap) and, if asked, the same
    :class:`MapInputs` and attention map (the ``map_inputs`` and ``probs`` taps) as the call that was
    tapped: same module, same inputs, no dropout in eval mode. A KD loss can keep this (the layer's
    [B, S, D] input) for its backward instead of the block's output and the teacher's Q and K. Under
    ZeRO-3 the module gathers its parameters again when called.
    """

    def __init__(self, layer: int, module: nn.Module, args: tuple, kwargs: dict):
        self.layer, self.module, self.args, self.kwargs = layer, module, args, kwargs

    def run(self, with_map: bool = False) -> tuple[torch.Tensor, MapInputs | None, torch.Tensor | None]:
        """(block output [B, S, D], and if ``with_map`` its MapInputs and float32 map [B, H, S, S])."""
        if self.args is None:
            raise RuntimeError(f"the attention call of layer {self.layer} was released")
        attn = self.module.self
        got: dict = {}
        previous = getattr(attn, "_kdqat_tap", None)
        if with_map:
            attn._kdqat_tap = _AttnTap(
                self.layer, frozenset({"map_inputs", "probs"}), lambda _l, n, t: got.__setitem__(n, t)
            )
        try:
            with torch.no_grad():
                out = _out(self.module(*self.args, **self.kwargs))
        finally:
            attn._kdqat_tap = previous
        return out, got.get("map_inputs"), got.get("probs")

    def release(self) -> None:
        """Drop the arguments (the layer's input): nothing can be recomputed after this."""
        self.args = self.kwargs = None


def norm_modules(layer: nn.Module) -> dict[str, nn.LayerNorm | None]:
    """The LayerNorms whose outputs are a BERT layer's ``attn_output`` and its output (``hidden`` l+1)."""

    def find(*path: str):
        m = layer
        for name in path:
            m = getattr(m, name, None)
        return m if isinstance(m, nn.LayerNorm) else None

    return {"attn_output_norm": find("attention", "output", "LayerNorm"), "hidden_norm": find("output", "LayerNorm")}


def supports_norm_taps(model: nn.Module) -> bool:
    """Whether every layer has the two LayerNorms the ``*_norm`` taps hook (BERT, RoBERTa, MiniLM, ...)."""
    layers = encoder_layers(model)
    return bool(layers) and all(m is not None for layer in layers for m in norm_modules(layer).values())


@dataclass
class _AttnTap:
    layer: int
    names: frozenset[str]
    sink: Sink


def self_attention_module(layer: nn.Module) -> nn.Module:
    return layer.attention.self


def _out(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def tapped(model: nn.Module, wanted: dict[str, set[int]], sink: Sink) -> Iterator[None]:
    """Deliver the requested taps of ``model`` to ``sink`` during forward passes inside the block.

    Args:
        model: a BERT-style encoder (or a model wrapping one) running the ``kdqat`` attention function
            whenever attention taps are wanted.
        wanted: tap name -> set of layer indices (for ``hidden``, 0 = embeddings, l+1 = layer l).
        sink: receives (layer, name, tensor) in forward order.
    """
    unknown = set(wanted) - set(ALL_TAPS)
    if unknown:
        raise ValueError(f"unknown taps {sorted(unknown)}; allowed: {', '.join(ALL_TAPS)}")
    layers = encoder_layers(model)
    handles = []
    attn_modules = []

    def module_hook(layer_idx: int, name: str):
        def hook(_mod, _inp, output):
            sink(layer_idx, name, _out(output))

        return hook

    def norm_hooks(layer_idx: int, name: str, norm: nn.LayerNorm):
        params: list = []

        def pre(mod, _inp):  # parameters are gathered here under ZeRO-3 (its own pre-hook ran first)
            params[:] = [None if p is None else p.detach().clone() for p in (mod.weight, mod.bias)]

        def post(mod, inp, output):
            sink(
                layer_idx,
                name,
                NormTap(output, NormInputs(inp[0], params[0], params[1], mod.eps, tuple(mod.normalized_shape))),
            )

        return norm.register_forward_pre_hook(pre), norm.register_forward_hook(post)

    def call_hook(layer_idx: int):
        def pre(mod, args, kwargs):
            sink(layer_idx, "attention_call", AttentionCall(layer_idx, mod, args, kwargs))

        return pre

    try:
        if 0 in wanted.get("hidden_norm", ()):
            raise ValueError("hidden_norm has no index 0 (the embedding output is not a LayerNorm's output)")
        if 0 in wanted.get("hidden", ()):
            handles.append(embeddings_module(model).register_forward_hook(module_hook(0, "hidden")))
        for i, layer in enumerate(layers):
            if i + 1 in wanted.get("hidden", ()):
                handles.append(layer.register_forward_hook(module_hook(i + 1, "hidden")))
            if i in wanted.get("attn_output", ()):
                handles.append(layer.attention.output.register_forward_hook(module_hook(i, "attn_output")))
            if i in wanted.get("sa_output", ()):
                handles.append(layer.attention.output.dense.register_forward_hook(module_hook(i, "sa_output")))
            norms = norm_modules(layer)
            for name, idx in (("hidden_norm", i + 1), ("attn_output_norm", i)):
                if idx in wanted.get(name, ()):
                    if norms[name] is None:
                        raise ValueError(f"{name}: layer {i} has no LayerNorm where a BERT layer has it")
                    handles.extend(norm_hooks(idx, name, norms[name]))
            if i in wanted.get("attention_call", ()):
                handles.append(layer.attention.register_forward_pre_hook(call_hook(i), with_kwargs=True))
            names = frozenset(n for n in FUNCTION_TAPS if i in wanted.get(n, ()))
            if names:
                attn = self_attention_module(layer)
                attn._kdqat_tap = _AttnTap(i, names, sink)
                attn_modules.append(attn)
        if attn_modules:
            impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if impl != "kdqat":
                raise RuntimeError(
                    f"attention taps need the 'kdqat' attention function, but the model uses {impl!r}; "
                    "call kdqat_dist.models.attention.use_kdqat_attention(model) first"
                )
        yield
    finally:
        for h in handles:
            h.remove()
        for attn in attn_modules:
            attn._kdqat_tap = None


class TapStore:
    """A sink that keeps every tap: ``store[name][layer] -> tensor`` (used for the student's forward)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[int, torch.Tensor]] = {}

    def __call__(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        self.data.setdefault(name, {})[layer] = tensor

    def __getitem__(self, name: str) -> dict[int, torch.Tensor]:
        return self.data[name]
