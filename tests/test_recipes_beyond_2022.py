"""The BitDistill and relation-KD recipes load, and train two steps on the tiny model end to end (student
saved, reloaded with the same score)."""

import json

import pytest

from kdqat_dist.config import load_config
from kdqat_dist.engine.loop import run
from kdqat_dist.models.subln import SubLNLinear
from kdqat_dist.pipeline import evaluate_folder
from kdqat_dist.quant.student import load_student

TINY = [
    "model.name_or_path=tiny-bert",
    "data.task=demo",
    "data.demo_size=200",
    "data.max_seq_length=32",
    "train.max_steps=2",
    "train.eval_every=2",
    "train.batch_size=16",
    "train.progress=false",
    "engine.backend=none",
]


@pytest.mark.parametrize("recipe", ["bitdistill_w158a8", "unified_relation_w2a8"])
def test_recipe_trains_two_steps_on_the_tiny_model(recipe, tiny_teacher, tmp_path):
    cfg = load_config(recipe, [*TINY, f"teacher.path={tiny_teacher}", f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.distill.attn_relation.weight > 0
    result = run(cfg, "train")
    student_dir = tmp_path / "run" / "student"
    student = load_student(student_dir)
    layer = student.bert.encoder.layer[0]
    if recipe == "bitdistill_w158a8":
        assert isinstance(layer.output.dense, SubLNLinear)
        assert layer.output.dense.linear.weight_quant.cfg.method == "absmean"
        assert layer.attention.self.query.act_quant.cfg.method == "absmax_token"
    else:
        assert cfg.distill.gamma == 0.5 and layer.attention.self.query.weight_quant.cfg.method == "twn"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best"]["step"] == 2
    again = evaluate_folder(cfg, str(student_dir))
    assert again["selection"] == pytest.approx(result["best"]["selection"], abs=0)
