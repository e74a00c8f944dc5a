"""Training-time diagnostics: values on a prepared model, ZeRO-3 partitions, real runs' TensorBoard events."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdqat_dist.config import QuantConfig, WeightQuantConfig
from kdqat_dist.engine.diagnostics import (
    log_diagnostics,
    log_flip_rate,
    reset_diagnostics,
    short_name,
    weight_codes,
)
from kdqat_dist.quant.api import prepare
from kdqat_dist.quant.fake_quant import QuantEmbedding, QuantLinear, WeightFakeQuant


class FakeWriter:
    """Records add_scalar calls: tag -> [(step, value)]."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag].append((step, float(value)))

    def last(self, tag: str) -> float:
        return self.scalars[tag][-1][1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only add contention
    yield
    torch.set_num_threads(n)


def tiny_student(quant: QuantConfig | None = None) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return prepare(BertForSequenceClassification(cfg), quant or QuantConfig())


def forward(model) -> None:
    g = torch.Generator().manual_seed(1)
    model(input_ids=torch.randint(5, 60, (2, 9), generator=g))


def test_weight_codes_per_method():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    codes, step = weight_codes(WeightFakeQuant(WeightQuantConfig()), w)  # TWN
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    x = w.abs()
    delta = 0.7 * x.mean()
    assert step.item() == pytest.approx(float(x[x > delta].mean()), rel=1e-6)  # α
    assert torch.equal(codes == 0, x <= delta)
    # TWN's codes come off the threshold, not from ŵ: codes x step must be the forward's ŵ, bit for bit
    w2 = w.clone()
    w2[2] = 0  # a row with no weight above the threshold
    w2[3, 0] = 4.0  # beyond the clip
    for gran in ("tensor", "row"):
        wq = WeightFakeQuant(WeightQuantConfig(granularity=gran))
        codes, step = weight_codes(wq, w2)
        assert torch.equal(codes * step, wq.forward(w2)), gran
        assert set(codes.unique().tolist()) == {-1.0, 0.0, 1.0} and (step > 0).all()
    assert torch.equal(codes[2], torch.zeros(10)) and step[2].item() == 1.0
    codes, step = weight_codes(WeightFakeQuant(WeightQuantConfig(bits=8, method="sym")), w)
    assert step.item() == pytest.approx(float(x.clamp(max=2.5).max()) / 127, rel=1e-6)
    assert codes.abs().max() == 127
    lsq = WeightFakeQuant(WeightQuantConfig(method="lsq", granularity="row"), w)
    codes, step = weight_codes(lsq, w)
    assert torch.equal(step.reshape(-1), lsq.step.detach().reshape(-1))
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}  # 2-bit narrow range: ternary
    codes, step = weight_codes(WeightFakeQuant(WeightQuantConfig(bits=4, method="mean_clip")), w)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 8


def test_short_names():
    assert short_name("bert.encoder.layer.3.attention.self.query", "bert") == "03.attention.self.query"
    assert short_name("roberta.encoder.layer.11.output.dense", "roberta") == "11.output.dense"
    assert short_name("bert.embeddings.word_embeddings", "bert") == "embeddings.word_embeddings"
    assert short_name("classifier", "bert") == "classifier"


def test_log_diagnostics_values_and_state():
    model = tiny_student()
    w = FakeWriter()
    log_diagnostics(w, 1, model)
    q = model.bert.encoder.layer[0].attention.self.query
    codes, _ = weight_codes(q.weight_quant, q.weight)
    assert w.last("quant_zero_frac/00.attention.self.query") == pytest.approx(float((codes == 0).float().mean()))
    assert w.last("quant_scale_drift/00.attention.self.query") == 0.0
    assert "quant_zero_frac/embeddings.word_embeddings" in w.scalars
    assert not any(t.startswith(("quant_flip_rate/", "quant_clip_rate/")) for t in w.scalars)  # nothing yet
    # the first call switched clip counting on; a forward feeds it
    forward(model)
    with torch.no_grad():
        q.weight.mul_(1.5)  # TWN's α grows by the same factor
    log_diagnostics(w, 2, model)
    assert w.last("quant_scale_drift/00.attention.self.query") == pytest.approx(0.5, rel=1e-5)
    assert w.last("quant_scale_drift/00.attention.self.key") == pytest.approx(0.0, abs=1e-7)
    assert not any(t.startswith("quant_flip_rate/") for t in w.scalars)  # evaluations' (log_flip_rate)
    rate = w.last("quant_clip_rate/00.attention.self.query.input")
    assert 0.0 <= rate < 1.0
    assert w.last("quant_clip_rate/00.attention.self.attn_quant.probs") == 0.0  # probs lie in [0, 1] < 2.5
    aq = q.act_quant
    assert aq.track_stats and float(aq.seen) == 0.0  # counters reset after reading
    for tag in ("quant_zero_frac/all", "quant_clip_rate/all"):
        assert 0.0 <= w.last(tag) <= 1.0
    reset_diagnostics(model)
    assert not aq.track_stats


