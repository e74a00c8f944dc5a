"""The DeepSpeed engine at world size 1 in this process (CPU accelerator, gloo): what setup leaves behind;
and the seam every engine implements."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch

from kdqat_dist.config import load_config
from kdqat_dist.engine import loop
from kdqat_dist.engine.backend import Backend
from kdqat_dist.engine.local import LocalBackend
from kdqat_dist.models.encoders import load_classifier


@pytest.fixture
def no_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_replicated_teacher_runs_in_the_engine_precision(tiny_teacher, tmp_path, no_launcher, precision, dtype):
    # DeepSpeed casts only a ZeRO-3 teacher; a replicated one must be cast by the backend, or its forward
    # runs in fp32 beside a bf16 student.
    from kdqat_dist.engine.ds_backend import DeepSpeedBackend

    cfg = load_config(
        "tiny_debug",
        [
            f"train.output_dir={tmp_path}",
            "engine.backend=deepspeed",
            "engine.deepspeed.teacher=replicated",
            f"engine.precision={precision}",
        ],
    )
    backend = DeepSpeedBackend(cfg)
    try:
        assert backend.ranks.world_size == 1
        with backend.building_teacher(None):
            teacher = backend.setup_teacher(load_classifier(str(tiny_teacher), 2))
        assert {p.dtype for p in teacher.parameters()} == {dtype}
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert not backend.partitioned_teacher()
        assert backend.memory_report()["teacher_param_mib"] > 0
    finally:
        backend.teardown()


def _backend_uses_in_the_loop() -> set[str]:
    """Attribute names the loop reads on a backend (``self.backend.x``, ``be.x``, ``backend.x``)."""
    tree = ast.parse(Path(loop.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            v = node.value
            if (isinstance(v, ast.Name) and v.id in ("be", "backend")) or (
                isinstance(v, ast.Attribute) and v.attr == "backend"
            ):
                names.add(node.attr)
    return names


def test_the_loop_uses_only_the_protocol_and_every_backend_implements_it():
    from kdqat_dist.engine.ds_backend import DeepSpeedBackend
    from kdqat_dist.engine.fsdp2 import FSDP2Backend

    methods = {n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")}
    fields = set(Backend.__annotations__)
    assert _backend_uses_in_the_loop() <= methods | fields
    for cls in (LocalBackend, DeepSpeedBackend, FSDP2Backend):
        assert all(callable(getattr(cls, n, None)) for n in methods), cls
    local = LocalBackend(load_config("tiny_debug"))
    assert all(hasattr(local, n) for n in fields)
    # the seam carries no collectives and no model loading: those are engine/dist.py's and the builder's
    assert not methods & {"all_reduce_sum", "gather_objects", "barrier", "load_teacher", "rank", "world_size"}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_bertadam_under_zero_is_accepted_without_the_untested_optimizer_warning(tiny_teacher, tmp_path, no_launcher):
    # DeepSpeed asks for zero_allow_untested_optimizer for any optimizer class not on its tested list, and
    # then warns on every run; BertAdam is tested under ZeRO 0-3 here (tests/distributed/test_dist_zero.py).
    from kdqat_dist.engine.ds_backend import DeepSpeedBackend

    cfg = load_config(
        "tiny_debug",
        [f"train.output_dir={tmp_path}", "engine.backend=deepspeed", "train.optimizer=bertadam"],
    )
    records, ds_logger = _Records(), logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.INFO)  # whatever an earlier test or script set it to
    ds_logger.addHandler(records)
    backend = DeepSpeedBackend(cfg)
    try:
        backend.setup_student(load_classifier(str(tiny_teacher), 2), total_steps=4)
        assert backend.optimizer is not None
    finally:
        backend.teardown()
        ds_logger.removeHandler(records)
        ds_logger.setLevel(level)
    assert any("ZeRO" in line or "zero" in line.lower() for line in records.lines)  # the handler saw DeepSpeed
    assert not [line for line in records.lines if "untested optimizer" in line]
    resolved = json.loads((tmp_path / "ds_config_student.json").read_text())
    assert "zero_allow_untested_optimizer" not in resolved
