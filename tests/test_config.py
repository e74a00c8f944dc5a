"""The typed config: every recipe parses, overrides are typed, bad input gives one clear line."""

from pathlib import Path

import pytest
import yaml

from kdqat_dist.config import RECIPES_DIR, ConfigError, flat_keys, load_config, save_config

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"demo", "tiny_debug", "bert_base_w2a8_kd", "bert_large_w2a8_kd", "kdlsq_w2a8"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert cfg.train.batch_size is None or cfg.train.batch_size > 0  # null: the task's batch
    assert path.read_text().startswith("#"), "each recipe opens with a comment saying how to run it"


def test_null_batch_size_takes_the_papers_per_task_batch(tiny_teacher, tmp_path):
    from kdqat_dist.data.tasks import TASKS
    from kdqat_dist.engine.loop import Trainer

    assert TASKS["cola"].batch_size == 16 and {t.batch_size for n, t in TASKS.items() if n != "cola"} == {32}
    cfg = load_config(
        "tiny_debug", [f"teacher.path={tiny_teacher}", f"train.output_dir={tmp_path / 'b'}", "train.batch_size=null"]
    )
    tr = Trainer(cfg, "train").setup()
    tr.cleanup()
    assert cfg.train.batch_size == 32  # the demo task's batch; written into config.yaml resolved
    assert load_config(tmp_path / "b" / "config.yaml").train.batch_size == 32


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "tiny_debug",
        [
            "train.lr=1e-5",
            "quant.weight.bits=4",
            "quant.weight.method=sym",
            "distill.gamma=0.25",
            "train.max_steps=3",
            "distill.layer_map=[0, 1]",
        ],
    )
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.quant.weight.bits == 4 and cfg.distill.gamma == 0.25 and cfg.distill.layer_map == [0, 1]
    # a partial section keeps the defaults of the fields it does not name
    cfg = load_config(None, ["quant.embedding.bits=4", "quant.embedding.method=sym"])
    assert cfg.quant.embedding.granularity == "row"


