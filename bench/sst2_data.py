"""Real SST-2 folders for the accuracy benchmarks, made from ``../shared/data/sst2/train.tsv`` (never committed).

The official dev set is not available here, so the last 2,000 rows of the training file are held out;
the rest is the training pool. Folders written (GLUE format, ``train.tsv`` + ``dev.tsv``):

- ``teacher/``: 20,000 rows drawn with ``random.Random(0).sample(pool, 20000)`` (the accuracy issue's
  teacher recipe) and the holdout as dev;
- ``full/``: the whole pool (65,349 rows) and the holdout as dev;
- ``sentences/``: a dev set of the holdout rows that read like whole sentences (see
  :func:`is_sentence`), for scoring a student on sentence-level data (311 rows: about ±1.8 points of
  sampling noise, too coarse to see a 0.5-point gap);
- ``full_sent/`` and ``sentence_test/``: 5,000 whole sentences drawn from the pool rows the teacher never saw
  (texts that occur once in the file), split into a 1,000-row **sentence dev** set for model selection
  (``full_sent/dev.tsv``) and a 4,000-row **sentence test** set for reporting (``sentence_test/dev.tsv``);
  ``full_sent/train.tsv`` is the pool without those 5,000 rows (60,349 rows). The other folders are
  unchanged by this split.
- two training sets that put more long text in front of the student (issue #20: the gap grows with input
  length and the pool is mostly short phrases, 8.6 words on average against 18.9 in the sentence test),
  both with the sentence dev set as dev: ``full_sent_long/`` is ``full_sent`` with every row of at least
  11 words written twice (78,009 rows); ``full_sent_concat/`` adds 20,000 rows that join two random pool
  rows of 3-20 words (KD only reads the teacher's outputs on them: their label, the first row's, is
  never trained on while ``distill.ground_truth.weight`` is 0).

Usage: ``python bench/sst2_data.py --out bench/out/sst2`` (idempotent).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
HOLDOUT = 2000
TEACHER_ROWS = 20000
SENTENCE_MIN_WORDS = 8
SENTENCE_DEV = 1000
SENTENCE_TEST = 4000
LONG_MIN_WORDS = 11
CONCAT_ROWS = 20000


def is_sentence(text: str) -> bool:
    """A holdout row that reads like a whole sentence: at least 8 words and ending in sentence
    punctuation (SST-2's training file is mostly phrase fragments, its dev set whole sentences)."""
    return len(text.split()) >= SENTENCE_MIN_WORDS and text.rstrip()[-1:] in (".", "!", "?")


def _write(folder: Path, header: list[str], train: list[list[str]], dev: list[list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", train), ("dev.tsv", dev)):
        # written back verbatim (a csv.writer would escape the quotes inside sentences)
        (folder / name).write_text("\n".join("\t".join(r) for r in [header, *part]) + "\n")


def make(out: Path, src: Path = SHARED) -> dict[str, int]:
    lines = src.read_text().splitlines()
    header, body = lines[0].split("\t"), [ln.split("\t") for ln in lines[1:] if ln]
    pool, holdout = body[:-HOLDOUT], body[-HOLDOUT:]
    # indices, so that the held-out sentences can avoid the teacher's rows (same draw as sample(pool, n))
    taught = random.Random(0).sample(range(len(pool)), TEACHER_ROWS)
    teacher = [pool[i] for i in taught]
    sentences = [r for r in holdout if is_sentence(r[0])]
    # sentence dev/test: rows neither model trains on; a text that occurs twice could sit on both sides
    counts = Counter(r[0] for r in body)
    seen = set(taught)
    candidates = [i for i, r in enumerate(pool) if i not in seen and is_sentence(r[0]) and counts[r[0]] == 1]
    held = random.Random(1).sample(candidates, SENTENCE_DEV + SENTENCE_TEST)
    held_set = set(held)
    _write(out / "teacher", header, teacher, holdout)
    _write(out / "full", header, pool, holdout)
    _write(out / "sentences", header, teacher[:64], sentences)
    rest = [r for i, r in enumerate(pool) if i not in held_set]
    _write(out / "full_sent", header, rest, [pool[i] for i in held[:SENTENCE_DEV]])
    _write(out / "sentence_test", header, teacher[:64], [pool[i] for i in held[SENTENCE_DEV:]])
    long = [r for r in rest if len(r[0].split()) >= LONG_MIN_WORDS]
    _write(out / "full_sent_long", header, rest + long, [pool[i] for i in held[:SENTENCE_DEV]])
    pieces = [r for r in rest if 3 <= len(r[0].split()) <= 20]
    rng = random.Random(2)
    joined = [[f"{a[0]} {b[0]}", *a[1:]] for a, b in (rng.sample(pieces, 2) for _ in range(CONCAT_ROWS))]
    _write(out / "full_sent_concat", header, rest + joined, [pool[i] for i in held[:SENTENCE_DEV]])
    return {
        "pool": len(pool),
        "holdout": len(holdout),
        "teacher_train": len(teacher),
        "sentences": len(sentences),
        "sentence_candidates": len(candidates),
        "full_sent_train": len(rest),
        "sentence_dev": SENTENCE_DEV,
        "sentence_test": SENTENCE_TEST,
        "full_sent_long_train": len(rest) + len(long),
        "full_sent_concat_train": len(rest) + len(joined),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--out", default="bench/out/sst2")
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"SST-2 not found at {args.data}")
    print(make(Path(args.out), Path(args.data)))


if __name__ == "__main__":
    main()
