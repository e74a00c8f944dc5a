"""Kill-and-resume in one process: a run stopped after a checkpoint and resumed ends exactly where an
uninterrupted run ends (same losses at every step, same evaluations, same saved student)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdqat_dist.config import ConfigError, load_config, save_config
from kdqat_dist.engine.checkpoint import commit_checkpoint, latest_checkpoint
from kdqat_dist.engine.local import LocalBackend
from kdqat_dist.engine.loop import Trainer, run
from kdqat_dist.models.tiny import make_tiny_checkpoint


class Killed(Exception):
    """Stands in for SIGKILL: raised from inside a training step."""


class KilledAfter(LocalBackend):
    """A LocalBackend whose process 'dies' in the middle of optimizer step ``n + 1``."""

    def __init__(self, cfg, n: int):
        super().__init__(cfg)
        self.left = n

    def step(self) -> None:
        if self.left == 0:
            raise Killed
        super().step()
        self.left -= 1


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    # A random tiny encoder is a valid teacher; dropout stays on, so the RNG restore is exercised too.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("resume_teacher") / "model")


def _cfg(teacher: Path, out: Path, *extra: str):
    return load_config(
        "tiny_debug",
        [
            f"teacher.path={teacher}",
            f"train.output_dir={out}",
            "train.max_steps=8",
            "train.save_every=3",
            "train.log_every=1",
            "train.eval_every=4",
            "train.grad_accum=2",
            *extra,
        ],
    )


def test_killed_and_resumed_run_matches_uninterrupted(teacher, tmp_path):
    full = run(_cfg(teacher, tmp_path / "full"), "train")

    cfg = _cfg(teacher, tmp_path / "killed")
    trainer = Trainer(cfg, "train", backend=KilledAfter(cfg, 5)).setup()
    with pytest.raises(Killed):
        trainer.train()  # dies during step 6; the last checkpoint is step 3
    trainer.cleanup()
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step0000003"

    resumed = run(cfg, "train", resume=True)
    assert [r["step"] for r in resumed["train_log"]] == list(range(1, 9))
    for a, b in zip(full["train_log"], resumed["train_log"], strict=True):
        assert a == b  # every reduced loss term and the learning rate, bit for bit
    assert resumed["history"] == full["history"] and resumed["best"] == full["best"]
    assert resumed["teacher"] == full["teacher"]
    w_full = load_file(str(tmp_path / "full" / "student" / "model.safetensors"))
    w_res = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    assert w_full.keys() == w_res.keys()
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    # TensorBoard: the steps logged after the checkpoint (4, 5) by the killed run are purged, not doubled
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "killed" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("eval/acc")] == [4, 8]


def test_resume_with_other_settings_is_refused_and_touches_nothing(teacher, tmp_path):
    cfg = _cfg(teacher, tmp_path / "run", "train.max_steps=3")
    run(cfg, "train")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    tb_before = sorted((tmp_path / "run" / "tb").iterdir())
    changed = _cfg(
        teacher, tmp_path / "run", "train.max_steps=5", "quant.weight.bits=4", "quant.weight.method=sym", "train.lr=0.5"
    )
    with pytest.raises(ConfigError) as e:
        run(changed, "train", resume=True)
    msg = str(e.value)
    assert "quant.weight.bits (2 -> 4)" in msg and "quant.weight.method ('twn' -> 'sym')" in msg
    assert "train.lr (0.001 -> 0.5)" in msg and "train.max_steps" not in msg.split("only")[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    assert sorted((tmp_path / "run" / "tb").iterdir()) == tb_before
    out = run(_cfg(teacher, tmp_path / "run", "train.max_steps=5"), "train", resume=True)  # longer: allowed
    assert out["total_steps"] == 5 and [r["step"] for r in out["train_log"]] == [1, 2, 3, 4, 5]


def test_resume_of_a_finished_run_without_checkpoint_names_the_fix(teacher, tmp_path):
    cfg = _cfg(teacher, tmp_path / "none", "train.save_every=null", "train.max_steps=1")
    run(cfg, "train")
    before = {p.name: p.read_bytes() for p in (tmp_path / "none").iterdir() if p.is_file()}
    tb_before = sorted((tmp_path / "none" / "tb").iterdir())
    with pytest.raises(ConfigError, match="finished run and no checkpoint.*train.save_every"):
        run(cfg, "train", resume=True)
    # nothing overwritten or added: metrics, config.yaml, TensorBoard
    assert {p.name: p.read_bytes() for p in (tmp_path / "none").iterdir() if p.is_file()} == before
    assert sorted((tmp_path / "none" / "tb").iterdir()) == tb_before


def test_resume_before_the_first_checkpoint_starts_from_step_0(teacher, tmp_path):
    # A job preempted before its first checkpoint and requeued with --resume (the Slurm scripts pass it
    # on every restart): its folder holds only the config; the run must start over, not refuse.
    cfg = _cfg(teacher, tmp_path / "early", "train.max_steps=2")
    (tmp_path / "early").mkdir()
    save_config(cfg, tmp_path / "early" / "config.yaml")
    with pytest.raises(ConfigError, match="already holds a run"):  # without --resume it is protected
        run(cfg, "train")
    out = run(cfg, "train", resume=True)
    assert [r["step"] for r in out["train_log"]] == [1, 2]
    out = run(_cfg(teacher, tmp_path / "never", "train.max_steps=1"), "train", resume=True)  # no folder at all
    assert out["total_steps"] == 1


def test_latest_never_names_a_partial_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step0000002.tmp").mkdir(parents=True)
    (root / "step0000002.tmp" / "state.pt").write_text("complete")
    commit_checkpoint(root / "step0000002.tmp", root / "step0000002")
    # a writer killed half-way through the next checkpoint leaves only a .tmp folder behind
    (root / "step0000004.tmp").mkdir()
    (root / "step0000004.tmp" / "state.pt").write_text("parti")
    assert latest_checkpoint(root) == root / "step0000002"
    assert (root / "latest").read_text() == "step0000002"  # DeepSpeed's format: the bare tag
    assert not (root / "latest.tmp").exists()
    # the legacy JSON pointer is still understood
    (root / "latest").write_text(json.dumps({"tag": "step0000002"}))
    assert latest_checkpoint(root) == root / "step0000002"


def test_only_the_newest_checkpoints_are_kept(teacher, tmp_path):
    cfg = _cfg(
        teacher,
        tmp_path / "keep",
        "train.max_steps=5",
        "train.save_every=1",
        "train.keep_checkpoints=2",
        "train.grad_accum=1",
    )
    run(cfg, "train")
    root = tmp_path / "keep" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step0000004", "step0000005"]
    assert latest_checkpoint(root) == root / "step0000005"


def test_pruning_never_deletes_what_latest_names(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step000000{step}.tmp").mkdir(parents=True)
        commit_checkpoint(root / f"step000000{step}.tmp", root / f"step000000{step}", keep=1)
    (root / "step0000009").mkdir()  # a newer-named folder that latest does not name (e.g. copied in)
    (root / "step0000004.tmp").mkdir()
    commit_checkpoint(root / "step0000004.tmp", root / "step0000004", keep=1)
    assert latest_checkpoint(root) == root / "step0000004"
    assert (root / "step0000004").exists() and not (root / "step0000001").exists()


def test_truncated_checkpoint_is_one_line_naming_the_fix(teacher, tmp_path):
    cfg = _cfg(teacher, tmp_path / "t", "train.max_steps=3", "train.save_every=3")
    run(cfg, "train")
    state = tmp_path / "t" / "checkpoints" / "step0000003" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(ConfigError) as e:
        run(_cfg(teacher, tmp_path / "t", "train.max_steps=4", "train.save_every=3"), "train", resume=True)
    msg = str(e.value)
    assert "step0000003 is damaged or incomplete" in msg and "latest" in msg and "\n" not in msg


# --------------------------------------------------------------------------- every resume state is exact or refused


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (path -> bytes): what a refused resume must leave exactly as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpointed(teacher, tmp_path_factory) -> Path:
    """A 3-step run with its checkpoint at step 3 (copied by each test before it is damaged)."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    run(_cfg(teacher, out, "train.max_steps=3"), "train")
    return out


