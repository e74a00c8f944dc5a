"""2 CPU ranks over gloo, real DeepSpeed: a token-classification student (ZeRO-2 / ZeRO-3) with a ZeRO-3
teacher against one process with grad_accum=2 (the same micro-batches; tolerances as test_dist_zero.py).

The token head's logit KD and ground truth average over the labelled first sub-tokens of each micro-batch,
so the per-micro-batch means, and the entity F1 of every evaluation, must match the single-process run.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForTokenClassification

from kdqat_dist.engine.loop import run
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
STEPS = 3
_TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
_WORDS = ["the", "film", "critics", "found", "it", "funny", "anna", "paris", "rome", "bob"]


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory):
    """A random tiny BertForTokenClassification teacher (9 CoNLL tags, dropout 0.1) and a CoNLL folder."""
    root = tmp_path_factory.mktemp("token_parity")
    base = make_tiny_checkpoint(root / "base")
    teacher = load_classifier(str(base), 9, auto_class=AutoModelForTokenClassification)
    teacher.save_pretrained(root / "teacher")
    load_tokenizer(str(base)).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    data = root / "conll"
    data.mkdir()
    for name, n in (("train.txt", 48), ("valid.txt", 16)):
        lines = []
        for _ in range(n):
            for _ in range(int(rng.integers(3, 9))):
                lines.append(f"{rng.choice(_WORDS)} NN {rng.choice(_TAGS)}")
            lines.append("")
        (data / name).write_text("\n".join(lines) + "\n")
    return root / "teacher", data


def _assert_same_losses(ref: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        for k in a:
            if k.startswith("loss/"):
                assert b[k] == pytest.approx(a[k], abs=1e-6), (a["step"], k)


def test_token_student_on_two_ranks_with_a_zero3_teacher_matches_one_process(
    token_setup, parity_config, launch_env, run_job, tmp_path
):
    teacher, data = token_setup
    task = ("data.task=conll2003", f"data.source={data}")
    local = run(parity_config(teacher, tmp_path / "local", "train.grad_accum=2", *task), "train")
    assert "loss/logits" in local["train_log"][0]
    out = tmp_path / "two"
    out.mkdir()
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "tests/distributed/token_checks.py",
           "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--steps", str(STEPS)]  # fmt: skip
    proc = run_job(cmd, launch_env, REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    _assert_same_losses(local["train_log"], ranks[0]["zero2"])
    _assert_same_losses(local["train_log"], ranks[0]["zero3"])
    assert ranks[0]["zero3"] == ranks[1]["zero3"]
    for a, b in zip(local["history"], ranks[0]["evals_zero3"], strict=True):
        assert b["f1"] == pytest.approx(a["f1"], abs=1e-9) and b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9)
