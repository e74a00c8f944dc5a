"""The built-in ``demo`` task: synthetic compositional sentiment, deterministic from a seed.

It stands in for SST-2 where no data can be downloaded (tests, smoke runs, the quick start). The label is a
fixed function of the word order, but a bag-of-words model cannot read it off the words alone, so a model
has to learn negation scope and which clause of a contrast counts -- like the hard part of SST-2.

Grammar (every token is lowercase; "," is its own token)::

    sentence := [opener] body [closer]
    body     := clause                        label = pol(clause)
              | clause "and" clause           both clauses have the label's polarity
              | clause "but" clause           label = pol(second); the clauses disagree
              | "although" clause "," clause  label = pol(second); the clauses disagree
              | clause "," "though" clause    label = pol(first);  the clauses disagree
    clause   := det aspect verb [neg] [intensifier] adjective
              | pronoun ("found" | "did not find" | "never found" | "hardly found") det aspect
                [intensifier] adjective
    pol(clause) = polarity(adjective), flipped when the clause has a negation (not / never / hardly)

Three levels (``data.demo_level``):

- ``easy``: simple clauses without negation; the label is the adjective's polarity (a bag of words reads
  it off; a tiny random encoder learns it in seconds, so smoke runs and sweeps can see accuracy move);
- ``standard``: the grammar above;
- ``hard``: the grammar above, and any clause may sit inside a frame that keeps its sentiment ("critics
  agree that ...") or reverses it ("nobody would say that ...", "it is not true that ..."), so a clause's
  polarity is the parity of up to three switches (adjective, negation, frame) and a contrast sentence
  needs that parity for the clause that counts; and a fixed share of labels (``HARD_LABEL_NOISE``) is
  flipped at random, in train and dev alike, as in real annotations. The best possible dev accuracy is
  about ``1 - HARD_LABEL_NOISE``: a model that scores 100 % here has memorised noise.

Openers, closers, determiners, aspects, verbs and intensifiers carry no sentiment. In contrast sentences
one clause of each polarity appears, so their bag of words is the same for both labels; in simple
clauses negation makes the adjective's polarity an XOR with the negation word, which a linear model over
word counts cannot represent. :func:`rule_label` recomputes the label from the text.
"""

from __future__ import annotations

import random
import typing

import numpy as np

from kdqat_dist.config import DemoLevel
from kdqat_dist.errors import DataError

POSITIVE = (
    "good great wonderful excellent brilliant superb delightful charming moving engaging funny clever "
    "beautiful gripping fresh memorable smart touching compelling enjoyable solid stunning witty "
    "thoughtful powerful"
).split()
NEGATIVE = (
    "bad dull boring awful terrible weak tedious clumsy flat bland predictable messy lifeless forgettable "
    "silly shallow painful stale slow confusing annoying lazy awkward poor hollow"
).split()
ASPECTS = (
    "acting plot story script dialogue cast direction music soundtrack ending pacing film movie humor "
    "lead villain premise editing score finale opening sequel writing camerawork setting"
).split()
DETERMINERS = ("the", "its", "this", "that")
VERBS = ("was", "is", "felt", "seemed", "looked", "sounded", "remained")
# Negated predicates: "the plot was not dull", "the plot never felt dull", "the plot was hardly dull".
NEG_VERBS = (
    "was not",
    "is not",
    "was never",
    "is never",
    "was hardly",
    "never felt",
    "hardly felt",
    "never seemed",
    "hardly seemed",
    "did not feel",
    "did not seem",
)
PRONOUNS = ("i", "we", "critics", "my friends", "most viewers", "the audience")
FIND_POS = ("found",)
FIND_NEG = ("did not find", "never found", "hardly found")
INTENSIFIERS = tuple(
    "very really truly quite extremely remarkably so rather fairly pretty incredibly deeply strangely "
    "surprisingly".split()
)
OPENERS = (
    "honestly ,",
    "frankly ,",
    "overall ,",
    "in the end ,",
    "to be fair ,",
    "i think",
    "we thought",
    "for me ,",
    "at times ,",
    "as expected ,",
    "in my opinion ,",
    "to my surprise ,",
    "after all ,",
)
CLOSERS = (
    "this year",
    "at the festival",
    "last night",
    "on the big screen",
    "for a sequel",
    "by the end",
    "in my opinion",
    "on a second viewing",
    "for its genre",
    "from start to finish",
    "at the cinema",
)
# hard level: frames around a clause; the reversing ones hold exactly one negation word each
KEEP_FRAMES = ("critics agree that", "it is true that", "everyone says that", "i would say that", "we all felt that")
FLIP_FRAMES = (
    "nobody would say that",
    "it is not true that",
    "i would never say that",
    "it is hardly fair to say that",
    "no one felt that",
)
NEGATIONS = frozenset({"not", "never", "hardly", "nobody", "no"})
HARD_LABEL_NOISE = 0.05
_P_FRAME = 0.4
LEVELS: tuple[str, ...] = typing.get_args(DemoLevel)
CONNECTORS = ("and", "but", "although", "though")

