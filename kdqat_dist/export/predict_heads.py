"""What ``kdqat predict`` makes of a token-classification or QA student's logits: pure functions, no model.

The alignment and span rules are the ones training's evaluation uses, imported from the task heads rather
than re-written, so a prediction is what ``kdqat eval`` scores: a word's tag is the argmax at its first
sub-token (:func:`~kdqat_dist.data.heads.token.first_subtokens`), entities are the CoNLL chunks of the tags
(:func:`~kdqat_dist.data.metrics_ner.entity_spans`), and an answer is the best n-best span over all windows
of a context (:func:`~kdqat_dist.data.qa_metrics.best_answers`), or nothing for a SQuAD v2.0 student when
:func:`~kdqat_dist.data.qa_metrics.choose_answers` says the null score wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdqat_dist.data.heads.token import first_subtokens
from kdqat_dist.data.metrics_ner import entity_spans
from kdqat_dist.data.qa_metrics import best_answers, choose_answers


@dataclass(frozen=True)
class Entity:
    """One entity of a sentence: its type, words ``start..end`` (inclusive), their text and a score (the mean
    probability of the predicted tag at the first sub-token of its words)."""

    type: str
    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True)
class TokenPrediction:
    """One row of a token-classification student: a tag per word and the entities they make.

    ``cut``: how many trailing words lost every sub-token to ``max_length``; they are tagged ``O`` (as
    evaluation counts them), so their entities are missing, not wrong.
    """

    words: list[str]
    tags: list[str]
    entities: list[Entity]
    cut: int = 0


@dataclass(frozen=True)
class AnswerPrediction:
    """One question's answer: the context's text at characters ``[start, end)`` and its score (the span's
    start + end logit, what the n-best ranking sorts by); an unanswered SQuAD v2.0 question has the empty
    answer, the null score (``[CLS]`` start + end logit) and no offsets."""

    answer: str
    score: float
    start: int | None = None
    end: int | None = None


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def token_prediction(
    words: Sequence[str], logits: np.ndarray, word_ids: Sequence[int], labels: Sequence[str]
) -> TokenPrediction:
    """Tags and entities of one row.

    Args:
        words: the row's words.
        logits: [S, C] float logits of the row's tokens (padding may follow; it has word id -1).
        word_ids: [S] each token's word, -1 for special tokens and padding.
        labels: the C tag names (the model's ``id2label``).

    Returns:
        Every word's tag (``O`` for words cut off by truncation) and the entities of those tags.
    """
    tags, probs = ["O"] * len(words), [0.0] * len(words)
    seen = 0
    for pos, w in first_subtokens(word_ids):
        p = _softmax(np.asarray(logits[pos], dtype=np.float64))
        k = int(p.argmax())
        tags[w], probs[w] = labels[k], float(p[k])
        seen = max(seen, w + 1)
    entities = [
        Entity(kind, s, e, " ".join(words[s : e + 1]), float(np.mean(probs[s : e + 1])))
        for kind, s, e in entity_spans(tags)
    ]
    return TokenPrediction(list(words), tags, entities, cut=len(words) - seen)


def answer_prediction(
    context: str,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    offsets: Sequence[Sequence[tuple[int, int] | None]],
    version_2: bool,
    null_threshold: float,
) -> AnswerPrediction:
    """The answer to one question from the logits of every window of its context.

    Args:
        context: the context the offsets index.
        start_logits: one [S_i] array per window.
        end_logits: one [S_i] array per window.
        offsets: per window, each token's character span in ``context`` (None outside the context).
        version_2: a SQuAD v2.0 student, which may answer nothing.
        null_threshold: the margin by which the null score must beat the best span (evaluation's).

    Returns:
        The best span over the windows, or for ``version_2`` the empty answer when the null score wins.
    """
    feats = [{"example_id": "q", "offset_mapping": o} for o in offsets]
    best = best_answers([{"id": "q", "context": context}], feats, start_logits, end_logits)["q"]
    text = choose_answers({"q": best}, version_2, null_threshold)["q"]
    if not text or best.span is None:
        # best_answers reads [CLS] at position 0 and keeps the lowest null score over the windows
        null = min(float(s[0] + e[0]) for s, e in zip(start_logits, end_logits, strict=True))
        return AnswerPrediction("", null)
    score, start, end = best.span
    return AnswerPrediction(context[start:end], score, start, end)
