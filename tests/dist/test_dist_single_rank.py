"""The DeepSpeed backend with no launcher: world size 1 in this process, with activation checkpointing."""

import os

import pytest

from kdqat_dist.engine.loop import run

pytestmark = pytest.mark.dist


def test_deepspeed_without_launcher_and_with_activation_checkpointing_matches_one_process(
        parity_teacher, parity_config, local_reference, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = parity_config(parity_teacher, tmp_path / "ds", "train.grad_accum=2", "engine.backend=deepspeed",
                        "engine.zero_stage=2", "engine.teacher=zero3", "engine.activation_checkpointing=true")
    ds = run(cfg, "train")
    assert ds["world_size"] == 1
    for a, b in zip(local_reference["twn"], ds["train_log"], strict=True):
        for k in a:  # recomputation and DeepSpeed's accumulation change no number beyond rounding
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (a["step"], k)
    mem = ds["memory"]
    assert mem["zero_stage"] == 2 and mem["teacher_zero3"] and mem["optim_mib"] > 0 and mem["grad_mib"] > 0
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # nothing leaks into this process
    assert (tmp_path / "ds" / "ds_config_teacher.json").exists()
    assert (tmp_path / "ds" / "student" / "model.safetensors").exists()