# Mixture of sentence shapes and rates, tuned so that a bag-of-words logistic regression reaches about
# 65-70 % dev accuracy at n = 4000 while a small BiGRU reaches 100 % within a few epochs.
_SHAPES = (("simple", 0.50), ("and", 0.15), ("but", 0.14), ("although", 0.11), ("though", 0.10))
_P_NEGATE = 0.2  # chance that a clause is negated
_P_INTENSIFY = 0.35
_P_OPENER = 0.3
_P_CLOSER = 0.3


def vocabulary() -> list[str]:
    """Every token the generator can produce (lowercase words and ","), sorted."""
    clause = (*POSITIVE, *NEGATIVE, *ASPECTS, *DETERMINERS, *VERBS, *NEG_VERBS, *PRONOUNS, *FIND_POS, *FIND_NEG)
    other = (*INTENSIFIERS, *OPENERS, *CLOSERS, *CONNECTORS, *KEEP_FRAMES, *FLIP_FRAMES, ",")
    return sorted({tok for phrase in (*clause, *other) for tok in phrase.split()})


def _clause(rng: random.Random, polarity: int, level: str = "standard") -> str:
    """One clause whose sentiment is ``polarity`` (1 positive, 0 negative)."""
    if level == "hard" and rng.random() < _P_FRAME:
        flip = rng.random() < 0.5
        frame = rng.choice(FLIP_FRAMES if flip else KEEP_FRAMES)
        return f"{frame} {_clause(rng, polarity ^ int(flip))}"
    negated = level != "easy" and rng.random() < _P_NEGATE
    adj_pol = polarity ^ int(negated)
    adj = rng.choice(POSITIVE if adj_pol else NEGATIVE)
    subject = f"{rng.choice(DETERMINERS)} {rng.choice(ASPECTS)}"
    if rng.random() < 0.7:
        verb = rng.choice(NEG_VERBS) if negated else rng.choice(VERBS)
        words = [subject, verb]
    else:
        find = rng.choice(FIND_NEG) if negated else rng.choice(FIND_POS)
        words = [rng.choice(PRONOUNS), find, subject]
    # "hardly very good" is not English; the intensifier is dropped after "hardly".
    if rng.random() < _P_INTENSIFY and not any("hardly" in w for w in words):
        words.append(rng.choice(INTENSIFIERS))
    words.append(adj)
    return " ".join(words)


def _sentence(rng: random.Random, label: int, level: str = "standard") -> str:
    shape = "simple" if level == "easy" else rng.choices([s for s, _ in _SHAPES], weights=[w for _, w in _SHAPES])[0]
    main, other = _clause(rng, label, level), _clause(rng, 1 - label, level)
    if shape == "simple":
        body = main
    elif shape == "and":
        body = f"{main} and {_clause(rng, label, level)}"
    elif shape == "but":
        body = f"{other} but {main}"
    elif shape == "although":
        body = f"although {other} , {main}"
    else:
        body = f"{main} , though {other}"
    parts = []
    if rng.random() < _P_OPENER:
        parts.append(rng.choice(OPENERS))
    parts.append(body)
    if rng.random() < _P_CLOSER:
        parts.append(rng.choice(CLOSERS))
    return " ".join(parts)


