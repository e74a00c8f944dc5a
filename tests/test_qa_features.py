"""SQuAD reading and windowed QA features on hand-made examples (a word-level fast tokenizer: one token a word)."""

import json

import pytest
from transformers import BertTokenizerFast, ByT5Tokenizer

from kdqat_dist.data.qa_features import check_window, prepare_features, read_squad_json
from kdqat_dist.errors import ConfigError, DataError

WORDS = ["what", "is", "it", "long", "question"] + [f"c{i}" for i in range(20)]
CONTEXT = " ".join(f"c{i}" for i in range(20))  # c0 c1 ... c19: one token a word


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa_vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


@pytest.fixture(scope="module")
def tok(vocab_file):
    return BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)


def _examples(answer: str | None, question: str = "what is it") -> dict[str, list]:
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [CONTEXT.index(answer)]}
    return {"id": ["q0"], "question": [question], "context": [CONTEXT], "answers": [answers]}


def _tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_answer_across_a_stride_boundary_is_labelled_in_the_window_that_holds_all_of_it(tok):
    # 16 tokens: [CLS] what is it [SEP] + 10 context tokens + [SEP]; windows share 4 tokens, so they start at
    # c0, c6, c12. "c8 c9 c10" is cut by the end of window 1 (c0..c9): [CLS] there; in window 2 (c6..c15)
    # c8 is token 5 + 2 = 7 and c10 token 9; window 3 (c12..c19) does not hold it.
    out = prepare_features(_examples("c8 c9 c10"), tok, max_length=16, doc_stride=4, for_eval=False)
    assert [_tokens(tok, ids)[5] for ids in out["input_ids"]] == ["c0", "c6", "c12"]
    assert _tokens(tok, out["input_ids"][0])[-2] == "c9"
    assert out["start_positions"] == [0, 7, 0]
    assert out["end_positions"] == [0, 9, 0]
    assert "example_id" not in out and "offset_mapping" not in out
    # the labelled tokens are the answer
    ids = out["input_ids"][1]
    assert tok.decode(ids[7:10]) == "c8 c9 c10"


def test_answer_in_two_windows_is_labelled_in_both(tok):
    # "c7" lies in window 1 (token 12) and window 2 (token 6)
    out = prepare_features(_examples("c7"), tok, max_length=16, doc_stride=4, for_eval=False)
    assert out["start_positions"] == [12, 6, 0] and out["end_positions"] == [12, 6, 0]


def test_eval_features_keep_example_id_and_context_offsets_only(tok):
    out = prepare_features(_examples("c8 c9 c10"), tok, max_length=16, doc_stride=4, for_eval=True)
    assert out["example_id"] == ["q0", "q0", "q0"]
    offs = out["offset_mapping"][1]
    assert offs[:5] == [None] * 5 and offs[-1] is None  # [CLS], the question, [SEP]s
    assert offs[5] == (CONTEXT.index("c6"), CONTEXT.index("c6") + 2)
    assert len(offs) == len(out["input_ids"][1])
    assert all(o is not None for o in offs[5:-1])


def test_no_answer_example_points_at_cls(tok):
    out = prepare_features(_examples(None), tok, max_length=16, doc_stride=4, for_eval=True)
    assert out["start_positions"] == [0, 0, 0] and out["end_positions"] == [0, 0, 0]


def test_empty_context_gives_cls_labels(tok):
    ex = {"id": ["e"], "question": ["what is it"], "context": [""], "answers": [{"text": ["c1"], "answer_start": [0]}]}
    out = prepare_features(ex, tok, max_length=16, doc_stride=4, for_eval=True)
    assert out["start_positions"] == [0] and all(o is None for o in out["offset_mapping"][0])


def test_short_context_is_one_feature(tok):
    ex = _examples("c3")
    out = prepare_features(ex, tok, max_length=32, doc_stride=4, for_eval=False)
    assert len(out["input_ids"]) == 1
    assert out["start_positions"] == [5 + 3] and out["token_type_ids"][0][5] == 1


def test_long_question_is_cut_to_the_query_budget(tok):
    question = " ".join(["long"] * 12) + " question"  # 13 tokens; budget min(64, 16 // 2) = 8
    out = prepare_features(_examples("c1", question), tok, max_length=16, doc_stride=2, for_eval=True)
    toks = _tokens(tok, out["input_ids"][0])
    assert toks[:10] == ["[CLS]"] + ["long"] * 8 + ["[SEP]"]
    assert out["offset_mapping"][0][10] == (0, 2)  # c0


def test_stride_too_large_and_slow_tokenizer_are_user_errors():
    with pytest.raises(ConfigError, match="doc_stride"):
        check_window(16, 5)
    assert check_window(384, 128) == 64
    with pytest.raises(ConfigError, match="fast tokenizer"):
        # a python-backend tokenizer has no offset mapping (BertTokenizer is fast in transformers 5)
        prepare_features(_examples("c1"), ByT5Tokenizer(), max_length=16, doc_stride=4, for_eval=True)


def _write(tmp_path, data, name="dev.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": "x", "data": data}))
    return path


def _article(qas, context="Paris is in France."):
    return {"title": "T", "paragraphs": [{"context": context, "qas": qas}]}


def test_read_squad_json_v1_and_v2(tmp_path):
    qas = [
        {"id": "a", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "b", "question": "Who?", "answers": [], "is_impossible": True},
    ]
    rows = read_squad_json(_write(tmp_path, [_article(qas)]), version_2=True)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["answers"] == {"text": ["France"], "answer_start": [12]}
    assert rows[1]["answers"] == {"text": [], "answer_start": []}
    assert rows[0]["context"] == "Paris is in France." and rows[0]["title"] == "T"
    with pytest.raises(DataError, match="squad_v2"):
        read_squad_json(_write(tmp_path, [_article(qas)]), version_2=False)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([{"title": "T"}], "missing key 'paragraphs'"),
        (
            [_article([{"id": "a", "question": "Q", "answers": [{"text": "France", "answer_start": 15}]}])],
            "does not fit",
        ),
        ([_article([{"id": "a", "question": "Q", "answers": [{"text": "x", "answer_start": "0"}]}])], "must be an int"),
        (
            [_article([{"id": "a", "question": "Q", "answers": [{"text": "France", "answer_start": 0}]}])],
            r"question 'a' answers\[0\]: the context at answer_start 0 reads 'Paris ', not the answer 'France'; "
            "answer_start must be the index",
        ),
        ([_article([{"id": "a", "question": "Q", "answers": []}])], "no answers"),
        ([_article([{"id": "a", "question": "Q", "answers": [{"text": " ", "answer_start": 0}]}])], "empty answer"),
        ([_article([{"id": "a", "question": "Q", "answers": [{"text": "P", "answer_start": 0}]}] * 2)], "duplicate"),
        ([], "no questions"),
    ],
)
def test_read_squad_json_rejects_bad_files_naming_the_place(tmp_path, data, match):
    with pytest.raises(DataError, match=match):
        read_squad_json(_write(tmp_path, data), version_2=False)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{oops", "not a readable JSON"),
        (" \n", r"x\.json: the file is empty; a SQuAD file is \{\"data\": "),
        ('{"version": "v2.0"}', r"x\.json: missing key 'data' \(expected the SQuAD layout data -> paragraphs -> qas\)"),
    ],
)
def test_read_squad_json_not_a_squad_file(tmp_path, text, match):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_squad_json(path, version_2=False)
