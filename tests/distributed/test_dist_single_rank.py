"""The DeepSpeed backend with no launcher: world size 1 in this process, with activation checkpointing."""

import os

import pytest
import torch

from kdqat_dist.engine.loop import run

TORCH_LINEAR = torch.nn.functional.linear  # before any ZeRO-3 engine in this process

pytestmark = pytest.mark.dist


def test_deepspeed_without_launcher_and_with_activation_checkpointing_matches_one_process(
    parity_teacher, parity_config, local_reference, tmp_path, monkeypatch
):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = parity_config(
        parity_teacher,
        tmp_path / "ds",
        "train.grad_accum=2",
        "engine.backend=deepspeed",
        "engine.deepspeed.zero_stage=2",
        "engine.deepspeed.teacher=zero3",
        "engine.activation_checkpointing=true",
    )
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
    # ZeRO-3 (the teacher here) replaces F.linear process-wide; teardown must put torch's back
    assert torch.nn.functional.linear is TORCH_LINEAR


def test_bf16_deepspeed_run_stays_close_to_fp32(parity_teacher, parity_config, local_reference, tmp_path, monkeypatch):
    # No GPU here, but DeepSpeed's bf16 path runs on the CPU accelerator: bf16 student and ZeRO-3 teacher
    # weights with fp32 master weights, every loss fed bf16 taps. The losses must stay near the fp32 run
    # of the same steps (bf16 keeps 8 mantissa bits: a few 1e-3 relative), and be finite. It is also the
    # second DeepSpeed run in this process: teardown must reset DeepSpeed's cached process groups.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = parity_config(
        parity_teacher,
        tmp_path / "bf16",
        "train.grad_accum=2",
        "engine.backend=deepspeed",
        "engine.deepspeed.zero_stage=2",
        "engine.deepspeed.teacher=zero3",
        "engine.precision=bf16",
    )
    out = run(cfg, "train")
    mem = out["memory"]
    assert mem["param_mib"] == pytest.approx(mem["master_mib"] / 2, rel=1e-3)  # bf16 weights, fp32 master
    assert mem["teacher_param_mib"] == pytest.approx(mem["param_mib"], rel=1e-3)
    ref = local_reference["twn"]
    for a, b in zip(ref, out["train_log"], strict=True):
        for k in a:
            if k.startswith("loss"):
                assert b[k] == pytest.approx(a[k], rel=3e-2, abs=1e-4), (a["step"], k, a[k], b[k])
                assert b[k] != a[k], (a["step"], k)  # really computed in bf16


def _train_and_check_teacher_mode(cfg, resume: bool = False) -> None:
    from kdqat_dist.engine.loop import Trainer

    tr = Trainer(cfg, "train", resume=resume).setup()
    try:
        tr.student.train()
        tr.evaluate(tr.teacher)
        tr.evaluate(tr.student)
        assert not any(m.training for m in tr.teacher.modules())  # the engine's own flag too
        assert all(m.training for m in tr.student.module.modules())  # predict restores the student's mode
        tr.train()  # evaluates the teacher (fresh run) and the student, and checkpoints
        assert not any(m.training for m in tr.teacher.modules())
    finally:
        tr.cleanup()


def test_zero3_teacher_stays_in_eval_mode_after_evaluations_checkpoints_and_resume(
    parity_teacher, parity_config, tmp_path, monkeypatch
):
    # DeepSpeedEngine.eval() leaves the engine's `training` flag set; restoring that flag after an
    # evaluation used to turn the teacher's dropout on for the rest of the run.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = parity_config(
        parity_teacher,
        tmp_path / "mode",
        "engine.backend=deepspeed",
        "engine.deepspeed.zero_stage=2",
        "engine.deepspeed.teacher=zero3",
        "train.save_every=2",
    )
    _train_and_check_teacher_mode(cfg)
    _train_and_check_teacher_mode(cfg, resume=True)


def test_truncated_deepspeed_checkpoint_and_another_rank_count_are_one_line(
    parity_teacher, parity_config, tmp_path, monkeypatch
):
    from kdqat_dist.config import ConfigError

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = parity_config(
        parity_teacher,
        tmp_path / "ds",
        "engine.backend=deepspeed",
        "engine.deepspeed.zero_stage=2",
        "train.save_every=3",
    )
    run(cfg, "train")
    ckpt = tmp_path / "ds" / "checkpoints" / "step0000003"
    # written by "2 ranks": refused before DeepSpeed reads anything
    extra = ckpt / "rank00001_state.pt"
    extra.write_bytes((ckpt / "rank00000_state.pt").read_bytes())
    with pytest.raises(ConfigError, match=r"written by 2 rank\(s\); resume it with the same number of ranks \(now 1\)"):
        run(cfg, "train", resume=True)
    extra.unlink()
    for f in ckpt.rglob("*model_states.pt"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ConfigError, match="step0000003 is damaged or incomplete"):
        run(cfg, "train", resume=True)


def test_zero3_size_report_counts_the_row_scales_of_partitioned_weights(parity_teacher, tmp_path, monkeypatch):
    """ZeRO-3 leaves each partitioned weight an empty tensor: its row-wise scales are still one per row."""
    import copy

    from kdqat_dist.config import load_config
    from kdqat_dist.engine.ds_backend import DeepSpeedBackend
    from kdqat_dist.models.student import init_student
    from kdqat_dist.quant.api import prepare
    from kdqat_dist.quant.size import size_report

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(
        "tiny_debug",
        [
            f"teacher.path={parity_teacher}",
            f"train.output_dir={tmp_path}",
            "engine.backend=deepspeed",
            "engine.deepspeed.zero_stage=3",
            "quant.weight.granularity=row",  # every Linear row-wise, as the word embeddings are by default
        ],
    )
    be = DeepSpeedBackend(cfg)
    try:
        student = prepare(init_student(str(parity_teacher), 2, None, "identity"), cfg.quant)
        whole = size_report(copy.deepcopy(student))
        engine = be.setup_student(student, total_steps=2)
        assert all(p.data.numel() == 0 for p in engine.module.parameters())  # every weight partitioned
        assert size_report(engine.module) == whole
    finally:
        be.teardown()
