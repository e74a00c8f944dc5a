"""Extractive QA on 2 DeepSpeed CPU ranks (gloo): a tiny QA student with a ZeRO-3 teacher (launch/torchrun.sh,
a real `kdqat train`) against one process with grad_accum=2 on the same global batch of stride windows."""

import json
from pathlib import Path

import pytest

from kdqat_dist.config import load_config
from kdqat_dist.data.qa_toy import write_toy_squad
from kdqat_dist.engine.loop import run

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
STEPS = 3
QA = ["data.task=squad", "data.max_seq_length=32", "data.doc_stride=8", "distill.attn_output.weight=1"]


def _overrides(squad: Path, teacher: Path, out: Path) -> list[str]:
    return [
        f"data.source={squad}",
        *QA,
        f"teacher.path={teacher}",
        f"train.output_dir={out}",
        "train.log_every=1",
        "train.dropout=0",
        f"train.max_steps={STEPS}",
        f"train.eval_every={STEPS}",
    ]


def test_qa_student_with_a_zero3_teacher_on_2_ranks_matches_one_process(tmp_path, launch_env, run_job):
    squad = write_toy_squad(tmp_path / "squad", n_train=16, n_dev=4)
    ft = tmp_path / "teacher"
    run(
        load_config("tiny_finetune", [f"data.source={squad}", *QA[:3], f"train.output_dir={ft}", "train.max_steps=4"]),
        "finetune",
    )
    teacher = ft / "model"
    ref = run(load_config("tiny_debug", [*_overrides(squad, teacher, tmp_path / "one"), "train.grad_accum=2"]), "train")
    out = tmp_path / "two"
    cmd = [
        "bash",
        "launch/torchrun.sh",
        "tiny_debug",
        *_overrides(squad, teacher, out),
        "engine.deepspeed.zero_stage=2",
        "engine.deepspeed.teacher=zero3",
    ]
    proc = run_job(cmd, {**launch_env, "NUM_PROCS": "2"}, REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((out / "metrics.json").read_text())
    assert got["world_size"] == 2 and got["memory_per_rank"][1]["teacher_zero3"]
    a_log, b_log = ref["train_log"], got["train_log"]
    assert [r["step"] for r in b_log] == [r["step"] for r in a_log] == list(range(1, STEPS + 1))
    for a, b in zip(a_log, b_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert {"loss/logits", "loss/attn_map", "loss/attn_output"} <= set(a)
        for k in a:
            if k.startswith("loss/"):
                assert b[k] == pytest.approx(a[k], abs=1e-6), (a["step"], k)
    # the same student: the same dev F1 after the same steps (every rank scores every window)
    assert got["best"]["f1"] == pytest.approx(ref["best"]["f1"], abs=1e-6)
    assert got["teacher"]["f1"] == pytest.approx(ref["teacher"]["f1"], abs=1e-6)
