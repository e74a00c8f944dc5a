"""Training-time quantization diagnostics, written to TensorBoard at every log step of ``kdqat train``.

:func:`log_diagnostics` is called by the training loop (``Trainer._diagnostics``). Per fake-quantized
weight (every ``QuantLinear`` / ``QuantEmbedding``), tags ``<group>/<module>``:

- ``quant_zero_frac``: fraction of weights whose code is 0 (for ternary weights: the zeros of {-α, 0, α});
- ``quant_scale``: the quantization step: TWN α, LSQ step, max-abs step, mean-clip step (mean over rows
  for row-wise quantizers);
- ``quant_scale_drift``: that scale relative to its value at the first call, minus 1;
- ``quant_flip_rate``: fraction of weight codes that changed since the previous call (previous codes
  are kept as int8 on the CPU, one byte per weight);

per activation quantizer:

- ``quant_clip_rate``: fraction of its inputs beyond the clip value (sym: ``clip``; LSQ: Q_P·step),
  counted by the quantizer itself (``ActFakeQuant.track_stats``) during the first forward pass after
  the previous call (a one-batch sample: counting at every step would add a pass over every activation
  to every step); the first rates appear at the second log step;
- ``quant_act_step`` (LSQ activations only): the learned step;

and ``.../all`` summaries (weighted by element counts). Module names drop the model prefix; Transformer
layers read ``03.attention.self.query``. The per-layer KD loss terms are logged by the loop itself
(``layers/<term>/<layer>``).

Under ZeRO-3 a weight outside the forward is an empty partition (``numel() == 0``). The caller passes
``gather`` (the engine's per-module gather, a collective): then every rank calls :func:`log_diagnostics`,
every rank gathers one quantized module at a time (memory stays at one module's weights), and the rank
with the writer computes and writes. Without ``gather`` empty partitions are skipped. This module does
not import the distributed engine.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdqat_dist.quant.fake_quant import ActFakeQuant, QuantEmbedding, QuantLinear, WeightFakeQuant

__all__ = ["log_diagnostics", "reset_diagnostics", "short_name", "weight_codes"]


@dataclass
class _WeightState:
    codes: torch.Tensor  # int8, CPU
    first_scale: float


_STATE: weakref.WeakKeyDictionary[WeightFakeQuant, _WeightState] = weakref.WeakKeyDictionary()
_WINDOWS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # a DeepSpeed engine
    return inner if isinstance(inner, nn.Module) else model


def short_name(name: str, prefix: str = "") -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``03.attention.self.query``; drops ``prefix.``."""
    m = re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.(.*)$", name)
    if m:
        return f"{int(m.group(1)):02d}.{m.group(2)}"
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1:]
    return name


