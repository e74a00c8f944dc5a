"""A synthetic SQuAD-format set for tests and smoke runs (no downloads), in the tiny models' vocabulary.

Each paragraph is a film review of a few sentences ``the <aspect> was <adjective> .``; each question asks
``how was the <aspect>`` and its answer is the adjective. Paragraphs are long enough that a short
``max_seq_length`` splits them into several stride windows. With ``version_2`` a third of the questions ask
about an aspect the paragraph never mentions (no answer, ``is_impossible``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

ASPECTS = (
    "plot",
    "music",
    "acting",
    "pacing",
    "dialogue",
    "ending",
    "script",
    "soundtrack",
    "villain",
    "editing",
    "direction",
    "cast",
    "camerawork",
    "humor",
    "writing",
    "premise",
    "setting",
    "finale",
)
ADJECTIVES = ("great", "dull", "brilliant", "boring", "superb", "awful", "witty", "predictable", "stunning", "clumsy")


def toy_articles(n_paragraphs: int, seed: int = 0, version_2: bool = False, sentences: int = 8) -> list[dict[str, Any]]:
    """``data`` of a SQuAD JSON file: one article of ``n_paragraphs`` paragraphs, two or three questions each."""
    rng = random.Random(seed)
    paragraphs = []
    for p in range(n_paragraphs):
        aspects = rng.sample(ASPECTS, sentences)
        parts, starts = [], {}
        pos = 0
        for a in aspects:
            adj = rng.choice(ADJECTIVES)
            sentence = f"the {a} was {adj} ."
            starts[a] = (pos + len(f"the {a} was "), adj)
            parts.append(sentence)
            pos += len(sentence) + 1
        context = " ".join(parts)
        qas = []
        for q, a in enumerate(rng.sample(aspects, 2)):
            start, adj = starts[a]
            assert context[start : start + len(adj)] == adj
            qa = {"id": f"p{p}q{q}", "question": f"how was the {a}", "answers": [{"text": adj, "answer_start": start}]}
            qas.append({**qa, "is_impossible": False} if version_2 else qa)
        if version_2:
            absent = rng.choice([a for a in ASPECTS if a not in aspects])
            qas.append({"id": f"p{p}q2", "question": f"how was the {absent}", "answers": [], "is_impossible": True})
        paragraphs.append({"context": context, "qas": qas})
    return [{"title": "reviews", "paragraphs": paragraphs}]


def write_toy_squad(
    folder: str | Path, n_train: int = 24, n_dev: int = 8, version_2: bool = False, seed: int = 0
) -> Path:
    """``<folder>/train.json`` and ``dev.json`` (SQuAD layout); returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    version = "v2.0" if version_2 else "1.1"
    for name, n, s in (("train", n_train, seed), ("dev", n_dev, seed + 1)):
        data = {"version": version, "data": toy_articles(n, s, version_2)}
        (out / f"{name}.json").write_text(json.dumps(data))
    return out
