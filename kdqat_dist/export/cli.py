"""``kdqat export``: pack a trained student (or write its ONNX form), reload it, and prove on the dev set
that nothing changed.

    kdqat export --student runs/x/student --out runs/x/export [--base3] [--config RECIPE] [key=value ...]
    kdqat export --format onnx --student runs/x/student --out runs/x/onnx [--weights int8|2bit]
    kdqat export --format hf-bitnet --student runs/x/student --out runs/x/hf   (bitdistill_w158a8 students)

Every format takes sequence-classification, token-classification and extractive-QA students.

The task and data for the re-evaluation come from the ``config.yaml`` the training run wrote next to the
student (``--config`` replaces it; overrides apply to either). The packed artifact must score what the
student scores; the ONNX model (ONNX Runtime, int8 kernels) and the hf-bitnet model (transformers' own
BitLinear, :mod:`~kdqat_dist.export.hf_bitnet`) must agree with the student on at least 99.5 % of the dev
rows, tokens or QA windows (:data:`~kdqat_dist.export.onnx_check.MAX_DISAGREEMENT`). Each is removed otherwise.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

from kdqat_dist.config import ConfigError, RunConfig
from kdqat_dist.errors import InternalError
from kdqat_dist.export.artifact import EXPORT_META, _remove_written, check_out_dir, export_student, read_meta
from kdqat_dist.export.onnx_export import ONNX_META, WEIGHT_LAYOUTS, export_onnx
from kdqat_dist.run_folder import model_run, resolve_model_dir, run_config_path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="pack a trained student into a low-bit artifact (2-bit/base-3 ternary, n-bit) and "
        "check that it scores exactly what the student scored",
    )
    p.add_argument("--student", required=True, help="the student/ folder written by `kdqat train` (or its run folder)")
    p.add_argument("--out", required=True, help="a new or empty folder for the artifact")
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help="recipe for the dev-set check (default: the run's config.yaml next to the student)",
    )
    p.add_argument(
        "--format",
        choices=("packed", "onnx", "hf-bitnet"),
        default="packed",
        help="packed: bit-packed codes for kdqat_dist.export.load (default); onnx: an ONNX Runtime int8 graph; "
        "hf-bitnet: transformers' BitNet format, loaded by plain from_pretrained (bitdistill_w158a8 students)",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHT_LAYOUTS,
        default="int8",
        help="ONNX weight layout: int8 QDQ (default) or 2bit (MatMulNBits, 2 bits per ternary code)",
    )
    p.add_argument("--base3", action="store_true", help="pack ternary weights five per byte (1.6 bits)")
    p.add_argument(
        "--skip-eval",
        action="store_true",
        help="skip the dev-set check (the reloaded artifact is still compared on a probe batch)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.cache_dir=x")
    p.set_defaults(func=run)


def run_config(student: Path, config: str | None, overrides: list[str]) -> RunConfig:
    """The config of the re-evaluation: the training run's ``config.yaml``, or ``config`` (which must name
    the run's task: :func:`~kdqat_dist.run_folder.model_run`), plus overrides."""
    if config is None and run_config_path(student) is None:
        raise ConfigError(
            f"--config: no config.yaml next to {student} (in {student.parent}); pass "
            "--config RECIPE to say which task to re-evaluate on, or --skip-eval"
        )
    run = model_run(student, config, overrides, flag="--student")
    for note in run.notes:
        print(f"[export] note: {note}", file=sys.stderr)
    return run.config


