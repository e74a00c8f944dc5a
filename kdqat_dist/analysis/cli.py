"""``kdqat analyze``: registered by :func:`kdqat_dist.cli._add_optional_commands`."""

from __future__ import annotations

import argparse
from dataclasses import fields

from kdqat_dist.analysis.report import AnalyzeOptions, analyze

EXAMPLE = """examples:
  kdqat analyze --teacher runs/t --student map=runs/map --student out=runs/out --out analysis/rte
  kdqat analyze --config tiny_debug --teacher /tmp/a/t --student /tmp/a/map --student /tmp/a/out --out /tmp/an

A run folder stands for its model/ (finetune) or student/ (train) folder. A student is named by NAME=DIR,
or after its run folder. The data and analysis sections come from the config.yaml of the first student's
training run (--config replaces it; a task other than the one a student or the teacher was trained on is
refused, other data differences are stated). Extra key=value arguments override them: the data section
(data.source, ...) and the analysis section (analysis.samples=64, analysis.hessian_iters=50, ...); the flags
below, when given, override the analysis section in turn."""

# the flags that override the analysis section: (flag, type, help)
KNOBS = (
    ("--samples", int, "dev examples analysed (analysis.samples, 32)"),
    ("--seed", int, "picks the dev examples and power-iteration starts (analysis.seed, 0)"),
    ("--top-k", int, "teacher keys the cover length must reach (analysis.top_k, 5)"),
    (
        "--hessian-samples",
        int,
        "examples for the Hessian spectrum, the first of the sample; 0 skips it (analysis.hessian_samples, 8)",
    ),
    ("--hessian-iters", int, "power iterations at most (analysis.hessian_iters, 100)"),
    ("--hessian-tol", float, "relative tolerance (analysis.hessian_tol, 1e-3)"),
    ("--hessian-top-n", int, "eigenvalues per example (analysis.hessian_top_n, 1)"),
    (
        "--hessian-norm-weight",
        float,
        "weight of the Σ‖p‖₂ term of the Hessian loss (analysis.hessian_norm_weight, 0; the reference used 0.01)",
    ),
    ("--device", str, "cpu | cuda | auto (analysis.device, cpu)"),
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze",
        help="compare a teacher with its quantized students on dev examples: attention-map distance, "
        "attention-output range, norm analysis, Hessian spectra (PNG + JSON + Markdown)",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="the fine-tuned FP teacher (a `kdqat finetune` model/ folder)")
    p.add_argument(
        "--student",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        dest="students",
        help="a `kdqat train` student/ folder; repeat for several students",
    )
    p.add_argument("--task", default=None, help="the task (sets data.task); default: the recipe's")
    p.add_argument("--out", required=True, help="output folder for the figures, analysis.json and summary.md")
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help="recipe whose data and analysis sections are used (default: the first student's run config.yaml)",
    )
    # None: the config's analysis.<name> decides (see kdqat_dist.config.AnalysisConfig for the defaults).
    for flag, kind, text in KNOBS:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="write analysis.json and summary.md only, no PNGs (the figures take most of the time)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. data.source=glue/RTE analysis.samples=64",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # every option is a flag of the same name; the CLI shows progress bars
    names = [f.name for f in fields(AnalyzeOptions) if f.name != "progress"]
    opts = AnalyzeOptions(**{n: getattr(args, n) for n in names}, progress=True)
    result = analyze(opts)
    print(
        f"kdqat analyze: wrote {len(result['files'])} files to {result['out']} in {result['seconds']:.1f} s "
        f"(summary: {result['out']}/summary.md)"
    )
    return 0
