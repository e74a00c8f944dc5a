"""Training-time quantization diagnostics: values on a prepared model, ZeRO-3 partitions, a real run's events."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdqat_dist.analysis.diagnostics import log_diagnostics, reset_diagnostics, short_name, weight_codes
from kdqat_dist.config import QuantConfig, WeightQuantConfig
from kdqat_dist.quant.api import prepare
from kdqat_dist.quant.fake_quant import QuantLinear, WeightFakeQuant


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
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
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
    with torch.no_grad():  # flip the sign of the first row of one weight: its non-zero codes flip
        q.weight[0].neg_()
        q.weight.mul_(1.5)  # and scale it: TWN's α grows by the same factor
    log_diagnostics(w, 2, model)
    flips = float((codes[0] != 0).sum()) / codes.numel()
    assert w.last("quant_flip_rate/00.attention.self.query") == pytest.approx(flips)
    assert w.last("quant_flip_rate/00.attention.self.key") == 0.0
    assert w.last("quant_scale_drift/00.attention.self.query") == pytest.approx(0.5, rel=1e-5)
    rate = w.last("quant_clip_rate/00.attention.self.query.input")
    assert 0.0 <= rate < 1.0
    assert w.last("quant_clip_rate/00.attention.self.attn_quant.probs") == 0.0  # probs lie in [0, 1] < 2.5
    aq = q.act_quant
    assert aq.track_stats and float(aq.seen) == 0.0  # counters reset after reading
    for tag in ("quant_zero_frac/all", "quant_flip_rate/all", "quant_clip_rate/all"):
        assert 0.0 <= w.last(tag) <= 1.0
    reset_diagnostics(model)
    assert not aq.track_stats


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
    assert "quant_zero_frac/00.attention.self.query" not in w.scalars
    assert "quant_zero_frac/00.attention.self.key" in w.scalars
    log_diagnostics(None, 3, model)


def test_no_distributed_imports_in_analysis():
    root = Path(__file__).resolve().parents[1] / "kdqat_dist" / "analysis"
    for f in root.glob("*.py"):
        src = f.read_text()
        assert not re.search(r"^\s*(import|from)\s+(deepspeed|torch\.distributed|ray)\b", src, re.M), f.name


def test_training_run_writes_the_diagnostics_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdqat_dist.config import load_config
    from kdqat_dist.engine.loop import run
    from kdqat_dist.models.tiny import make_tiny_checkpoint

    teacher = make_tiny_checkpoint(tmp_path / "teacher")  # a random FP model is a valid teacher here
    out = tmp_path / "run"
    cfg = load_config("tiny_debug", [f"teacher.path={teacher}", f"train.output_dir={out}", "train.max_steps=6",
                                     "train.log_every=2", "train.eval_every=6", "data.demo_size=120"])
    run(cfg, "train")
    (events,) = (out / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for group in ("quant_zero_frac", "quant_scale", "quant_scale_drift", "quant_flip_rate"):
        assert f"{group}/00.attention.self.query" in tags, group
    for tag in ("quant_clip_rate/00.attention.self.query.input", "quant_clip_rate/01.output.dense.input",
                "quant_clip_rate/01.attention.self.attn_quant.key"):
        assert tag in tags, tag
    assert "quant_zero_frac/embeddings.word_embeddings" in tags
    # the loop's per-layer KD terms: the default recipe distils hidden states, maps and outputs
    for tag in ("layers/attn_map/00", "layers/attn_map/01", "layers/attn_output/01", "layers/hidden/02"):
        assert tag in tags, tag
    steps = [e.step for e in acc.Scalars("quant_zero_frac/00.attention.self.query")]
    assert steps == [2, 4, 6]
    assert [e.step for e in acc.Scalars("quant_flip_rate/00.attention.self.query")] == [4, 6]
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("quant_clip_rate/all"))
