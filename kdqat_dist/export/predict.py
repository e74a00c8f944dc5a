"""Serve a student: predictions per row from a student folder, a packed export or an ONNX export.

    from kdqat_dist.export.predict import Predictor

    p = Predictor("runs/x/onnx")                      # or runs/x/student, runs/x/export, runs/x
    p.predict(["a gripping , funny film", "dull"])     # [Prediction(label='1', probability=0.97), ...]
    Predictor("runs/ner").predict(["EU rejects German call"])   # [TokenPrediction(tags=['B-ORG', 'O', ...])]
    Predictor("runs/squad").predict(["Who?"], ["Anna met Bob."])  # [AnswerPrediction(answer='Anna', ...)]

What a row gives depends on the model's task head (:func:`~kdqat_dist.files.head_kind`): a sequence
classifier a :class:`Prediction`, a token classifier a
:class:`~kdqat_dist.export.predict_heads.TokenPrediction` (a row is its words: a text split at whitespace,
as CoNLL is tokenized, or a list of words), an extractive QA model an
:class:`~kdqat_dist.export.predict_heads.AnswerPrediction` (a row is a question and its context; a context
longer than ``max_length`` is split into windows sharing the run's ``data.doc_stride`` tokens, and the best
span over all windows wins, as in evaluation).

The three kinds compute the same model: a student folder runs its integer form in torch
(:func:`~kdqat_dist.quant.api.convert` of the fake-quant student), a packed export its integer form
(:func:`~kdqat_dist.export.artifact.load`), an ONNX export ONNX Runtime with its int8 kernels. Rows are
tokenized as ``kdqat eval`` tokenizes them (truncated to the run's ``data.max_seq_length``, or split into
windows of it for QA; padded to the longest row of each batch) and batched in input order (QA: windows).
With per-tensor dynamic activation scales (the ``sym`` activation quantizer, the default), a row's
activations are scaled by the largest value in its batch, so a prediction can depend slightly on the other
rows of the batch, exactly as in training's evaluation; ``batch_size=1`` makes every row independent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from kdqat_dist.data.heads.base import INPUT_COLUMNS
from kdqat_dist.data.heads.qa import DEFAULT_DOC_STRIDE, is_version_2
from kdqat_dist.data.qa_features import check_window, prepare_features
from kdqat_dist.data.tasks import ALIASES, TASKS, TaskSpec
from kdqat_dist.errors import ConfigError
from kdqat_dist.export.artifact import EXPORT_META, load
from kdqat_dist.export.head_outputs import HEAD_OUTPUTS
from kdqat_dist.export.onnx_export import ONNX_META, read_onnx_meta, run_outputs, session
from kdqat_dist.export.predict_heads import AnswerPrediction, TokenPrediction, answer_prediction, token_prediction
from kdqat_dist.files import head_kind
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


def _run_data(kind: str, folder: Path) -> dict:
    """The ``data`` section of the training run's config.yaml, next to the student (the student folder named
    in an export's metadata for exports); empty when not found."""
    student = folder
    if kind != "student":
        try:
            meta = json.loads((folder / (ONNX_META if kind == "onnx" else EXPORT_META)).read_text())
            student = Path((meta.get("source") or {}).get("student") or "")
        except (OSError, ValueError, AttributeError):
            return {}
    try:
        data = (yaml.safe_load((student.parent / "config.yaml").read_text()) or {}).get("data")
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}


