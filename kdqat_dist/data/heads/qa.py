"""Extractive question answering (SQuAD v1.1 / v2.0): start and end logits over the sequence positions.

Raw splits are SQuAD examples (:mod:`kdqat_dist.data.qa_features`: ``id``, ``title``, ``context``,
``question``, ``answers``); features are stride windows of the context, each labelled with the answer's first
and last token (``[CLS]`` when the window does not hold all of it). The KD terms see the logits as
``[B, 2, S]``: two rows per window (start, end) whose classes are the sequence positions, padding masked out,
so the logit KD is a soft cross-entropy over positions averaged over start and end, and the ground truth the
cross-entropy at the labelled positions (the mean of the start and end losses, as BERT's SQuAD head).
Evaluation maps each example's best span over its windows back to text (:mod:`kdqat_dist.data.qa_metrics`)
and scores it with the official SQuAD EM/F1 (v2.0: the empty answer when the no-answer score beats the span by
more than ``data.null_score_diff_threshold``, and the official ``best_exact``/``best_f1`` threshold search).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, Value
from datasets import Sequence as DsSequence

from kdqat_dist.config import DataConfig
from kdqat_dist.data.heads.base import HeadOutput, TaskHead, column, row_lengths, tokenize_rows
from kdqat_dist.data.qa_features import check_window, prepare_features, read_squad_json
from kdqat_dist.data.qa_metrics import BestSpan, best_answers, best_threshold_scores, choose_answers, squad_scores
from kdqat_dist.data.tasks import TaskSpec
from kdqat_dist.errors import DataError

DEFAULT_DOC_STRIDE = 128
MASKED = -1.0e4  # logit at padded positions: no probability for either model, finite in bf16 and fp16
VERSION_2_TASKS = frozenset({"squad_v2"})
HUB = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
# file names looked for in a data.source folder, in order
FILES = {
    ("squad", "train"): ("train-v1.1.json", "train.json"),
    ("squad", "dev"): ("dev-v1.1.json", "dev.json"),
    ("squad_v2", "train"): ("train-v2.0.json", "train.json"),
    ("squad_v2", "dev"): ("dev-v2.0.json", "dev.json"),
}
EXAMPLE_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": DsSequence({"text": Value("string"), "answer_start": Value("int32")}),
    }
)


def is_version_2(spec: TaskSpec) -> bool:
    return spec.name in VERSION_2_TASKS


def doc_stride(spec: TaskSpec) -> int:
    """The task's window overlap (``data.doc_stride``; 128 tokens, BERT's SQuAD setting, when unset)."""
    return spec.doc_stride


# --------------------------------------------------------------------------- raw splits


def examples_dataset(rows: list[dict[str, Any]]) -> Dataset:
    return Dataset.from_list(rows, features=EXAMPLE_FEATURES)


def _load_hub(name: str, spec: TaskSpec) -> dict[str, Dataset]:
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"data.source: could not load {name!r} from the Hugging Face hub ({first}); the hub is unreachable or "
            f"has no such dataset: set data.source to a folder with the SQuAD JSON files "
            f"({' or '.join(FILES[spec.name, 'train'])}, {' or '.join(FILES[spec.name, 'dev'])})"
        ) from None
    out = {}
    for hub_split, split in (("train", "train"), ("validation", "dev")):
        if hub_split in dd:
            missing = set(EXAMPLE_FEATURES) - set(dd[hub_split].column_names)
            if missing:
                raise DataError(f"data.source: hub dataset {name!r} lacks the SQuAD columns {sorted(missing)}")
            out[split] = dd[hub_split].select_columns(list(EXAMPLE_FEATURES)).cast(EXAMPLE_FEATURES)
    if "train" not in out:
        raise DataError(f"data.source: hub dataset {name!r} has no train split (splits: {', '.join(dd)})")
    return out


def load_qa_splits(cfg: DataConfig, spec: TaskSpec) -> dict[str, Dataset]:
    """The task's raw splits (``train``, and ``dev`` when the source has one).

    ``data.train_file`` / ``data.dev_file``: SQuAD JSON files; ``data.source``: a folder holding them
    (``train-v1.1.json``/``dev-v1.1.json``, ``train-v2.0.json``/``dev-v2.0.json`` or ``train.json``/``dev.json``)
    or a hub dataset name; nothing: the hub's ``rajpurkar/squad`` (``rajpurkar/squad_v2``).
    """
    v2 = is_version_2(spec)
    if cfg.train_file:
        out = {"train": examples_dataset(read_squad_json(Path(cfg.train_file).expanduser(), v2))}
        if cfg.dev_file:
            out["dev"] = examples_dataset(read_squad_json(Path(cfg.dev_file).expanduser(), v2))
        return out
    if cfg.dev_file:
        raise DataError("data.train_file: data.dev_file is set but data.train_file is not")
    source = Path(cfg.source).expanduser() if cfg.source else None
    if source is not None and source.is_dir():
        out = {}
        for split in ("train", "dev"):
            names = FILES[spec.name, split]
            path = next((source / n for n in names if (source / n).is_file()), None)
            if path is None and split == "train":
                raise DataError(f"data.source: {source} holds no SQuAD training file ({' or '.join(names)})")
            if path is not None:
                out[split] = examples_dataset(read_squad_json(path, v2))
        return out
    if source is not None and (source.exists() or cfg.source.startswith((".", "/", "~"))):
        raise DataError(f"data.source: {cfg.source} is not a folder (one holding the SQuAD JSON files)")
    return _load_hub(cfg.source or HUB[spec.name], spec)


# --------------------------------------------------------------------------- the head


class QAHead(TaskHead):
    """``AutoModelForQuestionAnswering``; labels ``start_positions``/``end_positions`` (one per window)."""

    kind = "qa"
    auto_class_name = "AutoModelForQuestionAnswering"
    label_keys = ("start_positions", "end_positions")
    cache_version = "1"

    @property
    def num_labels(self) -> int:
        return 2  # the QA output layer: a start and an end logit per position

    @property
    def version_2(self) -> bool:
        return is_version_2(self.spec)

    def load_raw(self, cfg: DataConfig) -> dict[str, Dataset]:
        return load_qa_splits(cfg, self.spec)

    def cache_key(self) -> str:
        return f"{super().cache_key()}|stride={doc_stride(self.spec)}"

    def tokenize(self, split: str, raw: Dataset, tokenizer: Any, max_len: int) -> Dataset:
        stride = doc_stride(self.spec)
        check_window(max_len, stride)  # one line before any row is read
        return tokenize_rows(
            raw,
            split,
            prepare_features,
            tokenizer=tokenizer,
            max_length=max_len,
            doc_stride=stride,
            for_eval=split != "train",
        )

    def collate_labels(self, rows: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
        if not rows or "start_positions" not in rows[0]:
            return
        for key in self.label_keys:
            batch[key] = torch.tensor([int(r[key]) for r in rows], dtype=torch.long)

    def outputs(self, model_output: Any, batch: dict[str, torch.Tensor]) -> HeadOutput:
        """Logits ``[B, 2, S]`` (start, end; padded positions at :data:`MASKED`), labels ``[B, 2]``; every
        one of the 2B rows is valid (the mask flattens them to ``[2B, S]`` for the terms)."""
        logits = torch.stack([model_output.start_logits, model_output.end_logits], dim=1)
        pad = ~batch["attention_mask"].bool()
        logits = logits.masked_fill(pad[:, None, :], MASKED)
        labels = None
        if "start_positions" in batch:
            labels = torch.stack([batch["start_positions"], batch["end_positions"]], dim=1)
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        return HeadOutput(logits, labels, valid)

    def feature_logits(self, model_output: Any, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """One ``[S_i, 2]`` array (start, end) per window, cut to its real length."""
        both = torch.stack([model_output.start_logits, model_output.end_logits], dim=-1).float().cpu().numpy()
        return [both[i, :n] for i, n in enumerate(row_lengths(batch))]

    def best_spans(self, logits: Sequence[np.ndarray], features: Dataset, raw: Dataset) -> dict[str, BestSpan]:
        """Each example's best span over its windows and its no-answer score difference."""
        feats = [
            {"example_id": e, "offset_mapping": o}
            for e, o in zip(column(features, "example_id"), column(features, "offset_mapping"), strict=True)
        ]
        return best_answers(raw.to_list(), feats, [x[:, 0] for x in logits], [x[:, 1] for x in logits])

    def predictions(self, logits: Sequence[np.ndarray], features: Dataset, raw: Dataset) -> dict[str, str]:
        """The answer text of every example of ``raw`` (empty: no answer; v2.0 at the task's
        ``null_score_diff_threshold``)."""
        return choose_answers(
            self.best_spans(logits, features, raw), self.version_2, self.spec.null_score_diff_threshold
        )

    def evaluate(self, logits: Sequence[np.ndarray], features: Dataset, raw: Dataset | None) -> dict[str, float]:
        """``exact`` and ``f1`` (fractions), the official SQuAD scores; v2.0 also ``has_ans_*`` / ``no_ans_*`` and
        ``best_exact``/``best_f1`` with their ``*_thresh`` (the best no-answer threshold on this split: a
        report, never the selection metric, which stays ``f1`` at the configured threshold)."""
        if raw is None:
            raise ValueError("QA evaluation needs the raw split (the contexts and gold answers)")
        if "example_id" not in features.column_names:
            raise ValueError("QA evaluation needs evaluation features (example_id, offset_mapping)")
        best, examples = self.best_spans(logits, features, raw), raw.to_list()
        out = squad_scores(choose_answers(best, self.version_2, self.spec.null_score_diff_threshold), examples)
        if self.version_2:
            out.update(best_threshold_scores(best, examples))
        return out
