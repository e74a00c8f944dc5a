"""Training-time quantization diagnostics for TensorBoard, written during ``kdqat train``.

The training loop (``Trainer``, switched off by ``train.diagnostics=false``) calls :func:`log_diagnostics`
at every log step and :func:`log_flip_rate` at every evaluation: per fake-quantized weight (every
``QuantLinear`` / ``QuantEmbedding``) its zero fraction, scale, scale drift and code flip rate, per
activation quantizer its clip rate (and learned LSQ step), and ``.../all`` summaries weighted by element
counts. :data:`DESCRIPTION` explains every tag; :func:`describe_diagnostics` writes it as a TensorBoard
text entry, so the tags are explained where they are read. Module names drop the model prefix;
Transformer layers read ``03.attention.self.query``. The clip value is ``clip`` (sym) or Q_P·step (LSQ);
the quantizer counts clipping itself (``ActFakeQuant.track_stats``) in the first forward after each call,
so the first rates appear at the second log step. The codes the flip rate compares with are kept as int8
on the CPU, not in checkpoints: after --resume the first rate compares with the codes at the resume.

Under ZeRO-3 a weight outside the forward is an empty partition (``numel() == 0``), under FSDP2 a shard. The
caller passes ``gather`` (the engine's per-module gather, a collective): then every rank calls these functions,
every rank gathers one quantized module at a time (memory stays at one module's weights), and the rank
with the writer computes and writes. Without ``gather`` empty partitions are skipped. This module does
not import an engine's library. It sits in ``engine/`` because the loop calls it.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdqat_dist.models.encoders import unwrap
from kdqat_dist.quant.fake_quant import ActFakeQuant, QuantEmbedding, QuantLinear, WeightFakeQuant

__all__ = [
    "DESCRIPTION",
    "describe_diagnostics",
    "log_diagnostics",
    "log_flip_rate",
    "reset_diagnostics",
    "short_name",
    "weight_codes",
]


DESCRIPTION = """\
Quantization diagnostics of `kdqat train` (kdqat_dist.engine.diagnostics; `train.diagnostics=false` turns
them off). `<module>` reads `03.attention.self.query`; `all` is the element-weighted mean over modules.

| tag | when | meaning |
|---|---|---|
| `quant_zero_frac/<module>` | log steps | fraction of the weight's codes that are 0 |
| `quant_scale/<module>` | log steps | quantization step (TWN α, LSQ step, ...; row mean) |
| `quant_scale_drift/<module>` | log steps | step / step at the first log step − 1 (of this process: \
after --resume, of the resumed run) |
| `quant_flip_rate/<module>` | evaluations | fraction of weight codes changed since the previous evaluation \
(the first: since the start of training) |
| `quant_clip_rate/<module>.input` | log steps | fraction of inputs beyond the clip value, in the first \
forward after the previous log step |
| `quant_act_step/<module>.input` | log steps | learned LSQ activation step |
| `kd_contribution/<term>/<layer>` | log steps | weight × that layer's KD term: what it adds to `train/loss`, \
mean over the steps and micro-batches since the previous log step and over ranks |
| `kd_contribution/<term>` | log steps | the same for the layer-free terms (logits, ground_truth); all \
contributions sum to `train/loss` |
"""

_FIRST_SCALE: weakref.WeakKeyDictionary[WeightFakeQuant, float] = weakref.WeakKeyDictionary()
# int8 codes (CPU) at the previous evaluation, for the flip rate
_EVAL_CODES: weakref.WeakKeyDictionary[WeightFakeQuant, torch.Tensor] = weakref.WeakKeyDictionary()
_WINDOWS: weakref.WeakKeyDictionary[nn.Module, RemovableHandle] = weakref.WeakKeyDictionary()


def short_name(name: str, prefix: str = "") -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``03.attention.self.query``; drops ``prefix.``."""
    m = re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.(.*)$", name)
    if m:
        return f"{int(m.group(1)):02d}.{m.group(2)}"
    if prefix and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


