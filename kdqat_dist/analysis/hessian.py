"""Hessian maximum eigenvalues by power iteration on Hessian-vector products (ALGORITHMS.md D, Exp2).

The reference (PyHessian plus the how-do-vits-work recipe) takes, for each dev example on its own (batch
1, model in eval mode), the loss ``CE(logits, label) + 0.01·Σ_p ‖p‖₂`` (a non-squared L2 norm per
parameter tensor), and runs power iteration on H·v with up to 100 iterations and a relative tolerance of
1e-3. The dominant eigenvalue may be negative; the spectra of the positive and negative ones are plotted
separately. For a fake-quant student the second-order gradients go through the STE autograd Functions, as
in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EigenResult", "hessian_loss", "max_eigenvalue_spectrum", "power_iteration"]


@dataclass
class EigenResult:
    """``eigenvalues[n]`` is the n-th dominant eigenvalue found (by magnitude, with its sign)."""

    eigenvalues: list[float]
    iterations: list[int]
    converged: list[bool]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    n = torch.sqrt(_dot(v, v)).clamp_min(1e-12)
    return [x / n for x in v]


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
) -> EigenResult:
    """Dominant eigenvalues of the Hessian of ``loss`` w.r.t. ``params`` (PyHessian's ``eigenvalues``).

    Each eigenvalue is estimated by the Rayleigh quotient vᵀHv while v ← Hv/‖Hv‖, stopping once the
    relative change ``|λ_k − λ_{k−1}| / (|λ_{k−1}| + 1e-6)`` drops below ``tol``; the n-th eigenvector is
    kept orthogonal to the ones found before it (deflation).

    Args:
        loss: a scalar built from ``params`` with a graph (not yet backpropagated).
        params: the tensors to differentiate against; ones the loss does not depend on are dropped.
        top_n: how many eigenvalues to find.
        max_iter: iterations per eigenvalue.
        tol: relative tolerance.
        generator: seeds the random start vectors (CPU generator).

    Returns:
        :class:`EigenResult` with ``top_n`` entries, in order of discovery (by decreasing magnitude).
    """
    if top_n < 1 or max_iter < 1 or tol <= 0:
        raise ValueError(f"power_iteration: need top_n >= 1, max_iter >= 1 and tol > 0, "
                         f"got {top_n}, {max_iter}, {tol}")
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # Parameters the loss ignores, or on which its gradient is constant, have no Hessian block to iterate.
    keep = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None and g.requires_grad]
    if not keep:
        raise ValueError("power_iteration: the loss has no second-order dependence on the parameters")
    params, grads = [p for p, _ in keep], [g for _, g in keep]
    result = EigenResult([], [], [])
    basis: list[list[torch.Tensor]] = []
    for _ in range(top_n):
        v = _normalize([torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params])
        eig, it, done = None, 0, False
        for it in range(1, max_iter + 1):  # noqa: B007  (it is read after the loop)
            v = _orthogonalize(v, basis)
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
            new = float(_dot(hv, v))
            v = _normalize([h.detach() for h in hv])
            if eig is not None and abs(new - eig) / (abs(eig) + 1e-6) < tol:
                eig, done = new, True
                break
            eig = new
        basis.append(v)
        result.eigenvalues.append(float(eig))
        result.iterations.append(it)
        result.converged.append(done)
    return result


def hessian_loss(model: nn.Module, example: dict[str, torch.Tensor], norm_weight: float = 0.01,
                 regression: bool = False) -> torch.Tensor:
    """The reference's loss for one example: CE (MSE for regression) + ``norm_weight``·Σ_p ‖p‖₂.

    A parameter tensor that is exactly zero adds nothing: ‖p‖ is not differentiable at 0 (its Hessian
    would be NaN there), which happens with untrained zero-initialised biases.
    """
    inputs = {k: v for k, v in example.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = example["labels"]
    if regression:
        loss = F.mse_loss(logits.reshape(-1).float(), labels.reshape(-1).float())
    else:
        loss = F.cross_entropy(logits.float(), labels.reshape(-1).long())
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
) -> dict[str, np.ndarray]:
    """Power iteration on every example separately (batch 1, eval mode).

    Returns:
        ``eigenvalues`` [N, top_n] float, ``iterations`` [N, top_n] int, ``converged`` [N, top_n] bool.
    """
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)  # a frozen teacher still has a Hessian
    gen = torch.Generator().manual_seed(seed)
    eig, its, conv = [], [], []
    try:
        params = list(model.parameters())
        for ex in examples:
            with torch.enable_grad():
                r = power_iteration(hessian_loss(model, ex, norm_weight, regression), params, top_n,
                                    max_iter, tol, gen)
            eig.append(r.eigenvalues)
            its.append(r.iterations)
            conv.append(r.converged)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    shape = (len(examples), top_n)
    return {"eigenvalues": np.asarray(eig, dtype=np.float64).reshape(shape),
            "iterations": np.asarray(its, dtype=np.int64).reshape(shape),
            "converged": np.asarray(conv, dtype=bool).reshape(shape)}
