"""The one-process engine (``engine.backend=none``): a torch optimizer, clipping, gradient accumulation,
and ``engine.precision=bf16`` as autocast (the weights stay fp32; the teacher is cast to bf16)."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from kdqat_dist.config import RunConfig
from kdqat_dist.engine.backend import PRECISION_DTYPE, enable_activation_checkpointing, freeze, pick_device
from kdqat_dist.engine.checkpoint import commit_checkpoint, readable_checkpoint, rng_state, set_rng_state
from kdqat_dist.engine.dist import Ranks
from kdqat_dist.engine.memory import MIB, memory_report, storage_bytes
from kdqat_dist.engine.optim import global_clip, make_optimizer, make_scheduler


class LocalBackend:
    """Single process: torch AdamW or BertAdam, linear warmup/decay, clipping, gradient accumulation."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        self.ranks = Ranks(device=self.device)
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._grad_peak = 0

    # -- models
    def building_teacher(self, hidden_size: int | None) -> AbstractContextManager:
        return contextlib.nullcontext()

    def setup_teacher(self, model: nn.Module) -> nn.Module:
        dtype = PRECISION_DTYPE[self.cfg.engine.precision]
        self.teacher = freeze(model, self.device, dtype)
        return self.teacher

    def setup_student(self, model: nn.Module, total_steps: int) -> nn.Module:
        if self.cfg.engine.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.student = model.to(self.device)
        self.optimizer = make_optimizer(model, self.cfg.train)
        self.scheduler = make_scheduler(self.optimizer, total_steps, self.cfg.train)
        return self.student

    def student_module(self) -> nn.Module:
        return self.student

    def partitioned_student(self) -> bool:
        return False

    def partitioned_teacher(self) -> bool:
        return False

    def gathered_params(self, params: list[nn.Parameter]) -> AbstractContextManager:
        return contextlib.nullcontext()  # weights are always whole in one process

    # -- stepping
    def autocast(self) -> AbstractContextManager:
        if self.cfg.engine.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        (loss / self.cfg.train.grad_accum).backward()

    def step(self) -> None:
        grads = storage_bytes(p.grad for p in self.student.parameters() if p.grad is not None)
        self._grad_peak = max(self._grad_peak, grads)
        if (clip := global_clip(self.cfg.train)) > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- checkpoints
    def save_checkpoint(self, ckpt_dir: Path, client_state: dict) -> None:
        tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "client": client_state,
                "rng": rng_state(),
            },
            tmp / "state.pt",
        )
        commit_checkpoint(tmp, ckpt_dir, keep=self.cfg.train.keep_checkpoints)

    def load_checkpoint(self, ckpt_dir: Path) -> dict:
        with readable_checkpoint(ckpt_dir):
            state = torch.load(ckpt_dir / "state.pt", map_location=self.device, weights_only=False)
            self.student.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            fit_moments_to_params(self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            client = state["client"]
            set_rng_state(state["rng"])
        return client

    def memory_report(self) -> dict[str, float]:
        out = memory_report(self.student, self.optimizer)
        out["grad_mib"] = self._grad_peak * MIB
        if self.teacher is not None:
            out["teacher_param_mib"] = storage_bytes(p.data for p in self.teacher.parameters()) * MIB
        return out

    def teardown(self) -> None:
        pass


def fit_moments_to_params(optimizer: torch.optim.Optimizer) -> None:
    """Checkpoints from before per-tensor LSQ steps had shape (1,) hold 0-d moments for them (the modules
    reshape the steps themselves on load): give the moments the parameter's shape. Step counters stay."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if k != "step" and torch.is_tensor(v) and v.dim() == 0 and p.shape == (1,):
                state[k] = v.reshape(1)
