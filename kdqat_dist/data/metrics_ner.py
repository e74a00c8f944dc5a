"""Entity-level precision, recall and F1 over IOB1/IOB2 tag sequences (the CoNLL/seqeval definition).

A chunk is a maximal run ``(type, start, end)``: it starts at ``B-X``, or at ``I-X`` after ``O`` or after a
tag of another type (so IOB1's ``I-`` opens a chunk, and ``I-PER I-LOC`` is two chunks); it ends before
``O``, before any ``B-``, or before a tag of another type. A predicted chunk counts as correct only when
its type and both boundaries equal a gold chunk's. Scores are micro-averaged over all chunks of all
sentences (seqeval's default mode, the number CoNLL-2003 papers report).
"""

from __future__ import annotations

from collections.abc import Sequence


def _split(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ("B", "PER"); ``"O"`` -> ("O", ""); a bare ``"PER"`` is read as ``I-PER``."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in ("B", "I", "E", "S"):
        return prefix, kind
    return "I", tag


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The chunks of one sentence as ``(type, start, end)`` with ``end`` inclusive, in order."""
    spans: list[tuple[str, int, int]] = []
    start, cur = -1, ""  # the open chunk's start and type (start -1: none open)
    prev_prefix = "O"
    for i, tag in enumerate([*tags, "O"]):  # the sentinel closes a chunk that runs to the end
        prefix, kind = _split(tag)
        ends = start >= 0 and (prefix in ("B", "S", "O") or kind != cur or prev_prefix in ("E", "S"))
        if ends:
            spans.append((cur, start, i - 1))
            start = -1
        if prefix != "O" and (start < 0 or prefix in ("B", "S")):
            start, cur = i, kind
        prev_prefix = prefix
    return spans


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 of predicted chunks against gold chunks, plus word ``accuracy``.

    Args:
        gold: one tag sequence per sentence.
        pred: the predicted tags, each as long as its gold sentence.

    Returns:
        ``precision``, ``recall``, ``f1`` (0.0 when undefined: no predicted or no gold chunks) and
        ``accuracy`` (the fraction of words whose tag is right), as fractions.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    n_gold = n_pred = n_ok = words = right = 0
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        gs, ps = set(entity_spans(g)), set(entity_spans(p))
        n_gold, n_pred, n_ok = n_gold + len(gs), n_pred + len(ps), n_ok + len(gs & ps)
        words += len(g)
        right += sum(a == b for a, b in zip(g, p, strict=True))
    precision = n_ok / n_pred if n_pred else 0.0
    recall = n_ok / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": right / words if words else 0.0}
