"""DeepSpeed engine (``engine.backend=deepspeed``): a ZeRO 0-3 student and a ZeRO-3-partitioned (or
replicated) teacher, behind the :class:`~kdqat_dist.engine.backend.Backend` seam. Options:
``engine.deepspeed.*``. What happens where:

- **Student.** Built, fake-quant prepared, LSQ steps initialised from whole weights and activation
  steps calibrated on every rank from the full checkpoint (by the builder) *before*
  :func:`deepspeed.initialize`, so initialisation never reads an empty ZeRO-3 partition. The optimizer is
  a torch AdamW (or BertAdam) object with our parameter groups (no JIT build; LSQ steps keep their own
  learning rates) unless ``engine.deepspeed.optimizer=deepspeed``; the schedule is the same LambdaLR as in
  one process; clipping and gradient accumulation come from the resolved JSON, whose values come from
  ``train.*``.
- **Teacher.** ``engine.deepspeed.teacher=zero3``: the builder constructs it inside
  :meth:`DeepSpeedBackend.building_teacher`, under ``HfDeepSpeedConfig``, so transformers partitions each
  parameter as it is created and fills the partitions from the checkpoint one module at a time (rank 0
  reads the values); no rank ever holds the whole teacher. Then an optimizer-free DeepSpeed engine in
  eval mode. The KD objective's forward hooks and attention taps run on its ``.module`` unchanged.
  ``replicated``: a plain frozen copy per rank, cast to ``engine.precision`` as DeepSpeed casts the
  ZeRO-3 one.
- **Process group.** :mod:`kdqat_dist.engine.dist` brings it up; DeepSpeed's comm layer attaches to it.
- **DeepSpeed internals.** What this backend needs beyond DeepSpeed's public API is in
  :mod:`kdqat_dist.engine.ds_workarounds`, with the version it was written for.
- **Checkpoints.** ``engine.save_checkpoint`` into ``<tag>.tmp``, per-rank RNG and loop state beside it,
  then rank 0 renames the folder and atomically repoints ``latest`` (:mod:`kdqat_dist.engine.checkpoint`).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_update_full_grad_vectorized
from torch import nn
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from kdqat_dist.config import RunConfig
from kdqat_dist.engine import dist, ds_config, ds_workarounds
from kdqat_dist.engine.backend import PRECISION_DTYPE, enable_activation_checkpointing, freeze
from kdqat_dist.engine.checkpoint import check_rank_count, load_rank_state, readable_checkpoint, save_sharded
from kdqat_dist.engine.dist import Ranks
from kdqat_dist.engine.memory import MIB, memory_report, storage_bytes
from kdqat_dist.engine.optim import clip_each_, make_optimizer, make_scheduler, param_groups
from kdqat_dist.errors import ConfigError, InternalError


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
    """The loop's engine under DeepSpeed (any launcher, or none: world size 1)."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.opts = cfg, cfg.engine.deepspeed
        ds_workarounds.skip_shm_comm_build()
        ds_workarounds.declare_tested_optimizers()
        self.device = _device(cfg)
        self._owns_group = dist.init_process_group(self.device.type)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)  # on our group
        self.ranks = Ranks.of_group(self.device)
        self.run_dir = Path(cfg.train.output_dir)
        self.engine = None
        self.teacher_engine = None
        self.teacher: nn.Module | None = None
        self.optimizer = None
        self._teacher_conf: dict | None = None
        self._grad_peak = 0

    # ------------------------------------------------------------------ configs

    def ds_config(self, kind: str, hidden_size: int | None) -> dict:
        """Resolve on every rank (so a ConfigError is raised everywhere, not a hang), write on rank 0,
        then every rank reads the one file back and uses that."""
        resolved = ds_config.build(self.cfg, self.ranks.world_size, kind, hidden_size)
        if self.ranks.is_main:
            ds_config.write_resolved(resolved, self.run_dir, kind)
        self.ranks.barrier()
        return ds_config.read_resolved(self.run_dir, kind)

    # ------------------------------------------------------------------ models

    @contextlib.contextmanager
    def building_teacher(self, hidden_size: int | None):
        """Under ``zero3``: while the block runs, ``from_pretrained`` builds under zero.Init, so each
        parameter is partitioned as it is created and the checkpoint is copied into the partitions module
        by module. (The path that works with transformers 5: zero.Init around the constructor fails in
        ``_init_weights``.)"""
        if self.opts.teacher == "replicated":
            yield
            return
        self._teacher_conf = self.ds_config("teacher", hidden_size)
        hf_ds = HfDeepSpeedConfig(self._teacher_conf)
        try:
            yield
        finally:
            unset_hf_deepspeed_config()  # the student and later loads must not be partitioned
            del hf_ds

    def setup_teacher(self, model: nn.Module) -> nn.Module:
        """The frozen teacher: a ZeRO-3 engine (built partitioned), or a replicated module.

        Both run in ``engine.precision``: DeepSpeed casts a ZeRO-3 teacher itself, a replicated one is
        cast here (left in its checkpoint's fp32, its forward would run in fp32 beside a bf16 student).
        """
        if self.opts.teacher == "replicated":
            self.teacher = freeze(model, self.device, PRECISION_DTYPE[self.cfg.engine.precision])
            return self.teacher
        if self._teacher_conf is None:
            raise InternalError("a ZeRO-3 teacher must be built inside DeepSpeedBackend.building_teacher()")
        model.requires_grad_(False)
        self.teacher_engine, *_ = deepspeed.initialize(model=model, config=self._teacher_conf)
        # DeepSpeedEngine.eval() switches only the wrapped module; nn.Module.train(False) clears the
        # engine's own flag as well, so nothing that reads it (or restores it) turns dropout back on.
        nn.Module.train(self.teacher_engine, False)
        self.teacher = self.teacher_engine
        return self.teacher_engine

    def setup_student(self, model: nn.Module, total_steps: int) -> nn.Module:
        t = self.cfg.train
        if self.cfg.engine.activation_checkpointing:
            enable_activation_checkpointing(model)
        model.to(self.device)
        conf = self.ds_config("student", getattr(model.config, "hidden_size", None))
        # BertAdam's per-tensor clipping runs here on whole gradients (step()): its optimizer object only
        # sees ZeRO's flat partitions.
        optimizer = make_optimizer(model, t, clip_each=False) if self.opts.optimizer == "torch" else None
        params = None if optimizer is not None else param_groups(model, t)
        self.engine, self.optimizer, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=params,
            config=conf,
            lr_scheduler=lambda opt: make_scheduler(opt, total_steps, t),
        )
        return self.engine

    def student_module(self) -> nn.Module:
        return self.engine.module

    def partitioned_teacher(self) -> bool:
        """True for a ZeRO-3 teacher: its modules are called only by its own forward (see distill/streaming.py)."""
        return self.teacher_engine is not None

    def partitioned_student(self) -> bool:
        """True when submodules must not be called outside the engine's forward (ZeRO-3 hooks would
        fetch and release their parameters)."""
        return self.engine is not None and self.engine.zero_optimization_stage() == 3

    def gathered_params(self, params: list[nn.Parameter]) -> AbstractContextManager:
        """Whole ``params`` on every rank inside the block: a collective under a ZeRO-3 student, so every
        rank must enter it with the same list."""
        if not self.partitioned_student():
            return contextlib.nullcontext()
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    # ------------------------------------------------------------------ stepping

    def autocast(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed holds the modules in engine.precision itself

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not sync:
            # DeepSpeed counts micro-batches in engine.step(): before the last one it only counts; its
            # gradient reduction follows the same count (train.grad_accum in the resolved JSON)
            self.engine.step()

    def step(self) -> None:
        """DeepSpeed's step (and schedule) at the accumulation boundary, after per-tensor clipping."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise InternalError("DeepSpeedBackend.step() called before the last micro-batch of the step")
        self._grad_peak = max(self._grad_peak, self._grad_bytes())
        t = self.cfg.train
        if t.optimizer == "bertadam" and t.max_grad_norm > 0:
            self._clip_each_tensor(t.max_grad_norm)
        self.engine.step()

    def _clip_each_tensor(self, max_norm: float) -> None:
        """BertAdam's per-tensor clipping on the reduced gradients, between the backward and the step,
        through DeepSpeed's public gradient API (``safe_update_full_grad_vectorized``): each parameter's
        whole gradient under every ZeRO stage, as one process clips it."""
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        safe_update_full_grad_vectorized(params, lambda g, p: clip_each_(g, max_norm))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: Path, client_state: dict) -> None:
        """All ranks write into ``<tag>.tmp``; rank 0 publishes it and repoints ``latest`` atomically."""
        meta = {"step": client_state.get("step"), "world_size": self.ranks.world_size}

        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False, client_state=meta)

        save_sharded(ckpt_dir, self.ranks, write, {"client": client_state}, self.cfg.train.keep_checkpoints)

    def load_checkpoint(self, ckpt_dir: Path) -> dict:
        check_rank_count(ckpt_dir, self.ranks.world_size)
        with readable_checkpoint(ckpt_dir):
            path, _ = self.engine.load_checkpoint(
                str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise ConfigError(f"--resume: DeepSpeed could not load {ckpt_dir}")
            return load_rank_state(ckpt_dir, self.ranks.rank)["client"]

    # ------------------------------------------------------------------ memory

    def _grad_bytes(self) -> int:
        tensors = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return storage_bytes(tensors + ds_workarounds.zero_grad_tensors(self.engine.optimizer))

    def memory_report(self) -> dict[str, float]:
        """This rank's bytes (MiB): student params (its partition under ZeRO-3), fp32 master copies,
        gradients (peak, at an accumulation boundary), optimizer state, teacher params, peak RSS."""
        opt = self.engine.optimizer if self.engine is not None else None
        out = memory_report(None, getattr(opt, "optimizer", opt))
        out["param_mib"] = _param_bytes(self.engine.module) * MIB if self.engine is not None else 0.0
        out["master_mib"] = storage_bytes(ds_workarounds.fp32_master_tensors(opt)) * MIB
        out["grad_mib"] = self._grad_peak * MIB
        teacher = getattr(self.teacher, "module", self.teacher)
        out["teacher_param_mib"] = _param_bytes(teacher) * MIB if teacher is not None else 0.0
        out["zero_stage"] = self.engine.zero_optimization_stage() if self.engine is not None else -1
        out["teacher_zero3"] = self.teacher_engine is not None
        out["rank"] = self.ranks.rank
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