def make_demo(n: int, seed: int, level: str = "standard") -> dict[str, list[dict]]:
    """``n`` distinct sentences split into ``train`` and ``dev`` (15 %, at least 1 of each when n >= 2).

    Records are ``{"text_a": str, "text_b": None, "label": int}`` with labels 0 = negative, 1 = positive.
    The same ``(n, seed, level)`` always gives the same data. At the hard level a ``HARD_LABEL_NOISE``
    share of the labels is flipped (so ``rule_label`` disagrees with exactly those rows).
    """
    if n < 2:
        raise DataError(f"data.demo_size: got {n}; must be >= 2")
    if level not in LEVELS:
        raise DataError(f"data.demo_level: got {level!r}; allowed: {', '.join(LEVELS)}")
    rng = random.Random(seed)
    noise = random.Random(f"{seed}-noise")  # its own stream: the texts do not depend on the noise
    seen: set[str] = set()
    records: list[dict] = []
    # Distinct texts, so no dev sentence also appears in train.
    while len(records) < n:
        label = int(rng.random() < 0.5)
        text = _sentence(rng, label, level)
        if text not in seen:
            seen.add(text)
            if level == "hard" and noise.random() < HARD_LABEL_NOISE:
                label = 1 - label
            records.append({"text_a": text, "text_b": None, "label": label})
    n_dev = min(max(1, round(0.15 * n)), n - 1)
    return {"train": records[: n - n_dev], "dev": records[n - n_dev :]}


def _clause_polarity(tokens: list[str]) -> int:
    adj = [t for t in tokens if t in _POS_SET or t in _NEG_SET]
    if len(adj) != 1:
        raise ValueError(f"expected one sentiment adjective in {' '.join(tokens)!r}")
    # each negation word (in the predicate or in a reversing frame) flips the clause once
    return int(adj[0] in _POS_SET) ^ (sum(t in NEGATIONS for t in tokens) % 2)


_POS_SET = frozenset(POSITIVE)
_NEG_SET = frozenset(NEGATIVE)


def rule_label(text: str) -> int:
    """The label the grammar assigns to ``text``, recomputed from the word order alone."""
    toks = text.split()
    if "but" in toks:
        return _clause_polarity(toks[toks.index("but") + 1 :])
    if "although" in toks:
        rest = toks[toks.index("although") + 1 :]
        first_adj = next(i for i, t in enumerate(rest) if t in _POS_SET or t in _NEG_SET)
        return _clause_polarity(rest[first_adj + 1 :])
    if "though" in toks:
        return _clause_polarity(toks[: toks.index("though")])
    if "and" in toks:
        return _clause_polarity(toks[: toks.index("and")])
    return _clause_polarity(toks)


def bag_of_words_baseline(train: list[dict], dev: list[dict], l2: float = 1e-3) -> float:
    """Dev accuracy of an L2-regularised logistic regression on word counts (Newton's method, numpy).

    The yardstick for "not trivial": a model that ignores word order should stay well below 100 %.
    """
    vocab = {w: i for i, w in enumerate(sorted({w for r in train for w in r["text_a"].split()}))}

    def featurize(records: list[dict]) -> np.ndarray:
        x = np.zeros((len(records), len(vocab) + 1))
        x[:, -1] = 1.0  # bias
        for row, r in enumerate(records):
            for w in r["text_a"].split():
                if w in vocab:
                    x[row, vocab[w]] += 1.0
        return x

    x, y = featurize(train), np.array([r["label"] for r in train], dtype=float)
    w = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2 * len(train))
    reg[-1] = 0.0  # the bias is not regularised
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-x @ w))
        grad = x.T @ (p - y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg) + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    xd, yd = featurize(dev), np.array([r["label"] for r in dev])
    return float(np.mean(((xd @ w) > 0).astype(int) == yd))
