"""Run an inference-only encoder's feed-forward blocks over slices of its tokens (used for the teacher).

A BERT layer's feed-forward block is applied to each token on its own, so running it over slices of the
tokens gives the same values (up to float rounding: a matrix product over fewer rows may sum in another
order) while its [B, S, 4·D] intermediate and activation, the largest tensors of a
teacher's forward besides the attention map, are never whole. In a KD step the teacher runs on top of the
student's saved activations, so its largest temporary is what the step's peak memory adds. transformers'
own ``chunk_size_feed_forward`` needs the sequence length to be a multiple of the chunk; this does not.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from kdqat_dist.models.encoders import encoder_layers

# Elements of the intermediate per slice: 8 MiB in float32, whatever B and S are.
SLICE_ELEMENTS = 1 << 21


def slice_feed_forward(model: nn.Module, max_elements: int = SLICE_ELEMENTS) -> int:
    """Make every BERT-style layer of ``model`` run its feed-forward block over slices of its tokens.

    For frozen models only (the KD teacher): with autograd, each slice's activations would be kept anyway.
    Returns the number of layers changed (0 for an architecture without ``feed_forward_chunk``).
    """
    changed = 0
    for layer in encoder_layers(model):
        block = getattr(type(layer), "feed_forward_chunk", None)
        dense = getattr(getattr(layer, "intermediate", None), "dense", None)
        if block is None or not isinstance(dense, nn.Linear):
            continue
        # an instance attribute: BertLayer.forward calls self.feed_forward_chunk
        layer.feed_forward_chunk = partial(_sliced, block.__get__(layer), dense.out_features, max_elements)
        changed += 1
    return changed


def _sliced(
    block: Callable[[torch.Tensor], torch.Tensor], width: int, max_elements: int, x: torch.Tensor
) -> torch.Tensor:
    # Slices of the flattened tokens, not of the sequence axis: a token slice is contiguous, so each
    # Linear is one matrix product (a strided sequence slice went through a batched product, ~15% slower).
    rows = max(1, max_elements // max(1, width))
    tokens = x.reshape(-1, x.shape[-1])
    if rows >= tokens.shape[0]:
        return block(x)
    out = torch.cat([block(tokens[i : i + rows]) for i in range(0, tokens.shape[0], rows)])
    return out.view(*x.shape[:-1], out.shape[-1])
