"""`kdqat finetune` and `kdqat train` end to end on a tiny encoder and the built-in task."""

import json
from pathlib import Path

import pytest
import torch

from kdqat_dist.config import ConfigError, load_config
from kdqat_dist.engine.loop import Trainer, TrainingError, run
from kdqat_dist.pipeline import evaluate_folder
from kdqat_dist.quant.student import load_student


def test_finetune_checkpoint_reloads_with_identical_metrics(tiny_teacher):
    saved = json.loads((tiny_teacher / "metrics.json").read_text())
    cfg = load_config("tiny_debug")
    again = evaluate_folder(cfg, str(tiny_teacher))
    assert again["acc"] == pytest.approx(saved["acc"], abs=0)
    assert (tiny_teacher / "config.json").exists() and (tiny_teacher / "tokenizer.json").exists()


def test_train_lowers_kd_loss_and_writes_run_dir(tiny_teacher, tmp_path):
    cfg = load_config(
        "tiny_debug",
        [
            f"teacher.path={tiny_teacher}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=16",
            "train.eval_every=8",
            "train.lr=2e-4",
        ],
    )
    trainer = Trainer(cfg, "train").setup()
    batch = trainer.run.first_batch()
    trainer.student.eval()
    with torch.no_grad():
        before = trainer.objective(trainer.student, trainer.teacher, batch).total.item()
    result = trainer.train()
    trainer.student.eval()
    with torch.no_grad():
        after = trainer.objective(trainer.student, trainer.teacher, batch).total.item()
    trainer.cleanup()
    assert after < before, (before, after)
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "student/model.safetensors", "student/kdqat_student.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tb").glob("events.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best"]["step"] in (8, 16) and "teacher" in metrics
    # the saved best student reloads and scores exactly what was selected
    student = load_student(run_dir / "student")
    again = evaluate_folder(cfg, str(run_dir / "student"))
    assert again["selection"] == pytest.approx(result["best"]["selection"], abs=0)
    assert student.bert.encoder.layer[0].attention.self.query.weight_quant is not None


def test_keeping_the_teacher_blocks_instead_of_recomputing_them_trains_bit_for_bit_the_same(tiny_teacher, tmp_path):
    logs = []
    for keep in ("true", "false"):
        cfg = load_config(
            "tiny_debug",
            [
                f"teacher.path={tiny_teacher}",
                f"train.output_dir={tmp_path / keep}",
                "train.max_steps=4",
                "train.eval_every=4",
                "train.log_every=1",
                f"distill.recompute_teacher={keep}",
            ],
        )
        trainer = Trainer(cfg, "train").setup()
        # what the map term keeps for its backward: the block's call, or the teacher's Q and K
        assert ("attention_call" if keep == "true" else "map_inputs") in trainer.objective.teacher_taps()
        logs.append(trainer.train()["train_log"])
        trainer.cleanup()
    assert [r["step"] for r in logs[0]] == [1, 2, 3, 4]
    for a, b in zip(*logs, strict=True):
        assert {k: v for k, v in a.items() if k.startswith("loss")} == {
            k: v for k, v in b.items() if k.startswith("loss")
        }


def test_nan_loss_stops_with_step_and_term(tiny_teacher, tmp_path):
    cfg = load_config("tiny_debug", [f"teacher.path={tiny_teacher}", f"train.output_dir={tmp_path / 'nan'}"])
    trainer = Trainer(cfg, "train").setup()
    real = trainer.objective.term_loss

    def poisoned(term, s, t, mask, *rest):
        v = real(term, s, t, mask, *rest)
        return v * float("nan") if term == "attn_map" else v

    trainer.objective.term_loss = poisoned
    with pytest.raises(TrainingError, match=r"non-finite loss at step 1: term 'attn_map'"):
        trainer.train()
    trainer.cleanup()


