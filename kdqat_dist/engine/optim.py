"""Optimizers, their parameter groups and the learning-rate schedules (docs/algorithms.md §3).

``train.optimizer``: ``adamw`` (torch AdamW, one global gradient-norm clip, linear warmup/decay) or
``bertadam`` (the reference code's BertAdam: no bias correction, each parameter tensor's gradient
clipped on its own, and its warmup_linear schedule).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdqat_dist.config import TrainConfig
from kdqat_dist.quant.api import quant_param_names

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias")
# KDLSQ-BERT's weight decay for learned clip values / steps.
QUANT_WEIGHT_WD = 2e-5
QUANT_ACT_WD = 1e-4


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Groups: decayed weights, no decay for bias/LayerNorm, and LSQ steps at their own rates.

    ``train.quant_weight_lr`` / ``train.quant_act_lr`` are the rates of a quantizer's *clip* (KDLSQ-BERT
    learns the clip value α); we learn the step s = α / Q_P, and Adam moves a parameter by about its rate
    per update whatever its scale, so each step gets the rate / Q_P (one group per kind and Q_P) and its
    clip moves at KDLSQ's rate. (Ternary weights have Q_P = 1: step and clip are the same.)
    """
    w_levels, a_levels = quant_param_names(model)
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "decay"},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"},
    }
    for kind, levels, lr, wd in (
        ("quant_weight", w_levels, cfg.quant_weight_lr, QUANT_WEIGHT_WD),
        ("quant_act", a_levels, cfg.quant_act_lr, QUANT_ACT_WD),
    ):
        for qp in sorted(set(levels.values())):
            groups[f"{kind}_q{qp}"] = {"params": [], "weight_decay": wd, "lr": lr / qp, "name": f"{kind}_q{qp}"}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in w_levels:
            groups[f"quant_weight_q{w_levels[name]}"]["params"].append(p)
        elif name in a_levels:
            groups[f"quant_act_q{a_levels[name]}"]["params"].append(p)
        elif any(k in name for k in NO_DECAY):
            groups["no_decay"]["params"].append(p)
        else:
            groups["decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


BETAS = (0.9, 0.999)


class BertAdam(torch.optim.Optimizer):
    """The BertAdam of the reference code (TernaryBERT's ``transformer/optimization.py``), step for step.

    For each parameter tensor with gradient g (after the backward, averaged over the batch):

        g ← g · min(1, c / (‖g‖₂ + 1e-6))        per-tensor clipping (c = max_grad_norm; 0 skips it)
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
        p ← p − lr · (m / (√v + ε) + λ·p)

    There is no bias correction: early updates are up to 1/√(1 − β2^t)·(1 − β1^t) times Adam's (about 3x
    at step 100 with β2 = 0.999), which is what the reference's short QAT runs are tuned for. ``lr`` is the
    group's current rate (the scheduler sets it, :func:`bert_warmup_linear` for the reference's schedule).
    ``max_grad_norm=0`` leaves clipping to the caller: under ZeRO the optimizer sees flat partitions, not
    tensors, so the DeepSpeed backend clips each whole gradient before the step.
    """

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = BETAS,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
    ):
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["max_grad_norm"] > 0:
                    clip_each_(g, group["max_grad_norm"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                state["step"] += 1
        return loss


def clip_each_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale one tensor's gradient in place to L2 norm at most ``max_norm`` (torch's clip_grad_norm_ on
    that tensor alone: coefficient max_norm / (norm + 1e-6), capped at 1)."""
    norm = torch.linalg.vector_norm(grad.float())
    return grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))


def make_optimizer(model: nn.Module, cfg: TrainConfig, clip_each: bool = True) -> torch.optim.Optimizer:
    """``train.optimizer`` over :func:`param_groups`. ``clip_each=False``: a BertAdam that leaves its
    per-tensor clipping to the caller (ZeRO partitions)."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "bertadam":
        return BertAdam(
            groups, lr=cfg.lr, eps=cfg.adam_eps, betas=BETAS, max_grad_norm=cfg.max_grad_norm if clip_each else 0.0
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.adam_eps, betas=BETAS)


def global_clip(cfg: TrainConfig) -> float:
    """The global gradient-norm clip the engine applies (0: none; BertAdam clips each tensor instead)."""
    return 0.0 if cfg.optimizer == "bertadam" else cfg.max_grad_norm


def bert_warmup_linear(total_steps: int, warmup_ratio: float):
    """Multiplier of the reference's ``warmup_linear`` at optimizer step ``step`` (0-based), progress
    x = step / total_steps: x / warmup during warmup (0 at the first step), then (1 − x) / (1 − warmup)."""

    def fn(step: int) -> float:
        x = step / total_steps
        if x < warmup_ratio:
            return x / warmup_ratio
        return max(0.0, (1.0 - x) / (1.0 - warmup_ratio))

    return fn


def linear_warmup_decay(total_steps: int, warmup_ratio: float):
    """Multiplier: linear warmup over the first ``warmup_ratio`` of steps, then linear decay to 0."""
    warmup = int(math.floor(total_steps * warmup_ratio))

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return fn


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig):
    """The schedule that goes with ``train.optimizer``: the reference's warmup_linear for BertAdam."""
    fn = bert_warmup_linear if cfg.optimizer == "bertadam" else linear_warmup_decay
    return torch.optim.lr_scheduler.LambdaLR(opt, fn(total_steps, cfg.warmup_ratio))
