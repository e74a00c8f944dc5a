"""One pass over a dev sample: every number behind the figures, for a teacher and any number of students.

Each example is run on its own (batch 1, no padding), so every statistic sees exactly the sample's true
length; nothing is carried over from one sample to the next (the reference notebook reused the first
sample's length). The tensors come from the same tap machinery as training
(:func:`kdqat_dist.models.taps.tapped`): ``hidden`` (layer inputs), ``probs`` and ``attn_output``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kdqat_dist.analysis.attention_distance import cover_length_ratio, head_kl, ranking_loss
from kdqat_dist.analysis.norms import NormAccumulator, norm_decomposition, token_classes
from kdqat_dist.data.heads.base import LABEL_KEYS
from kdqat_dist.models.encoders import encoder_layers
from kdqat_dist.models.taps import TapStore, self_attention_module, tapped

__all__ = ["DISTANCES", "collect", "forward_taps"]

DISTANCES = ("kl", "ranking_loss", "cover_length_ratio")


@torch.no_grad()
def forward_taps(model: nn.Module, example: Mapping[str, torch.Tensor]) -> TapStore:
    """Run one batch-1 example and keep, for every layer l: ``hidden[l]`` (the layer's input), ``probs[l]``
    and ``attn_output[l]``, each without the batch dimension."""
    n = len(encoder_layers(model))
    wanted = {"hidden": set(range(n)), "probs": set(range(n)), "attn_output": set(range(n))}
    store = TapStore()

    def sink(layer: int, name: str, t: torch.Tensor) -> None:
        store(layer, name, t[0].detach())

    with tapped(model, wanted, sink):
        model(**{k: v for k, v in example.items() if k not in LABEL_KEYS})
    return store


def collect(
    teacher: nn.Module,
    students: Mapping[str, nn.Module],
    examples: Sequence[Mapping[str, torch.Tensor]],
    tokenizer,
    top_k: int = 5,
    progress: bool = False,
) -> dict:
    """Attention-map distances, attention-output dynamic range and norm statistics over ``examples``.

    Args:
        teacher: the full-precision model, running the ``kdqat`` attention function.
        students: name -> model, each with the teacher's depth and heads.
        examples: batch-1 inputs (``input_ids`` [1, S], ``attention_mask``, ...), unpadded.
        tokenizer: classifies key tokens for the norm analysis.
        top_k: the teacher's top keys the cover length must reach.

    Returns:
        ``distance[student][metric]`` [N, L, H] for metric in :data:`DISTANCES`;
        ``dynamic_range[model]`` with ``min``/``max`` [N, L] (over the tokens and hidden units of each
        example) and ``example_min``/``example_max`` [L, S_0] (per token of the first example);
        ``norms[model]`` from :meth:`NormAccumulator.result`; ``lengths`` [N].
    """
    models = {"teacher": teacher, **students}
    if "teacher" in students:
        raise ValueError("collect: 'teacher' is reserved; give the students other names")
    layers = {name: encoder_layers(m) for name, m in models.items()}
    n_layers = len(layers["teacher"])
    n_heads = _heads(layers["teacher"][0])
    for name, ls in layers.items():
        if len(ls) != n_layers or _heads(ls[0]) != n_heads:
            raise ValueError(
                f"collect: {name} has {len(ls)} layers x {_heads(ls[0])} heads, the teacher {n_layers} x {n_heads}"
            )
    for m in models.values():
        m.eval()
    dist = {s: {k: np.zeros((len(examples), n_layers, n_heads)) for k in DISTANCES} for s in students}
    rng = {m: {"min": np.zeros((len(examples), n_layers)), "max": np.zeros((len(examples), n_layers))} for m in models}
    acc = {m: NormAccumulator(n_layers, n_heads) for m in models}
    lengths = []
    for n, ex in enumerate(tqdm(examples, desc="attention and norms", disable=not progress, leave=False)):
        ids = ex["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"collect: example {n} must be one unpadded sample [1, S], got {tuple(ids.shape)}")
        if "attention_mask" in ex and not bool(ex["attention_mask"].all()):
            raise ValueError(f"collect: example {n} is padded; slice it to its true length first")
        lengths.append(ids.shape[1])
        classes = token_classes(ids[0], tokenizer)
        for name, model in models.items():  # the teacher first
            taps = forward_taps(model, ex)
            for l in range(n_layers):
                acc[name].add(l, norm_decomposition(layers[name][l], taps["hidden"][l], taps["probs"][l]), classes)
            acc[name].count(classes)
            att = torch.stack([taps["attn_output"][l] for l in range(n_layers)])  # [L, S, D]
            rng[name]["min"][n] = att.amin(dim=(1, 2)).cpu().numpy()
            rng[name]["max"][n] = att.amax(dim=(1, 2)).cpu().numpy()
            if n == 0:
                rng[name]["example_min"] = att.amin(-1).cpu().numpy()
                rng[name]["example_max"] = att.amax(-1).cpu().numpy()
            if name == "teacher":
                t_taps = taps
                continue
            for l in range(n_layers):
                ps, pt = taps["probs"][l], t_taps["probs"][l]
                dist[name]["kl"][n, l] = head_kl(ps, pt).cpu().numpy()
                dist[name]["ranking_loss"][n, l] = ranking_loss(ps, pt).cpu().numpy()
                dist[name]["cover_length_ratio"][n, l] = cover_length_ratio(ps, pt, top_k).cpu().numpy()
    return {
        "distance": dist,
        "dynamic_range": rng,
        "norms": {m: a.result() for m, a in acc.items()},
        "lengths": np.asarray(lengths),
    }


def _heads(layer: nn.Module) -> int:
    return self_attention_module(layer).num_attention_heads
