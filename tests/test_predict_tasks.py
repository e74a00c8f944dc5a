"""``kdqat predict`` on token-classification (NER) and extractive-QA students: tags at first sub-tokens and
entities, answers over stride windows (v2: the null answer), output formats, student vs packed export."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from test_deploy import _student

from kdqat_dist.cli import main
from kdqat_dist.config import QuantConfig
from kdqat_dist.data.metrics_ner import entity_spans
from kdqat_dist.data.qa_features import prepare_features
from kdqat_dist.data.qa_metrics import MAX_ANSWER_LENGTH
from kdqat_dist.data.qa_toy import ADJECTIVES, ASPECTS, write_toy_squad
from kdqat_dist.data.tasks import CONLL_TAGS
from kdqat_dist.export import export_student
from kdqat_dist.export.onnx_export import export_onnx
from kdqat_dist.export.predict import Predictor
from kdqat_dist.export.predict_heads import AnswerPrediction, answer_prediction, token_prediction
from kdqat_dist.models.encoders import AUTO_CLASSES, load_tokenizer
from kdqat_dist.quant.api import convert
from kdqat_dist.quant.student import load_student

NER_MAX_LEN = 16
QA_MAX_LEN, QA_STRIDE = 32, 8
SENTENCES = ["anna found paris", "the critics at acme found it funny", "bob and anna in rome " * 4]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("predict_tasks")


@pytest.fixture(scope="module")
def ner_student(root):
    data = ("data.task=conll2003", f"data.max_seq_length={NER_MAX_LEN}")
    return _student(root, QuantConfig(), "ner", AUTO_CLASSES["ForTokenClassification"], CONLL_TAGS, data)


@pytest.fixture(scope="module")
def qa_student(root):
    squad = write_toy_squad(root / "squad", n_train=4, n_dev=4)
    data = (
        "data.task=squad",
        f"data.source={squad}",
        f"data.max_seq_length={QA_MAX_LEN}",
        f"data.doc_stride={QA_STRIDE}",
    )
    return _student(root, QuantConfig(), "qa", AUTO_CLASSES["ForQuestionAnswering"], ("start", "end"), data)


# --------------------------------------------------------------------------- pure functions


def _one_hot(rows: list[int], width: int = len(CONLL_TAGS), high: float = 4.0) -> np.ndarray:
    out = np.zeros((len(rows), width), np.float32)
    out[np.arange(len(rows)), rows] = high
    return out


def test_tags_and_entities_from_hand_made_logits():
    words = "EU rejects German call to boycott New York lamb".split()
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "I-LOC", "I-LOC", "O"]  # IOB1 I- opens a chunk
    ids = [CONLL_TAGS.index(t) for t in tags]
    # [CLS] EU rejects Ger ##man call to boycott New York lamb [SEP]; ##man's logits say PER and are ignored
    word_ids = [-1, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, -1]
    logits = _one_hot([0, ids[0], ids[1], ids[2], 1, *ids[3:], 0])
    pred = token_prediction(words, logits, word_ids, CONLL_TAGS)
    assert pred.tags == tags and pred.cut == 0
    p = float(np.exp(4.0) / (np.exp(4.0) + len(CONLL_TAGS) - 1))
    assert [(e.type, e.start, e.end, e.text) for e in pred.entities] == [
        ("ORG", 0, 0, "EU"),
        ("MISC", 2, 2, "German"),
        ("LOC", 6, 7, "New York"),
    ]
    assert all(e.score == pytest.approx(p) for e in pred.entities)
    # truncation left the last two words without a sub-token: O, counted in cut
    cut = token_prediction(words, logits[:9], word_ids[:9], CONLL_TAGS)
    assert cut.tags == [*tags[:7], "O", "O"] and cut.cut == 2
    assert cut.entities[-1].text == "New" and cut.entities[-1].end == 6


def _window(context: str, spans: list[tuple[int, int]], logits: dict[int, tuple[float, float]], n: int):
    """A window of ``n`` tokens: [CLS] and question (no offsets), then context tokens with ``spans``; all
    logits 0 except ``logits[pos] = (start, end)``."""
    offsets = [None] * (n - len(spans)) + spans
    start, end = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for pos, (s, e) in logits.items():
        start[pos], end[pos] = s, e
    return start, end, offsets


def test_best_span_over_windows_and_the_v2_null_answer():
    context = "the plot was great . the music was dull ."
    # word character spans; window 1 holds words 0-5, window 2 words 4-9 (two shared)
    words = [(m, m + len(w)) for m, w in zip(_starts(context), context.split(), strict=True)]
    w1 = _window(context, words[:6], {0: (1.0, 1.0), 4: (2.0, 0.0), 5: (0.0, 2.0)}, 8)
    w2 = _window(context, words[4:], {0: (1.0, 2.0), 5: (3.0, 0.0), 6: (0.0, 3.0)}, 8)
    starts, ends, offsets = zip(w1, w2, strict=True)
    best = answer_prediction(context, starts, ends, offsets, version_2=False, null_threshold=0.0)
    # window 2's positions 5 and 6 are context words 7 and 8: "was dull", offsets into the whole context
    assert best == AnswerPrediction("was dull", 6.0, words[7][0], words[8][1])
    assert context[best.start : best.end] == "was dull"
    # v2: a [CLS] score above the best span's gives the empty answer; the null score is the lowest window's
    high = [s.copy() for s in starts]
    for s in high:
        s[0] = 9.0
    null = answer_prediction(context, high, ends, offsets, version_2=True, null_threshold=0.0)
    assert null == AnswerPrediction("", 10.0)
    assert answer_prediction(context, high, ends, offsets, version_2=True, null_threshold=5.0) == best
    assert answer_prediction(context, high, ends, offsets, version_2=False, null_threshold=0.0) == best


def _starts(text: str) -> list[int]:
    out, pos = [], 0
    for w in text.split():
        pos = text.index(w, pos)
        out.append(pos)
        pos += len(w)
    return out


# --------------------------------------------------------------------------- the models


def test_token_tags_are_the_argmax_at_each_words_first_sub_token(ner_student):
    p = Predictor(ner_student, batch_size=1)
    assert (p.head, p.max_length, p.labels) == ("token", NER_MAX_LEN, list(CONLL_TAGS))
    model, tok = convert(load_student(ner_student)), load_tokenizer(str(ner_student))
    preds = p.predict(SENTENCES)
    for text, pred in zip(SENTENCES, preds, strict=True):
        words = text.split()
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=NER_MAX_LEN, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0]
        want = ["O"] * len(words)
        for pos, w in enumerate(enc.word_ids(0)):
            if w is not None and (pos == 0 or enc.word_ids(0)[pos - 1] != w):
                want[w] = CONLL_TAGS[int(logits[pos].argmax())]
        assert pred.words == words and pred.tags == want
        assert [(e.type, e.start, e.end) for e in pred.entities] == entity_spans(want)
    assert preds[0].cut == 0 and preds[-1].cut > 0  # the long row lost words to max_length
    # a list of words (JSONL ``tokens``) is the same row as its text
    assert p.predict([SENTENCES[1].split()]) == preds[1:2]


def _context(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"the {rng.choice(ASPECTS)} was {rng.choice(ADJECTIVES)} ." for _ in range(10))


def _naive_answer(model, tok, question: str, context: str) -> tuple[int, int, int]:
    """(window, first char, end char) of the highest start + end logit over every window's context spans of
    at most MAX_ANSWER_LENGTH tokens, each window run alone."""
    no_answer = {"text": [], "answer_start": []}
    ex = {"id": ["0"], "question": [question], "context": [context], "answers": [no_answer]}
    feats = prepare_features(ex, tok, QA_MAX_LEN, QA_STRIDE, for_eval=True)
    best = (-np.inf, 0, 0, 0)
    for w, offsets in enumerate(feats["offset_mapping"]):
        batch = {k: torch.tensor([feats[k][w]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            out = model(**batch)
        s_log, e_log = out.start_logits[0].numpy(), out.end_logits[0].numpy()
        ctx = [i for i, o in enumerate(offsets) if o is not None]
        for s in ctx:
            for e in ctx:
                if s <= e < s + MAX_ANSWER_LENGTH and s_log[s] + e_log[e] > best[0]:
                    best = (s_log[s] + e_log[e], w, offsets[s][0], offsets[e][1])
    assert len(feats["offset_mapping"]) >= 3, "the context must span several windows"
    return best[1:]


def test_qa_answer_is_the_best_span_over_windows_with_context_offsets(qa_student):
    p = Predictor(qa_student, batch_size=1)
    assert (p.head, p.max_length, p.doc_stride, p.version_2) == ("qa", QA_MAX_LEN, QA_STRIDE, False)
    model, tok = convert(load_student(qa_student)), load_tokenizer(str(qa_student))
    question = "how was the plot"
    # the first of a few fixed contexts whose best span lies past the first window
    found = next((c, ans) for c in map(_context, range(20)) if (ans := _naive_answer(model, tok, question, c))[0] >= 1)
    context, (_, start, end) = found
    got = p.predict([question], [context])[0]
    assert (got.start, got.end, got.answer) == (start, end, context[start:end]) and got.answer


def test_a_squad_v2_student_answers_nothing_at_the_runs_threshold(qa_student, root):
    """The run's data.null_score_diff_threshold decides, as in evaluation: far below every null-score
    difference nothing is answered, far above it every question gets its best span."""
    questions, contexts = ["how was the plot"] * 3, [_context(i) for i in range(3)]
    spans = Predictor(qa_student).predict(questions, contexts)
    for threshold, want in ((-1e6, ["" for _ in spans]), (1e6, [x.answer for x in spans])):
        run = root / f"qa_v2_{threshold:g}"
        shutil.copytree(qa_student.parent, run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["data"].update(task="squad_v2", null_score_diff_threshold=threshold)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        p = Predictor(run / "student")
        assert p.version_2 and p.null_threshold == threshold
        assert [x.answer for x in p.predict(questions, contexts)] == want
    assert not Predictor(qa_student).version_2 and all(x.answer for x in spans)


# --------------------------------------------------------------------------- the CLI and the model kinds


def test_cli_writes_tags_entities_and_answers_as_tsv_and_jsonl(ner_student, qa_student, root, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(SENTENCES) + "\n"))
    assert main(["predict", "--model", str(ner_student.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    preds = Predictor(ner_student).predict(SENTENCES)
    assert lines[0] == "entities\ttags\ttext" and len(lines) == 1 + len(SENTENCES)
    for line, pred in zip(lines[1:], preds, strict=True):
        assert line.split("\t") == [
            "; ".join(f"{e.text}:{e.type}" for e in pred.entities),
            " ".join(pred.tags),
            " ".join(pred.words),
        ]
    (root / "ner.jsonl").write_text("".join(json.dumps({"tokens": s.split()}) + "\n" for s in SENTENCES))
    out = root / "ner_out.jsonl"
    assert main(["predict", "--model", str(ner_student), "--input", str(root / "ner.jsonl"), "--output", str(out)]) == 0
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [d["tags"] for d in docs] == [p.tags for p in preds] and docs[-1]["cut"] == preds[-1].cut
    assert [[(e["type"], e["start"], e["end"], e["text"]) for e in d["entities"]] for d in docs] == [
        [(e.type, e.start, e.end, e.text) for e in p.entities] for p in preds
    ]
    # QA: question and context columns in, the answer with its character offsets out
    rows = [{"question": "how was the plot", "context": _context(i)} for i in range(3)]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "qa_out.jsonl"
    assert main(["predict", "--model", str(qa_student), "--input", str(root / "qa.jsonl"), "--output", str(out)]) == 0
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["context"][d["start"] : d["end"]] == d["answer"] != "" for r, d in zip(rows, docs, strict=True))
    assert main(["predict", "--model", str(qa_student), "--input", str(root / "qa.jsonl")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "answer\tscore\tquestion" and [x.split("\t")[0] for x in lines[1:]] == [
        d["answer"] for d in docs
    ]
    # a QA input without contexts, lines, windows too short: one line naming the flag, not the command twice
    (root / "q.tsv").write_text("question\nhow was the plot\n")
    for argv, flag, expected in (
        (["--input", str(root / "q.tsv")], "--input", "has no column 'context'; pass --pair-column"),
        ([], "--input", "stdin has no text column 'question'"),
        (["--input", str(root / "qa.jsonl"), "--max-length", "16"], "--max-length", "too short for the run's windows"),
    ):
        monkeypatch.setattr("sys.stdin", io.StringIO("how was the plot\n"))
        assert main(["predict", "--model", str(qa_student), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"kdqat: error: {flag}: ") and expected in err, err


def test_student_packed_and_onnx_exports_predict_the_same(ner_student, qa_student, root):
    rows = [("how was the plot", _context(i)) for i in range(3)]
    for student, args in ((ner_student, (SENTENCES,)), (qa_student, tuple(map(list, zip(*rows, strict=True))))):
        name = student.parent.name
        export_student(student, root / f"{name}_packed")
        export_onnx(student, root / f"{name}_onnx")
        want = Predictor(student).predict(*args)
        for folder in (root / f"{name}_packed", root / f"{name}_onnx"):
            p = Predictor(folder)
            got = p.predict(*args)
            assert p.kind == folder.name.split("_")[1] and p.head == Predictor(student).head, folder
            if p.head == "qa":
                assert [(x.answer, x.start, x.end) for x in got] == [(x.answer, x.start, x.end) for x in want]
                assert np.allclose([x.score for x in got], [x.score for x in want], atol=0.05), folder
            else:
                assert [x.tags for x in got] == [x.tags for x in want], folder
                assert [[e.text for e in x.entities] for x in got] == [[e.text for e in x.entities] for x in want]
