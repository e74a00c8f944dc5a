"""``kdqat sweep``: a Ray Tune sweep of KD-QAT runs described by a spec (a YAML path, or the name of one
shipped in ``kdqat_dist/sweeps/``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kdqat_dist.tune.results import collect_rows, format_console, write_report
from kdqat_dist.tune.spec import MAX_GRID_CHECK, SweepSpec, load_spec
from kdqat_dist.tune.trainable import SweepInterrupted, run_sweep

EPILOG = """examples:
  kdqat sweep --config tiny_demo                  # a shipped spec, on a local Ray sized to this machine
  kdqat sweep --config tiny_demo --resume         # continue an interrupted sweep
  kdqat sweep --config my_sweep.yaml --address auto   # your own spec, joining a running cluster (Slurm)
  kdqat sweep --config tiny_demo --report-only    # rebuild the tables and the plot

key=value arguments override the base recipe for every trial (e.g. train.max_steps=50).

Ctrl-C (SIGINT) or SIGTERM (Slurm preemption, scancel) stops the sweep gracefully: Tune saves its state,
running trials stop, the tables are written for the trials so far, and kdqat exits with 130 (SIGINT) or
143 (SIGTERM); --resume then reruns only the unfinished trials. A second Ctrl-C aborts at once.
Exit status: 0 every trial finished (or was stopped early by ASHA), 1 some trial failed (fix the cause,
then --resume), 2 bad input, 130/143 interrupted."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="Ray Tune sweep of KD-QAT runs (a spec YAML, or a shipped one: kdqat_dist/sweeps/)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", required=True, help="sweep spec YAML (a path, or a shipped spec)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="base config overrides for every trial")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in output_dir; finished trials are kept, errored and unfinished ones run again",
    )
    p.add_argument("--address", help="join an existing Ray cluster (e.g. auto); default: start a local one")
    p.add_argument(
        "--num-cpus",
        type=int,
        help="logical CPUs of the local Ray instance "
        "(default: this machine's cores, +1 for the trial driver when tune.num_workers > 1)",
    )
    p.add_argument("--output-dir", default=None, help="override the spec's output_dir")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.{csv,md} and sweep.png")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no Ray Tune progress tables and no trial output (the trials' logs stay in their folders)",
    )
    p.set_defaults(func=main)


def main(args) -> int:
    spec = load_spec(args.config, args.overrides, output_dir=args.output_dir)
    errors = 0
    if not args.report_only:
        _warn_missing_teachers(spec)
        print(
            f"kdqat sweep: {spec.name}: {spec.num_grid_points} grid points x "
            f"{spec.base_config().tune.num_samples} samples -> {spec.output_dir}",
            flush=True,
        )
        try:
            grid = run_sweep(
                spec, resume=args.resume, address=args.address, num_cpus=args.num_cpus, verbose=0 if args.quiet else 1
            )
        except SweepInterrupted as exc:
            _report(spec.output_dir)  # the finished trials' rows are final; worth having now
            print(
                f"kdqat sweep: {exc}; the sweep state is saved in {spec.output_dir / 'tune'}. "
                f"Continue with: {_resume_command(args)}",
                file=sys.stderr,
                flush=True,
            )
            return exc.exit_code
        errors = grid.num_errors
    rows = _report(spec.output_dir)
    # "partial" rows are trials ASHA stopped early - a normal outcome, which --resume would not rerun -
    # or failed ones after some evaluations, which Tune counts in num_errors.
    bad = [r for r in rows if r.get("status") == "incomplete"]
    if errors or bad:
        print(
            f"kdqat sweep: {max(errors, len(bad))} trial(s) did not finish; fix the cause and rerun with "
            "--resume (finished trials are kept)",
            file=sys.stderr,
        )
        return 1
    return 0


def _report(output_dir: Path) -> list[dict]:
    """Write the tables and the plot, print the trial table and where everything is; returns the rows."""
    paths = write_report(output_dir)
    rows, _ = collect_rows(output_dir)
    print(format_console(rows))
    print("\n".join(f"{k:12s} {v}" for k, v in paths.items()))
    print(f"{'tensorboard':12s} tensorboard --logdir {output_dir / 'trials'}", flush=True)
    return rows


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this sweep (same spec, overrides and output dir)."""
    parts = ["kdqat", "sweep", "--config", args.config, *args.overrides]
    if args.output_dir:
        parts += ["--output-dir", args.output_dir]
    if args.address:
        parts += ["--address", args.address]
    return shlex.join([*parts, "--resume"])


def _warn_missing_teachers(spec: SweepSpec) -> None:
    """Trials whose teacher does not exist (on this machine) will fail; say so before starting."""
    cfgs = (spec.resolve(p, v) for p, v in spec.grid_points()[:MAX_GRID_CHECK])
    missing = sorted({c.teacher.path for c in cfgs if c.teacher.path and not Path(c.teacher.path).exists()})
    if missing:
        print(
            f"kdqat sweep: warning: {len(missing)} teacher path(s) do not exist here (e.g. {missing[0]}); "
            "their trials will fail until the teachers exist (then rerun with --resume)",
            file=sys.stderr,
        )
