"""Token classification (NER): one tag per word, predicted at the word's first sub-token.

Features keep ``word_ids`` (each token's word, -1 for special tokens), which never enters a batch; labels
are the word's tag id at its first sub-token and -100 (ignored) at every other position, so the logit KD
and the ground truth average over the labelled first sub-tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from kdqat_dist.data.heads.base import INPUT_COLUMNS, HeadOutput, TaskHead, column, tokenize_rows
from kdqat_dist.data.metrics_ner import entity_scores
from kdqat_dist.errors import ConfigError

IGNORE_INDEX = -100  # PyTorch's cross-entropy default, and the label of every unscored position


def align_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """Per-token labels: ``tags[w]`` at the first sub-token of word ``w``, -100 elsewhere (special tokens,
    later sub-tokens)."""
    out, prev = [], None
    for w in word_ids:
        out.append(IGNORE_INDEX if w is None or w == prev else int(tags[w]))
        prev = w
    return out


def first_subtokens(word_ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(position, word)`` of each word's first sub-token (``word_ids`` with -1 for special tokens)."""
    out, prev = [], -1
    for pos, w in enumerate(word_ids):
        if w >= 0 and w != prev:
            out.append((pos, w))
        prev = w
    return out


def _encode_words(batch: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
    out: dict[str, list] = {k: enc[k] for k in INPUT_COLUMNS if k in enc}
    words = [enc.word_ids(i) for i in range(len(batch["tokens"]))]
    out["labels"] = [align_labels(w, tags) for w, tags in zip(words, batch["tags"], strict=True)]
    out["word_ids"] = [[-1 if x is None else x for x in w] for w in words]
    return out


class TokenHead(TaskHead):
    """``AutoModelForTokenClassification``; raw splits have ``tokens`` (words) and ``tags`` (tag ids)."""

    kind = "token"
    auto_class_name = "AutoModelForTokenClassification"

    def cache_key(self) -> str:
        return f"{super().cache_key()}|{','.join(self.spec.label_list or ())}"

    def load_raw(self, cfg: Any) -> dict[str, Dataset]:
        from kdqat_dist.data.token_data import load_token_splits  # lazy: it reads tables with data.loaders

        return load_token_splits(cfg, self.spec)

    def tokenize(self, split: str, raw: Dataset, tokenizer: Any, max_len: int) -> Dataset:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"task {self.spec.name}: token classification needs a fast tokenizer (its word_ids map "
                f"sub-words to words); {type(tokenizer).__name__} is not one"
            )
        return tokenize_rows(raw, split, _encode_words, tokenizer=tokenizer, max_length=max_len)

    def collate_labels(self, rows: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
        """``labels`` [B, S]: each row's labels at its real positions (either padding side), -100 at padding."""
        if not rows or "labels" not in rows[0]:
            return
        mask = batch["attention_mask"].bool()
        labels = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, mask[i]] = torch.as_tensor(r["labels"], dtype=torch.long)
        batch["labels"] = labels

    def outputs(self, model_output: Any, batch: dict[str, torch.Tensor]) -> HeadOutput:
        labels = batch.get("labels")
        valid = labels != IGNORE_INDEX if labels is not None else batch["attention_mask"].bool()
        return HeadOutput(model_output.logits, labels, valid)

    def feature_logits(self, model_output: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        logits = model_output.logits.float().cpu()
        mask = batch["attention_mask"].bool().cpu()
        return [logits[i][mask[i]].numpy() for i in range(len(logits))]

    def predict_tags(self, logits: np.ndarray, word_ids: Sequence[int], n_words: int) -> list[str]:
        """Tag names of ``n_words`` words from one feature's [S, C] logits; words cut off by truncation (or
        with no sub-token) get ``O``."""
        names = self.spec.label_list or ()
        tags = ["O"] * n_words
        for pos, w in first_subtokens(word_ids):
            if w < n_words:
                tags[w] = names[int(np.argmax(logits[pos]))]
        return tags

    def evaluate(self, logits: Sequence[np.ndarray], features: Dataset, raw: Dataset | None) -> dict[str, float]:
        """Entity P/R/F1 (:func:`~kdqat_dist.data.metrics_ner.entity_scores`) against the raw split's tags
        (every word, truncated ones too); without ``raw``, against the words that kept a sub-token."""
        names = self.spec.label_list or ()
        word_ids, labels = column(features, "word_ids"), column(features, "labels")
        raw_tags = column(raw, "tags") if raw is not None else None
        gold, pred = [], []
        for i, z in enumerate(logits):
            if raw_tags is not None:
                g = [names[t] for t in raw_tags[i]]
                p = self.predict_tags(z, word_ids[i], len(g))
            else:
                firsts = [pos for pos, _ in first_subtokens(word_ids[i])]
                g = [names[labels[i][pos]] for pos in firsts]
                p = [names[int(np.argmax(z[pos]))] for pos in firsts]
            gold.append(g)
            pred.append(p)
        return entity_scores(gold, pred)
