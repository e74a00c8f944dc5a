"""Per-layer taps: where each KD tensor is read, delivered to a sink as soon as it is produced.

Tap names and where they come from (ALGORITHMS.md A.7), for Transformer layer ``l`` (0-based):

=============  ============================================================  ==================
name           tensor                                                        shape
=============  ============================================================  ==================
hidden         index 0: embedding output; index l+1: output of layer l       [B, S, D]
scores         QKᵀ/√d_h + additive mask (attention function)                 [B, H, S, S]
probs          softmax probabilities (float32), before dropout/quantization  [B, H, S, S]
map_inputs     ``MapInputs(Q, K, mask, scaling)``: what ``probs`` is made    2 x [B, H, S, d_h]
               of (emitted just before it); ``.probs()`` recomputes it
context        per-head softmax(A)·V before the head merge                   [B, H, S, d_h]
sa_output      W_o·ctx + b_o (attention.output.dense), before residual/LN    [B, S, D]
attn_output    LayerNorm(Dropout(W_o·ctx + b_o) + X): the attention block    [B, S, D]
=============  ============================================================  ==================

A sink is any ``callable(layer: int, name: str, tensor) -> None`` (``map_inputs`` delivers a
:class:`~kdqat_dist.models.attention.MapInputs` instead of a tensor). Only the (name, layer) pairs asked
for are tapped; the hooks are removed when the context manager exits. The same mechanism runs on a
plain model, a DeepSpeed ZeRO-3 engine's module, and in the analysis tools.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kdqat_dist.models.encoders import embeddings_module, encoder_layers

Sink = Callable[[int, str, torch.Tensor], None]
FUNCTION_TAPS = ("scores", "probs", "map_inputs", "context")
MODULE_TAPS = ("sa_output", "attn_output")
ALL_TAPS = ("hidden",) + FUNCTION_TAPS + MODULE_TAPS


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

    try:
        if 0 in wanted.get("hidden", ()):
            handles.append(embeddings_module(model).register_forward_hook(module_hook(0, "hidden")))
        for i, layer in enumerate(layers):
            if i + 1 in wanted.get("hidden", ()):
                handles.append(layer.register_forward_hook(module_hook(i + 1, "hidden")))
            if i in wanted.get("attn_output", ()):
                handles.append(layer.attention.output.register_forward_hook(module_hook(i, "attn_output")))
            if i in wanted.get("sa_output", ()):
                handles.append(layer.attention.output.dense.register_forward_hook(module_hook(i, "sa_output")))
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

    def clear(self) -> None:
        self.data.clear()
