"""``kdqat analyze``: registered by :func:`kdqat_dist.cli._add_optional_commands`."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  kdqat analyze --teacher runs/t/model --student map=runs/map/student --student out=runs/out/student \\
      --task rte data.source=glue/RTE --out analysis/rte
  kdqat analyze --config tiny_debug --teacher /tmp/a/t --student /tmp/a/map --student /tmp/a/out --out /tmp/an

A run folder stands for its model/ (finetune) or student/ (train) folder. A student is named by NAME=DIR,
or after its run folder. Extra key=value arguments override the recipe's data section (data.source, ...)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze",
        help="compare a teacher with its quantized students on dev examples: attention-map distance, "
             "attention-output range, norm analysis, Hessian spectra (PNG + JSON + Markdown)",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="the fine-tuned FP teacher (a `kdqat finetune` model/ folder)")
    p.add_argument("--student", action="append", required=True, metavar="[NAME=]DIR", dest="students",
                   help="a `kdqat train` student/ folder; repeat for several students")
    p.add_argument("--task", default=None, help="the task (sets data.task); default: the recipe's")
    p.add_argument("--out", required=True, help="output folder for the figures, analysis.json and summary.md")
    p.add_argument("--config", "-c", default=None, help="recipe whose data section is used (default: built-in)")
    p.add_argument("--samples", type=int, default=32, help="dev examples analysed (default 32)")
    p.add_argument("--seed", type=int, default=0, help="picks the dev examples and power-iteration starts")
    p.add_argument("--top-k", type=int, default=5, help="teacher keys the cover length must reach (default 5)")
    p.add_argument("--hessian-samples", type=int, default=8,
                   help="examples for the Hessian spectrum, the first of the sample (0 skips it; default 8)")
    p.add_argument("--hessian-iters", type=int, default=100, help="power iterations at most (default 100)")
    p.add_argument("--hessian-tol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--hessian-top-n", type=int, default=1, help="eigenvalues per example (default 1)")
    p.add_argument("--hessian-norm-weight", type=float, default=0.01,
                   help="weight of the Σ‖p‖₂ term of the Hessian loss (the reference's 0.01)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.source=glue/RTE")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from kdqat_dist.analysis.report import AnalyzeOptions, analyze

    opts = AnalyzeOptions(
        teacher=args.teacher, students=list(args.students), out=args.out, task=args.task, config=args.config,
        overrides=list(args.overrides), samples=args.samples, seed=args.seed, top_k=args.top_k,
        hessian_samples=args.hessian_samples, hessian_iters=args.hessian_iters, hessian_tol=args.hessian_tol,
        hessian_top_n=args.hessian_top_n, hessian_norm_weight=args.hessian_norm_weight, device=args.device,
        progress=True,
    )
    result = analyze(opts)
    print(f"kdqat analyze: wrote {len(result['files'])} files to {result['out']} in {result['seconds']:.1f} s "
          f"(summary: {result['out']}/summary.md)")
    return 0
