"""Engines compared on the same KD-QAT run: PyTorch FSDP2 vs DeepSpeed ZeRO-2 / ZeRO-3, step time and per-rank memory.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_engine.py                       # 2 ranks, all three engines
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_engine.py --steps 2 --warmup 1 --seq 32 --no-write   # smoke

For every engine the driver launches ``torchrun --standalone --nproc_per_node N`` on this file in worker
mode. Each worker builds the run through the public builder (``make_backend`` + ``build_run``: the MiniLM-L6
student with the default W2 E2 A8 fake quantization, the MiniLM-L6 teacher sharded over the ranks), runs
warm-up steps, then times KD-QAT steps (student forward, streamed teacher forward, losses, backward,
optimizer step; no evaluation) and reports this rank's memory. The engines:

- ``zero2``: DeepSpeed, ZeRO-2 student (optimizer state and gradients partitioned), ZeRO-3 teacher;
- ``zero3``: DeepSpeed, ZeRO-3 student (weights partitioned too), ZeRO-3 teacher;
- ``fsdp2``: PyTorch FSDP2, student and teacher sharded per Transformer layer (ZeRO-3's sharding).

The global batch, data and seed are the same for every engine. Results go to ``bench/results/engine.md`` and
``bench/results/engine.png`` (``--no-write``: printed only).
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

from common import save_minilm_teacher

REPO = Path(__file__).resolve().parents[1]
ENGINES = {
    "zero2": ["engine.backend=deepspeed", "engine.deepspeed.zero_stage=2", "engine.deepspeed.teacher=zero3"],
    "zero3": ["engine.backend=deepspeed", "engine.deepspeed.zero_stage=3", "engine.deepspeed.teacher=zero3"],
    "fsdp2": ["engine.backend=fsdp2", "engine.fsdp2.teacher=sharded"],
}
LABELS = {
    "zero2": "DeepSpeed ZeRO-2 student, ZeRO-3 teacher",
    "zero3": "DeepSpeed ZeRO-3 student, ZeRO-3 teacher",
    "fsdp2": "FSDP2 student and teacher, per-layer shards",
}


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
    from kdqat_dist.engine.build import build_run, make_backend

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
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
            "train.dropout=0",  # the same arithmetic on every engine (dropout masks would follow each RNG use)
            f"data.cache_dir={args.out}/tok",
            *ENGINES[args.engine],
        ],
    )
    backend = make_backend(cfg)
    run = build_run(cfg, backend)
    ranks = backend.ranks
    collate = Collator(run.tokenizer, pad_to_multiple_of=args.seq)  # every batch: seq tokens
    rss_after_setup = _rss_mib()
    t = cfg.train
    batches = micro_batches(len(run.train_set), t.batch_size, 1, ranks.rank, ranks.world_size, t.seed, 0)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        _, (idx,) = next(batches)
        batch = {k: v.to(backend.device) for k, v in collate([run.train_set[j] for j in idx]).items()}
        ranks.barrier()
        t0 = time.perf_counter()
        run.student.train()
        with backend.autocast():
            out = run.objective(run.student, run.teacher, batch)
        backend.backward(out.total)
        backend.step()
        ranks.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(out.total.detach()))
    mem = backend.memory_report()
    mem.update(
        rss_after_setup_mib=rss_after_setup,
        rss_end_mib=_rss_mib(),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    record = {
        "rank": ranks.rank,
        "world_size": ranks.world_size,
        "engine": args.engine,
        "step_s": times,
        "losses": losses,
        "memory": mem,
    }
    Path(args.out, f"rank{ranks.rank}.json").write_text(json.dumps(record, indent=2))
    backend.teardown()


# --------------------------------------------------------------------------- driver


def launch(args, teacher: Path, ranks: int, engine: str) -> list[dict]:
    out = args.workdir / f"r{ranks}_{engine}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads_per_rank),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
    )
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(ranks), __file__, "--worker"]
    cmd += ["--teacher", str(teacher), "--out", str(out), "--engine", engine, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench run ranks={ranks} engine={engine} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    print(f"ranks={ranks} engine={engine}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return recs


def summarize(results: dict[tuple[int, str], list[dict]]) -> list[dict]:
    rows = []
    for (ranks, engine), recs in results.items():
        # a step ends when the slowest rank ends: take the max over ranks of each step, then the median
        per_step = sorted(max(r["step_s"][i] for r in recs) for i in range(len(recs[0]["step_s"])))
        m = [r["memory"] for r in recs]
        rows.append(
            {
                "ranks": ranks,
                "engine": engine,
                "step_s": per_step[len(per_step) // 2],
                "step_min_s": per_step[0],
                "loss_first": recs[0]["losses"][0],
                "loss_last": recs[0]["losses"][-1],
                **{k: max(x.get(k, 0.0) for x in m) for k in MEMORY},
            }
        )
    return rows


MEMORY = (
    "param_mib",
    "master_mib",
    "grad_mib",
    "optim_mib",
    "teacher_param_mib",
    "rss_after_setup_mib",
    "rss_end_mib",
    "peak_rss_mib",
)


def markdown(rows: list[dict], args, load: tuple[float, float], command: str) -> str:
    date = dt.date.today().isoformat()
    lines = [
        "# Engines: PyTorch FSDP2 vs DeepSpeed ZeRO-2 / ZeRO-3 (`bench/bench_engine.py`)",
        "",
        f"- Command: `{command}`",
        f"- Machine: 2-core AVX2 CPU, no GPU ({_cpu_name()}, {os.cpu_count()} CPUs, torch CPU build, gloo); load "
        f"average {load[0]:.1f} before, {load[1]:.1f} after (the machine is shared with other work: timings "
        "are indicative; re-run the command on a quiet machine for figures to quote).",
        f"- Date: {date}.",
        f"- Workload: KD-QAT steps of a MiniLM-L6 student (22.7 M params; W2 TWN, E2 row TWN, A8) from a "
        f"MiniLM-L6 teacher, global batch {args.batch} x {args.seq} tokens (demo-task sentences padded to "
        f"{args.seq}), torch AdamW, fp32, dropout 0, the default losses (logits, hidden, attention map and "
        "output); "
        f"{args.warmup} warm-up + {args.steps} timed steps (a step ends when the slowest rank ends; median and "
        f"fastest of the timed steps); {args.threads_per_rank} thread(s) per rank. Memory: this rank's "
        "bytes, the max over ranks.",
        "",
        "| ranks | engine | step median (s) | step min (s) | student params / rank (MiB) | fp32 master (MiB) "
        "| grads (MiB) | Adam state (MiB) | teacher params / rank (MiB) | RSS after set-up (MiB) "
        "| RSS after steps (MiB) | peak RSS (MiB) | loss, step 1 | loss, last step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {LABELS[r['engine']]} | {r['step_s']:.2f} | {r['step_min_s']:.2f} | "
            f"{r['param_mib']:.1f} | {r['master_mib']:.1f} | {r['grad_mib']:.1f} | {r['optim_mib']:.1f} | "
            f"{r['teacher_param_mib']:.1f} | {r['rss_after_setup_mib']:.0f} | {r['rss_end_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} | {r['loss_first']:.6f} | {r['loss_last']:.6f} |"
        )
    lines += [
        "",
        "- Columns: parameter, fp32-master and Adam-state bytes are the tensors this rank owns (DeepSpeed keeps "
        "fp32 masters beside its module weights; FSDP2's sharded fp32 weights are the masters, so none "
        "beside them); grads: the bytes this rank holds its gradients in at the step; RSS: the whole process "
        "(Python, torch, activations, communication buffers), heap trimmed before reading.",
        "- Same run on every engine: the same data, order and weights, dropout 0. The losses of rank 0's first "
        f"micro-batch differ by at most {_spread([r['loss_first'] for r in rows]):.1e} relative between the "
        f"engines, of its last by {_spread([r['loss_last'] for r in rows]):.1e} (each engine sums in its own "
        "order, and ternary codes amplify the last bits over the steps); tests/distributed pins each engine "
        "to one process on a tiny model (1e-5 relative under ZeRO, 1e-4 under FSDP2).",
        "",
        "![step time and memory per engine](engine.png)",
    ]
    return "\n".join(lines) + "\n"


def _spread(values: list[float]) -> float:
    """The largest relative difference of any value from the first."""
    return max(abs(v - values[0]) / abs(values[0]) for v in values)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['engine']}\n{r['ranks']} ranks" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(names, [r["step_s"] for r in rows], color="#4477aa")
    a.set_ylabel("s per KD-QAT step (median)")
    a.set_title("step time")
    kinds = (("param_mib", "student params"), ("grad_mib", "grads"), ("optim_mib", "Adam state"))
    kinds += (("master_mib", "fp32 master"), ("teacher_param_mib", "teacher params"))
    bottom = [0.0] * len(rows)
    for key, label in kinds:
        vals = [r[key] for r in rows]
        b.bar(names, vals, bottom=bottom, label=label)
        bottom = [x + y for x, y in zip(bottom, vals, strict=True)]
    b.set_ylabel("MiB per rank (max over ranks)")
    b.set_title("tensors a rank owns")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    ap.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=6)
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
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="engine.md and engine.png here")
    ap.add_argument("--no-write", action="store_true", help="print the table, write nothing under bench/results")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    command = "HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_engine.py " + " ".join(sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    teacher = save_minilm_teacher(args.workdir / "minilm_teacher")
    load_before = os.getloadavg()[0]
    results = {(n, e): launch(args, teacher, n, e) for n in args.ranks for e in args.engines}
    rows = summarize(results)
    section = markdown(rows, args, (load_before, os.getloadavg()[0]), command.strip())
    (args.workdir / "results.json").write_text(json.dumps({f"{k[0]}_{k[1]}": v for k, v in results.items()}, indent=2))
    print(section)
    if not args.no_write:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "engine.md").write_text(section)
        plot(rows, args.results / "engine.png")
        print(f"wrote {args.results / 'engine.md'} and {args.results / 'engine.png'}")


if __name__ == "__main__":
    main()
