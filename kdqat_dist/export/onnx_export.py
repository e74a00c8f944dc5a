"""``kdqat export --format onnx``: the student as an ONNX graph that ONNX Runtime runs with its int8 kernels.

The integer-form student (:func:`~kdqat_dist.quant.api.convert`) is traced by ``torch.onnx.export``; its
modules write the QDQ form of :mod:`kdqat_dist.quant.onnx_form` (int8 weight initializers holding the codes
with their per-tensor or per-row scales; each activation quantizer as in training, Q/K/V and the attention
probabilities included), with dynamic batch and sequence axes, then tidied for ONNX Runtime's fusions
without changing a number (:mod:`kdqat_dist.export.onnx_graph`: shared constants, each Linear's bias inside
``MatMulIntegerToFloat``, attention codes transposed as uint8). An export folder holds

- ``model.onnx``: inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has
  segment embeddings), int64 [batch, sequence]; outputs by task head
  (:data:`~kdqat_dist.export.head_outputs.HEAD_OUTPUTS`): ``logits`` [batch, labels] of a sequence
  classifier, ``logits`` [batch, sequence, labels] of a token classifier, ``start_logits`` and
  ``end_logits`` [batch, sequence] of an extractive-QA model;
- ``kdqat_onnx.json``: format, the file's size and SHA-256, inputs, ``head`` and ``outputs``, labels, the
  weight layout, the probe check and the operators ONNX Runtime runs after its graph optimizations
  (``MatMulIntegerToFloat``: int8), and what the tidying changed (``graph``);
- ``config.json`` and the tokenizer files.

Before anything is kept, ONNX Runtime runs the file on fixed probe batches with padding and its outputs are
compared with the fake-quant student's (within :data:`ONNX_RTOL` of the largest logit, the same predicted
class, tag or start/end position where the student's margin is clear; token and QA outputs over real tokens
only); a model that disagrees is removed and an :class:`~kdqat_dist.errors.InternalError` raised.

``weights="2bit"`` stores ternary and 2-bit weights as ONNX Runtime's ``MatMulNBits`` (2 bits per code,
com.microsoft domain) instead of int8 QDQ; see :mod:`kdqat_dist.export.nbits`.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdqat_dist import __version__
from kdqat_dist.config import to_dict
from kdqat_dist.errors import ConfigError, InternalError
from kdqat_dist.export.artifact import (
    _TOKENIZER_PREFIXES,
    _remove_written,
    _sha256,
    check_out_dir,
    probe_batches,
    read_student_quant,
)
from kdqat_dist.export.head_outputs import HEAD_OUTPUTS, compare_outputs, head_of, outputs_of
from kdqat_dist.quant.api import convert
from kdqat_dist.quant.hf_quantizer import KdqatQuantizationConfig
from kdqat_dist.quant.onnx_form import OPSET
from kdqat_dist.quant.student import load_student

ONNX_META = "kdqat_onnx.json"
MODEL_FILE = "model.onnx"
FORMAT = "kdqat-onnx"
FORMAT_VERSION = 1
WEIGHT_LAYOUTS = ("int8", "2bit")
# ONNX Runtime vs the fake-quant student, logits, relative to the batch's largest |logit|. The graph is not
# bit-exact and cannot be: ONNX Runtime's LayerNorm, GELU, softmax and int32 sums round differently from
# torch's in the last bit, and where an activation sits within that rounding of a code boundary its 8-bit
# code comes out one step apart; the next layers carry that on. Measured on the random-token probe batches
# (out of distribution, small logits): up to 3.5 % on the trained MiniLM SST-2 student of
# bench/results/runtime.md (12 batches), 1.7 % on an untrained one. A wrong scale, zero point, layout or
# operator moves logits by far more; subtler differences are the dev-set check's to find (kdqat export).
ONNX_RTOL = 0.15
INTEGER_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulNBits")


@dataclass
class OnnxReport:
    """What an ONNX export wrote."""

    out_dir: Path
    file_bytes: int
    max_abs_logit_diff: float
    integer_ops: dict[str, int]
    weights: str

    def lines(self) -> list[str]:
        ops = ", ".join(f"{n} x{c}" for n, c in sorted(self.integer_ops.items())) or "none"
        return [
            f"ONNX file    {self.out_dir / MODEL_FILE}: {self.file_bytes / 1e6:.3f} MB ({self.weights} weights)",
            f"ONNX Runtime integer kernels: {ops}",
            f"probe batches: max |logit - fake-quant logit| {self.max_abs_logit_diff:.2e} "
            f"(tolerance {ONNX_RTOL:g} x the largest |logit|)",
        ]


def input_names(config) -> list[str]:
    """The graph's inputs for a model config: segment ids only where the model has segment embeddings."""
    names = ["input_ids", "attention_mask"]
    if getattr(config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


def session(path: str | Path, threads: int | None = None, optimized_to: str | Path | None = None):
    """An ONNX Runtime CPU session on ``path`` (all graph optimizations on)."""
    import onnxruntime as ort  # only the ONNX paths need it

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # the CPU provider's "hardware specific optimizations" note on saving
    # Where a weight's DequantizeLinear feeds a MatMul with a float input (a Linear whose input the student
    # keeps in full precision), ONNX Runtime turns it into MatMulNBits, which by default re-quantizes that
    # input to int8 (accuracy level 4): not the student's arithmetic. Level 1 computes in float32.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types (InvalidGraph, Fail, ...) share no public base
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: ONNX Runtime cannot load it ({first})") from None


def _feeds(sess, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The graph's inputs from a tokenized batch, as int64 (segment ids zero when the batch has none)."""
    feeds = {}
    for n in (i.name for i in sess.get_inputs()):
        if n in batch:
            feeds[n] = np.asarray(batch[n], dtype=np.int64)
        elif n == "token_type_ids":
            feeds[n] = np.zeros_like(np.asarray(batch["input_ids"], dtype=np.int64))
        else:
            raise InternalError(f"the ONNX model needs an input {n!r} the batch does not have")
    return feeds


def run_outputs(sess, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every output of ``sess`` on a tokenized batch by name, float32: ``logits`` (sequence [B, C], token
    [B, S, C]) or ``start_logits`` and ``end_logits`` (QA, [B, S])."""
    names = [o.name for o in sess.get_outputs()]
    arrays = sess.run(names, _feeds(sess, batch))
    return {n: np.asarray(a, dtype=np.float32) for n, a in zip(names, arrays, strict=True)}


def _trace(model: nn.Module, path: Path, names: list[str], head: str) -> None:
    """``torch.onnx.export`` (TorchScript tracer, one file) with dynamic batch and sequence axes."""
    example = {n: t for n, t in probe_batches(model.config)[0].items()}
    example["token_type_ids"] = torch.zeros_like(example["input_ids"])
    args = tuple(example[n] for n in names)
    outputs = HEAD_OUTPUTS[head]
    axes = {n: {0: "batch", 1: "sequence"} for n in (*names, *outputs)}
    if head == "sequence":
        axes["logits"] = {0: "batch"}

    class _Outputs(nn.Module):  # positional inputs in the graph's order, the head's outputs only
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            out = self.inner(**dict(zip(names, tensors, strict=True)))
            return tuple(getattr(out, n) for n in outputs)

    with warnings.catch_warnings():
        # the tracer's notes on Python control flow over shapes (transformers' mask helpers) and its own
        # deprecation notice: the probe check below is what proves the graph right for other shapes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Outputs(model).eval(),
            args,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=list(outputs),
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def export_onnx(
    student_dir: str | Path, out_dir: str | Path, *, weights: str = "int8", verify: bool = True
) -> OnnxReport:
    """Write the ONNX form of the ``student/`` folder written by ``kdqat train`` into ``out_dir``.

    Sequence, token and QA students alike; the graph's outputs are the head's
    (:data:`~kdqat_dist.export.head_outputs.HEAD_OUTPUTS`).

    Args:
        student_dir: a student folder (``kdqat_student.json``).
        out_dir: a new or empty folder.
        weights: ``int8`` (QDQ, MatMulIntegerToFloat) or ``2bit`` (MatMulNBits for ternary/2-bit weights).
        verify: compare ONNX Runtime with the fake-quant student on probe batches (keep it on).

    Raises:
        ConfigError: not a student folder, an existing non-empty ``out_dir``, an unknown weight layout.
        InternalError: the ONNX model does not reproduce the student (nothing is kept).
    """
    src = Path(student_dir)
    out = check_out_dir(out_dir)
    if weights not in WEIGHT_LAYOUTS:
        raise ConfigError(f"--weights: {weights!r} is not a weight layout; allowed: {', '.join(WEIGHT_LAYOUTS)}")
    if weights == "2bit":
        from kdqat_dist.export.nbits import has_2bit_kernel  # only this layout needs the probe

        if not has_2bit_kernel():
            import onnxruntime

            raise ConfigError(
                f"--weights 2bit: the installed onnxruntime {onnxruntime.__version__} has no 2-bit MatMulNBits "
                "CPU kernel; use --weights int8"
            )
    quant, smeta = read_student_quant(src, "--student")
    student = load_student(src)
    integer = convert(copy.deepcopy(student))
    names, head = input_names(student.config), head_of(src)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        path = out / MODEL_FILE
        _trace(integer, path, names, head)
        if weights == "2bit":
            from kdqat_dist.export.nbits import to_matmul_nbits  # only this layout rewrites the graph

            to_matmul_nbits(path)
        graph = _tidy(path)
        _write_side_files(student, src, out, quant)
        diff, ops = _check(student, path, head) if verify else (float("nan"), {})
        report = OnnxReport(out, path.stat().st_size, diff, ops, weights)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_file": MODEL_FILE,
            "model_bytes": report.file_bytes,
            "model_sha256": _sha256(path),
            "opset": OPSET,
            "inputs": names,
            "head": head,
            "outputs": list(HEAD_OUTPUTS[head]),
            "weights": weights,
            "id2label": {str(k): v for k, v in student.config.id2label.items()},
            "problem_type": getattr(student.config, "problem_type", None),
            "quant": to_dict(quant),
            "probe": {"max_abs_logit_diff": diff, "rtol": ONNX_RTOL, "integer_ops": ops},
            "graph": graph,
            "source": {"student": str(src.resolve()), "task": smeta.get("task"), "metrics": smeta.get("metrics")},
            "versions": _versions(),
        }
        (out / ONNX_META).write_text(json.dumps(meta, indent=2))
    except BaseException:
        _remove_written(out, created)
        raise
    return report


def _tidy(path: Path) -> dict[str, int]:
    """The traced graph in the shape ONNX Runtime fuses best (:mod:`kdqat_dist.export.onnx_graph`: shared
    constants, Linears with their bias in ``MatMulIntegerToFloat``); the same codes, scales and bounds."""
    import onnx

    from kdqat_dist.export.onnx_graph import tidy  # onnx only where an ONNX file is written

    model = onnx.load(str(path))
    changes = tidy(model)
    onnx.save(model, str(path))
    return changes


def _write_side_files(student: nn.Module, src: Path, out: Path, quant) -> None:
    for p in src.iterdir():
        if p.is_file() and p.name.startswith(_TOKENIZER_PREFIXES):
            (out / p.name).write_bytes(p.read_bytes())
    config = copy.deepcopy(student.config)  # labels and sizes for readers; from_pretrained refuses the folder
    config.quantization_config = KdqatQuantizationConfig(to_dict(quant), packed=FORMAT).to_dict()
    config.save_pretrained(out)


def _check(student: nn.Module, path: Path, head: str) -> tuple[float, dict[str, int]]:
    """(max |logit difference| on the probe batches, integer operators ONNX Runtime runs); raises
    InternalError when ONNX Runtime does not reproduce the student (the head's outputs over real tokens:
    :func:`~kdqat_dist.export.head_outputs.compare_outputs`)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        sess = session(path, optimized_to=optimized)
        ops = Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    diffs = []
    for batch in probe_batches(student.config, seed=11):
        got = {n: torch.from_numpy(a) for n, a in run_outputs(sess, batch).items()}
        problem, diff = compare_outputs(head, outputs_of(student, batch, head), got, batch["attention_mask"], ONNX_RTOL)
        if problem is not None:
            raise InternalError(
                f"export: ONNX Runtime does not reproduce the fake-quant student ({problem}); not keeping a wrong model"
            )
        diffs.append(diff)
    return max(diffs), {k: v for k, v in ops.items() if k in INTEGER_OPS}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {
        "kdqat_dist": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def read_onnx_meta(path: str | Path) -> dict:
    """The parsed ``kdqat_onnx.json`` of an ONNX export folder, with the model file's size and SHA-256
    checked (a truncated or corrupt file is refused before ONNX Runtime reads it); ``head`` is ``sequence``
    where an older export has none."""
    p = Path(path)
    mpath = p / ONNX_META
    if not mpath.exists():
        raise ConfigError(
            f"{p} is not a kdqat ONNX export (no {ONNX_META}); create one with `kdqat export --format onnx`"
        )
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{mpath} is not valid JSON (corrupt export metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{mpath}: not a {FORMAT} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{mpath}: format_version {meta.get('format_version')!r} is not supported (reads 1)")
    for key in ("model_file", "model_bytes", "model_sha256", "inputs", "id2label"):
        if key not in meta:
            raise ConfigError(f"{mpath}: missing key {key!r} (corrupt export metadata)")
    meta.setdefault("head", "sequence")  # exports written before token and QA students: sequence classifiers
    if meta["head"] not in HEAD_OUTPUTS:
        raise ConfigError(f"{mpath}: head {meta['head']!r} is not one of {', '.join(HEAD_OUTPUTS)} (corrupt metadata)")
    model = p / str(meta["model_file"])
    if Path(str(meta["model_file"])).name != meta["model_file"] or not model.is_file():
        raise ConfigError(f"{model} is missing (the ONNX export folder is incomplete)")
    size, expected = model.stat().st_size, meta["model_bytes"]
    if size != expected:
        what = "truncated" if size < expected else "has trailing data"
        raise ConfigError(f"{model} is {what}: {size} bytes, expected {expected}; re-run `kdqat export --format onnx`")
    if _sha256(model) != meta["model_sha256"]:
        raise ConfigError(f"{model} is corrupt: its SHA-256 does not match {ONNX_META}; re-run `kdqat export`")
    return meta
