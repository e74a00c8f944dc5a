"""``kdqat export``: pack a trained student, reload it, and prove on the dev set that nothing changed.

    kdqat export --student runs/x/student --out runs/x/export [--base3] [--config RECIPE] [key=value ...]

The task and data for the re-evaluation come from the ``config.yaml`` the training run wrote next to the
student (``--config`` replaces it; overrides apply to either).
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

from kdqat_dist.config import ConfigError, RunConfig
from kdqat_dist.export.artifact import EXPORT_META, _remove_written, check_out_dir, export_student, read_meta
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
    """Equal metric dicts, NaN equal to NaN (x != x only for NaN)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


def run(args, evaluate_folder: Callable[[RunConfig, str], dict]) -> int:
    """Export, then score the student and the artifact with ``evaluate_folder`` (the CLI passes
    :func:`kdqat_dist.pipeline.evaluate_folder`, which sits above this package)."""
    student, out = resolve_model_dir(args.student, "--student"), check_out_dir(args.out)
    cfg = None if args.skip_eval and args.config is None else run_config(student, args.config, args.overrides)
    created = not out.exists()
    report = export_student(student, out, base3=args.base3)
    print(
        f"[export] wrote {out} ({report.modules} packed weights"
        f"{', ternary base-3 packed' if args.base3 else ''}); reloaded logits identical on a probe batch"
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
            raise ConfigError(
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
        f"(export), all metrics identical"
    )
    return 0
