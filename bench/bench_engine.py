"""Distributed engine benchmark: KD-QAT step time and per-rank memory, ZeRO-3 teacher vs replicated.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_engine.py            # MiniLM, 1 and 2 ranks, appends
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_engine.py --ranks 1 2 --steps 6 --no-append

For every (ranks, teacher) pair the driver launches ``torchrun --standalone --nproc_per_node N`` on this
file in worker mode. Each worker builds the real Trainer (student: ZeRO-2 DeepSpeed engine with the
default W2 E2 A8 fake quantization; teacher: ZeRO-3 engine or a replicated frozen copy), runs warm-up
steps, then times KD-QAT steps (student forward, streamed teacher forward, losses, backward, optimizer
step; no evaluation) and reports this rank's memory. The global batch is the same at every world size.
The teacher is MiniLM-L6 with a fresh 2-label head saved once (a valid teacher for timing).

Results (a markdown section with machine, date and load) are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    """Resident set size now, after returning freed heap pages to the OS (glibc keeps them otherwise,
    so a model loaded and freed would still count)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- worker (one rank)


def worker(args) -> None:
    import torch

    from kdqat_dist.config import load_config
    from kdqat_dist.data.loaders import Collator
    from kdqat_dist.data.sampling import micro_batches
    from kdqat_dist.engine.loop import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(
        None,
        [
            f"teacher.path={args.teacher}",
            f"train.output_dir={args.out}",
            "data.task=demo",
            "data.demo_size=2000",
            f"data.max_seq_length={args.seq}",
            f"train.batch_size={args.batch}",
            "train.grad_accum=1",
            f"train.max_steps={args.warmup + args.steps}",
            "train.progress=false",
            "engine.backend=deepspeed",
            "engine.zero_stage=2",
            f"engine.teacher={args.teacher_mode}",
            f"data.cache_dir={args.out}/tok",
        ],
    )
    trainer = Trainer(cfg, "train").setup()
    trainer.collate = Collator(trainer.tokenizer, pad_to_multiple_of=args.seq)  # every batch: seq tokens
    be = trainer.backend
    rss_after_setup = _rss_mib()
    times = []
    batches = micro_batches(len(trainer.train_set), cfg.train.batch_size, 1, be.rank, be.world_size, cfg.train.seed, 0)
    trainer.student.train()
    for i in range(args.warmup + args.steps):
        _, micro = next(batches)
        be.barrier()
        t0 = time.perf_counter()
        for idx in micro:
            out = trainer.loss(trainer._batch(idx))
            be.backward(out.total)
            be.step()
        be.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mem = be.memory_report()
    mem.update(
        rss_after_setup_mib=rss_after_setup,
        rss_end_mib=_rss_mib(),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    record = {
        "rank": be.rank,
        "world_size": be.world_size,
        "teacher": args.teacher_mode,
        "step_s": times,
        "memory": mem,
        "loss": float(out.total.detach()),
    }
    Path(args.out, f"rank{be.rank}.json").write_text(json.dumps(record, indent=2))
    trainer.cleanup()


# --------------------------------------------------------------------------- driver


def make_teacher(root: Path) -> Path:
    """MiniLM-L6 with a fresh 2-label head, saved once (a valid teacher for timing)."""
    out = root / "minilm_teacher"
    if (out / "config.json").exists():
        return out
    import torch

    from kdqat_dist.models.encoders import load_classifier, load_tokenizer

    torch.manual_seed(0)
    load_classifier("minilm", 2).save_pretrained(out)
    load_tokenizer("minilm").save_pretrained(out)
    return out


def launch(args, teacher: Path, ranks: int, mode: str) -> list[dict]:
    out = args.workdir / f"r{ranks}_{mode}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads_per_rank), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        __file__,
        "--worker",
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--teacher-mode",
        mode,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench run ranks={ranks} teacher={mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    print(f"ranks={ranks} teacher={mode}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return recs


def summarize(results: dict[tuple[int, str], list[dict]]) -> list[dict]:
    rows = []
    for (ranks, mode), recs in sorted(results.items()):
        # a step ends when the slowest rank ends: take the max over ranks of each step, then the median
        per_step = sorted(max(r["step_s"][i] for r in recs) for i in range(len(recs[0]["step_s"])))
        m = [r["memory"] for r in recs]
        rows.append(
            {
                "ranks": ranks,
                "teacher": mode,
                "step_s": per_step[len(per_step) // 2],
                "step_min_s": per_step[0],
                "teacher_param_mib": max(x["teacher_param_mib"] for x in m),
                "student_param_mib": max(x["param_mib"] for x in m),
                "grad_mib": max(x["grad_mib"] for x in m),
                "optim_mib": max(x["optim_mib"] for x in m),
                "master_mib": max(x["master_mib"] for x in m),
                "rss_end_mib": max(x["rss_end_mib"] for x in m),
                "peak_rss_mib": max(x["peak_rss_mib"] for x in m),
            }
        )
    return rows


def markdown(rows: list[dict], args, load_before: tuple, load_after: tuple) -> str:
    date = dt.date.today().isoformat()
    cpu = _cpu_name()
    lines = [
        f"## Distributed engine: ZeRO-2 student + ZeRO-3 vs replicated teacher, MiniLM-L6 "
        f"(`bench/bench_engine.py`, {date})",
        "",
        f"Machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, torch CPU build, gloo; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared with other work).",
        f"Workload: KD-QAT steps of MiniLM-L6 (22.7 M params) student (W2 TWN, E2 row TWN, A8) from a "
        f"MiniLM-L6 teacher, global batch {args.batch} x {args.seq} tokens (demo task sentences padded to "
        f"{args.seq}), ZeRO-2 student with torch AdamW, fp32; {args.warmup} warm-up + {args.steps} timed "
        f"steps (a step ends when the slowest rank ends; median and fastest of the timed steps); "
        f"{args.threads_per_rank} thread(s) per rank. Memory: this rank's bytes, max over ranks.",
        "",
        "| ranks | teacher | step median (s) | step min (s) | teacher params / rank (MiB) "
        "| student params (MiB) | grads (MiB) | Adam state (MiB) | fp32 master (MiB) "
        "| RSS after steps, heap trimmed (MiB) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['teacher']} | {r['step_s']:.2f} | {r['step_min_s']:.2f} | "
            f"{r['teacher_param_mib']:.1f} | "
            f"{r['student_param_mib']:.1f} | {r['grad_mib']:.1f} | {r['optim_mib']:.1f} | "
            f"{r['master_mib']:.1f} | {r['rss_end_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    lines.append("")
    by = {(r["ranks"], r["teacher"]): r for r in rows}
    for n in sorted({r["ranks"] for r in rows} - {1}):
        if (1, "zero3") in by and (n, "zero3") in by:
            one, many = by[(1, "zero3")]["teacher_param_mib"], by[(n, "zero3")]["teacher_param_mib"]
            ok = many <= one / n * 1.10
            lines.append(
                f"- ZeRO-3 teacher parameters per rank at {n} ranks: {many:.1f} MiB = "
                f"{many / one:.3f} x one rank's {one:.1f} MiB (target <= 1/{n} + 10% = "
                f"{1.1 / n:.3f}): **{'met' if ok else 'NOT met'}**."
            )
        if (n, "zero3") in by and (n, "replicated") in by:
            z, rep = by[(n, "zero3")], by[(n, "replicated")]
            lines.append(
                f"- At {n} ranks, ZeRO-3 vs replicated teacher: step {z['step_s'] / rep['step_s']:.2f}x "
                f"the time; RSS after steps {z['rss_end_mib'] - rep['rss_end_mib']:+.0f} MiB per rank."
            )
    lines.append(
        "- Columns: parameter, Adam-state and fp32-master bytes are the tensors this rank owns; grads "
        "are the bytes of the buffers DeepSpeed holds this rank's gradients in at the accumulation "
        "boundary; RSS is the whole process (Python, torch, activations, DeepSpeed buffers). "
        "Timings on a shared 2-core machine are indicative."
    )
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--teacher-mode", default="zero3")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--threads-per-rank",
        type=int,
        default=1,
        help="OMP threads per rank (1: a 2-core machine shared with other jobs stays fair)",
    )
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kdqat_bench_engine")
    ap.add_argument("--no-append", action="store_true", help="print the section, do not append to RESULTS.md")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(args.workdir)
    load_before = os.getloadavg()
    results = {(n, mode): launch(args, teacher, n, mode) for n in args.ranks for mode in ("zero3", "replicated")}
    section = markdown(summarize(results), args, load_before, os.getloadavg())
    (args.workdir / "results.json").write_text(json.dumps({f"{k[0]}_{k[1]}": v for k, v in results.items()}, indent=2))
    print(section)
    if not args.no_append:
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
