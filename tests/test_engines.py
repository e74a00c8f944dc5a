"""The engine seam without a second rank: the public builder, bf16 in one process, and how each engine is
launched (the launchers' dry runs, the demo's command line)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from kdqat_dist.config import load_config
from kdqat_dist.engine.build import build_run, make_backend
from kdqat_dist.engine.launch import launch_command
from kdqat_dist.engine.local import LocalBackend
from kdqat_dist.engine.loop import run
from kdqat_dist.quant.api import is_prepared

REPO = Path(__file__).resolve().parents[1]


def _cfg(teacher: Path, out: Path, *extra: str):
    return load_config(
        "tiny_debug",
        [f"teacher.path={teacher}", f"train.output_dir={out}", "train.max_steps=3", "train.log_every=1", *extra],
    )


def test_build_run_builds_what_the_loop_trains(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path / "kd")
    backend = make_backend(cfg)
    assert isinstance(backend, LocalBackend) and backend.ranks.world_size == 1
    run_ = build_run(cfg, backend)
    assert run_.teacher is not None and run_.objective is not None and run_.optimizer is backend.optimizer
    assert not any(p.requires_grad for p in run_.teacher.parameters()) and not run_.teacher.training
    assert run_.total_steps == 3 and len(run_.train_set) > 0 and set(run_.data) >= {"train", "dev"}
    batch = run_.first_batch()
    assert batch["input_ids"].shape[0] == cfg.train.batch_size
    out = run_.objective(run_.student, run_.teacher, batch)
    assert set(out.terms) == {"logits", "hidden", "attn_map", "attn_output"}
    before = [p.detach().clone() for p in run_.student.parameters()]
    backend.backward(out.total)
    backend.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, run_.student.parameters(), strict=True))
    # a student without a teacher (the memory baseline), and the FP fine-tune
    bare = build_run(_cfg(tiny_teacher, tmp_path / "bare"), LocalBackend(cfg), with_teacher=False)
    assert bare.teacher is None and bare.objective is None
    ft_cfg = _cfg(tiny_teacher, tmp_path / "ft", f"model.name_or_path={tiny_teacher}")
    ft = build_run(ft_cfg, LocalBackend(ft_cfg), "finetune")
    assert ft.teacher is None and ft.objective is None and not is_prepared(ft.student)


def test_bf16_in_one_process_is_autocast_not_ignored(tiny_teacher, tmp_path):
    fp32 = run(_cfg(tiny_teacher, tmp_path / "fp32"), "train")
    bf16 = run(_cfg(tiny_teacher, tmp_path / "bf16", "engine.precision=bf16"), "train")
    for a, b in zip(fp32["train_log"], bf16["train_log"], strict=True):
        losses = [k for k in a if k.startswith("loss")]
        for k in losses:
            assert b[k] == pytest.approx(a[k], rel=3e-2, abs=1e-4), (a["step"], k)
        # really computed in bf16: the total differs (a term can round to the same value, e.g. a KL at log 2
        # between two near-uniform distributions)
        assert b["loss"] != a["loss"], a["step"]
    # the teacher is held in bf16 (half the bytes); the student's weights stay fp32 for the optimizer
    assert bf16["memory"]["teacher_param_mib"] == pytest.approx(fp32["memory"]["teacher_param_mib"] / 2, rel=1e-6)
    assert bf16["memory"]["param_mib"] == pytest.approx(fp32["memory"]["param_mib"], rel=1e-6)


def test_the_demo_launches_each_engine_with_its_own_launcher():
    ds = launch_command("deepspeed", "train", "demo", ["a.b=1"], 2, 4242)
    assert ds[1:7] == ["-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port", "4242"]
    fsdp2 = launch_command("fsdp2", "train", "demo", ["a.b=1"], 3, 4242)
    assert fsdp2[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "3",
        "--module",
        "kdqat_dist.cli",
        "train",
        "--config",
        "demo",
        "engine.backend=fsdp2",
        "a.b=1",
    ]
    with pytest.raises(ValueError, match="engine must be one of"):
        launch_command("none", "train", "demo", [], 2, 1)


def _launcher(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=REPO,
        env={**base, "KDQAT_DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_torchrun_and_slurm_launch_fsdp2_and_refuse_an_unknown_engine():
    tail = "--module kdqat_dist.cli train --config tiny_debug engine.backend=fsdp2 a.b=1"
    out = _launcher("torchrun.sh", {"ENGINE": "fsdp2", "NUM_PROCS": "2"}, "tiny_debug", "a.b=1")
    assert out.returncode == 0 and out.stdout.strip() == "torchrun --standalone --nproc_per_node 2 " + tail
    out = _launcher("slurm_single_node.sbatch", {"ENGINE": "fsdp2", "SLURM_GPUS_ON_NODE": "4"}, "tiny_debug", "a.b=1")
    assert out.returncode == 0
    assert out.stdout.strip() == "srun --ntasks=1 --kill-on-bad-exit=1 torchrun --standalone --nproc_per_node 4 " + tail
    for script in ("torchrun.sh", "slurm_single_node.sbatch"):
        out = _launcher(script, {"ENGINE": "fsdp"}, "tiny_debug")
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip().endswith("error: ENGINE=fsdp: allowed: deepspeed, fsdp2"), out.stderr
        assert out.stderr.count("\n") == 1


def test_only_the_deepspeed_engine_imports_deepspeed():
    # every engine shares engine/dist.py, which talks to torch.distributed only; DeepSpeed stays inside its
    # own engine (ds_backend.py and the workarounds it needs)
    import ast

    engine = REPO / "kdqat_dist" / "engine"
    importers = set()
    for path in engine.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                importers.add(path.name)
    assert importers == {"ds_backend.py", "ds_workarounds.py"}


def test_fsdp2_without_a_launcher_matches_one_process_with_layers_kept_gathered(tiny_teacher, tmp_path, monkeypatch):
    # World size 1 in this process (the group is brought up and torn down by the engine); each layer keeps
    # its gathered weights from the forward to the backward (reshard_after_forward=false), so after an
    # evaluation the weights are whole until the engine frees them for the diagnostics and the saved student.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    extra = ("train.eval_every=2", "train.max_steps=4", "train.dropout=0", "train.grad_accum=2")
    ref = run(_cfg(tiny_teacher, tmp_path / "local", *extra), "train")
    cfg = _cfg(
        tiny_teacher, tmp_path / "fsdp2", *extra, "engine.backend=fsdp2", "engine.fsdp2.reshard_after_forward=false"
    )
    got = run(cfg, "train")
    assert got["world_size"] == 1 and "RANK" not in os.environ  # nothing of the group is left behind
    for a, b in zip(ref["train_log"], got["train_log"], strict=True):  # the 2-rank FSDP2 test's tolerance
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["lr"] == pytest.approx(a["lr"], rel=1e-12)
        for k in a:
            if k.startswith("loss/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    assert [h["step"] for h in got["history"]] == [2, 4]
    assert got["memory"]["teacher_sharded"] and got["memory"]["param_mib"] == pytest.approx(ref["memory"]["param_mib"])
    from kdqat_dist.quant.student import load_student

    whole = load_student(tmp_path / "fsdp2" / "student")  # written from the gathered fp32 weights
    assert all(p.dtype == torch.float32 and p.numel() > 0 for p in whole.parameters())
