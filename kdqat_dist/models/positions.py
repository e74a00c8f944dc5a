"""How many token positions a model has, and the check that ``data.max_seq_length`` fits in them.

A longer sequence would index past the position-embedding table in the first forward (an IndexError deep
inside transformers, on every rank); the check says so in one line before any data is tokenized.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from kdqat_dist.errors import ConfigError
from kdqat_dist.files import unguard_hf_config
from kdqat_dist.models.encoders import resolve_model_path

# Encoders whose position ids start at padding_idx + 1 (RoBERTa's create_position_ids_from_input_ids), so
# pad_token_id + 1 rows of the table are never a sequence position.
_PADDING_OFFSET = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "roberta-prelayernorm",
    "data2vec-text",
    "xmod",
    "ibert",
    "mpnet",
    "longformer",
}


def max_positions(config: dict) -> int | None:
    """Sequence positions a model with this ``config.json`` content can embed (None: not said)."""
    n = config.get("max_position_embeddings")
    if not isinstance(n, int):
        return None
    if config.get("model_type") in _PADDING_OFFSET:
        n -= int(config.get("pad_token_id") or 0) + 1
    return n


def _model_config(name_or_path: str) -> dict | None:
    """The model's config.json as a dict: read from a local folder, else from transformers' cache or the hub
    (None when it cannot be had: the model loader reports that, in its own words)."""
    local = Path(name_or_path).expanduser() / "config.json"
    try:
        if local.is_file():
            return unguard_hf_config(json.loads(local.read_text()))  # a student's: its real model type
        return AutoConfig.from_pretrained(name_or_path).to_dict()
    except (OSError, ValueError):
        return None


def check_max_length(max_length: int, name_or_path: str, explicit: bool, key: str = "data.max_seq_length") -> None:
    """Refuse a tokenization length the model has no positions for.

    ``explicit``: the length is the user's ``data.max_seq_length`` (else the task's default, which the
    message then says how to lower).
    """
    config = _model_config(resolve_model_path(name_or_path))
    n = max_positions(config) if config else None
    if n is None or max_length <= n:
        return
    what = f"got {max_length}" if explicit else f"the task's default is {max_length}"
    raise ConfigError(f"{key}: {what}, but the model {name_or_path} has {n} positions; set {key} to {n} or less")