@torch.no_grad()
def weight_codes(wq: WeightFakeQuant, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes of the quantized weight, step broadcastable to them), both float32.

    The quantizer's own codes (:meth:`~kdqat_dist.quant.quantizers.Quantizer.codes`); the step is the
    distance between its levels: TWN's α (codes in {-1, 0, 1}), the LSQ step, the max-abs step 1/s, the
    mean-clip step, twice the scale of 2-bit SEQ's odd codes. An all-zero row or tensor (α = 0) gets step 1,
    so that scales and drifts stay finite.
    """
    # The quantizer, not the module: a ZeRO-3 engine hooks every submodule call to fetch its parameters (a
    # collective the other ranks would not join); the caller has made them whole already.
    q = wq.quantizer
    codes, scale = q.codes(weight, getattr(wq, "step", None))
    step = scale.float() * q.code_stride  # the public form: x̂ = codes · scale
    return codes.float(), torch.where(torch.isfinite(step) & (step > 0), step, torch.ones_like(step))


def _quant_modules(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_quant is not None and m.weight_quant.enabled:
            yield name, m


def _close_clip_window(model: nn.Module) -> None:
    handle = _WINDOWS.pop(model, None)
    if handle is not None:
        handle.remove()


def _open_clip_window(model: nn.Module, acts: list[ActFakeQuant], forwards: int | None) -> None:
    """Count clipping during the next ``forwards`` forward passes of ``model`` (None: until the next call)."""
    _close_clip_window(model)
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
            _close_clip_window(model)

    _WINDOWS[model] = model.register_forward_hook(close)


def describe_diagnostics(writer) -> None:
    """Write :data:`DESCRIPTION` as a TensorBoard text entry (the Text tab explains every tag)."""
    if writer is not None:
        writer.add_text("diagnostics/README", DESCRIPTION, 0)


def _gathered(gather, m: nn.Module) -> AbstractContextManager:
    return gather(list(m.parameters())) if gather is not None else nullcontext()


def _usable(m: nn.Module) -> bool:
    wq = m.weight_quant
    # an empty tensor is a ZeRO-3 partition nobody gathered: nothing to look at on this rank
    return m.weight.numel() > 0 and not (hasattr(wq, "step") and wq.step.numel() == 0)


@torch.no_grad()
def log_diagnostics(
    writer,
    step: int,
    model: nn.Module,
    clip_forwards: int | None = 1,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
) -> None:
    """Write the log-step quantization diagnostics of ``model`` at ``step`` to a TensorBoard ``SummaryWriter``.

    Cheap enough for every log step: one re-quantization of each weight on its device (as a forward does;
    the word embedding table is quantized whole here, most of the cost, where the forward quantizes only
    the rows it looks up), and clip counting during ``clip_forwards`` forward passes after each call (the
    first micro-batch; None counts every forward until the next call, which costs one extra pass over every
    quantized activation at every step). The flip rate is :func:`log_flip_rate`'s, at evaluations.
    ``gather(params)``: a context manager making ``params`` whole on every rank (ZeRO-3); with it every
    rank must call this function. Without it, does nothing when ``writer`` is None (non-main ranks).
    """
    if writer is None and gather is None:
        return
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    totals = {"zero": 0.0, "n": 0, "clipped": 0.0, "seen": 0.0}
    for name, m in _quant_modules(model):
        with _gathered(gather, m):
            if writer is not None and _usable(m):
                _log_weight(writer, step, short_name(name, prefix), m, totals)
    acts = [(name, q) for name, q in model.named_modules() if isinstance(q, ActFakeQuant) and q.enabled]
    for name, q in acts:
        tag = short_name(name, prefix).replace(".act_quant", ".input")
        if q.quantizer.learned:  # the step is a parameter: a partition under ZeRO-3 unless gathered
            with _gathered(gather, q):
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
    if totals["seen"]:
        writer.add_scalar("quant_clip_rate/all", totals["clipped"] / totals["seen"], step)


def _log_weight(writer, step: int, tag: str, m: nn.Module, totals: dict) -> None:
    codes, scale_t = weight_codes(m.weight_quant, m.weight)
    n = codes.numel()
    zeros = int(torch.count_nonzero(codes == 0))  # counted on the weight's device: no copy
    scale = float(scale_t.mean())
    first = _FIRST_SCALE.setdefault(m.weight_quant, scale)
    writer.add_scalar(f"quant_zero_frac/{tag}", zeros / n, step)
    writer.add_scalar(f"quant_scale/{tag}", scale, step)
    writer.add_scalar(f"quant_scale_drift/{tag}", scale / first - 1.0 if first else 0.0, step)
    totals["zero"] += zeros
    totals["n"] += n


@torch.no_grad()
def log_flip_rate(
    writer,
    step: int | None,
    model: nn.Module,
    gather: Callable[[list[nn.Parameter]], AbstractContextManager] | None = None,
) -> None:
    """Write ``quant_flip_rate``: per quantized weight, the fraction of its integer codes that changed since
    the previous call, and keep the current codes for the next one.

    The training loop calls it once before its first step (``step=None``: only keep the codes, write
    nothing) and at every evaluation, so the rate is the fraction of codes flipped between evaluations.
    Cost per call: one re-quantization of each weight and an int8 copy on the CPU (one byte per weight).
    ``gather``/``writer`` as in :func:`log_diagnostics`: the rank with the writer computes and writes.
    """
    if writer is None and gather is None:
        return
    model = unwrap(model)
    prefix = getattr(model, "base_model_prefix", "")
    flipped, total = 0, 0
    for name, m in _quant_modules(model):
        with _gathered(gather, m):
            if writer is None or not _usable(m):
                continue
            codes, _ = weight_codes(m.weight_quant, m.weight)
            codes8 = codes.clamp_(-128, 127).to(torch.int8).cpu()
            prev = _EVAL_CODES.get(m.weight_quant)
            _EVAL_CODES[m.weight_quant] = codes8
            if step is None or prev is None or prev.shape != codes8.shape:
                continue
            k = int(torch.count_nonzero(codes8 != prev))
            writer.add_scalar(f"quant_flip_rate/{short_name(name, prefix)}", k / codes8.numel(), step)
            flipped += k
            total += codes8.numel()
    if writer is not None and total:
        writer.add_scalar("quant_flip_rate/all", flipped / total, step)


def reset_diagnostics(model: nn.Module) -> None:
    """Forget the kept codes and scale baselines and stop the clip counters (e.g. between two runs)."""
    model = unwrap(model)
    _close_clip_window(model)
    for m in model.modules():
        if isinstance(m, WeightFakeQuant):
            _FIRST_SCALE.pop(m, None)
            _EVAL_CODES.pop(m, None)
        elif isinstance(m, ActFakeQuant):
            m.track_stats = False
            m.clipped.zero_()
            m.seen.zero_()