def test_flip_rate_counts_codes_changed_since_the_previous_call():
    model = tiny_student()
    w = FakeWriter()
    log_flip_rate(w, None, model)  # the baseline: kept, nothing written
    assert not w.scalars
    q = model.bert.encoder.layer[0].attention.self.query
    codes, _ = weight_codes(q.weight_quant, q.weight)
    with torch.no_grad():  # flip the sign of the first row: its non-zero codes flip, α is unchanged
        q.weight[0].neg_()
    log_flip_rate(w, 3, model)
    flips = int((codes[0] != 0).sum())
    assert flips > 0
    assert w.scalars["quant_flip_rate/00.attention.self.query"] == [(3, pytest.approx(flips / codes.numel()))]
    assert w.last("quant_flip_rate/00.attention.self.key") == 0.0
    n_all = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, QuantLinear | QuantEmbedding) and m.weight_quant is not None and m.weight_quant.enabled
    )
    assert w.last("quant_flip_rate/all") == pytest.approx(flips / n_all)
    log_flip_rate(w, 6, model)  # nothing changed since the previous call (not since the baseline)
    assert w.last("quant_flip_rate/00.attention.self.query") == 0.0
    reset_diagnostics(model)  # forgets the codes: the next call is a new baseline
    log_flip_rate(w, 9, model)
    assert w.scalars["quant_flip_rate/all"][-1][0] == 6


def test_clip_rate_counts_inputs_beyond_the_clip():
    model = tiny_student()
    w = FakeWriter()
    log_diagnostics(w, 1, model)
    lin = model.bert.encoder.layer[0].intermediate.dense
    x = torch.tensor([[0.5, -3.0, 2.4, 2.6] * 8])  # half beyond 2.5
    lin(x)
    log_diagnostics(w, 2, model)
    assert w.last("quant_clip_rate/00.intermediate.dense.input") == pytest.approx(0.5)


def test_clip_counting_covers_one_forward_after_each_call():
    model = tiny_student()
    aq = model.bert.encoder.layer[1].output.dense.act_quant
    log_diagnostics(FakeWriter(), 1, model)
    forward(model)
    one = float(aq.seen)
    assert one > 0 and not aq.track_stats  # the window closed after the first forward
    forward(model)
    assert float(aq.seen) == one
    log_diagnostics(FakeWriter(), 2, model, clip_forwards=None)  # every forward until the next call
    forward(model)
    forward(model)
    assert float(aq.seen) == 2 * one and aq.track_stats
    reset_diagnostics(model)
    assert not model._forward_hooks


def test_lsq_student_logs_steps():
    quant = QuantConfig()
    quant.weight.method = "lsq"
    quant.act.method = "lsq"
    model = tiny_student(quant)
    forward(model)  # initialises the activation steps
    w = FakeWriter()
    log_diagnostics(w, 1, model)
    q = model.bert.encoder.layer[1].output.dense
    assert w.last("quant_scale/01.output.dense") == pytest.approx(float(q.weight_quant.step.detach()))
    assert w.last("quant_act_step/01.output.dense.input") == pytest.approx(float(q.act_quant.step.detach()))


def test_zero3_partitions_are_skipped_and_none_writer_is_a_no_op():
    model = tiny_student()
    q = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, QuantLinear)
    q.weight = torch.nn.Parameter(torch.empty(0))  # what a ZeRO-3 rank holds outside the forward
    w = FakeWriter()
    log_diagnostics(w, 1, model)
    log_diagnostics(w, 2, model)
    log_flip_rate(w, None, model)
    log_flip_rate(w, 2, model)
    assert "quant_zero_frac/00.attention.self.query" not in w.scalars
    assert "quant_flip_rate/00.attention.self.query" not in w.scalars
    assert "quant_zero_frac/00.attention.self.key" in w.scalars
    assert "quant_flip_rate/00.attention.self.key" in w.scalars
    log_diagnostics(None, 3, model)
    log_flip_rate(None, 3, model)


