"""``kdqat analyze``: registered by :func:`kdqat_dist.cli._add_optional_commands`."""

from __future__ import annotations

import argparse

from kdqat_dist.analysis.report import AnalyzeOptions, analyze

EXAMPLE = """examples:
  kdqat analyze --teacher runs/t/model --student map=runs/map/student --student out=runs/out/student \\
      --task rte data.source=glue/RTE --out analysis/rte
  kdqat analyze --config tiny_debug --teacher /tmp/a/t --student /tmp/a/map --student /tmp/a/out --out /tmp/an

A run folder stands for its model/ (finetune) or student/ (train) folder. A student is named by NAME=DIR,
or after its run folder. Extra key=value arguments override the recipe: its data section (data.source, ...)
and its analysis section (analysis.samples=64, analysis.hessian_iters=50, ...); the flags below, when
given, override the analysis section in turn."""


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
        "--config", "-c", default=None, help="recipe whose data and analysis sections are used (default: built-in)"
    )
    # None: the config's analysis.<name> decides (see kdqat_dist.config.AnalysisConfig for the defaults).
    p.add_argument("--samples", type=int, default=None, help="dev examples analysed (analysis.samples, 32)")
    p.add_argument(
        "--seed", type=int, default=None, help="picks the dev examples and power-iteration starts (analysis.seed, 0)"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="teacher keys the cover length must reach (analysis.top_k, 5)"
    )
    p.add_argument(
        "--hessian-samples",
        type=int,
        default=None,
        help="examples for the Hessian spectrum, the first of the sample; 0 skips it (analysis.hessian_samples, 8)",
    )
    p.add_argument(
        "--hessian-iters", type=int, default=None, help="power iterations at most (analysis.hessian_iters, 100)"
    )
    p.add_argument("--hessian-tol", type=float, default=None, help="relative tolerance (analysis.hessian_tol, 1e-3)")
    p.add_argument(
        "--hessian-top-n", type=int, default=None, help="eigenvalues per example (analysis.hessian_top_n, 1)"
    )
    p.add_argument(
        "--hessian-norm-weight",
        type=float,
        default=None,
        help="weight of the Σ‖p‖₂ term of the Hessian loss (analysis.hessian_norm_weight, 0; the reference used 0.01)",
    )
    p.add_argument("--device", default=None, help="cpu | cuda | auto (analysis.device, cpu)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. data.source=glue/RTE analysis.samples=64",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    opts = AnalyzeOptions(
        teacher=args.teacher,
        students=list(args.students),
        out=args.out,
        task=args.task,
        config=args.config,
        overrides=list(args.overrides),
        samples=args.samples,
        seed=args.seed,
        top_k=args.top_k,
        hessian_samples=args.hessian_samples,
        hessian_iters=args.hessian_iters,
        hessian_tol=args.hessian_tol,
        hessian_top_n=args.hessian_top_n,
        hessian_norm_weight=args.hessian_norm_weight,
        device=args.device,
        progress=True,
    )
    result = analyze(opts)
    print(
        f"kdqat analyze: wrote {len(result['files'])} files to {result['out']} in {result['seconds']:.1f} s "
        f"(summary: {result['out']}/summary.md)"
    )
    return 0
