"""SQuAD folders for the QA benchmark, made from the public SQuAD v2.0 dev half in ``../shared/data/squad/source``
(never committed).

Source: ``data/dev-v2.0.json`` of the public repository chrischute/squad (the Stanford CS224n default project):
16 articles of the official SQuAD v2.0 dev set, 6,078 questions, 2,910 of them answerable. The answerable
questions of SQuAD v2.0 dev are the SQuAD v1.1 dev questions of the same articles (v2.0 added the unanswerable
ones), so dropping the unanswerable ones gives real SQuAD v1.1 data. No copy of train-v1.1.json reachable
here was the real file (LFS pointers or small unrelated files), so the articles are split into train and dev:

- ``v1/``: ``train.json`` = the answerable questions of 13 articles (2,370), ``dev.json`` = those of the
  3 held-out articles (Normans, Warsaw, Force: 540 questions, 3-5 gold answers each);
- ``v2/``: the same articles with the unanswerable questions kept (SQuAD v2.0 layout).

Usage: ``python bench/squad_data.py`` (idempotent; writes ``../shared/data/squad/v1`` and ``v2``).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

# ../shared beside the checkout (a worktree under wt/: one level further up)
_HERE = Path(__file__).resolve()
SHARED = next(
    (p / "shared" / "data" / "squad" for p in _HERE.parents[2:4] if (p / "shared" / "data").is_dir()),
    _HERE.parents[2] / "shared" / "data" / "squad",
)
SOURCE = SHARED / "source" / "cs224n-dev-v2.0.json"
DEV_ARTICLES = ("Normans", "Warsaw", "Force")


def _subset(articles: list[dict], answerable_only: bool) -> list[dict]:
    out = []
    for art in copy.deepcopy(articles):
        for para in art["paragraphs"]:
            if answerable_only:
                para["qas"] = [q for q in para["qas"] if not q.get("is_impossible")]
                for q in para["qas"]:
                    q.pop("is_impossible", None)
        art["paragraphs"] = [p for p in art["paragraphs"] if p["qas"]]
        out.append(art)
    return out


def _count(articles: list[dict]) -> int:
    return sum(len(p["qas"]) for a in articles for p in a["paragraphs"])


def make(out: Path = SHARED, src: Path = SOURCE) -> dict[str, int]:
    data = json.loads(src.read_text())["data"]
    dev = [a for a in data if a["title"] in DEV_ARTICLES]
    train = [a for a in data if a["title"] not in DEV_ARTICLES]
    counts = {}
    for name, version, answerable in (("v1", "1.1", True), ("v2", "v2.0", False)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, arts in (("train", train), ("dev", dev)):
            sub = _subset(arts, answerable)
            (folder / f"{split}.json").write_text(json.dumps({"version": version, "data": sub}))
            counts[f"{name}/{split}"] = _count(sub)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=SHARED)
    p.add_argument("--src", type=Path, default=SOURCE)
    args = p.parse_args()
    for k, v in make(args.out, args.src).items():
        print(f"{k}: {v} questions")


if __name__ == "__main__":
    main()
