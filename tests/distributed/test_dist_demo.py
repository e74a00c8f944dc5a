"""`kdqat demo` runs the product's shape: its KD-QAT stage on 2 DeepSpeed CPU ranks through the launcher
(student ZeRO-2, teacher ZeRO-3), beside the same student trained without KD, and prints both."""

import json

import pytest

from kdqat_dist.pipeline import demo


@pytest.mark.dist
def test_demo_runs_kd_qat_on_2_ranks_with_the_teacher_sharded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    res = demo("tiny_debug", ["train.max_steps=4", "train.eval_every=2"], num_procs=2)
    out = capsys.readouterr().out
    assert "[demo] 3/4 KD-QAT on 2 DeepSpeed ranks" in out and "--num_accelerators 2" in out
    for row in ("teacher (fp32)", "QAT without KD", "KD-QAT (2 ranks)", "KD-QAT, deployed (ONNX int8)"):
        assert row in out
    # the deployed student: ONNX Runtime's int8 kernels (12 Linears + pooler + 4 attention matmuls), its dev
    # score, its speed over the teacher
    dep = res["deployed"]
    assert dep["integer_ops"] == {"MatMulIntegerToFloat": 17} and dep["speed"]["speedup"] > 0
    assert dep["dev"]["onnx"]["acc"] == pytest.approx(res["kd_qat"]["best"]["acc"], abs=0.02)
    assert "memory (MiB) per rank" in out and "rank 1" in out
    saved = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert saved["num_procs"] == 2 and saved["kd_qat"]["total_steps"] == 4
    ranks = res["kd_qat"]["memory_per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["teacher_zero3"] and r["zero_stage"] == 2 for r in ranks)
    # the teacher is sharded: each rank holds about half of what the one-process run holds whole
    whole = res["qat_no_kd"]["memory"]["teacher_param_mib"]
    assert whole > 0
    for r in ranks:
        assert 0.4 * whole < r["teacher_param_mib"] < 0.6 * whole
    # both students were trained from the same teacher; the KD run reports that teacher's score
    assert res["kd_qat"]["teacher"]["acc"] == pytest.approx(res["qat_no_kd"]["teacher"]["acc"])