def test_dict_overrides_for_sweeps():
    cfg = load_config("tiny_debug", {"distill.attn_map.weight": 0.3, "train.seed": 52})
    assert cfg.distill.attn_map.weight == 0.3 and cfg.train.seed == 52


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.bitz=4", "unknown key 'quant.bitz'"),
        ("quant.weight.bits=5", "quant.weight.bits: got 5; allowed: 2, 3, 4, 8"),
        ("quant.weight.bits=four", "quant.weight.bits: expected an integer"),
        ("distill.attn_map.weight=-1", "distill.attn_map.weight: got -1.0; must be >= 0 (0 switches the term off)"),
        ("quant.weight.method=twn2", "quant.weight.method: got 'twn2'"),
        ("quant.embedding.bits=4", "quant.embedding.method: twn is ternary and needs bits=2"),
        ("engine.deepspeed.zero_stage=4", "engine.deepspeed.zero_stage: got 4; allowed: 0, 1, 2, 3"),
        ("distill.gamma=1.5", "distill.gamma: got 1.5; must be in [0, 1] or null"),
        ("train.batch_size=0", "train.batch_size: got 0; must be > 0 or null"),
        ("nonsense", "expected key=value"),
        ("quant.rules=[{pattern: '('}]", "is not a valid regex"),
        ("train.diagnostics=maybe", "train.diagnostics: expected true or false, got 'maybe'"),
        ("analysis.samples=0", "analysis.samples: got 0; must be >= 1"),
        ("analysis.top_k=-2", "analysis.top_k: got -2; must be >= 1"),
        ("analysis.hessian_iters=0", "analysis.hessian_iters: got 0; must be >= 1"),
        ("analysis.hessian_samples=-1", "analysis.hessian_samples: got -1; must be >= 0"),
        ("analysis.hessian_tol=0", "analysis.hessian_tol: got 0.0; must be > 0"),
        ("analysis.hessian_tol=-1e-3", "analysis.hessian_tol: got -0.001; must be > 0"),
        ("analysis.samples=3.5", "analysis.samples: expected an integer, got 3.5"),
        ("analysis.device=tpu", "analysis.device: got 'tpu'; allowed: auto, cpu, cuda"),
        ("analysis.sample=3", "unknown key 'analysis.sample'"),
        ("train.optimizer=sgd", "train.optimizer: got 'sgd'; allowed: adamw, bertadam"),
        ("train.max_grad_norm=-1", "train.max_grad_norm: got -1.0; must be >= 0"),
        ("data.padding=max", "data.padding: got 'max'; allowed: longest, max_length"),
        ("train.dropout=1.0", "train.dropout: got 1.0; must be in [0, 1) or null"),
        ("distill.mse_tokens=real", "distill.mse_tokens: got 'real'; allowed: all, valid"),
        ("quant.act.method=twn", "quant.act.method: got 'twn'; allowed: sym, lsq"),
        ("quant.attention.method=mean_clip", "quant.attention.method: got 'mean_clip'; allowed: sym, lsq"),
        ("quant.embedding.method=ternary", "quant.embedding.method: got 'ternary'; allowed: twn, sym, mean_clip, lsq"),
        ("quant.weight.init=max", "quant.weight.init: got 'max'; allowed: mean, percentile, kl, kl_cdf"),
        ("quant.weight.granularity=col", "quant.weight.granularity: got 'col'; allowed: tensor, row"),
        ("quant.weight.percentile=50", "quant.weight.percentile: got 50.0; must be in (50, 100]"),
        ("quant.weight.clip=abc", "quant.weight.clip: expected a number or null, got 'abc'"),
        ("quant.act.clip=0", "quant.act.clip: got 0.0; must be > 0 or null"),
        (
            "quant.rules=[{pattern: x, weight_method: foo}]",
            "quant.rules[0].weight_method: got 'foo'; allowed: twn, sym, mean_clip, lsq, absmean, seq, null",
        ),
        ("quant.rules=[{pattern: x, weight_bits: 5}]", "quant.rules[0].weight_bits: got 5; allowed: 2, 3, 4, 8, null"),
        (
            "quant.rules=[{pattern: x, weight_method: twn, weight_bits: 4}]",
            "quant.rules[0].method: twn is ternary and needs bits=2",
        ),
        ("quant.rules=[{pattern: ''}]", "quant.rules[0].pattern: must be a non-empty regex"),
        ("quant.skip=['(']", "quant.skip[0]: '(' is not a valid regex"),
        ("distill.layer_map=foo", "distill.layer_map: got 'foo'; allowed: identity, uniform or a list of integers"),
        (
            "distill.layer_map=[0, x]",
            "distill.layer_map: got [0, 'x']; allowed: identity, uniform or a list of integers",
        ),
        ("distill.soft_ce_reduction=sum", "distill.soft_ce_reduction: got 'sum'; allowed: batch, batch_classes"),
        ("distill.temperature=0", "distill.temperature: got 0.0; must be > 0"),
        ("engine.precision=fp8", "engine.precision: got 'fp8'; allowed: fp32, bf16, fp16"),
        ("engine.deepspeed.zero_stage=two", "engine.deepspeed.zero_stage: expected an integer, got 'two'"),
        ("engine.backend=fsdp", "engine.backend: got 'fsdp'; allowed: none, deepspeed, fsdp2"),
        ("engine.fsdp2.teacher=zero3", "engine.fsdp2.teacher: got 'zero3'; allowed: sharded, replicated"),
        ("engine.zero_stage=2", "unknown key 'engine.zero_stage'; allowed here: activation_checkpointing, backend, "),
        ("engine.precision=fp16", "engine.precision: fp16 needs DeepSpeed's loss scaling"),
        ("train.device=tpu", "train.device: got 'tpu'; allowed: auto, cpu, cuda"),
        ("tune.scheduler=pbt", "tune.scheduler: got 'pbt'; allowed: none, asha"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny_debug", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_lists_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="config file not found.*tiny_debug"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["train.seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["quant"]["embedding"]["granularity"] == "row"


def test_flat_keys():
    keys = flat_keys()
    assert {"distill.attn_map.weight", "train.seed", "data.task", "quant.weight.bits"} <= keys
    assert Path  # keep import used


def test_analysis_section_from_yaml_and_overrides(tmp_path):
    from kdqat_dist.config import AnalysisConfig

    assert load_config(None).analysis == AnalysisConfig()
    assert load_config(None).train.diagnostics is True
    p = tmp_path / "an.yaml"
    p.write_text("analysis:\n  samples: 64\n  hessian_tol: 1e-4\n  hessian_iters: 20\ntrain:\n  diagnostics: false\n")
    cfg = load_config(p, ["analysis.hessian_iters=50", "analysis.top_k=3"])
    a = cfg.analysis
    assert (a.samples, a.hessian_tol, a.hessian_iters, a.top_k) == (64, 1e-4, 50, 3)
    assert isinstance(a.hessian_tol, float)  # YAML reads 1e-4 as a string
    assert a.hessian_samples == AnalysisConfig().hessian_samples  # unnamed keys keep their defaults
    assert cfg.train.diagnostics is False
    assert {"analysis.samples", "analysis.hessian_tol", "train.diagnostics"} <= flat_keys()
    save_config(cfg, tmp_path / "round.yaml")
    assert load_config(tmp_path / "round.yaml") == cfg


ZERO_ALL = [
    f"distill.{t}.weight=0"
    for t in ("logits", "hidden", "attn_score", "attn_map", "attn_output", "context", "sa_output", "ground_truth")
]


def test_all_zero_loss_weights_are_a_config_error():
    # Today's failure mode without the check: validation passes, then backward() fails on a constant loss.
    with pytest.raises(ConfigError) as e:
        load_config("tiny_debug", ZERO_ALL)
    msg = str(e.value)
    assert msg.startswith("distill: every loss weight is 0 and distill.gamma is null") and "\n" not in msg
    assert "ground_truth" in msg and "distill.gamma" in msg
    # any one term, or the unified gamma (map = gamma, output = 1 - gamma), is enough
    assert load_config("tiny_debug", ZERO_ALL + ["distill.gamma=0"]).distill.gamma == 0.0
    assert load_config("tiny_debug", ZERO_ALL + ["distill.ground_truth.weight=1"]).distill.ground_truth.weight == 1


def test_allowed_sets_live_on_the_fields():
    import typing

    from kdqat_dist.config import ALLOWED_BITS, INITS, Bits, LsqInit, WeightQuantConfig

    assert ALLOWED_BITS == typing.get_args(Bits) == (2, 3, 4, 8)
    assert INITS == typing.get_args(LsqInit)
    assert typing.get_type_hints(WeightQuantConfig, include_extras=True)["bits"] is Bits


def test_saved_sections_are_checked_too():
    # Student folders and exports rebuild their QuantConfig with build_section, without validate().
    from kdqat_dist.config import QuantConfig, build_section

    with pytest.raises(
        ConfigError,
        match=r"^quantization_config\.quant\.weight\.method: got 'foo'; allowed: "
        r"twn, sym, mean_clip, lsq, absmean, seq$",
    ):
        build_section(QuantConfig, {"weight": {"method": "foo"}}, "quantization_config.quant")
    with pytest.raises(ConfigError, match=r"^quant\.act\.bits: got 16; allowed: 2, 3, 4, 8$"):
        build_section(QuantConfig, {"act": {"bits": 16}}, "quant")


def test_every_allowed_method_and_init_runs():
    # The Literal sets must name exactly what quant/ implements: each value quantizes a tensor.
    import typing

    import torch

    from kdqat_dist.config import ActMethod, ActQuantConfig, LsqInit, WeightMethod, WeightQuantConfig
    from kdqat_dist.quant.fake_quant import ActFakeQuant, WeightFakeQuant
    from kdqat_dist.quant.quantizers import lsq_init

    torch.manual_seed(0)
    w = torch.randn(8, 16)
    for method in typing.get_args(WeightMethod):
        for bits in (2, 4) if method != "twn" else (2,):
            out = WeightFakeQuant(WeightQuantConfig(method=method, bits=bits), w)(w)
            assert out.shape == w.shape and torch.isfinite(out).all(), (method, bits)
            # mean_clip's extreme code rounds to ±2^(b-1): 2^b + 1 levels, as the reference's TwnQuantizer_mx
            assert out.unique().numel() <= 2**bits + 1, (method, bits)
    for method in typing.get_args(ActMethod):
        out = ActFakeQuant(ActQuantConfig(method=method, bits=8))(w)
        assert out.shape == w.shape and torch.isfinite(out).all(), method
    for init in typing.get_args(LsqInit):
        assert float(lsq_init(w, 4, init)) > 0, init