def _copy_run(teacher: Path, src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst``, its config.yaml naming ``dst`` as the run's own output_dir."""
    shutil.copytree(src, dst)
    save_config(_cfg(teacher, dst, "train.max_steps=3"), dst / "config.yaml")
    return dst


def _refused(teacher: Path, run_dir: Path, *extra: str) -> str:
    """The one line a --resume of ``run_dir`` stops with; nothing under it changes."""
    before = _files(run_dir)
    with pytest.raises(ConfigError) as e:
        run(_cfg(teacher, run_dir, "train.max_steps=4", *extra), "train", resume=True)
    assert _files(run_dir) == before
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "latest, problem",
    [
        ("step0000009", r"names step0000009, but .*step0000009 does not exist"),
        ("step0000003/../../elsewhere", "does not name a checkpoint"),
        ("not a tag", "does not name a checkpoint"),
        ('{"tag": "step00', "does not name a checkpoint"),
        ('{"step": 3}', "does not name a checkpoint"),
        ("", "does not name a checkpoint"),
    ],
)
def test_a_latest_that_names_no_checkpoint_is_refused_naming_the_file(teacher, checkpointed, tmp_path, latest, problem):
    run_dir = _copy_run(teacher, checkpointed, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").write_text(latest)
    msg = _refused(teacher, run_dir)
    assert msg.startswith(f"--resume: {run_dir / 'checkpoints' / 'latest'} ") and re.search(problem, msg), msg
    assert "step0000003 here" in msg  # what to write into it instead


def test_checkpoints_without_latest_are_refused_not_restarted(teacher, checkpointed, tmp_path, capsys):
    from kdqat_dist.cli import main

    run_dir = _copy_run(teacher, checkpointed, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").unlink()
    msg = _refused(teacher, run_dir)
    assert "holds checkpoints but no 'latest' file" in msg and "step0000003" in msg
    # the same through the command line: one line, exit 2, no traceback
    before = _files(run_dir)
    argv = ["train", "--resume", "--config", "tiny_debug", f"teacher.path={teacher}", f"train.output_dir={run_dir}"]
    assert main([*argv, "train.max_steps=4", "train.save_every=3", "train.grad_accum=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdqat: error: --resume:") and err.count("\n") == 1 and "Traceback" not in err
    assert _files(run_dir) == before


def test_a_checkpoint_of_another_model_is_refused_naming_it(teacher, checkpointed, tmp_path):
    # A checkpoint folder copied from a run of another model (hidden 48, not 32) into a run whose config
    # is the same: the tensors do not fit, and the resume says so instead of failing in load_state_dict.
    wide = make_tiny_checkpoint(tmp_path / "wide_teacher", hidden_size=48)
    run(_cfg(wide, tmp_path / "wide", "train.max_steps=3"), "train")
    run_dir = _copy_run(teacher, checkpointed, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")
    shutil.copytree(tmp_path / "wide" / "checkpoints", run_dir / "checkpoints")
    msg = _refused(teacher, run_dir)
    assert f"the checkpoint {run_dir / 'checkpoints' / 'step0000003'} does not fit the model" in msg
    assert "size mismatch" in msg, msg
