"""Optimizer parameter groups and the learning-rate schedule (ALGORITHMS.md B.1, A.6)."""

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
    """AdamW groups: decayed weights, no decay for bias/LayerNorm, and LSQ steps at their own rates."""
    w_steps, a_steps = quant_param_names(model)
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": cfg.weight_decay, "lr": cfg.lr, "name": "decay"},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": cfg.lr, "name": "no_decay"},
        "quant_weight": {"params": [], "weight_decay": QUANT_WEIGHT_WD, "lr": cfg.quant_weight_lr,
                         "name": "quant_weight"},
        "quant_act": {"params": [], "weight_decay": QUANT_ACT_WD, "lr": cfg.quant_act_lr, "name": "quant_act"},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in w_steps:
            groups["quant_weight"]["params"].append(p)
        elif name in a_steps:
            groups["quant_act"]["params"].append(p)
        elif any(k in name for k in NO_DECAY):
            groups["no_decay"]["params"].append(p)
        else:
            groups["decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, eps=cfg.adam_eps, betas=(0.9, 0.999))


def linear_warmup_decay(total_steps: int, warmup_ratio: float):
    """Multiplier: linear warmup over the first ``warmup_ratio`` of steps, then linear decay to 0."""
    warmup = int(math.floor(total_steps * warmup_ratio))

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return fn


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(total_steps, warmup_ratio))
