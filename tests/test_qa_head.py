"""The QA task head: SQuAD loading, features through the head, the KD view of start/end logits, evaluation,
and `kdqat finetune` / `train` / `eval` on tiny SQuAD v1.1 and v2.0 folders."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForQuestionAnswering

from kdqat_dist.cli import main
from kdqat_dist.config import DataConfig, load_config
from kdqat_dist.data.heads import get_head
from kdqat_dist.data.heads.qa import MASKED, QAHead, load_qa_splits
from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
from kdqat_dist.data.qa_features import read_squad_json
from kdqat_dist.data.qa_toy import write_toy_squad
from kdqat_dist.data.tasks import get_task, selection_value
from kdqat_dist.distill import losses as L
from kdqat_dist.errors import ConfigError, DataError
from kdqat_dist.models.encoders import load_tokenizer
from kdqat_dist.models.tiny import make_tiny_checkpoint

MAX_LEN = 32
STRIDE = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qa_tiny") / "model")


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory):
    return write_toy_squad(tmp_path_factory.mktemp("squad"), n_train=12, n_dev=4)


@pytest.fixture(scope="module")
def squad2_dir(tmp_path_factory):
    return write_toy_squad(tmp_path_factory.mktemp("squad2"), n_train=12, n_dev=4, version_2=True)


def _task(name="squad", **kw):
    return get_task(DataConfig(task=name, max_seq_length=MAX_LEN, doc_stride=STRIDE, **kw))


def _data(folder, tiny, name="squad"):
    task = _task(name, source=str(folder))
    head = get_head(task)
    raw = load_splits(DataConfig(task=name, source=str(folder)), task)
    tok = load_tokenizer(str(tiny))
    feats = tokenize_splits(raw, tok, MAX_LEN, None, head)
    return task, head, raw, tok, feats


def test_registry_and_task_specs():
    for name, v2 in (("squad", False), ("squad_v2", True), ("SQuAD-v2", True)):
        task = get_task(name)
        head = get_head(task)
        assert isinstance(head, QAHead) and head.version_2 is v2 and head.num_labels == 2
        assert head.auto_class is AutoModelForQuestionAnswering and head.selection_metric == "f1"
        assert not task.is_regression


def test_load_qa_splits_from_folders_files_and_bad_sources(squad_dir, tmp_path):
    task = _task()
    splits = load_qa_splits(DataConfig(task="squad", source=str(squad_dir)), task)
    assert len(splits["train"]) == 24 and len(splits["dev"]) == 8
    assert splits["dev"][0]["answers"]["text"] and splits["dev"][0]["context"].startswith("the ")
    # the official names win over train.json / dev.json
    (tmp_path / "train-v1.1.json").write_text((squad_dir / "dev.json").read_text())
    (tmp_path / "dev-v1.1.json").write_text((squad_dir / "dev.json").read_text())
    splits = load_qa_splits(DataConfig(task="squad", source=str(tmp_path)), task)
    assert len(splits["train"]) == 8
    files = DataConfig(task="squad", train_file=str(squad_dir / "train.json"), dev_file=str(squad_dir / "dev.json"))
    assert len(load_qa_splits(files, task)["dev"]) == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no SQuAD training file"):
        load_qa_splits(DataConfig(task="squad", source=str(tmp_path / "empty")), task)
    with pytest.raises(DataError, match="not a folder"):
        load_qa_splits(DataConfig(task="squad", source=str(tmp_path / "nope")), task)


def test_features_through_the_head_keep_offsets_and_labels(squad_dir, tiny):
    task, head, raw, tok, feats = _data(squad_dir, tiny)
    train, dev = feats["train"], feats["dev"]
    assert len(train) > len(raw["train"])  # long paragraphs: several windows each
    assert "offset_mapping" not in train.column_names and "example_id" in dev.column_names
    # a window's labelled span decodes to the answer (or is [CLS] when the window lacks it)
    answers = {r["id"]: r["answers"]["text"][0] for r in raw["dev"]}
    labelled = 0
    for f in dev:
        s, e = f["start_positions"], f["end_positions"]
        if s:
            assert tok.decode(f["input_ids"][s : e + 1]) == answers[f["example_id"]]
            labelled += 1
        assert f["offset_mapping"][0] is None  # [CLS]: outside the context, None after the Arrow round trip
    assert labelled >= len(raw["dev"])
    batch = Collator(tok, head=head)([dev[i] for i in range(4)])
    assert set(batch) >= {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert "offset_mapping" not in batch and "example_id" not in batch


def test_head_outputs_mask_padding_and_match_the_models_own_loss(squad_dir, tiny):
    task, head, raw, tok, feats = _data(squad_dir, tiny)
    model = AutoModelForQuestionAnswering.from_pretrained(str(tiny)).eval()
    rows = [feats["train"][i] for i in range(6)]
    batch = Collator(tok, head=head)(rows)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # some padding in this batch
    inputs = {k: v for k, v in batch.items() if k not in head.label_keys}
    with torch.no_grad():
        out = model(**inputs)
    ho = head.outputs(out, batch)
    assert ho.logits.shape == (6, 2, mask.shape[1]) and ho.labels.shape == (6, 2)
    assert (ho.logits[:, 0][~mask] == MASKED).all() and (ho.logits[:, 1][~mask] == MASKED).all()
    assert torch.equal(ho.logits[:, 0][mask], out.start_logits[mask])
    # ground truth: the mean of the start and end cross-entropies over the real positions
    gt = L.ground_truth_loss(ho.rows(ho.logits), ho.rows(ho.labels), False)
    naive = []
    for i in range(6):
        n = int(mask[i].sum())
        for k, logits in enumerate((out.start_logits, out.end_logits)):
            naive.append(-torch.log_softmax(logits[i, :n], -1)[ho.labels[i, k]])
    assert gt.item() == pytest.approx(torch.stack(naive).mean().item(), rel=1e-5)
    # logit KD: a soft CE over the real positions of each start/end row, averaged over the 2B rows
    teacher = AutoModelForQuestionAnswering.from_pretrained(str(tiny))
    torch.manual_seed(1)
    teacher.qa_outputs.reset_parameters()
    with torch.no_grad():
        t_ho = head.outputs(teacher.eval()(**inputs), batch)
    kd = L.soft_cross_entropy(ho.rows(ho.logits), ho.rows(t_ho.logits))
    naive = []
    for i in range(6):
        n = int(mask[i].sum())
        for k in range(2):
            p_t = torch.softmax(t_ho.logits[i, k, :n], -1)
            naive.append(-(p_t * torch.log_softmax(ho.logits[i, k, :n], -1)).sum())
    assert kd.item() == pytest.approx(torch.stack(naive).mean().item(), rel=1e-5)


def _label_logits(dev) -> list[np.ndarray]:
    """Logits that put each window's mass on its labelled start/end (CLS for windows without the answer)."""
    out = []
    for f in dev:
        x = np.zeros((len(f["input_ids"]), 2), dtype=np.float32)
        x[f["start_positions"], 0] = 10
        x[f["end_positions"], 1] = 10
        if f["start_positions"] == 0:  # a window without the answer: no span beats the others
            x[0] = 5
        out.append(x)
    return out


