"""Sweep overhead: K identical KD-QAT trials through Ray Tune (`kdqat sweep`, one trial at a time) vs the
same K runs back to back without Ray (`kdqat train`, one process each), on this machine.

    .venv/bin/python bench/bench_sweep.py --steps 120 --k 3 [--append bench/RESULTS.md]

Both sides are whole command lines timed from outside, so both pay interpreter start-up and imports;
the Ray side also pays starting the local Ray instance, Tune's bookkeeping and writing the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KDQAT = [sys.executable, "-m", "kdqat_dist.cli"]


THREADS = "1"


def _env() -> dict:
    env = dict(os.environ)
    # Ray sets OMP_NUM_THREADS to a trial's CPUs (1 here) unless it is set; set it for both sides so the
    # comparison measures Ray, not thread counts (torch's default, all cores, is much slower on a
    # loaded 2-core machine).
    env["OMP_NUM_THREADS"] = THREADS
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("KDQAT_CACHE", "/tmp/kdq_tune_cache")
    return env


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="training steps per trial (tiny_debug recipe)")
    ap.add_argument("--k", type=int, default=3, help="number of identical trials")
    ap.add_argument("--work", default="/tmp/kdqat_bench_sweep")
    ap.add_argument("--teacher", default="", help="a tiny teacher folder (default: fine-tune one)")
    ap.add_argument("--append", default="", help="append a section to this Markdown file")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS on both sides (= cpus_per_worker)")
    args = ap.parse_args()
    global THREADS
    THREADS = str(args.threads)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    teacher = Path(args.teacher) if args.teacher else work / "teacher" / "model"
    if not args.teacher:
        _run(
            [*KDQAT, "finetune", "--config", "tiny_debug", f"train.output_dir={work / 'teacher'}"], work / "teacher.log"
        )
    common = {
        "train.max_steps": args.steps,
        "train.eval_every": max(1, args.steps // 4),
        "train.log_every": max(1, args.steps // 10),
        "train.seed": 42,
    }

    load0 = os.getloadavg()
    direct = []
    for i in range(args.k):
        ov = [f"{k}={v}" for k, v in common.items()]
        direct.append(
            _run(
                [
                    *KDQAT,
                    "train",
                    "--config",
                    "tiny_debug",
                    f"teacher.path={teacher}",
                    f"train.output_dir={work / 'direct' / str(i)}",
                    *ov,
                ],
                work / f"direct{i}.log",
            )
        )
        print(f"direct run {i}: {direct[-1]:.1f} s", flush=True)

    spec = {
        "name": "bench",
        "base": "tiny_debug",
        "output_dir": str(work / "sweep"),
        "teacher_path": str(teacher),
        "overrides": {k: v for k, v in common.items() if k != "train.seed"},
        "search": {"train.seed": {"grid": [42] * args.k}},  # K identical trials
        "tune": {"num_workers": 1, "cpus_per_worker": args.threads, "max_failures": 0},
        "max_concurrent": 1,
    }
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    ray_total = _run([*KDQAT, "sweep", "--config", str(spec_path), "--quiet"], work / "sweep.log")
    print(f"ray sweep: {ray_total:.1f} s", flush=True)
    load1 = os.getloadavg()

    trial_times = []
    for tdir in sorted((work / "sweep" / "trials").iterdir()):
        start = (tdir / "starts.log").stat().st_mtime
        end = (tdir / "run" / "metrics.json").stat().st_mtime
        trial_times.append(end - start)
    d_total = sum(direct)
    overhead = ray_total / d_total - 1
    lines = [
        "",
        f"## Sweep overhead: Ray Tune vs back-to-back runs (`bench/bench_sweep.py`, {dt.date.today()})",
        "",
        f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average {load0[0]:.1f} before, {load1[0]:.1f} after "
        "(the machine is shared with other work).",
        f"Workload: K={args.k} identical KD-QAT runs of `tiny_debug` ({args.steps} steps, seed 42, "
        f"evaluation every quarter), one at a time in both cases; OMP_NUM_THREADS={args.threads} on both sides "
        f"(the trial holds {args.threads} CPU).",
        "",
        "| | wall (s) | per trial (s) |",
        "|---|---|---|",
        f"| back to back, `kdqat train` x{args.k} | {d_total:.1f} | " + ", ".join(f"{t:.1f}" for t in direct) + " |",
        f"| `kdqat sweep` (local Ray start + Tune, max_concurrent 1) | {ray_total:.1f} | "
        + ", ".join(f"{t:.1f}" for t in trial_times)
        + " (trial start to metrics.json) |",
        "",
        f"Overhead: **{overhead * 100:+.1f}%** ({ray_total - d_total:+.1f} s over {args.k} trials; "
        f"target <= 15% for ~1-minute trials).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        path = Path(args.append)
        new = not path.exists()
        with open(path, "a") as f:  # append only: other sections belong to other benchmarks
            f.write(("# Benchmark results\n" if new else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
