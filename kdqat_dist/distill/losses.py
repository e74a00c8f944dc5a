"""Knowledge-distillation loss terms (docs/algorithms.md §2 and §4.5) as pure tensor functions.

Every function takes tensors and returns a 0-dim tensor. Nothing here knows about models, hooks or
devices: the result lives on the inputs' device. Half-precision inputs (float16/bfloat16) are upcast to
float32 before any arithmetic, because squares, logs and sums over ``S*S`` attention entries lose too
much precision (or overflow) in 16 bits; the result is then float32. float32 and float64 inputs are
computed in their own precision.

Gradients flow to both arguments; the teacher is expected to be run under ``torch.no_grad()`` by the
caller, so in practice only the student receives gradients.

Per-layer sums (``sum_l``) from the reference are left to the caller, which owns the layer mapping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "attention_map_kl",
    "attention_relation_kl",
    "attention_score_mse",
    "ground_truth_loss",
    "hidden_mse",
    "logits_mse",
    "mse",
    "soft_cross_entropy",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: the promoted floating dtype of the inputs, at least float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, name: str) -> None:
    # F.mse_loss would silently broadcast e.g. [B, 1] against [B] into [B, B]; refuse instead.
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Soft cross-entropy of the student's logits against the teacher's distribution (logit KD).

    ``mean_b sum_c -softmax(z_t / T)_c * log_softmax(z_s / T)_c``.

    This is the reference's form (A.7, ``pred_distill``), which uses T = 1. With T != 1 the result is
    *not* multiplied by T**2 (the Hinton et al. gradient-scale correction), so the loss weight has to
    absorb that if wanted. Note that KDLSQ-BERT (A.6) instead takes ``.mean()`` over batch x classes,
    i.e. this value divided by C.

    Args:
        student_logits: [B, C] student classifier logits.
        teacher_logits: [B, C] teacher classifier logits.
        temperature: softmax temperature T > 0 applied to both logits.

    Returns:
        0-dim tensor: the loss, averaged over the batch.

    Raises:
        ValueError: if the shapes differ or the temperature is not positive.
    """
    _check_same_shape(student_logits, teacher_logits, "soft_cross_entropy")
    if temperature <= 0:
        raise ValueError(f"soft_cross_entropy: temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(dtype) / temperature
    zt = teacher_logits.to(dtype) / temperature
    per_sample = -(F.softmax(zt, dim=-1) * F.log_softmax(zs, dim=-1)).sum(dim=-1)
    return per_sample.mean()


def mse(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Element-mean squared error between two tensors of the same shape, optionally weighted.

    Used for the attention-block output [B, S, D], the per-head context [B, H, S, d_h] and the
    self-attention output [B, S, D] taps (A.7 ``output_distill``, ``context_distill``,
    ``sa_output_distill``). By default all positions count, padding included, as in the reference; with
    ``weight`` from :func:`token_weights` only real tokens do.

    Args:
        student: [*] student tensor.
        teacher: [*] teacher tensor, same shape.
        weight: None, or a tensor broadcastable to the inputs (e.g. [B, S, 1]).

    Returns:
        0-dim tensor: ``mean(weight * (student - teacher) ** 2)`` (weight 1 when None).

    Raises:
        ValueError: if the shapes differ.
    """
    _check_same_shape(student, teacher, "mse")
    return _MeanSquaredError.apply(student, teacher, weight)


def token_weights(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-position weights that turn :func:`mse`'s mean over all positions into a mean over real tokens.

    ``w[b, s] = mask[b, s] · (B·S) / Σ mask``, so ``mean(w · diff²) = Σ_valid diff² / (n_valid · D)``.

    Args:
        attention_mask: [B, S], 1 for real tokens and 0 for padding.
        like: the tap the weights are for: [B, S, D], or [B, H, S, d_h] (per-head context).

    Returns:
        [B, S, 1] or [B, 1, S, 1] weights in ``like``'s compute dtype (float32 for bf16/fp16 taps).
    """
    m = (attention_mask != 0).to(device=like.device, dtype=_compute_dtype(like, like))
    w = m * (m.numel() / m.sum().clamp(min=1))
    return w[:, :, None] if like.dim() == 3 else w[:, None, :, None]


class _MeanSquaredError(torch.autograd.Function):
    """:func:`mse` with a hand-written backward, for memory.

    ``F.mse_loss`` keeps both of its inputs for the backward. The student tap of a KD term is often not
    kept by anything else (the next layer keeps its own quantized copy), and the teacher's tap would
    otherwise be freed as soon as the teacher's next layer has run; so the composed loss holds two
    [B, S, D] tensors per layer, or three with its forward buffer. The gradient needs only ``s - t``:
    this saves that one tensor.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        dtype = _compute_dtype(s, t)
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
    """d(grad · mean(w·diff²))/d(diff) = grad · 2/N · w · diff: the gradient of :func:`mse` for its first
    input (w = 1 when ``weight`` is None).

    With ``overwrite`` it is written over ``diff`` (same values), for a caller whose ``diff`` is its own.
    """
    scale = grad * (2.0 / max(diff.numel(), 1))
    if weight is None:
        return diff.mul_(scale) if overwrite else diff * scale
    return diff.mul_(weight).mul_(scale) if overwrite else diff * weight * scale


def logits_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Logit KD for regression tasks (STS-B): element-mean MSE between student and teacher outputs.

    Args:
        student: [B, C] student logits (C = 1 for regression).
        teacher: [B, C] teacher logits.

    Returns:
        0-dim tensor: the mean squared error over all B * C entries.

    Raises:
        ValueError: if the shapes differ.
    """
    _check_same_shape(student, teacher, "logits_mse")
    return mse(student, teacher)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden-state KD for one layer: element-mean MSE over every position, padding included.

    The reference (A.7 ``rep_distill``) does not mask padding here; neither do we by default, so that loss
    magnitudes match its hyperparameters. ``weight`` (:func:`token_weights`) makes it a mean over real
    tokens (``distill.mse_tokens=valid``).

    Args:
        student: [B, S, D] student hidden states (embedding output or a layer output).
        teacher: [B, S, D] teacher hidden states.
        weight: None or [B, S, 1] per-position weights.

    Returns:
        0-dim tensor: mean over B * S * D entries.

    Raises:
        ValueError: if the shapes differ.
    """
    _check_same_shape(student, teacher, "hidden_mse")
    return mse(student, teacher, weight)


def attention_score_mse(student: torch.Tensor, teacher: torch.Tensor, threshold: float = -100.0) -> torch.Tensor:
    """TernaryBERT's attention-score KD: MSE of ``QK^T/sqrt(d_h) + mask`` with masked entries zeroed.

    Each tensor is masked by its own values (``torch.where(x <= threshold, 0, x)``, as the reference
    does with -1e2), then the element-mean MSE is taken over all entries. The additive mask may be
    ``torch.finfo(float32).min`` (about -3.4e38) or -inf: those entries are zeroed *before* the
    subtraction, so no square overflows to inf and no inf - inf gives NaN.

    Args:
        student: [B, H, S, S] student attention scores (mask already added).
        teacher: [B, H, S, S] teacher attention scores.
        threshold: entries ``<= threshold`` are treated as masked and set to 0.

    Returns:
        0-dim tensor: mean over B * H * S * S entries.

    Raises:
        ValueError: if the shapes differ.
    """
    _check_same_shape(student, teacher, "attention_score_mse")
    dtype = _compute_dtype(student, teacher)
    s = student.to(dtype)
    t = teacher.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    s = torch.where(s <= threshold, zero, s)
    t = torch.where(t <= threshold, zero, t)
    return _MeanSquaredError.apply(s, t, None)


def attention_map_kl(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, attention_mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Attention-map KD: KL(teacher || student) of each valid query row, over valid keys (A.7).

    With ``valid`` the set of real tokens of sample b and ``s_b = |valid|``::

        KL_bh = (1 / s_b) * sum_{i in valid} sum_{j in valid} p_t[b,h,i,j] * (log p_t - log p_s)
        loss  = mean over (b, h) of KL_bh

    Both probabilities are clamped at ``eps`` first. The mask is applied to query rows and key
    columns, and it is taken as given (not as a length), so left and right padding both work. A
    sample with no real token has ``s_b = 0`` and contributes 0 (the divisor is clamped to 1), so an
    all-padding batch gives 0 rather than NaN. Masked entries are replaced before the log, so NaN or
    garbage there (e.g. softmax over an all ``-inf`` row) cannot leak into the loss or its gradient.

    Args:
        student_probs: [B, H, S, S] student attention probabilities (softmax over the last dim).
        teacher_probs: [B, H, S, S] teacher attention probabilities.
        attention_mask: [B, S], 1 (or True) for real tokens and 0 for padding.
        eps: lower clamp of the probabilities before the log.

    Returns:
        0-dim tensor: the loss for one layer.

    Raises:
        ValueError: if the shapes are inconsistent.
    """
    return _AttentionMapKL.apply(student_probs, teacher_probs, attention_mask, eps)


# Elements per block of heads in the KL's forward: bounds its two temporaries whatever B and S are, while
# each block stays one vectorised op over the whole batch.
_KL_BLOCK_ELEMENTS = 1 << 20


def attention_map_kl_value(
    ps: torch.Tensor, pt: torch.Tensor, attention_mask: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_map_kl`'s value and checks, without a graph, and what its gradient needs besides the
    maps. Runs over blocks of heads with two reused buffers: its working memory does not grow with B·H·S·S.

    Returns:
        (loss, pair, scale): the 0-dim loss, the [B, 1, S, S] valid (query, key) pairs and the [B] weights.
    """
    _check_same_shape(ps, pt, "attention_map_kl")
    if ps.dim() != 4 or ps.shape[-1] != ps.shape[-2]:
        raise ValueError(f"attention_map_kl: expected [B, H, S, S] probabilities, got {tuple(ps.shape)}")
    b, h, s = ps.shape[:3]
    if tuple(attention_mask.shape) != (b, s):
        raise ValueError(
            f"attention_map_kl: attention_mask must be [B, S] = {(b, s)}, got {tuple(attention_mask.shape)}"
        )
    valid = attention_mask.to(device=ps.device) != 0  # [B, S]
    dtype = _compute_dtype(ps, pt)
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
    """The gradients of ``grad`` · :func:`attention_map_kl` for the student's and the teacher's map (each
    only where ``needs`` asks), from :func:`attention_map_kl_value`'s ``pair`` and ``scale``."""
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


class _AttentionMapKL(torch.autograd.Function):
    """:func:`attention_map_kl` with a hand-written backward, for memory.

    Composed from autograd ops, the loss keeps two fresh [B, H, S, S] tensors per layer alive until the
    backward (the clamped student probabilities for ``log`` and the teacher's for ``mul``) and makes five
    more at its peak. Here it saves only its inputs: the student's probabilities are the softmax output
    that autograd keeps anyway, so the one extra tensor per layer is the teacher's map, the least the
    gradient ``-p_t / p_s`` needs.
    """

    @staticmethod
    def forward(ctx, ps: torch.Tensor, pt: torch.Tensor, attention_mask: torch.Tensor, eps: float) -> torch.Tensor:
        loss, pair, scale = attention_map_kl_value(ps, pt, attention_mask, eps)
        ctx.save_for_backward(ps, pair, scale, pt)
        ctx.eps = eps
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        ps, pair, scale, pt = ctx.saved_tensors
        return *attention_map_kl_grads(grad, ps, pt, pair, scale, ctx.eps, ctx.needs_input_grad[:2]), None, None


def attention_relation_kl(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """Attention-relation KD (MiniLM-v2, as BitDistill uses it) for one relation of one layer, e.g. Q-Q.

    Both hidden vectors are split into ``heads`` relation heads (independent of the attention heads) of
    sizes d_r = D/heads; per relation head r, over the real keys j of each sample::

        R[b, r, i, :] = softmax_j( X_r[b, i] · X_r[b, j] / sqrt(d_r) )           [B, heads, S, S]
        loss = 1 / (heads · n) · sum_{r} sum_{b, i: m_bi = 1} KL( R^t[b, r, i] || R^s[b, r, i] )

    with n the number of real tokens in the batch (one mean over heads and valid query tokens). The
    relation is S x S whatever the width, so teacher and student may differ in hidden size and head count;
    ``heads`` must divide both. Padded keys get probability 0 on both sides (they are masked before the
    softmax), padded query rows are left out, and a batch without real tokens gives 0.

    Args:
        student: [B, S, D_s] the student's Q, K or V, heads merged (the attention function's input).
        teacher: [B, S, D_t] the teacher's same projection.
        attention_mask: [B, S], 1 (or True) for real tokens and 0 for padding.
        heads: number of relation heads; divides D_s and D_t.

    Returns:
        0-dim tensor (float32 for half-precision inputs).

    Raises:
        ValueError: if batch or sequence shapes differ, or ``heads`` does not divide a hidden size.
    """
    if student.dim() != 3 or teacher.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"attention_relation_kl: expected [B, S, D] inputs with the same B and S, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    b, s, _ = student.shape
    if tuple(attention_mask.shape) != (b, s):
        raise ValueError(
            f"attention_relation_kl: attention_mask must be [B, S] = {(b, s)}, got {tuple(attention_mask.shape)}"
        )
    for name, x in (("student", student), ("teacher", teacher)):
        if heads < 1 or x.shape[-1] % heads:
            raise ValueError(
                f"attention_relation_kl: {heads} relation heads do not divide the {name}'s hidden "
                f"size {x.shape[-1]} (distill.attn_relation.relation_heads)"
            )
    dtype = _compute_dtype(student, teacher)
    valid = (attention_mask != 0).to(student.device)  # [B, S]
    keys = valid[:, None, None, :]  # [B, 1, 1, S]
    log_s = _relation_log_probs(student.to(dtype), heads, keys)
    log_t = _relation_log_probs(teacher.to(dtype), heads, keys)
    # p_t (log p_t - log p_s) on real keys; where() also keeps masked entries' gradients exactly 0
    kl = torch.where(keys, log_t.exp() * (log_t - log_s), torch.zeros((), dtype=dtype, device=student.device))
    per_row = kl.sum(dim=-1)  # [B, heads, S]
    rows = valid[:, None, :].to(dtype)
    return (per_row * rows).sum() / (rows.sum().clamp(min=1) * heads)


def _relation_log_probs(x: torch.Tensor, heads: int, keys: torch.Tensor) -> torch.Tensor:
    """log softmax(X_r X_rᵀ / sqrt(d_r)) over the real keys: [B, S, D] -> [B, heads, S, S]."""
    b, s, d = x.shape
    xr = x.reshape(b, s, heads, d // heads).transpose(1, 2)  # [B, heads, S, d_r]
    scores = torch.matmul(xr, xr.transpose(-1, -2)) * (d // heads) ** -0.5
    return F.log_softmax(scores.masked_fill(~keys, torch.finfo(scores.dtype).min), dim=-1)


def ground_truth_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Hard-label loss: cross-entropy for classification, MSE to the float labels for regression.

    Differences from the reference code's ``gt_loss``: it summed over the batch (``reduction='sum'``);
    we take the mean so that the loss weight does not depend on the batch size. For regression it
    compared against the *teacher's* logits, which looks like a bug; we use
    the labels, as KDLSQ-BERT does.

    Args:
        logits: [B, C] class logits, or [B, 1] (or [B]) predictions for regression.
        labels: [B] class indices (integer) for classification, float targets for regression.
            For classification, label -100 is ignored (PyTorch's default ``ignore_index``).
        regression: whether the task is regression.

    Returns:
        0-dim tensor: the mean loss over the batch.

    Raises:
        ValueError: if the shapes do not fit.
    """
    if regression:
        if logits.dim() == 2 and logits.shape[-1] != 1:
            raise ValueError(f"ground_truth_loss: regression needs [B, 1] or [B] logits, got {tuple(logits.shape)}")
        pred = logits.reshape(-1)
        if labels.dim() != 1 or pred.shape != labels.shape:
            raise ValueError(f"ground_truth_loss: logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
        dtype = _compute_dtype(pred, labels)
        return F.mse_loss(pred.to(dtype), labels.to(dtype), reduction="mean")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"ground_truth_loss: expected logits [B, C] and labels [B], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    dtype = _compute_dtype(logits)
    return F.cross_entropy(logits.to(dtype), labels.long(), reduction="mean")