def test_evaluate_perfect_and_shifted_logits(squad_dir, tiny):
    task, head, raw, tok, feats = _data(squad_dir, tiny)
    dev = feats["dev"]
    assert head.evaluate(_label_logits(dev), dev, raw["dev"]) == {"exact": 1.0, "f1": 1.0}
    # every start one token early: "was great" for "great" -> EM 0, F1 2/3 ("was" is not an article)
    shifted = []
    for f, x in zip(dev, _label_logits(dev), strict=True):
        y = x.copy()
        if f["start_positions"]:
            y[:, 0] = 0
            y[f["start_positions"] - 1, 0] = 10
        shifted.append(y)
    m = head.evaluate(shifted, dev, raw["dev"])
    assert m["exact"] == 0.0 and m["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="raw split"):
        head.evaluate(shifted, dev, None)


def test_v2_evaluation_scores_no_answer_questions(squad2_dir, tiny):
    task, head, raw, tok, feats = _data(squad2_dir, tiny, "squad_v2")
    dev = feats["dev"]
    m = head.evaluate(_label_logits(dev), dev, raw["dev"])
    # answerable: the labelled span; unanswerable: CLS 5 + 5 = 10 beats nothing-but-zeros spans
    assert m["exact"] == 1.0 and m["has_ans_exact"] == 1.0 and m["no_ans_exact"] == 1.0
    # the best threshold: answerable diffs are 0 - 20 = -20, unanswerable 10 - 0 = 10; every question is
    # right from the first answerable one on until the first unanswerable one
    assert m["best_exact"] == m["best_f1"] == 1.0 and m["best_exact_thresh"] == m["best_f1_thresh"] == -20.0
    # model selection stays on f1 at the configured threshold, never on the dev-tuned best_f1
    assert task.selection_metric == "f1" and selection_value(task, {**m, "f1": 0.25}) == 0.25
    # data.null_score_diff_threshold: above 10 every unanswerable question gets its (wrong) best span
    loose = _task("squad_v2", source=str(squad2_dir), null_score_diff_threshold=10.5)
    m2 = get_head(loose).evaluate(_label_logits(dev), dev, raw["dev"])
    assert m2["no_ans_exact"] == 0.0 and m2["has_ans_exact"] == 1.0
    assert {k: v for k, v in m2.items() if k.startswith("best_")} == {
        k: v for k, v in m.items() if k.startswith("best_")
    }
    assert get_head(loose).predictions(_label_logits(dev), dev, raw["dev"]) != head.predictions(
        _label_logits(dev), dev, raw["dev"]
    )


def test_null_score_diff_threshold_is_checked():
    assert _task("squad_v2", null_score_diff_threshold=-1.5).null_score_diff_threshold == -1.5
    assert (
        load_config(
            "tiny_debug", ["data.task=squad_v2", "data.null_score_diff_threshold=2"]
        ).data.null_score_diff_threshold
        == 2.0
    )
    with pytest.raises(ConfigError, match="null_score_diff_threshold: got 1 for task 'squad'; only SQuAD v2.0"):
        _task("squad", null_score_diff_threshold=1.0)
    with pytest.raises(ConfigError, match="null_score_diff_threshold.*finite"):
        load_config("tiny_debug", ["data.task=squad_v2", "data.null_score_diff_threshold=nan"])


def test_the_span_head_stays_full_precision(tiny):
    from kdqat_dist.config import QuantConfig
    from kdqat_dist.quant.api import prepare
    from kdqat_dist.quant.fake_quant import QuantLinear

    model = AutoModelForQuestionAnswering.from_pretrained(str(tiny))
    prepare(model, QuantConfig())
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert type(model.qa_outputs) is torch.nn.Linear


def test_bad_stride_is_a_config_error(squad_dir, tiny):
    task = get_task(DataConfig(task="squad", max_seq_length=MAX_LEN, doc_stride=20))
    raw = Dataset.from_list([])
    with pytest.raises(ConfigError, match="doc_stride"):
        get_head(task).tokenize("train", raw, load_tokenizer(str(tiny)), MAX_LEN)


# --------------------------------------------------------------------------- the commands


def _common(folder, out, task="squad"):
    return [
        f"data.task={task}",
        f"data.source={folder}",
        f"data.max_seq_length={MAX_LEN}",
        f"data.doc_stride={STRIDE}",
        f"train.output_dir={out}",
        "train.eval_every=4",
        "train.max_steps=4",
    ]


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_finetune_train_eval_on_squad(task, squad_dir, squad2_dir, tiny, tmp_path, capsys, assert_finite_analysis):
    folder = squad_dir if task == "squad" else squad2_dir
    ft = tmp_path / "ft"
    assert main(["finetune", "--config", "tiny_finetune", *_common(folder, ft, task)]) == 0
    teacher = json.loads((ft / "metrics.json").read_text())
    assert teacher["selection_metric"] == "f1" and {"exact", "f1"} <= set(teacher["best"])
    if task == "squad_v2":
        assert "no_ans_f1" in teacher["best"]
    st = tmp_path / "st"
    code = main(["train", "--config", "tiny_debug", *_common(folder, st, task), f"teacher.path={ft / 'model'}"])
    assert code == 0
    res = json.loads((st / "metrics.json").read_text())
    assert res["teacher"]["f1"] == pytest.approx(teacher["best"]["f1"])
    assert {"loss/logits", "loss/attn_map"} & set(res["train_log"][-1])
    capsys.readouterr()
    assert main(["eval", "--model", str(st), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["task"] == task
    assert got["metrics"]["f1"] == pytest.approx(res["best"]["f1"], abs=1e-6)
    assert got["metrics"]["exact"] == pytest.approx(res["best"]["exact"], abs=1e-6)
    if task == "squad":  # the packed export round trip keeps the student's dev scores
        packed = tmp_path / "packed"
        assert main(["export", "--student", str(st), "--out", str(packed)]) == 0
        assert "round trip OK" in capsys.readouterr().out
        assert main(["eval", "--model", str(packed), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["metrics"] == got["metrics"]
    if task == "squad":  # `kdqat analyze` runs on the QA student (one example per window of a question)
        an = tmp_path / "an"
        argv = ["analyze", "--teacher", str(ft / "model"), "--student", f"qa={st}", "--out", str(an)]
        assert main([*argv, "--samples", "2", "--hessian-samples", "2", "--hessian-iters", "3", "--no-figures"]) == 0
        doc = json.loads((an / "analysis.json").read_text())
        assert doc["meta"]["task"] == "squad" and len(doc["meta"]["dev_rows"]) == 2
        assert len(doc["lengths"]) >= 2 and max(doc["lengths"]) <= MAX_LEN
        assert_finite_analysis(doc, "qa")
        assert "| qa |" in (an / "summary.md").read_text()
        capsys.readouterr()  # a sentence classifier as the teacher of a QA student: one line, exit 2
        argv = ["analyze", "--teacher", str(tiny), "--student", f"qa={st}", "--out", str(tmp_path / "an2")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1
            and "ForSequenceClassification but task squad needs an AutoModelForQuestionAnswering" in err[0]
        )
    if task == "squad":  # ONNX: start and end logits, checked against the student over the dev windows
        assert main(["export", "--student", str(st), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
        meta = json.loads((tmp_path / "onnx" / "kdqat_onnx.json").read_text())
        assert meta["outputs"] == ["start_logits", "end_logits"] and meta["round_trip"]["unit"] == "windows"
        assert meta["round_trip"]["onnx"]["f1"] == pytest.approx(got["metrics"]["f1"], abs=1e-6)
    if task == "squad":  # `kdqat predict` answers alike with the student and its ONNX export
        rows = [
            {"question": q["question"], "context": q["context"]} for q in read_squad_json(folder / "dev.json", False)
        ]
        (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
        tables, _ = [], capsys.readouterr()
        for model in (st, tmp_path / "onnx"):
            assert main(["predict", "--model", str(model), "--input", str(tmp_path / "q.jsonl")]) == 0
            tables.append(capsys.readouterr().out.splitlines())
        assert tables[0] == tables[1] and tables[0][0] == "answer\tscore\tquestion" and len(tables[0]) == 4


def test_sweeps_accept_the_qa_tasks(tmp_path):
    from kdqat_dist.tune.spec import parse_spec

    search = {"task": "grid[squad, squad_v2]", "data.doc_stride": "grid[64, 128]"}
    spec = parse_spec({"base": "tiny_debug", "teacher_path": "models/{task}", "search": search}, cwd=tmp_path)
    assert spec.num_grid_points == 4


def test_analysis_examples_and_hessian_loss_go_through_the_head(squad_dir, tiny):
    """analyze's dev examples: one unpadded window per batch, model inputs and start/end labels only;
    its Hessian loss is the head's start/end CE, which equals the model's own QA loss."""
    from kdqat_dist.analysis.collect import forward_taps
    from kdqat_dist.analysis.hessian import hessian_loss
    from kdqat_dist.analysis.report import _tokenize
    from kdqat_dist.models.attention import use_kdqat_attention

    task, head, raw, tok, _ = _data(squad_dir, tiny)
    data_cfg = DataConfig(task="squad", source=str(squad_dir), max_seq_length=MAX_LEN, doc_stride=STRIDE)
    examples = _tokenize(data_cfg, task, raw["dev"].select([0, 1]), tok, head)
    assert len(examples) >= 2  # a long context gives several windows
    model = AutoModelForQuestionAnswering.from_pretrained(str(tiny)).eval()
    use_kdqat_attention(model)  # the attention taps read the kdqat attention function
    for ex in examples:
        assert set(ex) <= {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
        assert {"start_positions", "end_positions"} <= set(ex) and ex["input_ids"].shape[0] == 1
        assert ex["input_ids"].shape[1] <= MAX_LEN and bool(ex["attention_mask"].all())
        with torch.no_grad():
            own = model(**ex).loss
            assert hessian_loss(model, ex, 0.0, head=head).item() == pytest.approx(own.item(), rel=1e-6)
        assert len(forward_taps(model, ex)["probs"]) == model.config.num_hidden_layers
