"""SubLN (BitNet; BitDistill's stage 1): an extra LayerNorm in front of the attention output projection and
the FFN down projection of every BERT-style layer, inserted by wrapping those Linears (no modeling file).

    attention.output.dense:  ctx          -> W_o · LN_sub(ctx) + b_o
    output.dense:            GELU(W_up x) -> W_down · LN_sub(GELU(W_up x)) + b_down

The inserted LayerNorms start fresh (gain 1, bias 0). That is not the identity: each token's input to the
projection is normalised to zero mean and unit variance, so the prepared model's outputs change before any
training (docs/algorithms.md §4.4); BitDistill inserts them the same way and then trains (continual
pre-training, then distillation) to adapt the projections.
"""

from __future__ import annotations

import torch
from torch import nn

from kdqat_dist.models.encoders import encoder_layers

# (path from a layer to the Linear, path to the LayerNorm whose eps the SubLN reuses)
SUBLN_SITES = (
    (("attention", "output", "dense"), ("attention", "output", "LayerNorm")),
    (("output", "dense"), ("output", "LayerNorm")),
)


class SubLNLinear(nn.Module):
    """``linear(LayerNorm(x))``. The norm is the child ``LayerNorm`` so that its parameters fall under the
    optimizer's no-decay names like every other LayerNorm's; ``linear`` is the original module (a
    :class:`~kdqat_dist.quant.fake_quant.QuantLinear` once prepared), its Parameters untouched."""

    def __init__(self, linear: nn.Module, eps: float = 1e-12):
        super().__init__()
        w = linear.weight
        self.LayerNorm = nn.LayerNorm(linear.in_features, eps=eps, device=w.device, dtype=w.dtype)
        self.linear = linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.LayerNorm(x))


def _get(root: nn.Module, path: tuple[str, ...]) -> nn.Module | None:
    for name in path:
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def insert_subln(model: nn.Module) -> int:
    """Wrap every layer's attention output and FFN down projections in :class:`SubLNLinear`, in place
    (idempotent: wrapped projections are left alone). Returns the number of SubLNs inserted.

    Raises:
        ValueError: a layer has no Linear where a BERT layer has these projections.
    """
    added = 0
    for i, layer in enumerate(encoder_layers(model)):
        for path, ln_path in SUBLN_SITES:
            dense = _get(layer, path)
            if isinstance(dense, SubLNLinear):
                continue
            if not isinstance(dense, nn.Linear):
                raise ValueError(
                    f"quant.subln: layer {i} has no Linear at {'.'.join(path)} (a BERT-style layer is needed)"
                )
            ln = _get(layer, ln_path)
            setattr(_get(layer, path[:-1]), path[-1], SubLNLinear(dense, getattr(ln, "eps", 1e-12)))
            added += 1
    return added
