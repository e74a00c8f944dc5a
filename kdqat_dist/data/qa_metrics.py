"""Span post-processing and the official SQuAD metrics (exact match and token F1).

:func:`postprocess` turns per-feature start/end logits into one answer text per example (the best span over
all of the example's windows; SQuAD v2.0: the empty answer when the no-answer score wins by more than a
threshold). :func:`squad_scores` scores them as the official evaluation scripts do (v1.1 and v2.0): answers
are normalised (lower case, no punctuation, no articles a/an/the, single spaces), each prediction takes its
best score over the gold answers, and a v2.0 question without an answer scores 1 only for an empty prediction.
:func:`best_threshold_scores` adds the v2.0 script's ``best_exact``/``best_f1``: the scores at the no-answer
threshold that maximises them over the split. Scores are fractions (the official scripts print percentages).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

N_BEST = 20
MAX_ANSWER_LENGTH = 30  # tokens

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


# --------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers; when either side is empty, 1.0 only if both are."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: dict[str, list]) -> list[str]:
    """The gold texts that count: those that normalise to something; ``[""]`` for a no-answer question."""
    texts = [t for t in answers["text"] if normalize_answer(t)]
    return texts or [""]


def squad_scores(predictions: dict[str, str], examples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{"exact", "f1"}`` over ``examples`` (fractions), plus ``has_ans_*``/``no_ans_*`` splits when some
    examples have no answer. Every example needs a prediction (a missing one is a bug, not a zero)."""
    if not examples:
        raise ValueError("cannot score an empty split")
    em, f, has = [], [], []
    for ex in examples:
        if ex["id"] not in predictions:
            raise KeyError(f"no prediction for question {ex['id']!r}")
        pred, golds = predictions[ex["id"]], gold_answers(ex["answers"])
        em.append(max(exact_match(pred, g) for g in golds))
        f.append(max(f1(pred, g) for g in golds))
        has.append(golds != [""])
    em_a, f_a, has_a = np.array(em), np.array(f), np.array(has)
    out = {"exact": float(em_a.mean()), "f1": float(f_a.mean())}
    if not has_a.all():
        for name, mask in (("has_ans", has_a), ("no_ans", ~has_a)):
            if mask.any():
                out[f"{name}_exact"] = float(em_a[mask].mean())
                out[f"{name}_f1"] = float(f_a[mask].mean())
    return out


def best_threshold(
    diffs: Sequence[float | None], answered: Sequence[float], empty: Sequence[float]
) -> tuple[float, float]:
    """The no-answer threshold that maximises the mean score over the questions, and that mean.

    Question ``i`` scores ``answered[i]`` when it gets its best span (``diffs[i] <= threshold``) and ``empty[i]``
    otherwise; ``diffs[i]`` None: no span, always empty. As the official v2.0 script's ``find_best_thresh``,
    the sweep starts from every question empty and answers them in increasing ``diff``, keeping a threshold only
    when it beats the best so far (strictly: ties keep the lower threshold). Unlike that script, questions with
    the same ``diff`` are answered together, since no threshold answers only some of them. When answering
    nothing is best the threshold is 1 below the lowest ``diff`` (0.0 when no question has a span).
    """
    if not (len(diffs) == len(answered) == len(empty)) or not diffs:
        raise ValueError(f"need equal, non-empty lengths; got {len(diffs)}, {len(answered)}, {len(empty)}")
    sweep = sorted((d, a - e) for d, a, e in zip(diffs, answered, empty, strict=True) if d is not None)
    total = best = float(sum(empty))
    thresh = sweep[0][0] - 1.0 if sweep else 0.0
    for i, (diff, gain) in enumerate(sweep):
        total += gain
        if i + 1 < len(sweep) and sweep[i + 1][0] == diff:
            continue  # the threshold `diff` also answers the next question
        if total > best:
            best, thresh = total, diff
    return best / len(diffs), float(thresh)


def _best_score(metric: Any, prediction: str, answers: dict[str, list]) -> float:
    return max(metric(prediction, g) for g in gold_answers(answers))


# --------------------------------------------------------------------------- span post-processing


def _top(x: np.ndarray, n: int) -> np.ndarray:
    return np.argsort(x, kind="stable")[::-1][:n]


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: Sequence[tuple[int, int] | None],
    n_best: int = N_BEST,
    max_answer_length: int = MAX_ANSWER_LENGTH,
) -> list[tuple[float, int, int]]:
    """Candidate spans of one feature, best first: ``(start + end logit, first char, end char)``.

    The ``n_best`` highest start and end logits are paired; a pair counts when both tokens are in the context
    (``offsets`` not None), ``end >= start`` and it spans at most ``max_answer_length`` tokens. Logits beyond
    ``len(offsets)`` (padding) are never read.
    """
    n = len(offsets)
    s_log, e_log = np.asarray(start_logits, dtype=np.float64)[:n], np.asarray(end_logits, dtype=np.float64)[:n]
    out = []
    for s in _top(s_log, n_best):
        if offsets[s] is None:
            continue
        for e in _top(e_log, n_best):
            if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            out.append((float(s_log[s] + e_log[e]), offsets[s][0], offsets[e][1]))
    out.sort(key=lambda c: -c[0])
    return out[:n_best]


