"""The public way to build a run: the engine, then the data, the models, the objective and the optimizer.

``build_run(cfg, backend)`` does on every rank what ``kdqat train`` / ``kdqat finetune`` do before their
first step, in this order, and hands the result (:class:`Run`) to the training loop, the benchmarks and
any other caller:

1. the task, its data (tokenised, cached; rank 0 first so that the others read its cache) and the
   collator; the step counts, with the global batch checked against the ranks and accumulation steps;
2. the student, built whole from its checkpoint (:func:`~kdqat_dist.models.student.init_student`, through
   :func:`~kdqat_dist.models.encoders.load_classifier`, the one function that constructs models),
   fake-quantized (:func:`~kdqat_dist.quant.api.prepare`) and calibrated on its first batch before any
   engine shards it;
3. the teacher, built inside the engine's :meth:`~kdqat_dist.engine.backend.Backend.building_teacher`
   (DeepSpeed ZeRO-3 partitions it as it is created) and handed to the engine, which freezes and shards it;
4. the engine's wrap of the student (its optimizer and schedule), and the KD objective for the two models.

The engine only wraps what it is given; which engine is :func:`make_backend`'s choice from
``engine.backend``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from kdqat_dist.config import RunConfig
from kdqat_dist.data.heads import TaskHead, get_head
from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
from kdqat_dist.data.sampling import steps_per_epoch
from kdqat_dist.data.tasks import TaskSpec, get_task
from kdqat_dist.distill.objective import DistillObjective
from kdqat_dist.engine.backend import Backend
from kdqat_dist.engine.dist import Ranks
from kdqat_dist.engine.local import LocalBackend
from kdqat_dist.errors import ConfigError
from kdqat_dist.models.attention import use_kdqat_attention
from kdqat_dist.models.encoders import load_classifier, load_tokenizer, resolve_model_path, set_dropout, unwrap
from kdqat_dist.models.positions import check_max_length
from kdqat_dist.models.sliced_ffn import slice_feed_forward
from kdqat_dist.models.student import init_student
from kdqat_dist.quant.api import calibrate_activations, prepare


def _deepspeed(cfg: RunConfig) -> Backend:
    # lazy: DeepSpeed takes seconds to import and probes the accelerator; other engines never need it
    from kdqat_dist.engine.ds_backend import DeepSpeedBackend

    return DeepSpeedBackend(cfg)


def _fsdp2(cfg: RunConfig) -> Backend:
    from kdqat_dist.engine.fsdp2 import FSDP2Backend  # lazy: one process needs none of torch.distributed's FSDP

    return FSDP2Backend(cfg)


# engine.backend -> the engine's constructor
BACKENDS: dict[str, Callable[[RunConfig], Backend]] = {"none": LocalBackend, "deepspeed": _deepspeed, "fsdp2": _fsdp2}


def make_backend(cfg: RunConfig) -> Backend:
    """The engine ``engine.backend`` names (it joins or brings up the process group)."""
    return BACKENDS[cfg.engine.backend](cfg)


@dataclass
class Run:
    """Everything a run is made of, built by :func:`build_run` on every rank.

    ``student`` / ``teacher`` are what the loss calls (an engine's wrapper, or the module itself);
    ``backend.student_module()`` is the student's ``nn.Module``. ``teacher`` and ``objective`` are None for
    a fine-tune (and the teacher for a student built without one).
    """

    cfg: RunConfig
    mode: str
    backend: Backend
    task: TaskSpec
    tokenizer: Any
    data: dict[str, Any]  # tokenised splits: train, dev (and dev_mm)
    collate: Collator
    steps_per_epoch: int
    total_steps: int
    student: nn.Module
    teacher: nn.Module | None
    objective: DistillObjective | None
    head: TaskHead | None = None  # the task's head (None: get_head(task))
    raw: dict[str, Any] | None = None  # the untokenised splits, for the head's evaluation

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The student's optimizer, as the engine built it (DeepSpeed's wrapper under DeepSpeed)."""
        return self.backend.optimizer

    @property
    def train_set(self):
        return self.data["train"]

    def first_batch(self) -> dict[str, torch.Tensor]:
        """The first ``train.batch_size`` training rows (at most), collated: the calibration batch."""
        return _first_batch(self.data["train"], self.collate, self.cfg.train.batch_size)


def _first_batch(train_set, collate: Collator, batch_size: int) -> dict[str, torch.Tensor]:
    return collate([train_set[i] for i in range(min(len(train_set), batch_size))])


def resolve_task(cfg: RunConfig) -> TaskSpec:
    """``data.task``'s spec; fills ``train.batch_size`` with the task's batch when it is null (so the saved
    config and a resume's comparison show it)."""
    task = get_task(cfg.data)
    if cfg.train.batch_size is None:
        cfg.train.batch_size = task.batch_size
    return task


def source_model(cfg: RunConfig, mode: str) -> str:
    """The checkpoint the run's tokenizer and student start from (checked to exist)."""
    if mode == "finetune":
        return cfg.model.name_or_path
    path = cfg.student.init_from or cfg.teacher.path
    if not cfg.teacher.path:
        raise ConfigError("teacher.path: required for `kdqat train` (a `kdqat finetune` output folder)")
    for key, p in (("teacher.path", cfg.teacher.path), ("student.init_from", path)):
        if not Path(p).expanduser().exists():
            raise ConfigError(f"{key}: {p} does not exist (expected a fine-tuned model folder)")
    return path


@contextlib.contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (one process: just run it)."""
    if not ranks.is_main:
        ranks.barrier()
    try:
        yield
    finally:
        if ranks.is_main:
            ranks.barrier()


def build_run(cfg: RunConfig, backend: Backend, mode: str = "train", with_teacher: bool = True) -> Run:
    """Build the run ``cfg`` describes on ``backend`` (see the module docstring for the order).

    Args:
        cfg: the run config (``train.batch_size`` is filled in when null).
        backend: the engine (:func:`make_backend`), already joined to the ranks.
        mode: ``train`` (KD-QAT student from ``teacher.path``) or ``finetune`` (the FP model on labels).
        with_teacher: ``train`` without a teacher: the quantized student on its labels, no teacher held
            (a memory baseline); the loop always builds one.

    Raises:
        ConfigError: one line naming the key (missing teacher, a batch that does not split over the ranks,
            a teacher with another label count ...).
    """
    if mode not in ("train", "finetune"):
        raise ValueError(f"mode must be train or finetune, got {mode!r}")
    ranks = backend.ranks
    task = resolve_task(cfg)
    head = get_head(task)
    with main_first(ranks):  # rank 0 fills the model and tokenisation caches, then the rest read them
        src = source_model(cfg, mode)
        tokenizer = load_tokenizer(src)
        max_len = cfg.data.max_seq_length or task.max_seq_length
        check_max_length(max_len, src, explicit=cfg.data.max_seq_length is not None)
        raw = load_splits(cfg.data, task)
        data = tokenize_splits(raw, tokenizer, max_len, cfg.data.cache_dir or None, head)
    collate = Collator(tokenizer, max_length=max_len if cfg.data.padding == "max_length" else None, head=head)
    cfg.train.micro_batch_size(ranks.world_size)  # ConfigError unless the batch splits evenly
    per_epoch = steps_per_epoch(len(data["train"]), cfg.train.batch_size)
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the training set ({len(data['train'])} examples)"
        )
    total = cfg.train.max_steps or math.ceil(per_epoch * cfg.train.epochs)
    if mode == "finetune":
        student, teacher, objective = _build_finetune(cfg, head, backend, src, total), None, None
    else:
        calibration = _first_batch(data["train"], collate, cfg.train.batch_size)
        student, teacher, objective = _build_student_and_teacher(
            cfg, head, backend, src, total, calibration, with_teacher
        )
    return Run(
        cfg, mode, backend, task, tokenizer, data, collate, per_epoch, total, student, teacher, objective, head, raw
    )


def _build_finetune(cfg: RunConfig, head: TaskHead, be: Backend, src: str, total_steps: int) -> nn.Module:
    """The FP model to fine-tune (the head's model class), on the engine."""
    task = head.spec
    id2label = dict(enumerate(task.label_list)) if task.label_list and head.kind != "qa" else None
    model = load_classifier(src, head.num_labels, cfg.model.attn_implementation, id2label, auto_class=head.auto_class)
    if cfg.train.dropout is not None:
        set_dropout(model, cfg.train.dropout)
    return be.setup_student(model, total_steps)


def _build_student_and_teacher(
    cfg: RunConfig,
    head: TaskHead,
    be: Backend,
    src: str,
    total_steps: int,
    calibration: dict[str, torch.Tensor],
    with_teacher: bool,
) -> tuple[nn.Module, nn.Module | None, DistillObjective | None]:
    """(student, teacher, objective) on the engine; neither teacher nor objective unless ``with_teacher``."""
    # The student is built and prepared whole on every rank (LSQ steps from whole weights, activation steps
    # calibrated) before the engine may shard it.
    student = init_student(src, head.num_labels, cfg.student.num_layers, cfg.distill.layer_map, head.auto_class)
    if cfg.train.dropout is not None:
        set_dropout(student, cfg.train.dropout)
    prepare(student, cfg.quant)
    if cfg.quant.enabled:
        # on the engine's device: a calibration forward of a large encoder on the host CPU is slow
        calibrate_activations(student.to(be.device), {k: v.to(be.device) for k, v in calibration.items()})
    teacher = _build_teacher(cfg, head, be) if with_teacher else None
    use_kdqat_attention(student)  # the attention function that fake-quantizes Q, K, V and records taps
    wrapped = be.setup_student(student, total_steps)
    if teacher is None:
        return wrapped, None, None
    # (the one place the objective is made; `kdqat train` and every benchmark get it from here)
    objective = DistillObjective.for_models(
        cfg.distill,
        student,
        teacher,
        head.regression,
        head=head.outputs,
        teacher_sharded=be.partitioned_teacher(),
    )
    return wrapped, teacher, objective


def _build_teacher(cfg: RunConfig, head: TaskHead, be: Backend) -> nn.Module:
    """The fine-tuned teacher (the head's model class), built in the engine's construction block and frozen
    (and sharded) by it."""
    task = head.spec
    hidden = getattr(AutoConfig.from_pretrained(resolve_model_path(cfg.teacher.path)), "hidden_size", None)
    with be.building_teacher(hidden):
        model = load_classifier(cfg.teacher.path, head.num_labels, "eager", auto_class=head.auto_class)
    if (n := model.config.num_labels) != head.num_labels:
        raise ConfigError(f"teacher.path: the teacher has {n} labels but task {task.name} has {head.num_labels}")
    teacher = be.setup_teacher(model)  # frozen, eval mode, in the engine's precision (and sharded)
    # Both models run our attention function so the same taps exist on each.
    use_kdqat_attention(unwrap(teacher))
    # A sharded teacher's modules are called only by its own forward.
    if not be.partitioned_teacher():
        slice_feed_forward(unwrap(teacher))
    return teacher
