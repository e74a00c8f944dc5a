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

from kdqat_dist.distill.kernels import AttentionMapKL, MeanSquaredError, check_same_shape, compute_dtype

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
    check_same_shape(student_logits, teacher_logits, "soft_cross_entropy")
    if temperature <= 0:
        raise ValueError(f"soft_cross_entropy: temperature must be > 0, got {temperature}")
    dtype = compute_dtype(student_logits, teacher_logits)
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
    check_same_shape(student, teacher, "mse")
    return MeanSquaredError.apply(student, teacher, weight)


def token_weights(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-position weights that turn :func:`mse`'s mean over all positions into a mean over real tokens.

    ``w[b, s] = mask[b, s] · (B·S) / Σ mask``, so ``mean(w · diff²) = Σ_valid diff² / (n_valid · D)``.

    Args:
        attention_mask: [B, S], 1 for real tokens and 0 for padding.
        like: the tap the weights are for: [B, S, D], or [B, H, S, d_h] (per-head context).

    Returns:
        [B, S, 1] or [B, 1, S, 1] weights in ``like``'s compute dtype (float32 for bf16/fp16 taps).
    """
    m = (attention_mask != 0).to(device=like.device, dtype=compute_dtype(like, like))
    w = m * (m.numel() / m.sum().clamp(min=1))
    return w[:, :, None] if like.dim() == 3 else w[:, None, :, None]


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
    check_same_shape(student, teacher, "logits_mse")
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
    check_same_shape(student, teacher, "hidden_mse")
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
    check_same_shape(student, teacher, "attention_score_mse")
    dtype = compute_dtype(student, teacher)
    s = student.to(dtype)
    t = teacher.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    s = torch.where(s <= threshold, zero, s)
    t = torch.where(t <= threshold, zero, t)
    return MeanSquaredError.apply(s, t, None)


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
    return AttentionMapKL.apply(student_probs, teacher_probs, attention_mask, eps, None)


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
    dtype = compute_dtype(student, teacher)
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
        dtype = compute_dtype(pred, labels)
        return F.mse_loss(pred.to(dtype), labels.to(dtype), reduction="mean")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"ground_truth_loss: expected logits [B, C] and labels [B], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    dtype = compute_dtype(logits)
    return F.cross_entropy(logits.to(dtype), labels.long(), reduction="mean")