@dataclass(frozen=True)
class BestSpan:
    """One example's best span over its windows: ``text`` (None: no window holds a valid span) and
    ``null_diff``, the no-answer score minus the span's score (None without a span); ``span``: the winning
    ``(start + end logit, first char, end char)`` for callers that report where the answer is (not compared:
    two results are equal when they answer the same)."""

    text: str | None
    null_diff: float | None
    span: tuple[float, int, int] | None = field(default=None, compare=False)


def best_answers(
    examples: Sequence[dict[str, Any]],
    features: Sequence[dict[str, Any]],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best: int = N_BEST,
    max_answer_length: int = MAX_ANSWER_LENGTH,
) -> dict[str, BestSpan]:
    """Each example's :class:`BestSpan`, from every feature's logits (row i of the logits is feature i).

    ``features[i]`` needs ``example_id``, ``offset_mapping`` (``None`` outside the context) and may give the
    ``[CLS]`` index as ``cls_index`` (default 0). The best span over all of an example's windows wins; the
    no-answer score is the lowest ``[CLS]`` start + end logit over the example's windows (BERT's SQuAD v2.0).
    """
    if not (len(features) == len(start_logits) == len(end_logits)):
        raise ValueError(f"{len(features)} features but {len(start_logits)}/{len(end_logits)} logit rows")
    by_example: dict[str, list[int]] = defaultdict(list)
    for i, feat in enumerate(features):
        by_example[str(feat["example_id"])].append(i)
    out: dict[str, BestSpan] = {}
    for ex in examples:
        best: tuple[float, int, int] | None = None
        null = None
        for i in by_example.get(str(ex["id"]), []):
            offsets = features[i]["offset_mapping"]
            cands = best_spans(start_logits[i], end_logits[i], offsets, n_best, max_answer_length)
            if cands and (best is None or cands[0][0] > best[0]):
                best = cands[0]
            cls = int(features[i].get("cls_index", 0))
            score = float(start_logits[i][cls] + end_logits[i][cls])
            null = score if null is None else min(null, score)
        if best is None:
            out[str(ex["id"])] = BestSpan(None, None)
        else:  # a span implies a window, so a null score
            out[str(ex["id"])] = BestSpan(ex["context"][best[1] : best[2]], float(null) - best[0], best)
    return out


def choose_answers(best: dict[str, BestSpan], version_2: bool, null_threshold: float = 0.0) -> dict[str, str]:
    """Each example's answer text: its best span, or ``""`` when it has none or (``version_2``) when the
    no-answer score beats the span's by more than ``null_threshold``."""
    return {
        qid: "" if b.text is None or (version_2 and b.null_diff > null_threshold) else b.text for qid, b in best.items()
    }


def best_threshold_scores(best: dict[str, BestSpan], examples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """SQuAD v2.0's ``best_exact``, ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh``
    (:func:`best_threshold`): each question scored with its best span and with the empty answer.

    The thresholds are in the units of ``data.null_score_diff_threshold`` (logit sums). They are chosen on the
    split they score, so they are an upper bound for that split, never a number to select models on.
    """
    out: dict[str, float] = {}
    diffs = [best[str(ex["id"])].null_diff for ex in examples]
    for name, metric in (("exact", exact_match), ("f1", f1)):
        answered = [_best_score(metric, best[str(ex["id"])].text or "", ex["answers"]) for ex in examples]
        empty = [_best_score(metric, "", ex["answers"]) for ex in examples]
        out[f"best_{name}"], out[f"best_{name}_thresh"] = best_threshold(diffs, answered, empty)
    return out


def postprocess(
    examples: Sequence[dict[str, Any]],
    features: Sequence[dict[str, Any]],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    version_2: bool = False,
    null_threshold: float = 0.0,
    n_best: int = N_BEST,
    max_answer_length: int = MAX_ANSWER_LENGTH,
) -> dict[str, str]:
    """One answer text per example id: :func:`best_answers` (the best span over each example's windows),
    then :func:`choose_answers` (``version_2``: the empty answer when the lowest ``[CLS]`` start + end logit
    over the windows beats the span's score by more than ``null_threshold``; any example without a valid span:
    the empty answer).
    """
    best = best_answers(examples, features, start_logits, end_logits, n_best, max_answer_length)
    return choose_answers(best, version_2, null_threshold)
