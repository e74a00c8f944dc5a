"""SQuAD v1.1 / v2.0 examples and their windowed features for extractive question answering.

An *example* is one question about one context, in the layout of the hub's ``rajpurkar/squad``:
``{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}``; a SQuAD v2.0
question without an answer has empty ``answers`` lists.

A *feature* is one model input: ``[CLS] question [SEP] window of the context [SEP]``. A context longer than
``max_length`` is split into overlapping windows (``doc_stride`` tokens shared by consecutive windows, the
tokenizer's ``stride``), so one example gives one or more features. Every feature carries
``start_positions``/``end_positions``: the answer's first and last token when the whole answer lies inside
the window, else the index of ``[CLS]`` (also for a v2.0 no-answer question). Evaluation features also keep
``example_id`` and ``offset_mapping`` (character spans into the context; ``None`` for the question and the
special tokens), which span post-processing (:mod:`kdqat_dist.data.qa_metrics`) maps back to text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdqat_dist.errors import ConfigError, DataError

MAX_QUERY_LENGTH = 64  # question tokens kept (BERT's SQuAD default); longer questions are cut
SPECIAL_TOKENS = 3  # [CLS] question [SEP] context [SEP]


# --------------------------------------------------------------------------- reading the official JSON


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing key {key!r} (expected the SQuAD layout data -> paragraphs -> qas)")
    value = obj[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        article = "an" if names[0] in "aeiou" else "a"
        raise DataError(f"{where}: {key!r} must be {article} {names}, got {type(value).__name__}")
    return value


def read_squad_json(path: str | Path, version_2: bool) -> list[dict[str, Any]]:
    """The examples of an official SQuAD JSON file (``data`` -> ``paragraphs`` -> ``qas``), in file order.

    ``version_2``: questions may have no answer (``is_impossible: true`` or an empty ``answers`` list); for
    SQuAD v1.1 (``version_2=False``) every question needs at least one answer. Raises :class:`DataError`
    naming the file and the question for a malformed file or an answer that does not lie inside its context.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if text.strip() else None
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raise DataError(f'{path}: the file is empty; a SQuAD file is {{"data": [{{"paragraphs": [...]}}, ...]}}')
    articles = _need(raw, "data", list, str(path))
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    for a, article in enumerate(articles):
        where_a = f"{path}: data[{a}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, para in enumerate(_need(article, "paragraphs", list, where_a)):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = _need(para, "context", str, where_p)
            for q, qa in enumerate(_need(para, "qas", list, where_p)):
                where = f"{where_p}.qas[{q}]"
                qid = str(_need(qa, "id", (str, int), where))
                question = _need(qa, "question", str, where)
                where = f"{path}: question {qid!r}"
                if qid in seen:
                    raise DataError(f"{where}: duplicate question id")
                seen.add(qid)
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else _need(qa, "answers", list, where)
                if impossible and not version_2:
                    raise DataError(f"{where}: is_impossible is a SQuAD v2.0 field; use data.task: squad_v2")
                texts, starts = [], []
                for i, ans in enumerate(answers):
                    text = _need(ans, "text", str, f"{where} answers[{i}]")
                    start = _need(ans, "answer_start", int, f"{where} answers[{i}]")
                    if not text.strip():
                        raise DataError(f"{where} answers[{i}]: empty answer text (a v2.0 no-answer has no answers)")
                    if start < 0 or start + len(text) > len(context):
                        raise DataError(
                            f"{where} answers[{i}]: answer_start {start} with {len(text)} characters does not "
                            f"fit in its context of {len(context)} characters"
                        )
                    if context[start : start + len(text)] != text:  # training would label another span
                        raise DataError(
                            f"{where} answers[{i}]: the context at answer_start {start} reads "
                            f"{context[start : start + len(text)]!r}, not the answer {text!r}; answer_start must "
                            "be the index of the answer's first character in the context"
                        )
                    texts.append(text)
                    starts.append(start)
                if not texts and not version_2:
                    raise DataError(f"{where}: no answers (a SQuAD v2.0 file? use data.task: squad_v2)")
                examples.append(
                    {
                        "id": qid,
                        "title": str(title),
                        "context": context,
                        "question": question,
                        "answers": {"text": texts, "answer_start": starts},
                    }
                )
    if not examples:
        raise DataError(f"{path}: no questions in the file")
    return examples


