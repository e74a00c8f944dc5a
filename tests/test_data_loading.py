"""Data loading (GLUE folders, custom files, the demo), tokenization caching, collation and loaders."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from transformers import BertTokenizerFast

from kdqat_dist.config import DataConfig
from kdqat_dist.data import loaders
from kdqat_dist.data.demo import (
    FLIP_FRAMES,
    HARD_LABEL_NOISE,
    NEGATIONS,
    bag_of_words_baseline,
    make_demo,
    rule_label,
    vocabulary,
)
from kdqat_dist.data.loaders import (
    Collator,
    default_cache_dir,
    load_splits,
    split_off_dev,
    tokenize_splits,
)
from kdqat_dist.data.tasks import get_task
from kdqat_dist.errors import DataError

# --------------------------------------------------------------------------- helpers


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(tmp: Path | str, task: str, **kw):
    cfg = DataConfig(task=task, source=str(tmp), **kw)
    return load_splits(cfg, get_task(cfg))


def records(ds: Dataset) -> list[tuple]:
    return [(r["text_a"], r["text_b"], r["label"]) for r in ds]


SST2_HEADER = ["sentence", "label"]


def sst2_folder(root: Path, n_train: int = 4, n_dev: int = 2) -> Path:
    write_tsv(root / "train.tsv", [SST2_HEADER] + [[f"good movie {i} ", str(i % 2)] for i in range(n_train)])
    write_tsv(root / "dev.tsv", [SST2_HEADER] + [[f"dev text {i}", str(i % 2)] for i in range(n_dev)])
    return root


def mnli_row(i: int, a: str, b: str, label: str, n_cols: int) -> list[str]:
    row = [str(i), "p", "q", "fiction", "(a)", "(b)", "(A)", "(B)", a, b]
    return row + ["x"] * (n_cols - len(row) - 1) + [label]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocabulary(), "good", "movie", "bad", "a", "b"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(dict.fromkeys(words)) + "\n")
    # transformers 5 ignores vocab_file= here; vocab= takes the file path.
    tok = BertTokenizerFast(vocab=str(vocab))
    assert len(tok) == len(dict.fromkeys(words))
    return tok


# --------------------------------------------------------------------------- GLUE folders


def test_sst2_folder(tmp_path):
    splits = load(sst2_folder(tmp_path), "SST-2")
    assert set(splits) == {"train", "dev"}
    assert records(splits["train"])[:2] == [("good movie 0 ", None, 0), ("good movie 1 ", None, 1)]
    assert len(splits["train"]) == 4 and len(splits["dev"]) == 2
    assert splits["train"].column_names == ["text_a", "text_b", "label"]


def test_cola_has_no_header(tmp_path):
    rows = [["gj04", "1", "", "Our friends won't buy this analysis."], ["gj04", "0", "*", "They drank the pub."]]
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "dev.tsv", rows[:1])
    splits = load(tmp_path, "cola")
    assert records(splits["train"]) == [
        ("Our friends won't buy this analysis.", None, 1),
        ("They drank the pub.", None, 0),
    ]
    # A header line is read as data, so its "label" is rejected on line 1.
    write_tsv(tmp_path / "train.tsv", [["source", "label", "orig", "sentence"], *rows])
    with pytest.raises(DataError, match=r"train\.tsv:1, column 1: label 'label' .*allowed: 0, 1"):
        load(tmp_path, "cola")


def test_rte_labels_are_mapped_through_the_label_list(tmp_path):
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(
        tmp_path / "train.tsv",
        [header, ["0", "A man.", "A person.", "entailment"], ["1", "A dog.", "A cat.", "not_entailment"]],
    )
    write_tsv(tmp_path / "dev.tsv", [header, ["0", "x", "y", "not_entailment"]])
    splits = load(tmp_path, "rte")
    assert records(splits["train"]) == [("A man.", "A person.", 0), ("A dog.", "A cat.", 1)]
    assert records(splits["dev"]) == [("x", "y", 1)]


def test_mnli_two_dev_files(tmp_path):
    header12 = mnli_row(0, "sentence1", "sentence2", "gold_label", 12)
    write_tsv(
        tmp_path / "train.tsv",
        [header12, mnli_row(1, "a", "b", "neutral", 12), mnli_row(2, "c", "d", "contradiction", 12)],
    )
    header16 = mnli_row(0, "sentence1", "sentence2", "gold_label", 16)
    write_tsv(tmp_path / "dev_matched.tsv", [header16, mnli_row(1, "m", "n", "entailment", 16)])
    write_tsv(
        tmp_path / "dev_mismatched.tsv",
        [header16, mnli_row(1, "o", "p", "neutral", 16), mnli_row(2, "q", "r", "contradiction", 16)],
    )
    splits = load(tmp_path, "mnli")
    assert set(splits) == {"train", "dev", "dev_mm"}
    assert records(splits["train"]) == [("a", "b", 2), ("c", "d", 0)]
    assert records(splits["dev"]) == [("m", "n", 1)]
    assert records(splits["dev_mm"]) == [("o", "p", 2), ("q", "r", 0)]
    (tmp_path / "dev_mismatched.tsv").unlink()
    with pytest.raises(DataError, match="dev_mismatched.tsv not found"):
        load(tmp_path, "mnli")


def test_stsb_float_label_in_last_column(tmp_path):
    header = [
        "index",
        "genre",
        "filename",
        "year",
        "old_index",
        "source1",
        "source2",
        "sentence1",
        "sentence2",
        "score",
    ]
    meta = ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none"]
    write_tsv(
        tmp_path / "train.tsv",
        [header, [*meta, "A plane.", "An air plane.", "5.000"], [*meta, "A man.", "A cat.", "0.25"]],
    )
    write_tsv(tmp_path / "dev.tsv", [header, [*meta, "x", "y", "3.8"]])
    splits = load(tmp_path, "sts-b")
    train = records(splits["train"])
    assert train[0][:2] == ("A plane.", "An air plane.") and train[0][2] == pytest.approx(5.0)
    assert train[1][2] == pytest.approx(0.25) and splits["dev"][0]["label"] == pytest.approx(3.8)
    write_tsv(tmp_path / "dev.tsv", [header, [*meta, "x", "y", "high"]])
    with pytest.raises(DataError, match=r"dev\.tsv:2, column 9: label 'high' is not a finite number"):
        load(tmp_path, "stsb")


def test_qqp_malformed_row_is_an_error(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(
        tmp_path / "train.tsv", [header, ["0", "1", "2", "How?", "Why?", "0"], ["1", "3", "4", "What?", "What!", "1"]]
    )
    write_tsv(tmp_path / "dev.tsv", [header, ["0", "1", "2", "a", "b", "1"]])
    assert records(load(tmp_path, "qqp")["train"]) == [("How?", "Why?", 0), ("What?", "What!", 1)]
    short_row = ["1", "3", "4", "What?", "1"]  # question2 missing
    write_tsv(tmp_path / "train.tsv", [header, ["0", "1", "2", "How?", "Why?", "0"], short_row])
    with pytest.raises(DataError) as exc:
        load(tmp_path, "qqp")
    msg = str(exc.value)
    assert f"{tmp_path / 'train.tsv'}:3: malformed row: expected 6" in msg and "got 5" in msg
    assert "\n" not in msg


def test_glue_header_without_the_label_column_is_an_error(tmp_path):
    write_tsv(tmp_path / "train.tsv", [["sentence"], ["good film"]])
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["bad", "0"]])
    with pytest.raises(DataError, match=r"train\.tsv:1: the header has 1 column\(s\) \(sentence\); sst2 files need"):
        load(tmp_path, "sst2")


def test_empty_sentence_in_a_glue_tsv_is_an_error(tmp_path):
    write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["good film", "1"], ["   ", "0"]])
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["bad", "0"]])
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.tsv'}:3: column 0 is empty \(a text is required\)"):
        load(tmp_path, "sst2")
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(tmp_path / "train.tsv", [header, ["0", "1", "2", "How?", "", "0"]])
    with pytest.raises(DataError, match=r"train\.tsv:2: column 4 is empty"):
        load(tmp_path, "qqp")


def test_mrpc_with_byte_order_mark(tmp_path):
    header = ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(tmp_path / "train.tsv", [header, ["1", "7", "8", "He said.", "He stated."]])
    write_tsv(tmp_path / "dev.tsv", [header, ["0", "7", "8", "a", "b"]])
    assert records(load(tmp_path, "mrpc")["train"]) == [("He said.", "He stated.", 1)]


def test_label_outside_label_space(tmp_path):
    sst2_folder(tmp_path)
    write_tsv(tmp_path / "dev.tsv", [SST2_HEADER, ["fine", "1"], ["odd", "2"]])
    with pytest.raises(DataError) as exc:
        load(tmp_path, "sst2")
    assert str(exc.value) == (
        f"{tmp_path / 'dev.tsv'}:3, column 1: label '2' is not in the label set of task sst2; allowed: 0, 1"
    )


def test_missing_train_and_dev_files(tmp_path):
    with pytest.raises(DataError, match=r"train\.tsv not found"):
        load(tmp_path, "sst2")
    write_tsv(tmp_path / "train.tsv", [SST2_HEADER] + [[f"s{i}", str(i % 2)] for i in range(20)])
    with pytest.raises(DataError, match=r"dev\.tsv: no dev split found.*dev_fraction"):
        load(tmp_path, "sst2")
    cfg = DataConfig(task="sst2", source=str(tmp_path))
    splits = load_splits(cfg, get_task(cfg), dev_fraction=0.25, split_seed=1)
    assert (len(splits["train"]), len(splits["dev"])) == (15, 5)
    texts = [*splits["train"]["text_a"], *splits["dev"]["text_a"]]
    assert sorted(texts) == sorted(f"s{i}" for i in range(20))
    again = load_splits(cfg, get_task(cfg), dev_fraction=0.25, split_seed=1)
    assert list(again["dev"]["text_a"]) == list(splits["dev"]["text_a"])


def test_split_off_dev_errors():
    ds = Dataset.from_dict({"x": list(range(10))})
    train, dev = split_off_dev(ds, 0.3, seed=0)
    assert len(train) == 7 and len(dev) == 3 and not set(train["x"]) & set(dev["x"])
    with pytest.raises(DataError, match="dev_fraction"):
        split_off_dev(ds, 1.5, seed=0)


def test_empty_split_and_truncation(tmp_path):
    sst2_folder(tmp_path, n_train=10, n_dev=6)
    splits = load(tmp_path, "sst2", max_train_samples=3, max_eval_samples=2)
    assert list(splits["train"]["text_a"]) == ["good movie 0 ", "good movie 1 ", "good movie 2 "]
    assert list(splits["dev"]["text_a"]) == ["dev text 0", "dev text 1"]
    write_tsv(tmp_path / "dev.tsv", [SST2_HEADER])
    with pytest.raises(DataError, match="dev split of task sst2 is empty"):
        load(tmp_path, "sst2")
    with pytest.raises(DataError, match="data.max_train_samples"):
        load(tmp_path, "sst2", max_train_samples=0)


def test_source_that_is_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load(tmp_path / "nope", "sst2")


def test_hub_unreachable_is_a_data_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline mode fails at once instead of retrying DNS for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(task="rte")
    with pytest.raises(DataError, match=r"nyu-mll/glue/rte.*hub is unreachable.*data\.source") as exc:
        load_splits(cfg, get_task(cfg))
    assert "\n" not in str(exc.value)


def test_hub_splits_and_classlabel_names_are_mapped(monkeypatch):
    import datasets

    # The hub's MNLI orders its labels entailment, neutral, contradiction; ours (the reference's) differ.
    names = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
    feats = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": names,
            "idx": datasets.Value("int32"),
        }
    )

    def split(n: int) -> Dataset:
        return Dataset.from_dict(
            {
                "premise": [f"p{i}" for i in range(n)],
                "hypothesis": ["h"] * n,
                "label": [i % 3 for i in range(n)],
                "idx": list(range(n)),
            },
            features=feats,
        )

    calls = []

    def fake_load_dataset(name, config=None, **kw):
        calls.append((name, config))
        return datasets.DatasetDict(
            {
                "train": split(3),
                "validation_matched": split(2),
                "validation_mismatched": split(1),
                "test_matched": split(1),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(task="mnli")
    splits = load_splits(cfg, get_task(cfg))
    assert calls == [("nyu-mll/glue", "mnli")]
    assert set(splits) == {"train", "dev", "dev_mm"}
    # entailment -> 1, neutral -> 2, contradiction -> 0
    assert records(splits["train"]) == [("p0", "h", 1), ("p1", "h", 2), ("p2", "h", 0)]


def test_binary_classlabel_ids_pass_through():
    import datasets

    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    ds = Dataset.from_dict({"sentence": ["a", "b"], "label": [1, 0]}, features=feats)
    out = loaders.normalise(ds, get_task("sst2"), lambda i: f"row {i}", "hub")
    assert records(out) == [("a", None, 1), ("b", None, 0)]


# --------------------------------------------------------------------------- custom files


def custom(
    tmp_path: Path, train: Path, dev: Path | None = None, dev_fraction: float | None = None, **kw
) -> dict[str, Dataset]:
    cfg = DataConfig(task=kw.pop("task", "custom"), train_file=str(train), dev_file=str(dev or ""), **kw)
    return load_splits(cfg, get_task(cfg), dev_fraction=dev_fraction)


def test_custom_csv_with_quotes_and_string_labels(tmp_path):
    csv_text = 'review,stars,extra\n"great, really",good,1\n"NA",bad,2\n007,good,3\n'
    (tmp_path / "train.csv").write_text(csv_text)
    (tmp_path / "dev.csv").write_text("review,stars,extra\nmeh,bad,9\n")
    splits = custom(
        tmp_path,
        tmp_path / "train.csv",
        tmp_path / "dev.csv",
        text_a="review",
        label="stars",
        label_list=["bad", "good"],
    )
    # texts arrive exactly as written ("NA" is not a missing value, "007" is not the number 7)
    assert records(splits["train"]) == [("great, really", None, 1), ("NA", None, 0), ("007", None, 1)]
    assert records(splits["dev"]) == [("meh", None, 0)]


def test_custom_tsv_pair_regression(tmp_path):
    (tmp_path / "train.tsv").write_text('a\tb\tscore\n"q" one\ttwo\t0.5\nthree\tfour\t1\n')
    (tmp_path / "dev.tsv").write_text("a\tb\tscore\nx\ty\t2.25\n")
    splits = custom(
        tmp_path, tmp_path / "train.tsv", tmp_path / "dev.tsv", text_a="a", text_b="b", label="score", num_labels=1
    )
    assert records(splits["train"]) == [('"q" one', "two", 0.5), ("three", "four", 1.0)]
    assert splits["dev"][0]["label"] == pytest.approx(2.25)


def test_custom_jsonl_json_and_parquet(tmp_path):
    rows = [{"text": "alpha", "y": 2}, {"text": "beta", "y": 0}, {"text": "gamma", "y": 1}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.json").write_text(json.dumps(rows[:2]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    kw = {"text_a": "text", "label": "y", "num_labels": 3}
    splits = custom(tmp_path, tmp_path / "train.jsonl", tmp_path / "dev.json", **kw)
    assert records(splits["train"]) == [("alpha", None, 2), ("beta", None, 0), ("gamma", None, 1)]
    assert records(splits["dev"]) == [("alpha", None, 2), ("beta", None, 0)]
    splits = custom(tmp_path, tmp_path / "train.parquet", tmp_path / "dev.json", **kw)
    assert records(splits["train"]) == [("alpha", None, 2), ("beta", None, 0), ("gamma", None, 1)]


def test_glue_task_from_csv_uses_hub_column_names(tmp_path):
    (tmp_path / "train.csv").write_text("sentence1,sentence2,label\na,b,entailment\nc,d,not_entailment\n")
    (tmp_path / "dev.csv").write_text("sentence1,sentence2,label\ne,f,entailment\n")
    splits = custom(tmp_path, tmp_path / "train.csv", tmp_path / "dev.csv", task="rte")
    assert records(splits["train"]) == [("a", "b", 0), ("c", "d", 1)]


def test_custom_missing_column_lists_present_columns(tmp_path):
    (tmp_path / "train.csv").write_text("review,stars\nok,good\n")
    with pytest.raises(DataError) as exc:
        custom(tmp_path, tmp_path / "train.csv", text_a="text", label="stars", label_list=["bad", "good"])
    assert str(exc.value) == (
        f"{tmp_path / 'train.csv'}: column 'text' (data.text_a) not found; columns present: review, stars"
    )


def test_custom_bad_label_names_file_line_and_allowed(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nok,good\nhmm,great\n")
    with pytest.raises(DataError) as exc:
        custom(tmp_path, tmp_path / "train.csv", text_a="text", label_list=["bad", "good"])
    assert str(exc.value) == (
        f"{tmp_path / 'train.csv'}:3, column 'label': label 'great' is not in the "
        "label set of task custom; allowed: bad, good"
    )
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 1}\n{"text": null, "label": 0}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: column 'text' has no value"):
        custom(tmp_path, tmp_path / "train.jsonl", text_a="text", num_labels=2)


def test_custom_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.train_file: file not found: .*missing\.csv"):
        custom(tmp_path, tmp_path / "missing.csv", label_list=["a", "b"])
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*allowed: \.csv"):
        custom(tmp_path, tmp_path / "train.txt", label_list=["a", "b"])
    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train\.json: could not be read as JSON"):
        custom(tmp_path, tmp_path / "train.json", label_list=["a", "b"])
    cfg = DataConfig(task="custom", label_list=["a", "b"])
    with pytest.raises(DataError, match="data.train_file"):
        load_splits(cfg, get_task(cfg))
    (tmp_path / "train.csv").write_text("sentence,label\na,a\nb,b\nc,a\nd,b\n")
    with pytest.raises(DataError, match="data.dev_file: no dev split"):
        custom(tmp_path, tmp_path / "train.csv", label_list=["a", "b"])
    assert len(custom(tmp_path, tmp_path / "train.csv", label_list=["a", "b"], dev_fraction=0.25)["dev"]) == 1


# --------------------------------------------------------------------------- the demo task


def test_demo_is_deterministic_and_split():
    a, b = make_demo(500, seed=3), make_demo(500, seed=3)
    assert a == b
    assert a != make_demo(500, seed=4)
    assert len(a["train"]) + len(a["dev"]) == 500 and len(a["dev"]) == 75
    texts = [r["text_a"] for r in a["train"] + a["dev"]]
    assert len(set(texts)) == 500  # no sentence shared between train and dev
    assert all(r["text_b"] is None and r["label"] in (0, 1) for r in a["train"])


def test_demo_labels_follow_the_grammar_and_vocabulary():
    demo = make_demo(2000, seed=0)
    vocab = set(vocabulary())
    assert 150 <= len(vocab) <= 300 and all(w == w.lower() for w in vocab)
    for r in demo["train"] + demo["dev"]:
        assert rule_label(r["text_a"]) == r["label"]
        assert set(r["text_a"].split()) <= vocab
    labels = Counter(r["label"] for r in demo["train"])
    assert 0.45 < labels[1] / sum(labels.values()) < 0.55
    assert rule_label("the acting was dull but the story was wonderful") == 1
    assert rule_label("although the acting was dull , the story was not wonderful") == 0
    assert rule_label("the plot was never boring , though the ending felt weak") == 1


def test_demo_is_learnable_but_not_trivial_for_bag_of_words():
    demo = make_demo(4000, seed=0)
    acc = bag_of_words_baseline(demo["train"], demo["dev"])
    assert 0.5 < acc < 0.9


def test_demo_levels_easy_and_hard():
    easy, hard = make_demo(2000, 0, "easy"), make_demo(4000, 0, "hard")
    assert make_demo(300, 5, "hard") == make_demo(300, 5, "hard")
    vocab = set(vocabulary())
    # easy: one clause, no negation: the adjective decides, so a bag of words reads it off
    for r in easy["train"] + easy["dev"]:
        assert rule_label(r["text_a"]) == r["label"] and not set(r["text_a"].split()) & NEGATIONS
    assert bag_of_words_baseline(easy["train"], easy["dev"]) > 0.97
    # hard: frames reverse clauses (parity of the negation words), and HARD_LABEL_NOISE of labels flipped
    rows = hard["train"] + hard["dev"]
    assert all(set(r["text_a"].split()) <= vocab for r in rows)
    flipped = sum(rule_label(r["text_a"]) != r["label"] for r in rows) / len(rows)
    assert abs(flipped - HARD_LABEL_NOISE) < 0.015
    assert sum(any(f in r["text_a"] for f in FLIP_FRAMES) for r in rows) > 0.2 * len(rows)
    assert rule_label("nobody would say that the plot was not dull") == 0
    assert rule_label("the acting was weak but it is not true that the plot was dull") == 1
    assert bag_of_words_baseline(hard["train"], hard["dev"]) < 0.7
    with pytest.raises(ValueError, match="easy, standard, hard"):
        make_demo(10, 0, "medium")
    with pytest.raises(DataError, match="data.demo_level: got 'medium'; allowed: easy, standard, hard"):
        load_splits(DataConfig(task="demo", demo_level="medium"), get_task(DataConfig(task="demo")))


def test_demo_through_load_splits():
    cfg = DataConfig(task="demo", demo_size=200, demo_seed=1, max_eval_samples=10)
    splits = load_splits(cfg, get_task(cfg))
    assert len(splits["train"]) == 170 and len(splits["dev"]) == 10
    assert records(splits["train"])[0] == tuple(make_demo(200, 1)["train"][0].values())
    bad = DataConfig(task="demo", source="/somewhere")
    with pytest.raises(DataError, match="demo is built in"):
        load_splits(bad, get_task(bad))


# --------------------------------------------------------------------------- tokenization


def demo_splits(n: int = 120) -> dict[str, Dataset]:
    cfg = DataConfig(task="demo", demo_size=n)
    return load_splits(cfg, get_task(cfg))


def test_tokenize_no_padding_and_columns(tokenizer, tmp_path):
    tok = tokenize_splits(demo_splits(), tokenizer, 64, cache_dir=tmp_path)
    train = tok["train"]
    assert set(train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = {len(x) for x in train["input_ids"]}
    assert len(lengths) > 1  # not padded
    first = make_demo(120, 0)["train"][0]
    assert train[0]["input_ids"] == tokenizer(first["text_a"])["input_ids"]
    assert train[0]["labels"] == first["label"]
    assert tokenizer.unk_token_id not in train[0]["input_ids"]


def test_pairs_truncate_longest_first(tokenizer, tmp_path):
    spec = get_task("rte")
    ds = Dataset.from_dict(
        {"text_a": ["the plot " * 20], "text_b": ["good movie"], "label": [1]}, features=loaders._features(spec)
    )
    out = tokenize_splits({"dev": ds}, tokenizer, 12, cache_dir=tmp_path)["dev"][0]
    assert len(out["input_ids"]) == 12
    # longest-first keeps the short second sentence whole: [CLS] a*7 [SEP] good movie [SEP]
    assert out["token_type_ids"] == [0] * 9 + [1] * 3
    assert tokenizer.convert_ids_to_tokens(out["input_ids"][-3:]) == ["good", "movie", "[SEP]"]


def test_tokenization_cache_is_reused(tokenizer, tmp_path, monkeypatch):
    splits = demo_splits()
    first = tokenize_splits(splits, tokenizer, 64, cache_dir=tmp_path)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and all((tmp_path / c / "dataset_info.json").is_file() for c in cached)

    def fail(*a, **k):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(loaders, "_tokenize_to", fail)
    second = tokenize_splits(demo_splits(), tokenizer, 64, cache_dir=tmp_path)
    assert second["train"].to_dict() == first["train"].to_dict()
    assert second["dev"].to_dict() == first["dev"].to_dict()
    monkeypatch.undo()
    tokenize_splits(splits, tokenizer, 32, cache_dir=tmp_path)  # a new max_length is a new entry
    assert len(list(tmp_path.iterdir())) == 4


def test_default_cache_dir_respects_kdqat_cache(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("KDQAT_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "tokenized"
    tokenize_splits({"dev": demo_splits(40)["dev"]}, tokenizer, 64, cache_dir="")
    assert len(os.listdir(tmp_path / "root" / "tokenized")) == 1
    monkeypatch.delenv("KDQAT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "kdqat_dist" / "tokenized"


# --------------------------------------------------------------------------- collate and loaders


def test_collate_pads_to_the_longest_in_the_batch(tokenizer, tmp_path):
    train = tokenize_splits(demo_splits(), tokenizer, 64, cache_dir=tmp_path)["train"]
    rows = [train[i] for i in range(4)]
    batch = Collator(tokenizer)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (4, longest)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [r["labels"] for r in rows]
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


def test_collate_regression_labels_are_float(tokenizer, tmp_path):
    spec = get_task("stsb")
    ds = Dataset.from_dict(
        {"text_a": ["good movie", "the plot"], "text_b": ["bad", "the plot was good"], "label": [4.5, 0.25]},
        features=loaders._features(spec),
    )
    tok = tokenize_splits({"dev": ds}, tokenizer, 32, cache_dir=tmp_path)["dev"]
    batch = Collator(tokenizer)([tok[0], tok[1]])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([4.5, 0.25])


def test_no_distributed_code_in_data():
    imports = r"import torch\.distributed|from torch\.distributed|from torch import distributed"
    pattern = re.compile(rf"^\s*({imports})", re.MULTILINE)
    for path in Path(loaders.__file__).parent.glob("*.py"):
        assert not pattern.search(path.read_text()), path


# --------------------------------------------------------------------------- the real SST-2 file


def _shared_sst2() -> Path | None:
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "shared" / "data", here.parents[1] / "shared" / "data"]
    if os.environ.get("KDQAT_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["KDQAT_SHARED_DATA"]))
    for root in candidates:
        if (root / "sst2" / "train.tsv").is_file():
            return root / "sst2"
    return None


def test_shared_sst2_train_file():
    folder = _shared_sst2()
    if folder is None:
        pytest.skip("shared/data/sst2/train.tsv is not present")
    cfg = DataConfig(task="sst2", source=str(folder))
    with pytest.raises(DataError, match="dev_fraction"):
        load_splits(cfg, get_task(cfg))
    splits = load_splits(cfg, get_task(cfg), dev_fraction=0.05, split_seed=0)
    labels = np.concatenate([np.asarray(splits[s]["label"][:]) for s in ("train", "dev")])
    assert len(labels) == 67_349
    assert np.bincount(labels).tolist() == [29_780, 37_569]
    assert len(splits["dev"]) == round(67_349 * 0.05)
