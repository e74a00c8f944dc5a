"""KD-QAT step cost on MiniLM (issue #4 benchmark): time per step and peak memory of

(a) plain FP fine-tuning, (b) QAT without KD, (c) KD-QAT with the streaming teacher (the default: teacher
attention blocks called again in the backward), (c2) the same keeping the teacher's block outputs and Q, K
instead (``distill.recompute_teacher=false``), (d) KD-QAT computed the naive way (all layers' taps of both
models materialised, then losses).

Each variant runs in its own process, as a training run does (its own allocator state and peak RSS).
Peak RSS includes what glibc's allocator keeps after frees, so each variant is also run once more, for
two steps, under a dispatch mode that sums the bytes of the tensor storages alive after every op,
the weights of both models included: the peak of that is the tensors' own memory, the CPU analogue of
``torch.cuda.max_memory_allocated``. Every variant is built by ``build_run``, as ``kdqat train`` builds it
(the teacher's feed-forward blocks over token slices), from MiniLM-L6 with a fresh head saved once.
The development machine's speed drifts (±20% between processes minutes apart), so the variants' processes
run in turn, ``--rounds`` times, and each variant's time is the median over its processes of their median
step. (Taking all variants' steps in turn inside one process, as this script did before, shares one
allocator between them: the KD variants then ran 5-10% slower than in their own processes.)
Usage: python bench/bench_kd_step.py [--steps 4] [--rounds 3] [--batch 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import LiveTensors, save_minilm_teacher

VARIANTS = ("a_fp_finetune", "b_qat_no_kd", "c_kdqat_streaming", "c2_kdqat_streaming_keep", "d_kdqat_naive")


def setup(variant: str, batch: int, seq: int, teacher: Path):
    """One variant built as ``kdqat train`` / ``finetune`` builds it (``build_run``, one process) from the saved
    MiniLM ``teacher``, and a batch; returns ``(step, models)`` where ``step()`` runs one training step
    (forward, backward, optimizer) and ``models`` are the modules whose weights it holds."""
    import torch

    from kdqat_dist.config import load_config
    from kdqat_dist.engine.build import build_run, make_backend

    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            f"teacher.path={teacher}",
            f"model.name_or_path={teacher}",
            "train.lr=2e-5",
            "train.max_grad_norm=0",  # the optimizer step alone, as this benchmark has always timed it
            f"train.batch_size={batch}",
            "train.max_steps=100",
            "data.task=demo",
            f"data.demo_size={max(400, 4 * batch)}",
            f"data.max_seq_length={seq}",
            "engine.backend=none",
            # logits + hidden + attention map + attention output (the defaults)
            f"distill.recompute_teacher={variant != 'c2_kdqat_streaming_keep'}",
        ],
    )
    backend = make_backend(cfg)
    # (a) and (b) hold no teacher at all, so their memory is the no-KD baseline.
    kd = variant.startswith(("c", "d"))
    run = build_run(cfg, backend, "finetune" if variant == "a_fp_finetune" else "train", with_teacher=kd)
    student, teacher_model, obj = run.student, run.teacher, run.objective
    g = torch.Generator().manual_seed(0)
    b = {
        "input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }
    b["attention_mask"][: batch // 2, seq * 3 // 4 :] = 0  # some padding, as real batches have

    def step() -> None:
        student.train()
        if obj is None:  # (a), (b): the labels only
            loss = student(**b).loss
        elif variant.startswith("c"):
            loss = obj(student, teacher_model, b).total
        else:
            loss = obj.naive(student, teacher_model, b).total
        backend.backward(loss)
        backend.step()

    models = [m for m in (student, teacher_model) if m is not None]
    return step, models


def one(variant: str, steps: int, batch: int, seq: int, teacher: Path, live: bool = False) -> dict:
    import torch

    torch.set_num_threads(2)
    step, models = setup(variant, batch, seq, teacher)
    times = []
    tracker = LiveTensors() if live else None
    if tracker is not None:  # the weights (and buffers) of both models count too
        for m in models:
            for t in (*m.parameters(), *m.buffers()):
                tracker.add(t)
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with tracker.mode if tracker is not None else contextlib.nullcontext():
            step()
        if i > 0:  # the first step pays allocator warm-up
            times.append(time.perf_counter() - t0)
    if tracker is not None:
        return {"variant": variant, "peak_live_tensor_mib": tracker.peak / 2**20}
    return {
        "variant": variant,
        "s_per_step": statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant, run in turn")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--live", action="store_true", help="with --variant: peak live tensor bytes instead")
    ap.add_argument("--teacher", type=Path, default=Path("bench/out/kd_step/minilm_teacher"), help="saved once")
    args = ap.parse_args()
    if args.variant:
        one_steps = 1 if args.live else args.steps
        print(json.dumps(one(args.variant, one_steps, args.batch, args.seq, args.teacher, args.live)))
        return
    save_minilm_teacher(args.teacher)

    def child(*extra: str) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--teacher",
                str(args.teacher),
                *extra,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            runs[v].append(child("--variant", v))
    rows = {
        v: {
            "s_per_step": statistics.median(r["s_per_step"] for r in rs),
            "s_per_step_runs": [round(r["s_per_step"], 3) for r in rs],
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
            **child("--variant", v, "--live"),
        }
        for v, rs in runs.items()
    }
    for v, r in rows.items():
        print(
            f"{v:24s} {r['s_per_step']:.3f} s/step (runs {r['s_per_step_runs']})  "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB  peak live tensors {r['peak_live_tensor_mib']:.0f} MiB"
        )
    a, b, c, c2, d = (rows[v] for v in VARIANTS)
    t, live, rss = "s_per_step", "peak_live_tensor_mib", "peak_rss_mib"
    print(f"time (c)/(a) = {c[t] / a[t]:.2f} (target <= 1.6); (d)/(c) = {d[t] / c[t]:.2f}")
    print(f"live tensors (c)/(b) = {c[live] / b[live]:.2f} (target <= 1.1), (c)/(d) = {c[live] / d[live]:.2f}")
    print(f"peak RSS (c)/(b) = {c[rss] / b[rss]:.2f} (target <= 1.1), (c)/(d) = {c[rss] / d[rss]:.2f} (target < 1)")
    print(
        f"(c2), keeping the teacher blocks: time /(a) = {c2[t] / a[t]:.2f}, live /(b) = {c2[live] / b[live]:.2f}, "
        f"RSS /(b) = {c2[rss] / b[rss]:.2f}"
    )


if __name__ == "__main__":
    main()
