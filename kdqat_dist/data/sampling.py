"""Deterministic, resumable batch order shared by every rank (no torch.distributed here).

Each epoch is one seeded permutation of the training set cut into global batches (the remainder is
dropped so every step sees the same number of examples on every rank). A global batch is cut into
``world_size × grad_accum`` equal micro-batches; micro-batch ``(a, r)`` goes to rank ``r`` at
accumulation step ``a``. One process with ``grad_accum = k`` therefore sees exactly the micro-batches
that ``k`` ranks see, which is what makes single-process and sharded runs comparable.
"""

from __future__ import annotations

import torch


def steps_per_epoch(n: int, global_batch: int) -> int:
    return n // global_batch


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(
    n: int, global_batch: int, grad_accum: int, rank: int, world: int, seed: int, epoch: int, start_step: int = 0
):
    """Yield ``(step_in_epoch, [index lists for each accumulation step])`` for this rank."""
    per_micro = global_batch // (grad_accum * world)
    perm = epoch_permutation(n, seed, epoch)
    for step in range(start_step, steps_per_epoch(n, global_batch)):
        starts = [step * global_batch + (a * world + rank) * per_micro for a in range(grad_accum)]
        yield step, [perm[s : s + per_micro] for s in starts]
