"""SQuAD EM/F1 and span post-processing against hand-computed cases."""

import numpy as np
import pytest

from kdqat_dist.data.qa_metrics import (
    BestSpan,
    best_answers,
    best_spans,
    best_threshold,
    best_threshold_scores,
    choose_answers,
    exact_match,
    f1,
    normalize_answer,
    postprocess,
    squad_scores,
)


@pytest.mark.parametrize(
    ("text", "norm"),
    [
        ("The  Cat's hat!", "cats hat"),
        ("an apple", "apple"),
        ("Theater of A Dream", "theater of dream"),  # whole-word articles only
        ("A. B.", "b"),  # punctuation goes first, then the article "a"
        ("  1,000\tpeople ", "1000 people"),
        ("the", ""),
    ],
)
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_f1_and_em_arithmetic():
    # pred {big, red, dog} vs gold {red, dog, barks}: 2 shared, P = R = 2/3
    assert f1("the big red dog", "red dog barks") == pytest.approx(2 / 3)
    # multiset overlap: "dog dog" vs "dog" shares 1: P = 1/2, R = 1, F1 = 2/3
    assert f1("dog dog", "dog") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/4: F1 = 2 * 0.25 / 1.25 = 0.4
    assert f1("Denver", "the Denver Broncos football team") == pytest.approx(0.4)
    assert f1("cat", "dog") == 0.0
    assert exact_match("The Denver Broncos.", "denver broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # empty sides (v2 no-answer): 1 only when both are empty
    assert f1("", "") == 1.0 and f1("x", "") == 0.0 and f1("", "x") == 0.0


def test_squad_scores_max_over_golds_and_v2_splits():
    examples = [
        {"id": "1", "answers": {"text": ["Denver Broncos", "Broncos", "the Denver Broncos"]}},
        {"id": "2", "answers": {"text": ["red dog barks"]}},
        {"id": "3", "answers": {"text": []}},  # v2 no-answer
        {"id": "4", "answers": {"text": []}},
    ]
    preds = {"1": "Broncos", "2": "the big red dog", "3": "", "4": "something"}
    s = squad_scores(preds, examples)
    # EM: 1, 0, 1, 0 -> 0.5. F1: 1, 2/3, 1, 0 -> (8/3) / 4
    assert s["exact"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert s["has_ans_exact"] == pytest.approx(0.5) and s["has_ans_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert s["no_ans_exact"] == pytest.approx(0.5) and s["no_ans_f1"] == pytest.approx(0.5)
    v1 = squad_scores({"1": "Denver", "2": "red dog barks"}, examples[:2])
    # "Denver" vs the best gold "Denver Broncos": P = 1, R = 1/2, F1 = 2/3
    assert v1 == pytest.approx({"exact": 0.5, "f1": (2 / 3 + 1) / 2})
    with pytest.raises(KeyError):
        squad_scores({}, examples[:1])


# one context "c0 c1 ... c9": word i spans characters [3i, 3i + 2)
CONTEXT = " ".join(f"c{i}" for i in range(10))


def _offs(words: list[int | None]) -> list[tuple[int, int] | None]:
    """Offsets for a feature whose tokens are the given context words (None: question/special token)."""
    return [None if w is None else (3 * w, 3 * w + 2) for w in words]


def test_best_spans_skips_question_tokens_reversed_and_too_long_spans():
    offs = _offs([None, None, None, 0, 1, 2, 3, 4, None])
    start = np.array([9.0, 9, 9, 1, 5, 0, 0, 0, 9])  # the question tokens have the highest logits
    end = np.array([9.0, 9, 9, 0, 0, 0, 4, 6, 9])
    spans = best_spans(start, end, offs, n_best=20, max_answer_length=30)
    # best: start at token 4 (c1, 5) + end at token 7 (c4, 6) = 11
    assert spans[0] == (11.0, 3, 14)
    assert all(s_char <= e_char for _, s_char, e_char in spans)
    # max_answer_length 3: token 4..7 is 4 tokens; the best allowed is 4..6 (c1..c3, 5 + 4)
    assert best_spans(start, end, offs, max_answer_length=3)[0] == (9.0, 3, 11)
    # padding beyond the offsets is never read
    assert best_spans(np.r_[start, 100.0], np.r_[end, 100.0], offs)[0] == (11.0, 3, 14)


def test_postprocess_takes_the_best_window_across_a_stride_boundary():
    # two windows of one example: window 1 holds c0..c5 (the answer c4 c5 c6 is cut), window 2 holds c3..c8
    ex = {"id": "q", "context": CONTEXT, "answers": {"text": ["c4 c5 c6"]}}
    f1_offs = _offs([None, None, 0, 1, 2, 3, 4, 5, None])
    f2_offs = _offs([None, None, 3, 4, 5, 6, 7, 8, None])
    s1 = np.array([0.0, 0, 0, 0, 0, 0, 3, 0, 0])  # c4 .. c5: 3 + 2 = 5
    e1 = np.array([0.0, 0, 0, 0, 0, 0, 0, 2, 0])
    s2 = np.array([0.0, 0, 0, 4, 0, 0, 0, 0, 0])  # c4 .. c6: 4 + 3 = 7, the best
    e2 = np.array([0.0, 0, 0, 0, 0, 3, 0, 0, 0])
    feats = [{"example_id": "q", "offset_mapping": f1_offs}, {"example_id": "q", "offset_mapping": f2_offs}]
    preds = postprocess([ex], feats, [s1, s2], [e1, e2])
    assert preds == {"q": "c4 c5 c6"}
    assert squad_scores(preds, [ex]) == {"exact": 1.0, "f1": 1.0}
    # with window 2's logits lowered, window 1's truncated span wins
    preds = postprocess([ex], feats, [s1, s2 / 4], [e1, e2 / 4])
    assert preds == {"q": "c4 c5"}
    assert squad_scores(preds, [ex])["f1"] == pytest.approx(2 * (1 * 2 / 3) / (1 + 2 / 3))


def test_postprocess_v2_null_threshold_on_both_sides():
    ex = {"id": "q", "context": CONTEXT, "answers": {"text": []}}
    offs = _offs([None, None, 0, 1, 2, None])
    start = np.array([2.0, 0, 0, 1.5, 0, 0])  # CLS start + end = 4; best span c1 = 1.5 + 1.5 = 3
    end = np.array([2.0, 0, 0, 1.5, 0, 0])
    feats = [{"example_id": "q", "offset_mapping": offs}]
    # null - best = 1.0
    assert postprocess([ex], feats, [start], [end], version_2=True, null_threshold=0.9) == {"q": ""}
    assert postprocess([ex], feats, [start], [end], version_2=True, null_threshold=1.1) == {"q": "c1"}
    assert postprocess([ex], feats, [start], [end], version_2=False) == {"q": "c1"}  # v1 never abstains
    # the null score is the lowest over the windows: a second window with CLS 1 + 1 = 2 < 3 -> answer
    feats2 = [*feats, {"example_id": "q", "offset_mapping": _offs([None, None, 5, None])}]
    s2, e2 = np.array([1.0, 0, -5, 0]), np.array([1.0, 0, -5, 0])
    assert postprocess([ex], feats2, [start, s2], [end, e2], version_2=True) == {"q": "c1"}
    # cls_index other than 0
    feats3 = [{"example_id": "q", "offset_mapping": offs, "cls_index": 5}]
    assert postprocess([ex], feats3, [start], [end], version_2=True, null_threshold=0.0) == {"q": "c1"}


def test_postprocess_without_any_valid_span_is_empty():
    ex = {"id": "q", "context": CONTEXT, "answers": {"text": ["c1"]}}
    feats = [{"example_id": "q", "offset_mapping": _offs([None, None, 0, 1, None])}]
    start, end = np.array([0.0, 0, 0, 5, 0]), np.array([0.0, 0, 5, 0, 0])  # only end < start pairs score
    assert postprocess([ex], feats, [start], [end], n_best=1) == {"q": ""}
    with pytest.raises(ValueError, match="features"):
        postprocess([ex], feats, [], [])


# --------------------------------------------------------------------------- the v2.0 best-threshold search

# Five questions, by increasing null_diff (no-answer score - best span score):
#   a  has an answer, span exact          diff -2   answering: EM +1, F1 +1
#   b  no answer,     span "something"    diff -1   answering: EM -1, F1 -1
#   c  has an answer, span 2/3 F1         diff 0.5  answering: EM  0, F1 +2/3
#   d  has an answer, span 2/3 F1         diff 1.0  answering: EM  0, F1 +2/3
#   e  no answer,     span "other"        diff 2.0  answering: EM -1, F1 -1
# All empty: b, e right = 2. EM sweep: 3 (t=-2), 2, 2, 2, 1 -> best 3/5 at -2.
# F1 sweep: 3 (t=-2), 2, 2 + 2/3, 3 + 1/3 (t=1.0), 2 + 1/3 -> best (3 + 1/3)/5 = 2/3 at 1.0.
V2_EXAMPLES = [
    {"id": "a", "answers": {"text": ["Denver Broncos"]}},
    {"id": "b", "answers": {"text": []}},
    {"id": "c", "answers": {"text": ["red dog barks"]}},
    {"id": "d", "answers": {"text": ["red dog barks"]}},
    {"id": "e", "answers": {"text": []}},
]
V2_BEST = {
    "a": BestSpan("the Denver Broncos", -2.0),
    "b": BestSpan("something", -1.0),
    "c": BestSpan("the big red dog", 0.5),
    "d": BestSpan("big red dog", 1.0),
    "e": BestSpan("other", 2.0),
}


def test_best_threshold_scores_hand_computed():
    got = best_threshold_scores(V2_BEST, V2_EXAMPLES)
    assert got == pytest.approx(
        {"best_exact": 3 / 5, "best_exact_thresh": -2.0, "best_f1": 2 / 3, "best_f1_thresh": 1.0}
    )
    # the thresholds reproduce the best scores when applied as data.null_score_diff_threshold
    for name in ("exact", "f1"):
        preds = choose_answers(V2_BEST, version_2=True, null_threshold=got[f"best_{name}_thresh"])
        assert squad_scores(preds, V2_EXAMPLES)[name] == pytest.approx(got[f"best_{name}"])
    # the default threshold 0 answers a and b only: EM = F1 = (1 + 0 + 0 + 0 + 1) / 5
    at_zero = squad_scores(choose_answers(V2_BEST, version_2=True), V2_EXAMPLES)
    assert at_zero["exact"] == at_zero["f1"] == pytest.approx(2 / 5)


def test_best_threshold_edge_cases():
    # answering nothing is best: a threshold below every diff (the lowest - 1), score = the no-answer share
    assert best_threshold([0.5, 3.0], [0.0, 0.0], [1.0, 1.0]) == (1.0, -0.5)
    # a question without a span (None) is always empty and never sets the threshold
    assert best_threshold([None, 1.0], [0.0, 1.0], [0.0, 0.0]) == (0.5, 1.0)
    assert best_threshold([None], [0.0], [1.0]) == (1.0, 0.0)
    # tied diffs: no threshold answers one without the other (+1 and -1 together: no gain over all empty);
    # the official script, answering them one by one, would report 2/2 at 0.0 here
    assert best_threshold([0.0, 0.0], [1.0, 0.0], [0.0, 1.0]) == (0.5, -1.0)
    # a gain equal to the best so far keeps the lower threshold (strict >, as the official script)
    assert best_threshold([1.0, 2.0, 3.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]) == (pytest.approx(2 / 3), 1.0)
    with pytest.raises(ValueError, match="lengths"):
        best_threshold([], [], [])


def test_best_answers_keep_the_span_and_the_null_diff_behind_postprocess():
    ex = {"id": "q", "context": CONTEXT, "answers": {"text": []}}
    feats = [{"example_id": "q", "offset_mapping": _offs([None, None, 0, 1, 2, None])}]
    start = np.array([2.0, 0, 0, 1.5, 0, 0])  # null 4, best span c1 = 3
    end = np.array([2.0, 0, 0, 1.5, 0, 0])
    assert best_answers([ex], feats, [start], [end]) == {"q": BestSpan("c1", 1.0)}
    none = best_answers([ex], feats, [start], [-np.arange(6.0)], n_best=1)  # only the CLS end: no valid pair
    assert none == {"q": BestSpan(None, None)} and choose_answers(none, version_2=False) == {"q": ""}
