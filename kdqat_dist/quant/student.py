"""The saved student folder: writing it and rebuilding the fake-quant student from it.

A saved student folder holds the Hugging Face ``config.json`` (with ``quantization_config``), the
tokenizer, ``model.safetensors`` (latent FP weights plus learned quantizer steps) and
``kdqat_student.json`` (the quant config), so it reloads with :func:`load_student` into exactly the
fake-quant model that was evaluated. Building the student from a teacher is
:func:`kdqat_dist.models.student.init_student`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from kdqat_dist.config import ConfigError, QuantConfig, build_section, to_dict
from kdqat_dist.files import ordinary_permissions
from kdqat_dist.models.encoders import auto_class_of
from kdqat_dist.quant.api import mark_calibrated, prepare
from kdqat_dist.quant.hf_quantizer import KdqatQuantizationConfig, save_config

STUDENT_META = "kdqat_student.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (a student's or an export's) as a safetensors file with ordinary permissions."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        if t.data_ptr() in seen and t.numel():  # tied tensors: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        state[k] = t
    save_file(state, str(path), metadata=metadata)
    ordinary_permissions(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc})") from None


def prepared_from_config(folder: Path, quant: QuantConfig) -> nn.Module:
    """The architecture of ``folder/config.json`` (weights not loaded; its task head's Auto class), prepared
    with ``quant``."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{folder / 'config.json'} is not a readable model config ({first})") from None
    return prepare(auto_class_of(config).from_config(config, attn_implementation="eager"), quant)


def save_student(
    model: nn.Module, out_dir: str | Path, quant: QuantConfig, tokenizer=None, extra: dict | None = None
) -> Path:
    """Write a student folder that :func:`load_student` rebuilds exactly."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # config.json says the folder is a kdqat-quantized model (transformers' quantization_config), so
    # AutoModelForSequenceClassification.from_pretrained rebuilds the student with kdqat_dist imported
    config = copy.deepcopy(model.config)
    config.quantization_config = KdqatQuantizationConfig(to_dict(quant)).to_dict()
    save_config(config, out)  # without kdqat_dist, transformers refuses it
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_weights(model.state_dict(), out / WEIGHTS_FILE, {"format": "pt"})
    meta = {"format_version": FORMAT_VERSION, "quant": to_dict(quant), **(extra or {})}
    (out / STUDENT_META).write_text(json.dumps(meta, indent=2))
    return out


def is_student_dir(path: str | Path) -> bool:
    return (Path(path) / STUDENT_META).exists()


def load_student(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved fake-quant student (architecture + quantizers + weights + steps)."""
    p = Path(path)
    if not is_student_dir(p):
        raise ConfigError(
            f"{p} is not a kdqat student folder (no {STUDENT_META}); "
            "it must be the student/ folder written by `kdqat train`"
        )
    try:
        meta = json.loads((p / STUDENT_META).read_text())
        quant = meta["quant"]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged or hand-edited folder
        raise ConfigError(f"{p / STUDENT_META}: unreadable ({type(exc).__name__}); the folder is damaged") from None
    model = prepared_from_config(p, build_section(QuantConfig, quant, "quant"))
    missing, unexpected = model.load_state_dict(load_weights(p / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{p}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    mark_calibrated(model)  # LSQ activation steps were calibrated before saving: no recalibration on first use
    return model.to(device).eval()
