"""PyTorch FSDP2 engine (``engine.backend=fsdp2``): ``fully_shard`` for the student and the teacher.

Options: ``engine.fsdp2.*``. Launch with ``torchrun`` (``launch/torchrun.sh`` with ``ENGINE=fsdp2``, the
Slurm scripts); CPU ranks talk over gloo, GPU ranks over NCCL. What happens where:

- **Sharding units.** One ``fully_shard`` group per Transformer layer, one for the embeddings and one for
  the rest (pooler, classifier): each group's weights are gathered just before it runs and freed after.
  Every parameter is sharded on its first dimension, the fake-quant ones too (an LSQ step of shape (1,)
  lives on rank 0, SEQ's per-row clips beside their rows); the forward sees them whole.
- **Student.** Built, prepared and calibrated whole by the builder, then sharded; the optimizer is built
  on the shards (``DTensor`` parameters), so its state is sharded too. ``engine.precision=bf16``: a
  :class:`MixedPrecisionPolicy` computing in bf16 over fp32 shards, gradients reduced in fp32. Global and
  BertAdam's per-tensor clipping see whole-tensor norms (DTensor reductions). Outside its forward and
  backward every weight is a shard; :meth:`FSDP2Backend.gathered_params` makes chosen ones whole.
- **Teacher.** ``engine.fsdp2.teacher=sharded``: frozen, in eval mode, cast to ``engine.precision``, and
  sharded like the student with every group (the root too) freed after its forward, so a rank holds about
  1/N of it between batches. Its modules are called only inside its own forward (the streaming KD taps
  read it there, as under ZeRO-3). Each rank reads the whole checkpoint once on the CPU before sharding
  it (ZeRO-3 instead builds it partitioned). ``replicated``: a frozen copy per rank.
- **Checkpoints.** ``torch.distributed.checkpoint``: every rank writes its shards of the student and the
  optimizer state into ``<tag>.tmp`` with its loop state and RNG; rank 0 publishes the folder. Resume
  reads them back into the same sharding, so it continues exactly. The best student is written whole
  (``student/``) from the gathered weights, as under DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kdqat_dist.config import RunConfig
from kdqat_dist.engine import dist
from kdqat_dist.engine.backend import PRECISION_DTYPE, enable_activation_checkpointing, freeze, pick_device
from kdqat_dist.engine.checkpoint import check_rank_count, load_rank_state, readable_checkpoint, save_sharded
from kdqat_dist.engine.dist import Ranks
from kdqat_dist.engine.memory import MIB, memory_report, storage_bytes
from kdqat_dist.engine.optim import global_clip, make_optimizer, make_scheduler
from kdqat_dist.models.encoders import embeddings_module, encoder_layers

Slot = tuple[nn.Module, str]  # a module and the name it holds a parameter under


class FSDP2Backend:
    """The loop's engine under FSDP2 (torchrun, Slurm, or no launcher: world size 1)."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.opts = cfg, cfg.engine.fsdp2
        device = pick_device(cfg.train.device)
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank())
            torch.cuda.set_device(device)
        self.device = device
        self._owns_group = dist.init_process_group(device.type)
        self.ranks = Ranks.of_group(device)
        self.mesh = init_device_mesh(device.type, (self.ranks.world_size,))
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._slots: list[Slot] = []
        self._grad_peak = 0

    # ------------------------------------------------------------------ models

    def _shard(self, model: nn.Module, reshard_after_forward: bool, policy: MixedPrecisionPolicy) -> None:
        """``fully_shard`` bottom-up: the embeddings, each Transformer layer, then the rest as the root.

        The root is resharded after its forward as well (FSDP2 keeps a root whole by default): weights are
        then shards whenever no forward or backward runs, which is what :meth:`gathered_params` and the
        memory report rely on.
        """
        kw = {"mesh": self.mesh, "mp_policy": policy}
        fully_shard(embeddings_module(model), reshard_after_forward=reshard_after_forward, **kw)
        for layer in encoder_layers(model):
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(model, reshard_after_forward=True, **kw)

    def building_teacher(self, hidden_size: int | None) -> AbstractContextManager:
        return contextlib.nullcontext()  # built whole on the CPU, sharded by setup_teacher

    def setup_teacher(self, model: nn.Module) -> nn.Module:
        """Frozen, eval mode, in ``engine.precision``; sharded unless ``engine.fsdp2.teacher=replicated``."""
        dtype = PRECISION_DTYPE[self.cfg.engine.precision]
        if self.opts.teacher == "replicated":
            self.teacher = freeze(model, self.device, dtype)
            return self.teacher
        model.requires_grad_(False)
        model.to(dtype=dtype).eval()
        self._shard(model, reshard_after_forward=True, policy=MixedPrecisionPolicy())
        self.teacher = model
        return model

    def setup_student(self, model: nn.Module, total_steps: int) -> nn.Module:
        if self.cfg.engine.activation_checkpointing:
            enable_activation_checkpointing(model)
        policy = MixedPrecisionPolicy()
        if self.cfg.engine.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        self._shard(model, reshard_after_forward=self.opts.reshard_after_forward, policy=policy)
        self.student = model
        self._slots = [(m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)]
        self.optimizer = make_optimizer(model, self.cfg.train)
        self.scheduler = make_scheduler(self.optimizer, total_steps, self.cfg.train)
        return model

    def student_module(self) -> nn.Module:
        return self.student

    def partitioned_student(self) -> bool:
        return True  # shards outside the forward, at any world size

    def partitioned_teacher(self) -> bool:
        return self.opts.teacher == "sharded"

    def _reshard_student(self) -> None:
        """Free gathered weights left by a forward without a backward (an evaluation, when the layers keep
        theirs: ``reshard_after_forward=false``); a local operation, no communication."""
        for m in self.student.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @contextlib.contextmanager
    def gathered_params(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Whole fp32 ``params`` inside the block: the modules holding them hold whole copies (one
        all-gather per tensor, a collective: every rank enters with the same list), then their shards again."""
        wanted = {id(p) for p in params}
        holders = {id(m) for m, n in self._slots if id(getattr(m, n)) in wanted}
        self._reshard_student()
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        whole: dict[int, nn.Parameter] = {}  # a tensor held under two names stays one tensor
        try:
            for m, n in self._slots:
                p = getattr(m, n)
                if id(m) in holders and isinstance(p, DTensor):
                    if id(p) not in whole:
                        whole[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    swapped.append((m, n, p))
                    setattr(m, n, whole[id(p)])
            yield
        finally:
            for m, n, p in reversed(swapped):
                setattr(m, n, p)

    # ------------------------------------------------------------------ stepping

    def autocast(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts the weights for the forward

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # Without sync, each rank keeps its whole gradients and adds the next micro-batch's to them; the
        # last micro-batch's backward reduce-scatters the sum (the mean over the ranks).
        self.student.set_requires_gradient_sync(sync)
        (loss / self.cfg.train.grad_accum).backward()

    def step(self) -> None:
        grads = storage_bytes(p.grad for p in self.student.parameters() if p.grad is not None)
        self._grad_peak = max(self._grad_peak, grads)
        if (clip := global_clip(self.cfg.train)) > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)  # the norm over every shard
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: Path, client_state: dict) -> None:
        self._reshard_student()

        def write(tmp: Path) -> None:
            model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))

        state = {"client": client_state, "scheduler": self.scheduler.state_dict()}
        save_sharded(ckpt_dir, self.ranks, write, state, self.cfg.train.keep_checkpoints)

    def load_checkpoint(self, ckpt_dir: Path) -> dict:
        check_rank_count(ckpt_dir, self.ranks.world_size)
        self._reshard_student()
        with readable_checkpoint(ckpt_dir):
            model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            try:
                dcp.load(state, checkpoint_id=str(ckpt_dir))
            except CheckpointException as exc:  # a BaseException; its failures: rank -> (exception, trace)
                first = next((e for e, _ in exc.failures.values()), exc)
                raise RuntimeError(f"{type(first).__name__}: {first}") from None
            set_state_dict(
                self.student, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            rank_state = load_rank_state(ckpt_dir, self.ranks.rank)
            self.scheduler.load_state_dict(rank_state["scheduler"])
            return rank_state["client"]

    # ------------------------------------------------------------------ memory

    def memory_report(self) -> dict[str, float]:
        """This rank's bytes (MiB): its shards of the student's weights and optimizer state, its gradient
        shards (peak, at a step), its shards of the teacher, peak RSS."""
        self._reshard_student()
        out = memory_report(self.student, self.optimizer)
        out["grad_mib"] = self._grad_peak * MIB
        teacher = self.teacher.parameters() if self.teacher is not None else ()
        out["teacher_param_mib"] = storage_bytes(p.data for p in teacher) * MIB
        out["teacher_sharded"] = self.partitioned_teacher()
        out["rank"] = self.ranks.rank
        return out

    def teardown(self) -> None:
        if self._owns_group:
            with contextlib.suppress(Exception):
                self.ranks.barrier()
            dist.destroy_process_group()
