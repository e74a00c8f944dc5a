"""Hand-written autograd kernels of the KD losses, which keep little for the backward: the MSE and map KL of
:mod:`~kdqat_dist.distill.losses`, and the streaming objective's lean forms (an MSE gradient written over its
input, a map KL that keeps what rebuilds the teacher's map: :func:`attention_map_kl_recomputed`). Their
backwards use tensors saved without a graph: a second derivative raises instead of being silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: the promoted floating dtype of the inputs, at least float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def check_same_shape(student: torch.Tensor, teacher: torch.Tensor, name: str) -> None:
    # F.mse_loss would silently broadcast e.g. [B, 1] against [B] into [B, B]; refuse instead.
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")


class MeanSquaredError(torch.autograd.Function):
    """:func:`~kdqat_dist.distill.losses.mse` with a hand-written backward, for memory.

    ``F.mse_loss`` keeps both of its inputs for the backward. The student tap of a KD term is often not
    kept by anything else (the next layer keeps its own quantized copy), and the teacher's tap would
    otherwise be freed as soon as the teacher's next layer has run; so the composed loss holds two
    [B, S, D] tensors per layer, or three with its forward buffer. The gradient needs only ``s - t``:
    this saves that one tensor.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        dtype = compute_dtype(s, t)
        with torch.no_grad():
            diff = s.to(dtype) - t.to(dtype)
            loss = diff.square().mean() if weight is None else (diff.square() * weight).mean()
        ctx.save_for_backward(diff, weight)
        ctx.dtypes = (s.dtype, t.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        diff, weight = ctx.saved_tensors
        g = mse_grad(diff, grad, weight=weight)
        g_s = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        g_t = g.neg().to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return g_s, g_t, None


def mse_grad(
    diff: torch.Tensor, grad: torch.Tensor, overwrite: bool = False, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """d(grad · mean(w·diff²))/d(diff) = grad · 2/N · w · diff: the MSE's gradient for its first input (w = 1
    when ``weight`` is None).

    With ``overwrite`` it is written over ``diff`` (same values), for a caller whose ``diff`` is its own.
    """
    scale = grad * (2.0 / max(diff.numel(), 1))
    if weight is None:
        return diff.mul_(scale) if overwrite else diff * scale
    return diff.mul_(weight).mul_(scale) if overwrite else diff * weight * scale


# Elements per block of heads in the KL's forward: bounds its two temporaries whatever B and S are, while
# each block stays one vectorised op over the whole batch.
_KL_BLOCK_ELEMENTS = 1 << 20


def attention_map_kl_value(
    ps: torch.Tensor, pt: torch.Tensor, attention_mask: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The map KL's value (:func:`~kdqat_dist.distill.losses.attention_map_kl`) and checks, without a graph, and
    what its gradient needs besides the maps. Runs over blocks of heads with two reused buffers: its working
    memory does not grow with B·H·S·S.

    Returns:
        (loss, pair, scale): the 0-dim loss, the [B, 1, S, S] valid (query, key) pairs and the [B] weights.
    """
    check_same_shape(ps, pt, "attention_map_kl")
    if ps.dim() != 4 or ps.shape[-1] != ps.shape[-2]:
        raise ValueError(f"attention_map_kl: expected [B, H, S, S] probabilities, got {tuple(ps.shape)}")
    b, h, s = ps.shape[:3]
    if tuple(attention_mask.shape) != (b, s):
        raise ValueError(
            f"attention_map_kl: attention_mask must be [B, S] = {(b, s)}, got {tuple(attention_mask.shape)}"
        )
    valid = attention_mask.to(device=ps.device) != 0  # [B, S]
    dtype = compute_dtype(ps, pt)
    pair = valid[:, None, :, None] & valid[:, None, None, :]  # [B, 1, S, S]: valid query AND valid key
    scale = 1.0 / (valid.sum(dim=-1).clamp_min(1).to(dtype) * (b * h))  # [B]: mean over (b, h) of 1/s_b
    per_sample = torch.zeros(b, dtype=dtype, device=ps.device)
    step = max(1, _KL_BLOCK_ELEMENTS // max(1, b * s * s))
    with torch.no_grad():
        for h0 in range(0, h, step):
            ps_blk, pt_blk = ps[:, h0 : h0 + step], pt[:, h0 : h0 + step]
            pt_c = pt_blk.to(dtype).clamp_min(eps)
            kl = ps_blk.to(dtype).clamp_min(eps)
            torch.div(pt_c, kl, out=kl).log_().mul_(pt_c)  # p_t·log(p_t / p_s): one log instead of two
            del pt_c
            # masked_fill, not multiply: padded entries may hold NaN (softmax over an all -inf row)
            kl.masked_fill_(~pair, 0.0)
            per_sample += kl.sum(dim=(1, 2, 3))
            del kl
        return (per_sample * scale).sum(), pair, scale


def attention_map_kl_grads(
    grad: torch.Tensor,
    ps: torch.Tensor,
    pt: torch.Tensor,
    pair: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    needs: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``grad`` · the map KL for the student's and the teacher's map (each only where ``needs``
    asks), from :func:`attention_map_kl_value`'s ``pair`` and ``scale``."""
    dtype = scale.dtype
    w = (grad * scale)[:, None, None, None]  # [B, 1, 1, 1]
    g_s = g_t = None
    if needs[0]:
        # d/dps of -p_t log max(p_s, eps): -p_t / p_s where p_s >= eps (clamp_min passes ties), else 0
        g_s = pt.to(dtype).clamp_min(eps).div_(ps.to(dtype).clamp_min(eps)).mul_(-w)
        g_s.masked_fill_((ps >= eps).logical_and_(pair).logical_not_(), 0.0)
        g_s = g_s.to(ps.dtype)
    if needs[1]:
        # d/dpt of p_t (log p_t - log p_s): log p_t - log p_s + 1 where p_t >= eps
        g_t = pt.to(dtype).clamp_min(eps).log_().sub_(ps.to(dtype).clamp_min(eps).log_()).add_(1.0).mul_(w)
        g_t.masked_fill_((pt >= eps).logical_and_(pair).logical_not_(), 0.0)
        g_t = g_t.to(pt.dtype)
    return g_s, g_t


# (fn, tensors) with fn(*tensors) the teacher's map: what a map KL keeps for its backward instead of the map
Recompute = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor | None, ...]]


class AttentionMapKL(torch.autograd.Function):
    """:func:`~kdqat_dist.distill.losses.attention_map_kl` with a hand-written backward, for memory.

    Composed from autograd ops, the loss keeps two fresh [B, H, S, S] tensors per layer alive until the
    backward (the clamped student probabilities for ``log`` and the teacher's for ``mul``) and makes five
    more at its peak. Here it saves only its inputs: the student's probabilities are the softmax output
    that autograd keeps anyway, so the one extra tensor per layer is the teacher's map, the least the
    gradient ``-p_t / p_s`` needs; or, given ``recompute``, what rebuilds the map instead of it.
    """

    @staticmethod
    def forward(ctx, ps, pt, attention_mask, eps: float, recompute: Recompute | None) -> torch.Tensor:
        loss, pair, scale = attention_map_kl_value(ps, pt, attention_mask, eps)
        # Only tensors saved through save_for_backward are freed by the backward; anything else on ctx
        # lives as long as the graph's root (often a whole extra step), so the recompute inputs go there.
        ctx.recompute_fn, kept = recompute if recompute is not None else (None, (pt,))
        ctx.save_for_backward(ps, pair, scale, *kept)
        ctx.eps = eps
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        ps, pair, scale, *kept = ctx.saved_tensors
        pt = kept[0] if ctx.recompute_fn is None else ctx.recompute_fn(*kept)
        return *attention_map_kl_grads(grad, ps, pt, pair, scale, ctx.eps, ctx.needs_input_grad[:2]), None, None, None


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
    return AttentionMapKL.apply(student_probs, teacher_probs, attention_mask, eps, recompute)