def _same(a: dict, b: dict) -> bool:
    """Equal metric dicts up to float rounding (max-abs weights are codes · (1/s) in the artifact where
    training divides by s: a correlation may move in its 7th digit, a count-based metric cannot move by
    less than one row), NaN equal to NaN (x != x only for NaN)."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 or (a[k] != a[k] and b[k] != b[k]) for k in a)


def run(args, evaluate_folder: Callable[[RunConfig, str], dict]) -> int:
    """Export, then score the student and the artifact with ``evaluate_folder`` (the CLI passes
    :func:`kdqat_dist.pipeline.evaluate_folder`, which sits above this package)."""
    student, out = resolve_model_dir(args.student, "--student"), check_out_dir(args.out)
    if args.format == "packed" and args.weights != "int8":
        raise ConfigError("--weights: only for --format onnx (the packed format stores 2-bit codes already)")
    if args.format != "packed" and args.base3:
        raise ConfigError("--base3: only for --format packed")
    if args.format == "hf-bitnet" and args.weights != "int8":
        raise ConfigError("--weights: only for --format onnx (hf-bitnet stores BitLinear's 2-bit codes)")
    if args.format == "hf-bitnet":
        from kdqat_dist.export.hf_bitnet import check_student

        check_student(student)  # before the dev-set config is read: the one line that matters
    cfg = None if args.skip_eval and args.config is None else run_config(student, args.config, args.overrides)
    if args.format == "onnx":
        return _run_onnx(args, student, out, cfg)
    if args.format == "hf-bitnet":
        return _run_hf_bitnet(student, out, cfg)
    created = not out.exists()
    report = export_student(student, out, base3=args.base3)
    print(
        f"[export] wrote {out} ({report.modules} packed weights"
        f"{', ternary base-3 packed' if args.base3 else ''}); the reloaded integer model gives the student's "
        "logits on probe batches"
    )
    print("\n".join(f"[export] {line}" for line in report.lines()))
    if cfg is None:
        print("[export] dev-set check skipped (--skip-eval)")
        return 0
    try:
        print("[export] dev set, fake-quant student:")
        ms = evaluate_folder(copy.deepcopy(cfg), str(student))
        print("[export] dev set, exported artifact:")
        me = evaluate_folder(copy.deepcopy(cfg), str(out))
        if not _same(ms, me):
            raise InternalError(
                f"export: the exported model scores {me.get('selection')} on the dev set but "
                f"the fake-quant student scores {ms.get('selection')} ({ms} vs {me}); "
                "artifact removed"
            )
    except BaseException:
        _remove_written(out, created)
        raise
    meta = read_meta(out)
    meta["round_trip"] = {"task": cfg.data.task, "student": ms, "export": me}
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2))  # the checksum covers the weights file only
    print(
        f"[export] round trip OK: dev selection {ms['selection']:.4f} (student) == {me['selection']:.4f} "
        f"(export), all metrics equal"
    )
    return 0


def _run_onnx(args, student: Path, out: Path, cfg: RunConfig | None) -> int:
    from kdqat_dist.export.onnx_check import MAX_DISAGREEMENT, dev_check  # data + engine: only this path

    created = not out.exists()
    report = export_onnx(student, out, weights=args.weights)
    print(
        f"[export] wrote {out} (ONNX, opset {read_onnx(out)['opset']}); "
        "ONNX Runtime matches the student on probe batches"
    )
    print("\n".join(f"[export] {line}" for line in report.lines()))
    if cfg is None:
        print("[export] dev-set check skipped (--skip-eval)")
        return 0
    try:
        check = dev_check(copy.deepcopy(cfg), student, out)
        sel_s, sel_o = check.student["selection"], check.onnx["selection"]
        print(
            f"[export] dev set ({check.rows} {check.unit}): student {sel_s:.4f}, ONNX {sel_o:.4f}; "
            f"predictions agree on {check.agree}/{check.rows} ({100 * check.agreement:.2f} %)"
        )
        if not check.ok():
            raise InternalError(
                f"export: the ONNX model agrees with the student on only {check.agree} of {check.rows} dev "
                f"{check.unit} (allowed: {100 * MAX_DISAGREEMENT:g} % different); ONNX model removed"
            )
    except BaseException:
        _remove_written(out, created)
        raise
    meta = read_onnx(out)
    meta["round_trip"] = {"task": cfg.data.task, **check.as_dict()}
    (out / ONNX_META).write_text(json.dumps(meta, indent=2))  # the checksum covers model.onnx only
    return 0


def _run_hf_bitnet(student: Path, out: Path, cfg: RunConfig | None) -> int:
    from kdqat_dist.export.hf_bitnet import META_FILE, Eager, export_hf_bitnet, load_native
    from kdqat_dist.export.onnx_check import MAX_DISAGREEMENT, dev_check  # data + engine: only this path

    created = not out.exists()
    report = export_hf_bitnet(student, out)
    print(
        f"[export] wrote {out} (transformers BitNet format); transformers' model matches the student on probe batches"
    )
    print("\n".join(f"[export] {line}" for line in report.lines()))
    if cfg is None:
        print("[export] dev-set check skipped (--skip-eval)")
        return 0
    try:
        check = dev_check(copy.deepcopy(cfg), student, out, model=Eager(load_native(out)))
        sel_s, sel_o = check.student["selection"], check.onnx["selection"]
        print(
            f"[export] dev set ({check.rows} {check.unit}): student {sel_s:.4f}, hf-bitnet {sel_o:.4f}; "
            f"predictions agree on {check.agree}/{check.rows} ({100 * check.agreement:.2f} %)"
        )
        if not check.ok():
            raise ConfigError(
                f"export: the hf-bitnet model agrees with the student on only {check.agree} of {check.rows} dev "
                f"{check.unit} (allowed: {100 * MAX_DISAGREEMENT:g} % different); folder removed"
            )
    except BaseException:
        _remove_written(out, created)
        raise
    meta = json.loads((out / META_FILE).read_text())
    meta["round_trip"] = {"task": cfg.data.task, **check.as_dict()}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return 0


def read_onnx(out: Path) -> dict:
    return json.loads((out / ONNX_META).read_text())