# --------------------------------------------------------------------------- features


def check_window(max_length: int, doc_stride: int, max_query_length: int = MAX_QUERY_LENGTH) -> int:
    """The question-token budget for ``max_length``; ConfigError if ``doc_stride`` leaves no room to move on.

    A window holds ``max_length - question - 3`` context tokens and consecutive windows share ``doc_stride``
    of them, so ``doc_stride`` must be smaller than the context room of a window with the longest question.
    """
    q_len = min(max_query_length, max_length // 2)
    room = max_length - q_len - SPECIAL_TOKENS
    if doc_stride < 0 or doc_stride >= room:
        raise ConfigError(
            f"data.doc_stride: got {doc_stride}; must be >= 0 and < {room} (the context tokens of a "
            f"{max_length}-token window with a {q_len}-token question)"
        )
    return q_len


def _cut_questions(questions: list[str], tokenizer: Any, q_len: int) -> list[str]:
    """Questions without leading blanks, cut after their ``q_len``-th token (a few SQuAD questions are very long)."""
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    return [
        q if len(offs) <= q_len else q[: offs[q_len - 1][1]]
        for q, offs in zip(questions, enc["offset_mapping"], strict=True)
    ]


def _answer_tokens(
    offsets: list[tuple[int, int]], seq_ids: list[int | None], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """First and last token of the character span ``[start_char, end_char)`` if all of it is in this window."""
    ctx = [i for i, s in enumerate(seq_ids) if s == 1]
    if not ctx:  # an empty context
        return None
    first, last = ctx[0], ctx[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    s = first
    while s <= last and offsets[s][0] <= start_char:
        s += 1
    e = last
    while e >= first and offsets[e][1] >= end_char:
        e -= 1
    return s - 1, e + 1


def prepare_features(
    examples: dict[str, list],
    tokenizer: Any,
    max_length: int,
    doc_stride: int,
    for_eval: bool,
    max_query_length: int = MAX_QUERY_LENGTH,
) -> dict[str, list]:
    """Windowed features of a batch of examples (a ``datasets`` batched ``map`` function).

    ``examples``: columns ``id``, ``question``, ``context``, ``answers`` (the first answer is the training
    target). Returns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them),
    ``start_positions``, ``end_positions``; with ``for_eval`` also ``example_id`` and ``offset_mapping``
    (``None`` outside the context). Needs a fast tokenizer (for the offset mapping).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"extractive QA needs a fast tokenizer (offset mapping); {type(tokenizer).__name__} is not one "
            "(save the model folder with a tokenizer.json, or use a model whose tokenizer has a fast version)"
        )
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ConfigError("extractive QA supports right-padding tokenizers (question first) only")
    q_len = check_window(max_length, doc_stride, max_query_length)
    questions = _cut_questions(list(examples["question"]), tokenizer, q_len)
    enc = tokenizer(
        questions,
        list(examples["context"]),
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    starts, ends, ex_ids, eval_offsets = [], [], [], []
    for i, offsets in enumerate(offsets_all):
        seq_ids = enc.sequence_ids(i)
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id) if tokenizer.cls_token_id is not None else 0
        ex = sample_map[i]
        answers = examples["answers"][ex]
        span = None
        if answers["text"]:
            start_char = answers["answer_start"][0]
            span = _answer_tokens(offsets, seq_ids, start_char, start_char + len(answers["text"][0]))
        starts.append(cls if span is None else span[0])
        ends.append(cls if span is None else span[1])
        if for_eval:
            ex_ids.append(str(examples["id"][ex]))
            eval_offsets.append([tuple(o) if s == 1 else None for o, s in zip(offsets, seq_ids, strict=True)])
    out = {k: list(v) for k, v in enc.items()}
    out["start_positions"], out["end_positions"] = starts, ends
    if for_eval:
        out["example_id"], out["offset_mapping"] = ex_ids, eval_offsets
    return out