def test_existing_run_dir_is_not_overwritten(tiny_teacher, tmp_path):
    cfg = load_config(
        "tiny_debug",
        [
            f"teacher.path={tiny_teacher}",
            f"train.output_dir={tmp_path / 'r'}",
            "train.max_steps=2",
            "train.eval_every=2",
        ],
    )
    run(cfg, "train")
    stamp = (tmp_path / "r" / "metrics.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg, "train")
    assert (tmp_path / "r" / "metrics.json").read_text() == stamp


def test_demo_runs_again_into_a_new_folder_and_never_overwrites(tmp_path, monkeypatch, capsys):
    # The README's main command must never fail: a second run (or one after an interruption) picks the
    # next free folder; a folder the user names explicitly is still protected.
    from kdqat_dist.pipeline import demo, pick_demo_dir

    monkeypatch.chdir(tmp_path)
    first = demo("tiny_debug", ["train.max_steps=2"], num_procs=1)
    summary = (tmp_path / "runs" / "tiny" / "summary.json").read_bytes()
    second = demo("tiny_debug", ["train.max_steps=2"], num_procs=1)
    assert "already holds a demo run; this one goes to runs/tiny-2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny" / "summary.json").read_bytes() == summary
    assert (tmp_path / "runs" / "tiny-2" / "summary.json").exists()
    assert second["kd_qat"]["total_steps"] == first["qat_no_kd"]["total_steps"] == 2
    with pytest.raises(ConfigError, match="already holds a demo run"):
        demo("tiny_debug", ["train.output_dir=runs/tiny"])
    with pytest.raises(ConfigError, match="already holds a demo run"):  # a half-written student stage
        (tmp_path / "runs" / "half" / "qat_no_kd").mkdir(parents=True)
        demo("tiny_debug", ["train.output_dir=runs/half"])
    # interrupted during the student stage -> next folder; teacher done, student not started -> reused
    (tmp_path / "runs" / "tiny-3" / "kd_qat").mkdir(parents=True)
    assert pick_demo_dir(Path("runs/tiny")) == Path("runs/tiny-4")
    (tmp_path / "runs" / "tiny-4" / "teacher" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "tiny-4" / "teacher" / "model" / "config.json").write_text("{}")
    (tmp_path / "runs" / "tiny-4" / "teacher" / "metrics.json").write_text("{}")
    assert pick_demo_dir(Path("runs/tiny")) == Path("runs/tiny-4")
    # a teacher run stopped after its first best checkpoint (model/ exists, no metrics.json) is unfinished
    (tmp_path / "runs" / "tiny-4" / "teacher" / "metrics.json").unlink()
    assert pick_demo_dir(Path("runs/tiny")) == Path("runs/tiny-5")


def test_tiny_teacher_learns_its_task_and_the_student_keeps_it(tmp_path):
    # The tiny recipes must teach something: a teacher at chance makes every smoke run and sweep trial
    # report the same accuracy. tiny_finetune learns the easy demo rule in seconds; tiny_debug's 12
    # KD-QAT steps keep most of it, and a student of the untrained checkpoint stays at chance.
    teacher = run(load_config("tiny_finetune", [f"train.output_dir={tmp_path / 't'}"]), "finetune")
    assert teacher["best"]["acc"] >= 0.85
    student = run(
        load_config("tiny_debug", [f"teacher.path={tmp_path / 't' / 'model'}", f"train.output_dir={tmp_path / 's'}"]),
        "train",
    )
    assert student["teacher"]["acc"] == teacher["best"]["acc"]
    assert student["best"]["acc"] >= 0.75


def test_teacher_stays_in_eval_mode_and_student_dropout_follows_train_dropout(tiny_teacher, tmp_path):
    cfg = load_config(
        "tiny_debug",
        [
            f"teacher.path={tiny_teacher}",
            f"train.output_dir={tmp_path / 'm'}",
            "train.max_steps=2",
            "train.eval_every=1",
            "train.dropout=0.25",
        ],
    )
    tr = Trainer(cfg, "train").setup()
    try:
        assert tr.teacher.config.hidden_dropout_prob > 0  # a realistic teacher: dropout on when training
        tr.train()
        assert not any(m.training for m in tr.teacher.modules())
        drops = [m.p for m in tr.student.modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(p == 0.25 for p in drops) and tr.student.config.hidden_dropout_prob == 0.25
        assert all(m.p > 0 and m.p != 0.25 for m in tr.teacher.modules() if isinstance(m, torch.nn.Dropout))
    finally:
        tr.cleanup()
