"""Tiny randomly initialised encoders with a word-level vocabulary, for tests and smoke runs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from kdqat_dist.data.demo import vocabulary


def tiny_vocab() -> list[str]:
    """Special tokens, the demo task's words, punctuation and letters (so any text tokenises)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-;:()\"")
    words = sorted(set(vocabulary()) - set(specials) - set(chars))
    return specials + chars + [f"##{c}" for c in chars if c.isalnum()] + words


def make_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "bert",
    num_labels: int = 2,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a random tiny encoder plus a WordPiece tokenizer into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # `vocab=` (a path): transformers 5 silently ignores `vocab_file=` and every word becomes [UNK].
    tok = BertTokenizerFast(vocab=str(out / "vocab.txt"), do_lower_case=True)
    common = dict(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=160,
        num_labels=num_labels,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(**common))
    elif arch == "roberta":
        # RoBERTa offsets positions by padding_idx + 1; a word-level tokenizer is fine for tests.
        common["max_position_embeddings"] += 2
        model = RobertaForSequenceClassification(RobertaConfig(**common, type_vocab_size=1))
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; allowed: bert, roberta")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
