"""DeepSpeed configs: "auto" fields come from the run config, explicit values must agree with it, the
resolved JSON round-trips through the run directory; and only engine/ imports the distributed stack."""

import json
import re
from pathlib import Path

import pytest

from kdqat_dist.config import ConfigError, load_config
from kdqat_dist.engine import ds_config

PACKAGE = Path(__file__).resolve().parents[1] / "kdqat_dist"


def _cfg(*overrides: str):
    return load_config(
        None,
        [
            "train.batch_size=32",
            "train.grad_accum=2",
            "train.max_grad_norm=0.5",
            "train.lr=3e-5",
            "train.weight_decay=0.02",
            "train.adam_eps=1e-7",
            *overrides,
        ],
    )


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_student_configs_resolve_from_the_run_config(stage):
    cfg = _cfg(f"engine.deepspeed.zero_stage={stage}")
    out = ds_config.build(cfg, world_size=4, kind="student", hidden_size=64)
    assert out["train_batch_size"] == 32
    assert out["train_micro_batch_size_per_gpu"] == 4  # 32 / (4 ranks x 2 accumulation steps)
    assert out["gradient_accumulation_steps"] == 2
    assert out["gradient_clipping"] == 0.5
    assert out["zero_optimization"]["stage"] == stage
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False
    assert "optimizer" not in out  # engine.deepspeed.optimizer=torch: our AdamW object is passed instead
    assert "auto" not in json.dumps(out)
    if stage == 3:
        z = out["zero_optimization"]
        assert z["stage3_param_persistence_threshold"] == 640
        assert z["reduce_bucket_size"] == 64 * 64


def test_teacher_config_is_zero3_without_optimizer():
    out = ds_config.build(_cfg("engine.precision=bf16"), world_size=2, kind="teacher", hidden_size=32)
    assert out["zero_optimization"]["stage"] == 3
    assert out["bf16"]["enabled"] is True
    assert "optimizer" not in out and "gradient_clipping" not in out
    assert out["train_micro_batch_size_per_gpu"] == 8


def test_deepspeed_optimizer_gets_the_run_hyperparameters():
    out = ds_config.build(_cfg("engine.deepspeed.optimizer=deepspeed"), world_size=1, kind="student")
    assert out["optimizer"]["type"] == "AdamW"
    assert out["optimizer"]["params"] == {"lr": 3e-5, "betas": [0.9, 0.999], "eps": 1e-7, "weight_decay": 0.02}


def test_explicit_value_contradicting_the_run_config_is_an_error():
    base = {"train_batch_size": 64, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"mine.json: train_batch_size is 64 but train.batch_size gives 32"):
        ds_config.resolve(base, _cfg(), world_size=1, source="mine.json")
    base = {"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"gradient_clipping is 1.0 but train.max_grad_norm gives 0.5"):
        ds_config.resolve(base, _cfg(), world_size=1)
    base = {"zero_optimization": {"stage": 1}}
    with pytest.raises(ConfigError, match=r"zero_optimization.stage is 1 but engine.deepspeed.zero_stage gives 2"):
        ds_config.resolve(base, _cfg(), world_size=1)
    base = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ConfigError, match=r"optimizer.params.lr is 0.001 but train.lr gives 3e-05"):
        ds_config.resolve(base, _cfg(), world_size=1)


def test_explicit_values_that_agree_are_kept_and_owned_sections_are_rejected():
    base = {
        "train_batch_size": 32,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": False},
    }
    out = ds_config.resolve(base, _cfg(), world_size=2)
    assert out["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(ConfigError, match="remove the 'scheduler' section"):
        ds_config.resolve({"scheduler": {"type": "WarmupLR"}}, _cfg(), world_size=1)
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        ds_config.resolve({}, _cfg(), world_size=3)
    with pytest.raises(ConfigError, match='steps_per_print is "auto" but nothing'):
        ds_config.resolve({"steps_per_print": "auto"}, _cfg(), world_size=1)


def test_resolved_config_is_written_once_and_read_back(tmp_path):
    cfg = _cfg(f"train.output_dir={tmp_path}")
    out = ds_config.build(cfg, world_size=2, kind="student", hidden_size=32)
    path = ds_config.write_resolved(out, tmp_path, "student")
    assert path == tmp_path / "ds_config_student.json"
    assert ds_config.read_resolved(tmp_path, "student") == out
    assert [p.name for p in tmp_path.iterdir()] == ["ds_config_student.json"]  # no temp file left
    with pytest.raises(ConfigError, match="shared by all nodes"):
        ds_config.read_resolved(tmp_path / "elsewhere", "student")


def test_custom_base_file_and_missing_file(tmp_path):
    p = tmp_path / "custom.json"
    p.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": "auto"}}))
    out = ds_config.build(_cfg(f"engine.deepspeed.config={p}", "engine.deepspeed.zero_stage=1"), 1, "student")
    assert out["zero_optimization"]["stage"] == 1
    with pytest.raises(ConfigError, match="engine.deepspeed.config: .*nope.json does not exist"):
        ds_config.build(_cfg(f"engine.deepspeed.config={tmp_path / 'nope.json'}"), 1, "student")


IMPORT = re.compile(
    r"^\s*(import|from)\s+(deepspeed|torch\.distributed)\b|"
    r"^\s*from\s+torch\s+import\s+.*\bdistributed\b",
    re.M,
)


def test_only_engine_imports_deepspeed_or_torch_distributed():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("engine/"):
            continue
        if IMPORT.search(path.read_text()):
            offenders.append(rel)
    assert not offenders, f"only kdqat_dist/engine/ may import deepspeed or torch.distributed: {offenders}"
    # and the engine really is where they live
    engine = "".join(p.read_text() for p in (PACKAGE / "engine").glob("*.py"))
    assert IMPORT.search(engine)


def test_the_suite_collects_the_distributed_tests():
    # pytest skips folders named "dist" by default (norecursedirs): the 2-rank DeepSpeed tests once sat in
    # tests/dist and never ran in `make test`. Guard the folder name and the collection.
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for name in ("test_dist_zero.py", "test_dist_launch.py", "test_dist_single_rank.py"):
        assert f"tests/distributed/{name}::" in out, name