def _positive(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _task_spec(head: str, *names: object) -> TaskSpec | None:
    """The spec of the first task of ``names`` that has the model's head (a folder whose metadata names
    another task, e.g. a hand-made one, falls back to the run's ``data.task``, then to the head's defaults)."""
    specs = (TASKS.get(ALIASES.get(str(n), str(n))) for n in names if n)
    return next((spec for spec in specs if spec is not None and spec.head == head), None)


def _text_columns(head: str, spec: TaskSpec | None) -> tuple[str, str | None]:
    """The input columns a row's text (and its second text) is read from by default."""
    if spec is not None:
        return spec.text_a, spec.text_b
    return {"token": ("tokens", None), "qa": ("question", "context")}.get(head, ("text", None))


class Predictor:
    """Predictions of a kdqat model folder (see the module docstring).

    Args:
        model: a student folder, a run folder holding ``student/``, a packed export or an ONNX export.
        batch_size: rows (QA: windows) per forward pass.
        max_length: tokens per row after truncation, or per QA window (default: the run's
            ``data.max_seq_length``, else the task's, else 128).
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
        self.head = head_kind(self.folder)[0]  # "sequence", "token" or "qa"
        self.batch_size = batch_size
        self.task = _task_of(self.kind, self.folder)
        data = _run_data(self.kind, self.folder)
        spec = _task_spec(self.head, self.task, data.get("task"))
        self.text_columns = _text_columns(self.head, spec)
        self.max_length = (
            max_length or _positive(data.get("max_seq_length")) or (spec.max_seq_length if spec else DEFAULT_MAX_LENGTH)
        )
        # QA windows: the run's overlap, else the task's; v2 students may answer nothing, as in evaluation
        self.doc_stride = _positive(data.get("doc_stride")) or (spec.doc_stride if spec else DEFAULT_DOC_STRIDE)
        self.version_2 = spec is not None and is_version_2(spec)
        threshold = data.get("null_score_diff_threshold")
        self.null_threshold = (
            float(threshold)
            if isinstance(threshold, int | float)
            else (spec.null_score_diff_threshold if spec else 0.0)
        )
        if self.head == "qa" and max_length:  # the run's own max_seq_length and doc_stride fit (training checked)
            try:
                check_window(self.max_length, self.doc_stride)
            except ConfigError as exc:
                raise ConfigError(f"--max-length: too short for the run's windows ({exc})") from None
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

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The model's float32 outputs on one tokenized batch, by name: ``logits`` ([B, C] sequence, [B, S, C]
        token) or ``start_logits`` and ``end_logits`` ([B, S], QA), the same names for all three kinds."""
        batch = {k: v for k, v in batch.items() if k in INPUT_COLUMNS}
        if self.kind == "onnx":
            return run_outputs(self._session, batch)
        with torch.no_grad():
            out = self._model(**batch)
        return {name: getattr(out, name).float().numpy() for name in HEAD_OUTPUTS[self.head]}

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        """[rows, labels] float32 logits of a sequence classifier (one column for regression), in input order."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            a = texts[i : i + self.batch_size]
            b = None if pairs is None else pairs[i : i + self.batch_size]
            enc = self.tokenizer(
                a, b, truncation="longest_first", max_length=self.max_length, padding="longest", return_tensors="pt"
            )
            out.append(self.forward(enc)["logits"])
        width = 1 if self.labels is None else len(self.labels)
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)

    def predict(
        self, texts: list[str] | list[list[str]], pairs: list[str] | None = None
    ) -> list[Prediction] | list[TokenPrediction] | list[AnswerPrediction]:
        """One prediction per row, of the head's type (see the module docstring).

        Args:
            texts: sequence: the texts; token: each row's text (split at whitespace) or list of words;
                QA: the questions.
            pairs: sequence: the second texts of a pair task; QA: the contexts (required).
        """
        if pairs is not None and len(pairs) != len(texts):
            raise ConfigError(f"{len(texts)} texts but {len(pairs)} second texts")
        if self.head == "token":
            return self._tag([t.split() if isinstance(t, str) else list(t) for t in texts])
        if self.head == "qa":
            if pairs is None:
                raise ConfigError("a question answering model needs a context for every question")
            return self._answer(list(texts), pairs)
        logits = self.logits(texts, pairs)
        if self.labels is None:
            return [Prediction(None, None, float(v)) for v in logits[:, 0]]
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [Prediction(self.labels[k], float(probs[i, k])) for i, k in enumerate(best)]

    def _tag(self, rows: list[list[str]]) -> list[TokenPrediction]:
        """Tags and entities per row of words (truncated rows: see TokenPrediction.cut)."""
        if not getattr(self.tokenizer, "is_fast", False):  # word_ids needs a fast tokenizer, as training does
            raise ConfigError(f"{self.folder}: token classification needs a fast tokenizer (tokenizer.json)")
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            enc = self.tokenizer(
                chunk,
                is_split_into_words=True,
                truncation=True,
                max_length=self.max_length,
                padding="longest",
                return_tensors="pt",
            )
            logits = self.forward(enc)["logits"]
            for j, words in enumerate(chunk):
                word_ids = [-1 if w is None else w for w in enc.word_ids(j)]
                out.append(token_prediction(words, logits[j], word_ids, self.labels))
        return out

    def _answer(self, questions: list[str], contexts: list[str]) -> list[AnswerPrediction]:
        """The answer per (question, context): windows as evaluation makes them, the best span over them."""
        n = len(questions)
        no_answer = {"text": [], "answer_start": []}
        examples = {"id": [str(i) for i in range(n)], "question": questions, "context": contexts}
        feats = prepare_features(
            {**examples, "answers": [no_answer] * n}, self.tokenizer, self.max_length, self.doc_stride, for_eval=True
        )
        keys = [k for k in INPUT_COLUMNS if k in feats]
        starts, ends = [], []
        for i in range(0, len(feats["input_ids"]), self.batch_size):
            enc = self.tokenizer.pad({k: feats[k][i : i + self.batch_size] for k in keys}, return_tensors="pt")
            out = self.forward(enc)
            for j, length in enumerate(enc["attention_mask"].sum(-1).tolist()):
                starts.append(out["start_logits"][j, :length])
                ends.append(out["end_logits"][j, :length])
        windows: list[list[int]] = [[] for _ in range(n)]
        for w, ex in enumerate(feats["example_id"]):
            windows[int(ex)].append(w)
        return [
            answer_prediction(
                contexts[r],
                [starts[w] for w in ws],
                [ends[w] for w in ws],
                [feats["offset_mapping"][w] for w in ws],
                self.version_2,
                self.null_threshold,
            )
            for r, ws in enumerate(windows)
        ]


def format_probability(p: float | None) -> str:
    return "" if p is None or math.isnan(p) else f"{p:.4f}"
