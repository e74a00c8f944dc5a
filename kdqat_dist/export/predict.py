"""Serve a student: label and probability per text from a student folder, a packed export or an ONNX export.

    from kdqat_dist.export.predict import Predictor

    p = Predictor("runs/x/onnx")                      # or runs/x/student, runs/x/export, runs/x
    p.predict(["a gripping , funny film", "dull"])     # [Prediction(label='1', probability=0.97), ...]

The three kinds compute the same model: a student folder runs its integer form in torch
(:func:`~kdqat_dist.quant.api.convert` of the fake-quant student), a packed export its integer form
(:func:`~kdqat_dist.export.artifact.load`), an ONNX export ONNX Runtime with its int8 kernels. Rows are
tokenized as ``kdqat eval`` tokenizes them (truncated to the run's ``data.max_seq_length``, padded to the
longest row of each batch) and batched in input order. With per-tensor dynamic activation scales (the
``sym`` activation quantizer, the default), a row's activations are scaled by the largest value in its
batch, so a prediction can depend slightly on the other rows of the batch, exactly as in training's
evaluation; ``batch_size=1`` makes every row independent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from kdqat_dist.data.tasks import TASKS
from kdqat_dist.errors import ConfigError
from kdqat_dist.export.artifact import EXPORT_META, load
from kdqat_dist.export.onnx_export import ONNX_META, read_onnx_meta, run_session, session
from kdqat_dist.files import require_sequence_head
from kdqat_dist.quant.api import convert
from kdqat_dist.quant.student import STUDENT_META, load_student

KINDS = {STUDENT_META: "student", EXPORT_META: "packed", ONNX_META: "onnx"}
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class Prediction:
    """One row's answer: the label with its probability (classification), or the value (regression)."""

    label: str | None
    probability: float | None
    value: float | None = None


def model_kind(path: Path) -> tuple[str, Path]:
    """(``student`` | ``packed`` | ``onnx``, the folder) of a model path; a run folder means its student/.

    Raises:
        ConfigError: none of the three, naming what was looked for.
    """
    if not path.exists():
        raise ConfigError(f"--model: {path} does not exist")
    if path.is_dir():
        for meta, kind in KINDS.items():
            if (path / meta).exists():
                return kind, path
        if (path / "student" / STUDENT_META).exists():
            return "student", path / "student"
    raise ConfigError(
        f"--model: {path} is not a kdqat student folder, packed export or ONNX export (no "
        f"{', '.join(KINDS)}); pass the student/ folder of `kdqat train` or a `kdqat export` folder"
    )


def _task_of(kind: str, folder: Path) -> str | None:
    """The task the model was trained on, from its metadata (None when unknown)."""
    try:
        if kind == "student":
            return json.loads((folder / STUDENT_META).read_text()).get("task")
        meta = json.loads((folder / (ONNX_META if kind == "onnx" else EXPORT_META)).read_text())
        return (meta.get("source") or {}).get("task")
    except (OSError, ValueError, AttributeError):
        return None


def _run_max_length(kind: str, folder: Path) -> int | None:
    """``data.max_seq_length`` of the training run: its config.yaml next to the student (the student folder
    named in an export's metadata for exports)."""
    student = folder
    if kind != "student":
        try:
            meta = json.loads((folder / (ONNX_META if kind == "onnx" else EXPORT_META)).read_text())
            student = Path((meta.get("source") or {}).get("student") or "")
        except (OSError, ValueError, AttributeError):
            return None
    run_yaml = student.parent / "config.yaml"
    try:
        value = (yaml.safe_load(run_yaml.read_text()) or {}).get("data", {}).get("max_seq_length")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


class Predictor:
    """Predictions of a kdqat model folder (see the module docstring).

    Args:
        model: a student folder, a run folder holding ``student/``, a packed export or an ONNX export.
        batch_size: rows per forward pass.
        max_length: tokens per row after truncation (default: the run's ``data.max_seq_length``, else the
            task's, else 128).
        threads: ONNX Runtime / torch intra-op threads (default: the library's).

    Raises:
        ConfigError: not a model folder of these kinds, a corrupt or truncated model file.
    """

    def __init__(
        self, model: str | Path, batch_size: int = 32, max_length: int | None = None, threads: int | None = None
    ):
        from kdqat_dist.models.encoders import load_tokenizer  # transformers: only when a model is loaded

        if batch_size < 1:
            raise ConfigError(f"--batch-size: {batch_size} must be >= 1")
        self.kind, self.folder = model_kind(Path(model))
        require_sequence_head(self.folder, "kdqat predict")
        self.batch_size = batch_size
        self.task = _task_of(self.kind, self.folder)
        spec = TASKS.get(self.task or "")
        self.text_columns = (spec.text_a, spec.text_b) if spec else ("text", None)
        self.max_length = (
            max_length
            or _run_max_length(self.kind, self.folder)
            or (spec.max_seq_length if spec else DEFAULT_MAX_LENGTH)
        )
        if self.kind == "onnx":
            meta = read_onnx_meta(self.folder)  # size and SHA-256 before ONNX Runtime reads the file
            self._session = session(self.folder / meta["model_file"], threads)
            id2label = meta["id2label"]
            regression = meta.get("problem_type") == "regression" or len(id2label) == 1
        else:
            if threads:
                torch.set_num_threads(threads)
            if self.kind == "packed":
                self._model = load(self.folder)
            else:
                self._model = convert(load_student(self.folder))
            config = self._model.config
            id2label = {str(k): v for k, v in config.id2label.items()}
            regression = getattr(config, "problem_type", None) == "regression" or config.num_labels == 1
        self.labels = None if regression else [str(id2label[str(i)]) for i in range(len(id2label))]
        self.tokenizer = load_tokenizer(str(self.folder))

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """[rows, labels] float32 logits (one column for regression), batched in input order."""
        if pairs is not None and len(pairs) != len(texts):
            raise ConfigError(f"{len(texts)} texts but {len(pairs)} second texts")
        out = []
        for i in range(0, len(texts), self.batch_size):
            a = texts[i : i + self.batch_size]
            b = None if pairs is None else pairs[i : i + self.batch_size]
            enc = self.tokenizer(
                a, b, truncation="longest_first", max_length=self.max_length, padding="longest", return_tensors="pt"
            )
            batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if self.kind == "onnx":
                out.append(run_session(self._session, batch))
            else:
                with torch.no_grad():
                    out.append(self._model(**batch).logits.float().numpy())
        width = 1 if self.labels is None else len(self.labels)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        """One :class:`Prediction` per row."""
        logits = self.logits(texts, pairs)
        if self.labels is None:
            return [Prediction(None, None, float(v)) for v in logits[:, 0]]
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [Prediction(self.labels[k], float(probs[i, k])) for i, k in enumerate(best)]


def format_probability(p: float | None) -> str:
    return "" if p is None or math.isnan(p) else f"{p:.4f}"
