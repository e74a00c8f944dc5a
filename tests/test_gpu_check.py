"""bench/gpu_check.py at tiny size on the CPU, as the GPU machine runs it: one command, then its JSON."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 6

FIGURES = (
    "kd_step_s",
    "fp_step_s",
    "qat_step_s",
    "naive_step_s",
    "tokens_per_step",
    "tokens_per_s",
    "flops_per_step",
    "achieved_tflops",
    "peak_tflops",
    "mfu",
    "mfu_non_embedding",
    "fp_mfu",
    "kd_over_fp",
)
MEMORY = (
    "kd_streaming_mib",
    "qat_no_kd_mib",
    "kd_naive_mib",
    "streaming_over_qat",
    "streaming_over_naive",
    "kd_streaming_working_mib",
    "qat_no_kd_working_mib",
    "kd_naive_working_mib",
    "working_streaming_over_qat",
    "working_streaming_over_naive",
)
VARIANTS = ("kd_streaming", "fp_finetune", "qat_no_kd", "kd_naive", "curve_bf16", "curve_fp32")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--out",
            str(out),
            "--tiny",
            "--steps",
            str(STEPS),
            "--warmup",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| MFU " in proc.stdout and "KD step / FP step" in proc.stdout
    return json.loads((out / "gpu_check.json").read_text()), out


def test_every_figure_is_there_finite_and_positive(report):
    r, _ = report
    assert r["tiny"] is True and r["shape"]["layers"] == 2 and r["shape"]["hidden"] == 64
    for key in FIGURES:
        assert _positive(r["figures"][key]), (key, r["figures"].get(key))
    for key in MEMORY:
        assert _positive(r["memory"][key]), (key, r["memory"].get(key))
    for key in ("teacher", "student", "teacher_non_embedding", "student_non_embedding"):
        assert _positive(r["params"][key]), key
    assert r["params"]["student_non_embedding"] < r["params"]["student"]
    assert r["memory"]["method"] and r["figures"]["peak_source"]
    assert r["memory"]["zero2_grad_bucket_mib"] >= 0


def test_figures_agree_with_each_other(report):
    r, _ = report
    f, s, p = r["figures"], r["shape"], r["params"]
    tokens = s["batch"] * s["seq"]
    assert f["tokens_per_step"] == tokens
    assert f["tokens_per_s"] == pytest.approx(tokens / f["kd_step_s"])
    assert f["flops_per_step"] == tokens * (2 * p["teacher"] + 6 * p["student"])
    assert f["mfu"] == pytest.approx(f["flops_per_step"] / f["kd_step_s"] / 1e12 / f["peak_tflops"])
    assert f["kd_over_fp"] == pytest.approx(f["kd_step_s"] / f["fp_step_s"])
    m = r["memory"]
    assert m["streaming_over_qat"] == pytest.approx(m["kd_streaming_mib"] / m["qat_no_kd_mib"])
    for v in ("kd_streaming", "qat_no_kd", "kd_naive"):
        assert m[f"{v}_working_mib"] <= m[f"{v}_mib"]
    limits = {"mfu": (0.40, True), "kd_over_fp": (1.4, False), "streaming_over_qat": (1.1, False)}
    for key, (limit, at_least) in limits.items():
        t = r["targets"][key]
        assert t["pass"] == (t["value"] >= limit if at_least else t["value"] <= limit), key


def test_every_variant_ran_its_steps(report):
    r, _ = report
    for name in VARIANTS:
        v = r["variants"][name]
        assert len(v["losses"]) == STEPS and len(v["step_s_all"]) == STEPS, name
        assert all(_positive(x) for x in v["losses"] + v["step_s_all"]), name
        assert v["params_student"] == r["params"]["student"], name
    assert r["variants"]["fp_finetune"]["params_teacher"] == 0  # no teacher held without KD
    assert r["variants"]["qat_no_kd"]["params_teacher"] == 0


def test_bf16_and_fp32_loss_curves_are_close_but_not_equal(report):
    r, _ = report
    c = r["loss_curves"]
    assert c["steps"] == STEPS and len(c["bf16"]) == len(c["fp32"]) == STEPS
    assert r["variants"]["curve_fp32"]["precision"] == "fp32"
    assert r["variants"]["curve_bf16"]["teacher_dtype"] == "torch.bfloat16"
    assert r["variants"]["curve_fp32"]["teacher_dtype"] == "torch.float32"
    # really computed in bf16 (8 mantissa bits), and still the same training run
    assert 0 < c["max_rel_diff"] < 0.05
    pairs = zip(c["bf16"], c["fp32"], strict=True)
    assert c["max_rel_diff"] == pytest.approx(max(abs(a - b) / abs(b) for a, b in pairs))


def test_markdown_holds_the_table_and_the_targets(report):
    _, out = report
    md = (out / "gpu_check.md").read_text()
    assert md.count("| ") > 15
    assert all(w in md for w in ("MFU", "KD step / FP step", "streaming / QAT-no-KD peak", "bf16 vs fp32"))
    assert md.count("(target ") == 3
    assert not (out / "runs" / "kd_streaming" / "model.safetensors").exists()  # the random weights stay in tmp


def test_the_fsdp2_variant_runs_the_same_step_under_the_other_engine(report):
    r, _ = report
    v, ds = r["variants"]["kd_streaming_fsdp2"], r["variants"]["kd_streaming"]
    assert v["engine"] == "fsdp2" and ds["engine"] == "deepspeed"
    assert len(v["losses"]) == STEPS and all(_positive(x) for x in v["losses"] + v["step_s_all"])
    assert v["params_student"] == ds["params_student"] and v["params_teacher"] == ds["params_teacher"]
    assert v["teacher_dtype"] == ds["teacher_dtype"] == "torch.bfloat16"  # each engine casts the teacher
    # the same weights and batch: the first step's loss agrees to bf16's rounding
    assert v["losses"][0] == pytest.approx(ds["losses"][0], rel=5e-2)
    f = r["figures"]
    assert f["fsdp2_kd_step_s"] == v["step_s"]
    assert f["fsdp2_over_deepspeed"] == pytest.approx(v["step_s"] / ds["step_s"])
    assert r["memory"]["kd_streaming_fsdp2_mib"] is None  # no CPU trace of sharded tensors (GPU only)
