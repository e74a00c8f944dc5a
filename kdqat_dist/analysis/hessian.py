"""Hessian maximum eigenvalues by power iteration on Hessian-vector products (Kim et al. 2022, Exp. 2).

The reference (PyHessian plus the how-do-vits-work recipe) takes, for each dev example on its own (batch
1, model in eval mode), the loss ``CE(logits, label) + 0.01·Σ_p ‖p‖₂`` (a non-squared L2 norm per
parameter tensor), and runs power iteration on H·v with up to 100 iterations and a relative tolerance of
1e-3. The dominant eigenvalue may be negative; the spectra of the positive and negative ones are plotted
separately. For a fake-quant student the second-order gradients go through the STE autograd Functions, as
in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kdqat_dist.data.heads.base import LABEL_KEYS, TaskHead
from kdqat_dist.data.heads.token import IGNORE_INDEX

__all__ = [
    "EigenResult",
    "has_labelled_rows",
    "hessian_loss",
    "max_eigenvalue_spectrum",
    "norm_penalty_hvp",
    "norm_penalty_max_eigenvalue",
    "power_iteration",
]


@dataclass
class EigenResult:
    """``eigenvalues[n]`` is the n-th dominant eigenvalue found (by magnitude, with its sign)."""

    eigenvalues: list[float]
    iterations: list[int]
    converged: list[bool]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True))


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    inv = 1.0 / max(float(_dot(v, v)) ** 0.5, 1e-12)
    return [x * inv for x in v]


def _orthogonalize(v: list[torch.Tensor], basis: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    for u in basis:
        c = _dot(v, u)
        v = [x - c * y for x, y in zip(v, u, strict=True)]
    return _normalize(v)


def power_iteration(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    top_n: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    extra_hvp: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> EigenResult:
    """Dominant eigenvalues of the Hessian of ``loss`` w.r.t. ``params`` (PyHessian's ``eigenvalues``).

    Each eigenvalue is estimated by the Rayleigh quotient vᵀHv while v ← Hv/‖Hv‖, stopping once the
    relative change ``|λ_k − λ_{k−1}| / (|λ_{k−1}| + 1e-6)`` drops below ``tol``; the n-th eigenvector is
    kept orthogonal to the ones found before it (deflation).

    Args:
        loss: a scalar built from ``params`` with a graph (not yet backpropagated).
        params: the tensors to differentiate against. Without ``extra_hvp``, ones on which the loss has
            no second-order dependence are dropped.
        top_n: how many eigenvalues to find.
        max_iter: iterations per eigenvalue.
        generator: seeds the random start vectors (CPU generator).
        extra_hvp: the Hessian-vector product of a term left out of ``loss`` and known in closed form,
            ``(params, v) -> H_extra·v`` (lists aligned with the parameters kept), added to autograd's.

    Returns:
        :class:`EigenResult` with ``top_n`` entries, in order of discovery (by decreasing magnitude).
    """
    if top_n < 1 or max_iter < 1 or tol <= 0:
        raise ValueError(f"power_iteration: need top_n >= 1, max_iter >= 1 and tol > 0, got {top_n}, {max_iter}, {tol}")
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # Only gradients that still depend on the parameters have a Hessian block autograd can give.
    active = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if extra_hvp is None:
        params, grads = [params[i] for i in active], [grads[i] for i in active]
        active = list(range(len(params)))
    if not params:
        raise ValueError("power_iteration: the loss has no second-order dependence on the parameters")

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(params)
        if active:
            hv = torch.autograd.grad(
                [grads[i] for i in active],
                [params[i] for i in active],
                grad_outputs=[v[i] for i in active],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for i, h in zip(active, hv, strict=True):
                out[i] = h.detach()
        if extra_hvp is not None:
            for i, h in enumerate(extra_hvp(params, v)):
                out[i] = h if out[i] is None else out[i].add_(h)
        return [torch.zeros_like(x) if h is None else h for x, h in zip(v, out, strict=True)]

    result = EigenResult([], [], [])
    basis: list[list[torch.Tensor]] = []
    for _ in range(top_n):
        v = _normalize([torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params])
        eig, iters, done = None, 0, False
        while iters < max_iter and not done:
            iters += 1
            v = _orthogonalize(v, basis)
            hv = hvp(v)
            new = float(_dot(hv, v))
            v = _normalize(hv)
            done = eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol
            eig = new
        basis.append(v)
        result.eigenvalues.append(float(eig))
        result.iterations.append(iters)
        result.converged.append(done)
    return result


def norm_penalty_max_eigenvalue(params: Sequence[torch.Tensor], weight: float) -> float:
    """λ_max of the Hessian of ``weight·Σ_p ‖p‖₂`` alone: ``weight / min ‖p‖``.

    Each tensor's block is ``weight·(I − uuᵀ)/‖p‖``, whose eigenvalues are ``weight/‖p‖`` (on the
    directions orthogonal to p) and 0, so the largest comes from the smallest-norm tensor with more than
    one element. It does not depend on the data: when an example's λ_max equals it, the loss term's own
    curvature is below it (typical of a confident model, whose CE Hessian nearly vanishes) and the figure
    shows the smallest parameter norm, not the data. 0 when ``weight`` is 0.
    """
    norms = [float(p.detach().norm()) for p in params if p.numel() > 1]
    norms = [n for n in norms if n > 0]
    return weight / min(norms) if weight and norms else 0.0


def norm_penalty_hvp(params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], weight: float) -> list[torch.Tensor]:
    """H·v of ``weight·Σ_p ‖p‖₂`` in closed form: ``weight·(v − u(u·v))/‖p‖`` per tensor, u = p/‖p‖.

    Autograd's double backward through the norms costs several passes over every parameter per product
    (most of the time on a real model); this is three. A zero tensor contributes 0 (see :func:`hessian_loss`).
    """
    out = []
    for p, x in zip(params, v, strict=True):
        w = p.detach()
        n2 = float(torch.vdot(w.reshape(-1), w.reshape(-1)))
        if n2 == 0.0 or weight == 0.0:
            out.append(torch.zeros_like(x))
            continue
        c = float(torch.vdot(w.reshape(-1), x.reshape(-1))) / n2  # u(u·v) = p (p·v)/‖p‖²
        out.append(torch.add(x, w, alpha=-c).mul_(weight / n2**0.5))
    return out


def has_labelled_rows(example: dict[str, torch.Tensor], head: TaskHead | None) -> bool:
    """Whether ``head``'s loss counts a row of ``example``: False for a token example whose labels are all
    ``-100`` (no word starts inside it, e.g. a window of special tokens); True without a head."""
    return head is None or all(bool((example[k] != IGNORE_INDEX).any()) for k in head.label_keys if k in example)


def hessian_loss(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    norm_weight: float = 0.01,
    regression: bool = False,
    head: TaskHead | None = None,
) -> torch.Tensor:
    """The reference's loss for one example: CE (MSE for regression) + ``norm_weight``·Σ_p ‖p‖₂.

    ``head`` (a token or QA task head): the CE is the head's, over the valid rows of
    :meth:`~kdqat_dist.data.heads.base.TaskHead.outputs` (token: the labelled first sub-tokens; QA: the
    start and the end position, averaged); None: one label per example, as for sentence tasks.

    An example without a labelled row (:func:`has_labelled_rows`) has a CE of 0, not the NaN of a mean over no
    rows; it stays on the logits' graph, so its Hessian is 0 rather than an autograd error.

    A parameter tensor that is exactly zero adds nothing: ‖p‖ is not differentiable at 0 (its Hessian
    would be NaN there), which happens with untrained zero-initialised biases.
    """
    out = model(**{k: v for k, v in example.items() if k not in LABEL_KEYS})
    if head is not None:
        view = head.outputs(out, example)
        if view.labels is None:
            raise ValueError(f"hessian_loss: the example has none of the label keys {head.label_keys}")
        logits, labels = view.rows(view.logits).float(), view.rows(view.labels).long()
        loss = F.cross_entropy(logits, labels) if len(labels) else logits.sum() * 0.0
    elif regression:
        loss = F.mse_loss(out.logits.reshape(-1).float(), example["labels"].reshape(-1).float())
    else:
        loss = F.cross_entropy(out.logits.float(), example["labels"].reshape(-1).long())
    if norm_weight:
        norms = [p.norm() for p in model.parameters() if p.requires_grad and bool(p.detach().any())]
        if norms:
            loss = loss + norm_weight * torch.stack(norms).sum()
    return loss


def max_eigenvalue_spectrum(
    model: nn.Module,
    examples: Sequence[dict[str, torch.Tensor]],
    top_n: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    norm_weight: float = 0.01,
    regression: bool = False,
    seed: int = 0,
    progress: str | None = None,
    head: TaskHead | None = None,
) -> dict[str, np.ndarray]:
    """Power iteration on every example separately (batch 1, eval mode).

    ``progress``, when given, is the label of a progress bar (stderr); ``head``: see :func:`hessian_loss`.
    Examples without a labelled row (:func:`has_labelled_rows`) are left out: their loss is 0, so their
    eigenvalue would be the norm term's alone (or 0), not a curvature of the data.

    Returns:
        For the N examples kept: ``eigenvalues`` [N, top_n] float, ``iterations`` [N, top_n] int,
        ``converged`` [N, top_n] bool,
        ``norm_term_eigenvalue`` (0-dim): λ_max of the norm term alone (:func:`norm_penalty_max_eigenvalue`).
    """
    examples = [ex for ex in examples if has_labelled_rows(ex, head)]
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)  # a frozen teacher still has a Hessian
    gen = torch.Generator().manual_seed(seed)
    # The norm term's Hessian is added in closed form: same result, several times faster.
    penalty = partial(norm_penalty_hvp, weight=norm_weight) if norm_weight else None
    runs: list[EigenResult] = []
    try:
        for ex in tqdm(examples, desc=progress, disable=progress is None, leave=False):
            with torch.enable_grad():
                loss = hessian_loss(model, ex, 0.0, regression, head)
                runs.append(power_iteration(loss, params, top_n, max_iter, tol, gen, extra_hvp=penalty))
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    shape = (len(examples), top_n)
    return {
        "norm_term_eigenvalue": np.float64(norm_penalty_max_eigenvalue(params, norm_weight)),
        "eigenvalues": np.asarray([r.eigenvalues for r in runs], dtype=np.float64).reshape(shape),
        "iterations": np.asarray([r.iterations for r in runs], dtype=np.int64).reshape(shape),
        "converged": np.asarray([r.converged for r in runs], dtype=bool).reshape(shape),
    }
