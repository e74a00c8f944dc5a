"""DeepSpeed backend: a ZeRO 0-3 student engine and a ZeRO-3-partitioned (or replicated) teacher.

Same interface as :class:`~kdqat_dist.engine.backend.LocalBackend`, so the one training loop runs
unchanged. What happens where:

- **Student.** Built, fake-quant prepared, LSQ steps initialised from whole weights and activation
  steps calibrated on every rank from the full checkpoint *before* :func:`deepspeed.initialize`, so
  initialisation never reads an empty ZeRO-3 partition. The optimizer is a torch AdamW object with our
  parameter groups (no JIT build; LSQ steps keep their own learning rates) unless
  ``engine.optimizer=deepspeed``; the schedule is the same LambdaLR as in one process; clipping and
  gradient accumulation come from the resolved JSON, whose values come from ``train.*``.
- **Teacher.** ``engine.teacher=zero3``: constructed under ``HfDeepSpeedConfig``, so transformers
  partitions each parameter as it is created and fills the partitions from the checkpoint one module
  at a time (rank 0 reads the values); no rank ever holds the whole teacher. Then an optimizer-free
  DeepSpeed engine in eval mode. The KD objective's forward hooks and attention taps run
  on its ``.module`` unchanged. ``engine.teacher=replicated``: a plain frozen copy per rank, cast to
  ``engine.precision`` as DeepSpeed casts the ZeRO-3 one.
- **DeepSpeed internals.** What this backend needs beyond DeepSpeed's public API is in
  :mod:`kdqat_dist.engine.ds_workarounds`, with the version it was written for.
- **Checkpoints.** ``engine.save_checkpoint`` into ``<tag>.tmp``, per-rank RNG and loop state beside it,
  then rank 0 renames the folder and atomically repoints ``latest``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_update_full_grad_vectorized
from torch import nn
from transformers import AutoConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from kdqat_dist.config import ConfigError, RunConfig
from kdqat_dist.engine import dist, ds_config, ds_workarounds
from kdqat_dist.engine.backend import (
    _commit_checkpoint,
    damaged_checkpoint,
    freeze_teacher,
    memory_report,
    rng_state,
    set_rng_state,
    storage_bytes,
)
from kdqat_dist.engine.optim import clip_each_, make_optimizer, make_scheduler, param_groups
from kdqat_dist.models.encoders import load_classifier, resolve_model_path, unwrap

RANK_STATE = "rank{rank:05d}_state.pt"
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device(cfg: RunConfig) -> torch.device:
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        if cfg.engine.precision == "fp16":
            raise ConfigError("engine.precision: fp16 needs a GPU; on CPU use fp32 (or bf16)")
        return torch.device("cpu")
    if cfg.train.device == "cpu":
        raise ConfigError(
            "train.device: cpu, but DeepSpeed picked accelerator "
            f"{acc.device_name()!r}; set DS_ACCELERATOR=cpu to train on the CPU"
        )
    acc.set_device(dist.local_rank())
    return torch.device(acc.device_name(dist.local_rank()))


class DeepSpeedBackend:
    """The loop's backend under DeepSpeed (any launcher, or none: world size 1)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._owns_group = dist.init_process_group()
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.is_main = self.rank == 0
        self.device = _device(cfg)
        self.run_dir = Path(cfg.train.output_dir)
        self.engine = None
        self.teacher_engine = None
        self.teacher: nn.Module | None = None
        self._grad_peak = 0

    # ------------------------------------------------------------------ configs

    def ds_config(self, kind: str, hidden_size: int | None) -> dict:
        """Resolve on every rank (so a ConfigError is raised everywhere, not a hang), write on rank 0,
        then every rank reads the one file back and uses that."""
        resolved = ds_config.build(self.cfg, self.world_size, kind, hidden_size)
        if self.is_main:
            ds_config.write_resolved(resolved, self.run_dir, kind)
        dist.barrier()
        return ds_config.read_resolved(self.run_dir, kind)

    # ------------------------------------------------------------------ models

    def setup_student(self, model: nn.Module, total_steps: int) -> nn.Module:
        e, t = self.cfg.engine, self.cfg.train
        if e.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device)
        conf = self.ds_config("student", getattr(model.config, "hidden_size", None))
        # BertAdam's per-tensor clipping runs here on whole gradients (step()): its optimizer object only
        # sees ZeRO's flat partitions.
        optimizer = make_optimizer(model, t, clip_each=False) if e.optimizer == "torch" else None
        params = None if optimizer is not None else param_groups(model, t)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=params,
            config=conf,
            lr_scheduler=lambda opt: make_scheduler(opt, total_steps, t),
        )
        return self.engine

    def load_teacher(self, path: str, num_labels: int) -> nn.Module:
        """The frozen teacher: a ZeRO-3 engine built partitioned, or a replicated module.

        Both run in ``engine.precision``: DeepSpeed casts a ZeRO-3 teacher itself, a replicated one is
        cast here (left in its checkpoint's fp32, its forward would run in fp32 beside a bf16 student).
        """
        if self.cfg.engine.teacher == "replicated":
            model = load_classifier(path, num_labels, "eager")
            self.teacher = freeze_teacher(model, self.device, PRECISION_DTYPE[self.cfg.engine.precision])
            return self.teacher
        hidden = getattr(AutoConfig.from_pretrained(resolve_model_path(path)), "hidden_size", None)
        conf = self.ds_config("teacher", hidden)
        # While this object lives, from_pretrained builds under zero.Init: each parameter is partitioned
        # as it is created and the checkpoint is copied into the partitions module by module. (The path
        # that works with transformers 5: zero.Init around the constructor fails in _init_weights.)
        hf_ds = HfDeepSpeedConfig(conf)
        try:
            model = load_classifier(path, num_labels, "eager")
        finally:
            unset_hf_deepspeed_config()  # the student and later loads must not be partitioned
            del hf_ds
        model.requires_grad_(False)
        self.teacher_engine, *_ = deepspeed.initialize(model=model, config=conf)
        # DeepSpeedEngine.eval() switches only the wrapped module; nn.Module.train(False) clears the
        # engine's own flag as well, so nothing that reads it (or restores it) turns dropout back on.
        nn.Module.train(self.teacher_engine, False)
        self.teacher = self.teacher_engine
        return self.teacher_engine

    def student_module(self) -> nn.Module:
        return self.engine.module

    def partitioned_teacher(self) -> bool:
        """True for a ZeRO-3 teacher: its modules are called only by its own forward (see distill/streaming.py)."""
        return self.teacher_engine is not None

    def partitioned_student(self) -> bool:
        """True when submodules must not be called outside the engine's forward (ZeRO-3 hooks would
        fetch and release their parameters)."""
        return self.engine is not None and self.engine.zero_optimization_stage() == 3

    @contextlib.contextmanager
    def gathered_student(self) -> Iterator[nn.Module]:
        """Whole student weights on every rank inside the block (a collective under ZeRO-3)."""
        module = self.student_module()
        with self.gathered_params(list(module.parameters())):
            yield module

    def gathered_params(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        """Whole ``params`` on every rank inside the block: a collective under a ZeRO-3 student, so every
        rank must enter it with the same list."""
        if not self.partitioned_student():
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole student state dict on CPU, on every rank (gathered under ZeRO-3)."""
        with self.gathered_student() as module:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    # ------------------------------------------------------------------ stepping

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def step(self) -> bool:
        """Call after every micro-batch; DeepSpeed steps (and schedules) at the accumulation boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self._grad_peak = max(self._grad_peak, self._grad_bytes())
            t = self.cfg.train
            if t.optimizer == "bertadam" and t.max_grad_norm > 0:
                self._clip_each_tensor(t.max_grad_norm)
        self.engine.step()
        return boundary

    def _clip_each_tensor(self, max_norm: float) -> None:
        """BertAdam's per-tensor clipping on the reduced gradients, between the backward and the step,
        through DeepSpeed's public gradient API (``safe_update_full_grad_vectorized``): each parameter's
        whole gradient under every ZeRO stage, as one process clips it."""
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        safe_update_full_grad_vectorized(params, lambda g, p: clip_each_(g, max_norm))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(t, self.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        return dist.gather_objects(obj)

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: Path, client_state: dict) -> None:
        """All ranks write into ``<tag>.tmp``; rank 0 publishes it and repoints ``latest`` atomically."""
        tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)  # left by a crash mid-write
        dist.barrier()
        meta = {"step": client_state.get("step"), "world_size": self.world_size}
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False, client_state=meta)
        torch.save(
            {"client": client_state, "rng": rng_state(), "world_size": self.world_size},
            tmp / RANK_STATE.format(rank=self.rank),
        )
        dist.barrier()
        if self.is_main:
            _commit_checkpoint(tmp, ckpt_dir, keep=self.cfg.train.keep_checkpoints)
        dist.barrier()

    def load_checkpoint(self, ckpt_dir: Path) -> dict:
        own = ckpt_dir / RANK_STATE.format(rank=self.rank)
        saved = len(list(ckpt_dir.glob("rank*_state.pt")))
        if saved != self.world_size:  # every rank checks the same folder, so all refuse together
            raise ConfigError(
                f"--resume: {ckpt_dir} was written by {saved} rank(s); resume it with the same "
                f"number of ranks (now {self.world_size})"
            )
        with damaged_checkpoint(ckpt_dir):
            path, _ = self.engine.load_checkpoint(
                str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise ConfigError(f"--resume: DeepSpeed could not load {ckpt_dir}")
            state = torch.load(own, map_location="cpu", weights_only=False)
        set_rng_state(state["rng"])
        return state["client"]

    # ------------------------------------------------------------------ memory

    def _grad_bytes(self) -> int:
        tensors = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return storage_bytes(tensors + ds_workarounds.zero_grad_tensors(self.engine.optimizer))

    def memory_report(self) -> dict[str, float]:
        """This rank's bytes (MiB): student params (its partition under ZeRO-3), fp32 master copies,
        gradients (peak, at an accumulation boundary), optimizer state, teacher params, peak RSS."""
        mib = 1 / 2**20
        opt = self.engine.optimizer if self.engine is not None else None
        out = memory_report(None, getattr(opt, "optimizer", opt))
        out["param_mib"] = _param_bytes(self.engine.module) * mib if self.engine is not None else 0.0
        out["master_mib"] = storage_bytes(ds_workarounds.fp32_master_tensors(opt)) * mib
        out["grad_mib"] = self._grad_peak * mib
        out["teacher_param_mib"] = _param_bytes(unwrap(self.teacher)) * mib if self.teacher is not None else 0.0
        out["zero_stage"] = self.engine.zero_optimization_stage() if self.engine is not None else -1
        out["teacher_zero3"] = self.teacher_engine is not None
        out["rank"] = self.rank
        return out

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Quiesce, destroy the engines, then the process group.

        ZeRO-3 prefetches the next modules' parameters with asynchronous all-gathers; one still in flight
        when the interpreter exits aborts the process ("terminate called without an active exception")
        after an otherwise finished run. So: wait for them (re-partitioning everything), meet the other
        ranks, and only then take the engines and the group down.
        """
        engines = [e for e in (self.engine, self.teacher_engine) if e is not None]
        for eng in engines:
            if eng.zero_optimization_stage() == 3:
                with contextlib.suppress(Exception):
                    eng.empty_partition_cache()
        if engines and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                dist.barrier()
        for eng in engines:
            with contextlib.suppress(Exception):
                eng.destroy()
        self.engine = self.teacher_engine = None
        ds_workarounds.restore_torch_linear()
        if self._owns_group:
            dist.destroy_process_group()
            ds_workarounds.forget_deepspeed_groups()


def _param_bytes(module: nn.Module) -> int:
    """Parameter storage this rank owns: whole tensors, or under ZeRO-3 its partitions (``ds_tensor``)
    plus the small parameters kept whole (``ds_persist``). A ZeRO-3 parameter gathered for a forward is
    working memory, not owned: it counts in peak memory, not here."""
    tensors = []
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            tensors.append(p.ds_tensor)
            if getattr(p, "ds_persist", False):
                tensors.append(p.data)
        else:
            tensors.append(p.data)
    return storage_bytes(tensors)