def test_no_distributed_imports_in_analysis():
    root = Path(__file__).resolve().parents[1] / "kdqat_dist" / "analysis"
    for f in root.glob("*.py"):
        src = f.read_text()
        assert not re.search(r"^\s*(import|from)\s+(deepspeed|torch\.distributed|ray)\b", src, re.M), f.name


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tiny_run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, object]:
    """A real `kdqat train` of the tiny recipe from a random FP teacher: (metrics, its TensorBoard events)."""
    from kdqat_dist.config import load_config
    from kdqat_dist.engine.loop import run
    from kdqat_dist.models.tiny import make_tiny_checkpoint

    teacher = tmp_path / "teacher"
    if not teacher.exists():
        make_tiny_checkpoint(teacher)  # a random FP model is a valid teacher here
    out = tmp_path / name
    cfg = load_config(
        "tiny_debug", [f"teacher.path={teacher}", f"train.output_dir={out}", "data.demo_size=120", *overrides]
    )
    return run(cfg, "train"), _events(out)


def test_training_run_writes_the_diagnostics_to_tensorboard(tmp_path):
    # 7 steps, 2 micro-batches each; logs at 3, 6 and 7 (a one-step last window), evaluations at 4 and 7;
    # loss weights other than 1, so a weighted contribution differs from the raw term
    metrics, acc = _tiny_run(
        tmp_path,
        "run",
        "train.max_steps=7",
        "train.log_every=3",
        "train.eval_every=4",
        "train.grad_accum=2",
        "distill.hidden.weight=0.5",
        "distill.attn_map.weight=2",
    )
    tags = set(acc.Tags()["scalars"])
    for group in ("quant_zero_frac", "quant_scale", "quant_scale_drift", "quant_flip_rate"):
        assert f"{group}/00.attention.self.query" in tags, group
    for tag in (
        "quant_clip_rate/00.attention.self.query.input",
        "quant_clip_rate/01.output.dense.input",
        "quant_clip_rate/01.attention.self.attn_quant.key",
    ):
        assert tag in tags, tag
    assert "quant_zero_frac/embeddings.word_embeddings" in tags
    assert "diagnostics/README/text_summary" in acc.Tags()["tensors"]  # the text entry explaining the tags
    steps = [e.step for e in acc.Scalars("quant_zero_frac/00.attention.self.query")]
    assert steps == [3, 6, 7]
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("quant_clip_rate/all"))

    # the flip rate: at evaluations, codes changed since the previous one (the first: since the start)
    flips = acc.Scalars("quant_flip_rate/all")
    assert [e.step for e in flips] == [4, 7]
    assert all(0.0 < e.value < 1.0 for e in flips)  # lr 1e-3 moves some ternary codes

    # each term's (and layer's) weighted contribution, averaged like the loss: they sum to train/loss
    contrib = sorted(t for t in tags if t.startswith("kd_contribution/"))
    # the default recipe distils logits, hidden states (3 with the embeddings), maps and outputs (2 layers)
    assert contrib == [
        "kd_contribution/attn_map/00",
        "kd_contribution/attn_map/01",
        "kd_contribution/attn_output/00",
        "kd_contribution/attn_output/01",
        "kd_contribution/hidden/00",
        "kd_contribution/hidden/01",
        "kd_contribution/hidden/02",
        "kd_contribution/logits",
    ]
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == [3, 6, 7]
    for step, total in loss.items():
        parts = [next(e.value for e in acc.Scalars(t) if e.step == step) for t in contrib]
        assert sum(parts) == pytest.approx(total, rel=1e-5), step
        assert min(parts) >= 0
    # ... and a term's layers sum to its weight times the (unweighted) term the loop logs
    hidden = [acc.Scalars(f"kd_contribution/hidden/{i:02d}")[-1].value for i in range(3)]
    assert sum(hidden) == pytest.approx(0.5 * metrics["train_log"][-1]["loss/hidden"], rel=1e-5)
    assert not any(k.startswith("kd_contribution/") for k in metrics["train_log"][-1])


def test_flip_rate_is_zero_when_the_weights_do_not_move(tmp_path):
    # train.lr must be > 0; 1e-12 moves no weight by a float32 ulp of its value, so no code can change
    _, acc = _tiny_run(
        tmp_path, "still", "train.max_steps=4", "train.log_every=2", "train.eval_every=2", "train.lr=1e-12"
    )
    flips = acc.Scalars("quant_flip_rate/all")
    assert [e.step for e in flips] == [2, 4]
    assert all(e.value == 0.0 for e in flips)
    assert all(e.value == 0.0 for e in acc.Scalars("quant_flip_rate/00.attention.self.query"))


def test_diagnostics_switch_off(tmp_path):
    metrics, acc = _tiny_run(
        tmp_path, "off", "train.max_steps=4", "train.log_every=2", "train.eval_every=2", "train.diagnostics=false"
    )
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/selection" in tags  # the run logged
    assert not [t for t in tags if t.startswith(("quant_", "kd_contribution/"))]
    assert "diagnostics/README/text_summary" not in acc.Tags()["tensors"]
    assert metrics["best"] is not None
