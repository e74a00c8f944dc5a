"""Attention-map distances between a teacher and a student, per head (Kim et al. 2022, Exp. 1).

Every function takes the attention probabilities of **one sample already sliced to its true length**
(student ``p_s`` and teacher ``p_t``, each ``[H, S, S]``: head, query, key) and returns one number per
head (``[H]``). Batching over samples is the caller's business, so padding can never leak into a statistic.

- :func:`head_kl`: KL(teacher ‖ student) of each query row, averaged over rows: the attention-map KD
  loss of training (:func:`kdqat_dist.distill.losses.attention_map_kl`), here kept per head.
- :func:`ranking_loss`: the pairwise ranking loss of Liu et al. (2021, PTQ for ViT) as used by the
  reference notebook.
- :func:`cover_length_ratio`: how deep into the student's ordering of keys one must go to cover the
  teacher's top-k keys, as a fraction of the sequence length.
"""

from __future__ import annotations

import torch

from kdqat_dist.distill.losses import attention_map_kl

__all__ = ["cover_length_ratio", "head_kl", "ranking_loss"]


def _check(p_s: torch.Tensor, p_t: torch.Tensor, name: str) -> None:
    if p_s.shape != p_t.shape or p_s.dim() != 3 or p_s.shape[-1] != p_s.shape[-2]:
        raise ValueError(
            f"{name}: expected two [H, S, S] probability tensors of one sample, "
            f"got {tuple(p_s.shape)} and {tuple(p_t.shape)}"
        )


def head_kl(p_s: torch.Tensor, p_t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(teacher ‖ student) per head, averaged over the query rows.

    ``KL_h = (1/S) Σ_i Σ_j p_t[h,i,j] (log p_t[h,i,j] − log p_s[h,i,j])``, with both clamped at ``eps``:
    exactly the training loss of one layer (A.7) before its mean over heads.

    Args:
        eps: lower clamp before the log.

    Returns:
        [H] float64 tensor; 0 where the two maps are equal.
    """
    _check(p_s, p_t, "head_kl")
    mask = torch.ones(1, p_s.shape[-1], dtype=torch.long, device=p_s.device)
    s, t = p_s.double(), p_t.double()
    return torch.stack([attention_map_kl(s[h][None, None], t[h][None, None], mask, eps) for h in range(p_s.shape[0])])


def ranking_loss(p_s: torch.Tensor, p_t: torch.Tensor, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Pairwise ranking loss per head, averaged over the query rows.

    For each query row i and each unordered pair of keys (j, k):
    ``max(0, −(p_s[i,j] − p_s[i,k]) · sign(p_t[i,j] − p_t[i,k]))``, i.e. the amount by which the student
    orders the pair against the teacher. Pairs are summed per row (each unordered pair once), and the row
    sums are averaged over the S query rows. (A sum over ordered pairs, as "Σ over key pairs" can also be
    read, is exactly twice this.)

    Args:
        chunk_elems: bound on the size of the [H, rows, S, S] intermediate (memory is O(H·S³) otherwise).

    Returns:
        [H] float64 tensor; 0 when the student orders every pair as the teacher does.
    """
    _check(p_s, p_t, "ranking_loss")
    h, s, _ = p_s.shape
    rows = max(1, chunk_elems // max(1, h * s * s))
    total = torch.zeros(h, dtype=torch.float64, device=p_s.device)
    for i in range(0, s, rows):
        ps, pt = p_s[:, i : i + rows].double(), p_t[:, i : i + rows].double()
        ds = ps[..., :, None] - ps[..., None, :]  # [H, r, S, S]
        st = torch.sign(pt[..., :, None] - pt[..., None, :])
        # Ordered pairs (j, k) and (k, j) give the same term and the diagonal gives 0: halve the sum.
        total += torch.relu(-ds * st).sum(dim=(1, 2, 3)) / 2
    return total / s


def cover_length_ratio(p_s: torch.Tensor, p_t: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Top-k cover length ratio per head, averaged over the query rows.

    For each query row: take the teacher's top-k keys, find the deepest position (1-based) any of them
    reaches in the student's descending ordering of keys, and divide by S. Ties are broken by key index
    in both orderings (stable sorts), so identical maps give exactly ``min(k, S)/S``, the smallest value
    possible; 1 means the student ranks one of the teacher's top keys last.

    Args:
        k: how many of the teacher's top keys must be covered (clamped to S).

    Returns:
        [H] float64 tensor in [min(k, S)/S, 1].
    """
    _check(p_s, p_t, "cover_length_ratio")
    if k < 1:
        raise ValueError(f"cover_length_ratio: k must be >= 1, got {k}")
    s = p_s.shape[-1]
    k = min(k, s)
    top_t = torch.sort(p_t, dim=-1, descending=True, stable=True).indices[..., :k]  # [H, S, k]
    order_s = torch.sort(p_s, dim=-1, descending=True, stable=True).indices  # [H, S, S]
    # position of each key in the student's ordering (inverse permutation)
    pos_s = torch.empty_like(order_s)
    pos_s.scatter_(-1, order_s, torch.arange(s, device=p_s.device).expand_as(order_s))
    cover = pos_s.gather(-1, top_t).amax(dim=-1) + 1  # [H, S] 1-based depth
    return (cover.double() / s).mean(dim=-1)
