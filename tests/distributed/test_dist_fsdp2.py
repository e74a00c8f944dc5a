"""2 CPU ranks over gloo, real PyTorch FSDP2: a sharded student and a sharded teacher against one process.

One 2-rank job (tests/distributed/fsdp2_checks.py under torchrun) runs every check. The teacher's dropout
is on in its config (0.1, as a real checkpoint): a teacher left in training mode would change every run.
Tolerance: the total loss of every step within 1e-4 relative of the single-process run on the same
micro-batches (only the order of floating-point reductions differs), and every term within 1e-4 relative
or 1e-6 absolute (the attention-map KL of these near-identical models is ~4e-5: its last bits move by
~1e-8 with the reduction order, already with the thread count of the one-process run); the teacher's taps
exactly equal; a resumed run equal to the uninterrupted one bit for bit.
"""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def _assert_same_losses(ref: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, len(ref) + 1))
    assert max(abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(ref, got, strict=True)) < 1e-4
    for a, b in zip(ref, got, strict=True):
        assert a.keys() == b.keys()
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
        for k in a:
            if k.startswith("loss/"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])


@pytest.fixture(scope="module")
def fsdp2_ranks(parity_teacher, launch_env, run_job, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_checks")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "tests/distributed/fsdp2_checks.py"]
    proc = run_job([*cmd, "--teacher", str(parity_teacher), "--out", str(out), "--steps", str(STEPS)], launch_env, REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_fsdp2_student_and_teacher_match_one_process(fsdp2_ranks, local_reference):
    r0, r1 = fsdp2_ranks
    assert r0["world_size"] == r1["world_size"] == 2
    _assert_same_losses(local_reference["twn"], r0["twn"])  # TWN weights
    _assert_same_losses(local_reference["lsq"], r0["lsq"])  # LSQ steps of shape (1,): on rank 0 only
    _assert_same_losses(local_reference["relation"], r0["relation"])  # SEQ's per-row clips, SubLN
    _assert_same_losses(local_reference["bertadam"], r0["bertadam"])  # per-tensor clipping of sharded grads
    assert r0["twn"] == r1["twn"]  # reduced values: identical on every rank


def test_fsdp2_gradient_accumulation_and_finetune_match_one_process(
    fsdp2_ranks, parity_teacher, parity_config, tmp_path
):
    from kdqat_dist.engine.loop import run

    # two micro-batches per rank and step: the first backward keeps its gradients unreduced
    ref = run(parity_config(parity_teacher, tmp_path / "accum", "train.grad_accum=4"), "train")["train_log"]
    _assert_same_losses(ref, fsdp2_ranks[0]["accum"])
    ft = parity_config(parity_teacher, tmp_path / "ft", "train.grad_accum=2", f"model.name_or_path={parity_teacher}")
    _assert_same_losses(run(ft, "finetune")["train_log"], fsdp2_ranks[0]["finetune"])


def test_fsdp2_bf16_policy_stays_close_to_fp32(fsdp2_ranks, local_reference):
    ref, got = local_reference["twn"], fsdp2_ranks[0]["bf16"]
    for a, b in zip(ref, got, strict=True):
        for k in a:
            if k.startswith("loss"):
                assert b[k] == pytest.approx(a[k], rel=3e-2, abs=1e-4), (a["step"], k, a[k], b[k])
                assert b[k] != a[k], (a["step"], k)  # really computed in bf16


def test_killed_fsdp2_run_resumes_to_the_uninterrupted_run(fsdp2_ranks):
    for r in fsdp2_ranks:
        res = r["resume"]
        assert res["checkpoints"] == ["latest", "step0000003", "step0000006"]
        assert [x["step"] for x in res["resumed"]["train_log"]] == list(range(1, 7))
        assert res["resumed"]["train_log"] == res["full"]["train_log"]  # every loss term and lr, bit for bit
        assert res["resumed"]["history"] == res["full"]["history"] and res["resumed"]["best"] == res["full"]["best"]
        assert res["student_equal"]  # the consolidated student/ folder, tensor for tensor


def test_fsdp2_teacher_taps_equal_unsharded_and_each_rank_holds_half(fsdp2_ranks):
    for r in fsdp2_ranks:
        assert set(r["taps"]) >= {"hidden/2", "probs/1", "scores/0", "context/1", "attn_output/1", "qkv/1", "logits"}
        assert max(r["taps"].values()) == 0.0, r["taps"]
        assert not r["teacher_training"]  # eval mode: its dropout (0.1 in its config) never runs
        assert 0.45 <= r["teacher_param_bytes"] / r["teacher_full_bytes"] <= 0.55
    # the memory table of a training run: the teacher's parameters at about 1/2 per rank, the student's too
    full_mib = fsdp2_ranks[0]["teacher_full_bytes"] / 2**20
    for rank, m in enumerate(fsdp2_ranks[0]["memory"]):
        assert m["rank"] == rank and m["teacher_sharded"]
        assert 0.45 * full_mib <= m["teacher_param_mib"] <= 0.55 * full_mib, m
        assert 0.45 * full_mib <= m["param_mib"] <= 0.55 * full_mib, m  # the student: the teacher's shape
        assert m["optim_mib"] == pytest.approx(2 * m["param_mib"], rel=1e-6)  # AdamW's moments, sharded
