"""The deployed student in one call: ONNX export, dev-set accuracy next to the trained student's, and its
speed over the full-precision teacher (``make demo``'s last stage).

The speed figure is measured in this process: the torch FP32 teacher and ONNX Runtime's int8 student on the
same batch of dev rows (the training's evaluation batch size, padded to the longest row), with the same
number of threads, their calls interleaved, the fastest of five calls each.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from kdqat_dist.config import RunConfig
from kdqat_dist.data.heads import TaskHead, get_head
from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
from kdqat_dist.data.tasks import get_task
from kdqat_dist.engine.evaluate import evaluate
from kdqat_dist.export.onnx_check import OrtModel, dev_check
from kdqat_dist.export.onnx_export import export_onnx
from kdqat_dist.models.encoders import load_classifier, load_tokenizer


def _best_seconds(runs: dict, reps: int) -> dict[str, float]:
    """The fastest of ``reps`` timed calls of each callable in ``runs``, interleaved (on a shared CPU a burst
    of another job then slows both models' calls alike, and the fastest call is the least disturbed one)."""
    for run in runs.values():
        run()  # warm-up: ONNX Runtime's arenas, torch's caches
    best = {name: float("inf") for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _dev_batch(cfg: RunConfig, tokenizer, head: TaskHead) -> tuple[dict, dict, dict]:
    """(raw dev splits, tokenized dev splits, one collated batch of the first eval-batch-size dev features,
    inputs only)."""
    task = get_task(cfg.data)
    max_len = cfg.data.max_seq_length or task.max_seq_length
    dev = {k: v for k, v in load_splits(cfg.data, task).items() if k != "train"}
    data = tokenize_splits(dev, tokenizer, max_len, cfg.data.cache_dir or None, head)
    rows = [data["dev"][i] for i in range(min(cfg.train.eval_batch_size, len(data["dev"])))]
    batch = Collator(tokenizer, head=head)(rows)
    return dev, data, {k: v for k, v in batch.items() if k not in head.label_keys}


def speed_over_teacher(teacher: nn.Module, student: nn.Module, batch: dict, reps: int = 5) -> dict:
    """Throughput of ``student`` over ``teacher`` (torch) on ``batch``: the same threads, interleaved calls,
    the fastest of ``reps`` each."""
    with torch.inference_mode():
        best = _best_seconds({"teacher": lambda: teacher(**batch), "student": lambda: student(**batch)}, reps)
    t_teacher, t_student = best["teacher"], best["student"]
    return {
        "batch": list(batch["input_ids"].shape),
        "threads": torch.get_num_threads(),
        "teacher_s": t_teacher,
        "onnx_s": t_student,
        "speedup": t_teacher / t_student,
    }


def deploy_student(
    cfg: RunConfig, student_dir: str | Path, out_dir: str | Path, teacher_dir: str | Path, agreement: bool = False
) -> dict:
    """Export ``student_dir`` to ONNX in ``out_dir`` (with its probe check), score it on ``cfg``'s dev set, and
    time it against the torch FP32 teacher in ``teacher_dir``.

    ``agreement``: also run the fake-quant student over the dev set and count the rows where both predict
    the same (:func:`~kdqat_dist.export.onnx_check.dev_check`; slower). Without it the dev metrics are the
    ONNX model's alone, to be read next to the training run's own evaluation of the student.
    """
    t0 = time.perf_counter()
    report = export_onnx(student_dir, out_dir)
    task = get_task(cfg.data)
    head = get_head(task)
    ort_model = OrtModel(out_dir, threads=torch.get_num_threads())
    raw, data, batch = _dev_batch(cfg, load_tokenizer(str(student_dir)), head)
    if agreement:
        dev = dev_check(cfg, student_dir, out_dir).as_dict()
    else:
        collate = Collator(load_tokenizer(str(student_dir)), max_length=None, head=head)
        if cfg.data.padding == "max_length":
            collate.max_length = cfg.data.max_seq_length or task.max_seq_length
        dev = {"onnx": evaluate(ort_model, task, data, collate, cfg.train.eval_batch_size, "cpu", raw=raw, head=head)}
    teacher = load_classifier(str(teacher_dir), head.num_labels, strict=True, auto_class=head.auto_class).eval()
    return {
        "onnx": str(out_dir),
        "file_mb": report.file_bytes / 1e6,
        "integer_ops": report.integer_ops,
        "probe_max_abs_logit_diff": report.max_abs_logit_diff,
        "dev": dev,
        "speed": speed_over_teacher(teacher, ort_model, batch),
        "wall_s": time.perf_counter() - t0,
    }