@torch.no_grad()
def weight_codes(wq: WeightFakeQuant, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes of the quantized weight, step broadcastable to it), both float32.

    The step is TWN's α (codes in {-1, 0, 1}), the LSQ step, the max-abs step max|ŵ|/(2^(b-1)-1), or
    for mean-clip the smallest non-zero |ŵ| (its levels are multiples of the step).
    """
    cfg = wq.cfg
    # .forward, not __call__: a ZeRO-3 engine hooks every submodule call to fetch its parameters (a
    # collective the other ranks would not join); the caller has made them whole already.
    q = wq.forward(weight).float()
    per_row = wq.per_row and q.dim() > 1
    dims = tuple(range(1, q.dim())) if per_row else None

    def amax(x: torch.Tensor) -> torch.Tensor:
        return x.amax() if dims is None else x.amax(dim=dims, keepdim=True)

    if cfg.method == "lsq":
        step = wq.step.detach().float()
        step = step.reshape(-1, *([1] * (q.dim() - 1))) if step.dim() > 0 else step
    elif cfg.method == "twn":
        step = amax(q.abs())
    elif cfg.method == "sym":
        step = amax(q.abs()) / (2 ** (cfg.bits - 1) - 1)
    else:
        a = q.abs()
        step = -amax(torch.where(a > 0, -a, torch.full_like(a, -float("inf"))))
    step = torch.where(torch.isfinite(step) & (step > 0), step, torch.ones_like(step))
    return q.div_(step).round_(), step


def _quant_modules(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_quant is not None and m.weight_quant.enabled:
            yield name, m


def _open_clip_window(model: nn.Module, acts: list[ActFakeQuant], forwards: int | None) -> None:
    """Count clipping during the next ``forwards`` forward passes of ``model`` (None: until the next call)."""
    old = _WINDOWS.pop(model, None)
    if old is not None:
        old.remove()
    for q in acts:
        q.track_stats = True
    if forwards is None or not acts:
        return
    left = [forwards]

    def close(_module, _inputs, _output) -> None:
        left[0] -= 1
        if left[0] <= 0:
            for q in acts:
                q.track_stats = False
            handle = _WINDOWS.pop(model, None)
            if handle is not None:
                handle.remove()

    _WINDOWS[model] = model.register_forward_hook(close)


@torch.no_grad()
def log_diagnostics(writer, step: int, model: nn.Module, clip_forwards: int | None = 1,
                    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None) -> None:
    """Write the quantization diagnostics of ``model`` at ``step`` to a TensorBoard ``SummaryWriter``.

    Cheap enough for every log step: one re-quantization of each weight (as a forward does; the word
    embedding table is quantized whole here, most of the cost, where the forward quantizes only the rows
    it looks up), an int8 copy to the CPU for the flip rate, and clip counting during ``clip_forwards``
    forward passes after each call (the first micro-batch; None counts every forward until the next call,
    which costs one extra pass over every quantized activation at every step).
    ``gather(params)``: a context manager making ``params`` whole on every rank (ZeRO-3); with it every
    rank must call this function. Without it, does nothing when ``writer`` is None (non-main ranks).
    """
    if writer is None and gather is None:
        return
    model = _unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    totals = {"zero": 0.0, "flip": 0.0, "n": 0, "n_flip": 0, "clipped": 0.0, "seen": 0.0}
    for name, m in _quant_modules(model):
        with gather(list(m.parameters())) if gather is not None else nullcontext():
            if writer is not None:
                _log_weight(writer, step, short_name(name, prefix), m, totals)
    acts = [(name, q) for name, q in model.named_modules() if isinstance(q, ActFakeQuant) and q.enabled]
    for name, q in acts:
        tag = short_name(name, prefix).replace(".act_quant", ".input")
        if q.cfg.method == "lsq":  # the step is a parameter: a partition under ZeRO-3 unless gathered
            with gather(list(q.parameters())) if gather is not None else nullcontext():
                if writer is not None and q.step.numel() > 0:
                    writer.add_scalar(f"quant_act_step/{tag}", float(q.step.detach()), step)
        if writer is None:
            continue
        seen, clipped = float(q.seen), float(q.clipped)
        if seen > 0:
            writer.add_scalar(f"quant_clip_rate/{tag}", clipped / seen, step)
            totals["clipped"] += clipped
            totals["seen"] += seen
        q.clipped.zero_()
        q.seen.zero_()
    if writer is None:
        return
    _open_clip_window(model, [q for _, q in acts], clip_forwards)
    if totals["n"]:
        writer.add_scalar("quant_zero_frac/all", totals["zero"] / totals["n"], step)
    if totals["n_flip"]:
        writer.add_scalar("quant_flip_rate/all", totals["flip"] / totals["n_flip"], step)
    if totals["seen"]:
        writer.add_scalar("quant_clip_rate/all", totals["clipped"] / totals["seen"], step)


def _log_weight(writer, step: int, tag: str, m: nn.Module, totals: dict) -> None:
    wq = m.weight_quant
    if m.weight.numel() == 0 or (hasattr(wq, "step") and wq.step.numel() == 0):
        return  # a ZeRO-3 partition nobody gathered: nothing to look at on this rank
    codes, scale_t = weight_codes(wq, m.weight)
    codes8 = codes.clamp_(-128, 127).to(torch.int8).cpu()
    n = codes8.numel()
    zero = int(torch.count_nonzero(codes8 == 0)) / n
    scale = float(scale_t.mean())
    state = _STATE.get(wq)
    writer.add_scalar(f"quant_zero_frac/{tag}", zero, step)
    writer.add_scalar(f"quant_scale/{tag}", scale, step)
    totals["zero"] += zero * n
    totals["n"] += n
    if state is None or state.codes.shape != codes8.shape:
        _STATE[wq] = _WeightState(codes8, scale)
        writer.add_scalar(f"quant_scale_drift/{tag}", 0.0, step)
        return
    flip = int(torch.count_nonzero(codes8 != state.codes)) / n
    writer.add_scalar(f"quant_flip_rate/{tag}", flip, step)
    writer.add_scalar(f"quant_scale_drift/{tag}", scale / state.first_scale - 1.0 if state.first_scale else 0.0, step)
    totals["flip"] += flip * n
    totals["n_flip"] += n
    state.codes = codes8


def reset_diagnostics(model: nn.Module) -> None:
    """Forget the kept codes and baselines and stop the clip counters (e.g. between two runs)."""
    model = _unwrap(model)
    handle = _WINDOWS.pop(model, None)
    if handle is not None:
        handle.remove()
    for m in model.modules():
        if isinstance(m, WeightFakeQuant):
            _STATE.pop(m, None)
        elif isinstance(m, ActFakeQuant):
            m.track_stats = False
            m.clipped.zero_()
            m.seen.zero_()
