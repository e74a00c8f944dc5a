"""GPU check (issue #17 item 3): KD-QAT of a BERT-large-shaped student, on one device, under both engines.

    python bench/gpu_check.py --out gpu_check_out            # one GPU: BERT-large shape, bf16, < 10 min
    python bench/gpu_check.py --out /tmp/gc --tiny           # any machine: 2 layers, hidden 64, seconds

Teacher and student are a ``BertConfig`` with random weights (24 layers, hidden 1024, 16 heads, FFN 4096;
no hub, no data download), saved once to a temporary folder with a word-level tokenizer and loaded from it
as ``kdqat train`` loads a teacher. Every variant is built by the public builder at world size 1
(``make_backend`` + ``build_run``, exactly as the training loop builds a run): DeepSpeed with
``kdqat_dist/ds_configs/zero{stage}.json`` resolved from the run config (precision, batch, optimizer), or PyTorch FSDP2;
the student built from the teacher's checkpoint, fake-quantized (the default W2 E2 A8) and calibrated, the
teacher frozen in the engine's precision (replicated, or ``--teacher zero3``: partitioned / sharded), both
on the kdqat attention, and the KD objective. Batches are random token ids, every position a real token.

Variants (each in turn in this process, its own engine, torn down after):

- ``kd_streaming``: KD-QAT with the streaming objective (``distill.recompute_teacher=true``, the default)
  and the default terms (logits, hidden, attention map, attention output), under DeepSpeed;
- ``kd_streaming_fsdp2``: the same under FSDP2 (student and teacher sharded per layer; at world size 1
  the shards are whole), so one GPU run compares the engines;
- ``fp_finetune``: the same student trained on the labels, no fake quantization, no teacher;
- ``qat_no_kd``: fake-quantized student on the labels, no teacher held (the memory baseline);
- ``kd_naive``: the same KD objective computed the naive way (``DistillObjective.naive``: every tap of
  both models materialised, then the losses; there is no config key for it, the method is public);
- ``curve_bf16`` / ``curve_fp32``: KD-QAT for ``--steps`` steps, dropout 0, same seed, weights and
  batches, in bf16 and in fp32; the figure is the largest relative difference of the two loss curves.

Figures: median step time after ``--warmup`` steps (CUDA-synchronised), tokens/s, MFU = achieved
FLOP/s / peak, with per token 2·N_teacher (teacher forward) + 6·N_student (student forward and backward),
N counting every parameter (embeddings included, as issue #17 asks; ``mfu_non_embedding`` leaves the
embeddings out). Peak bf16 FLOP/s comes from a table by GPU name (dense, no sparsity), ``--peak-tflops``,
or, for a device not in the table (and on a CPU), a measured matmul. Peak memory is
``torch.cuda.max_memory_allocated`` over a variant's steps on a GPU; on a CPU it is the peak of the live
tensor storages (weights, optimizer state and activations) over one extra step under a dispatch mode
(``common.LiveTensors``), the CPU analogue (RSS cannot be reset between variants in one process); the
FSDP2 variant's sharded tensors are not traced there, so on a CPU it has a time and no memory figure.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``; prints the table, each target with pass/miss.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import LiveTensors

# bf16 dense tensor-core peak (TFLOP/s) by a substring of torch.cuda.get_device_name(); first match wins,
# so the longer names come before their prefixes (A100 before A10, L40S before L4).
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("L4", 121.0),
)
TARGETS = {"mfu": 0.40, "kd_over_fp": 1.4, "streaming_over_qat": 1.1}


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq: int
    batch: int
    vocab: int


FULL = Shape(layers=24, hidden=1024, heads=16, ffn=4096, seq=128, batch=128, vocab=30522)
TINY = Shape(layers=2, hidden=64, heads=2, ffn=128, seq=32, batch=8, vocab=1000)


@dataclass
class VariantResult:
    name: str
    precision: str
    step_s: float
    step_s_all: list[float]
    losses: list[float]
    peak_mib: float | None  # the largest allocation seen: weights, optimizer state and buffers included
    working_mib: float | None  # the largest rise above what was allocated when a step began (activations)
    params_student: int
    params_teacher: int
    teacher_dtype: str = ""
    engine: str = "deepspeed"
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- models and data


def save_random_bert(folder: Path, shape: Shape, seed: int = 0) -> Path:
    """A BERT classifier with random weights (BertConfig of ``shape``) and a word-level tokenizer (ids below
    the vocabulary size), saved as a teacher folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from kdqat_dist.models.tiny import tiny_vocab

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tiny_vocab()[: shape.vocab]) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.ffn,
        max_position_embeddings=max(512, shape.seq),
        num_labels=2,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def make_batches(shape: Shape, n: int, device, seed: int = 0) -> list[dict]:
    """``n`` batches of random token ids (all positions real) and binary labels; the same for every variant."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = min(1000, shape.vocab // 2)  # clear of BERT's special and unused ids
    out = []
    for _ in range(n):
        b = {
            "input_ids": torch.randint(low, shape.vocab, (shape.batch, shape.seq), generator=g),
            "attention_mask": torch.ones(shape.batch, shape.seq, dtype=torch.long),
            "token_type_ids": torch.zeros(shape.batch, shape.seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (shape.batch,), generator=g),
        }
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def run_config(
    model_dir: Path,
    run_dir: Path,
    shape: Shape,
    args,
    precision: str,
    steps: int,
    dropout: float | None,
    engine: str = "deepspeed",
):
    from kdqat_dist.config import load_config

    over = [
        f"teacher.path={model_dir}",
        f"model.name_or_path={model_dir}",
        f"train.output_dir={run_dir}",
        f"engine.backend={engine}",
        f"engine.precision={precision}",
        f"engine.deepspeed.zero_stage={args.zero_stage}",
        f"engine.deepspeed.teacher={args.teacher}",
        f"engine.fsdp2.teacher={'sharded' if args.teacher == 'zero3' else 'replicated'}",
        f"train.batch_size={shape.batch}",
        "train.grad_accum=1",
        f"train.max_steps={steps}",
        "train.progress=false",
        "train.seed=0",
        # the builder's data: the demo task (its first batch calibrates the activation quantizers)
        "data.task=demo",
        f"data.demo_size={max(400, 4 * shape.batch)}",
        f"data.max_seq_length={max(8, shape.seq)}",
        f"data.cache_dir={run_dir.parent / 'tokenized'}",
    ]
    if dropout is not None:
        over.append(f"train.dropout={dropout}")
    return load_config(None, over)


# --------------------------------------------------------------------------- one variant


def _n_params(m) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in m.parameters())


def _persistent_tensors(student, optimizer, teacher) -> list:
    """Weights of both models and the optimizer's flat buffers and state: what the CPU tracker must count
    from the start of its step (they are alive before the first op it sees)."""
    import torch

    out = []
    for m in (student, teacher):
        if m is not None:
            out += [*m.parameters(), *m.buffers()]
    inner = getattr(optimizer, "optimizer", optimizer)
    for holder in (optimizer, inner):
        for v in vars(holder).values() if holder is not None else ():
            vals = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            for x in vals:
                xs = x if isinstance(x, (list, tuple)) else [x]
                out += [t for t in xs if isinstance(t, torch.Tensor)]
    for state in getattr(inner, "state", {}).values():
        out += [t for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return out


def run_variant(
    name: str,
    precision: str,
    model_dir: Path,
    shape: Shape,
    args,
    batches: list[dict],
    measure_memory: bool,
    dropout: float | None = None,
    engine: str = "deepspeed",
) -> VariantResult:
    """Build one variant with the public builder on ``engine``, run ``len(batches)`` steps, tear it down."""
    import torch

    from kdqat_dist.engine.build import build_run, make_backend
    from kdqat_dist.models.encoders import unwrap

    cfg = run_config(
        model_dir, Path(args.out) / "runs" / f"{name}", shape, args, precision, len(batches), dropout, engine
    )
    torch.manual_seed(0)
    backend = make_backend(cfg)
    try:
        kd = name.startswith(("kd_", "curve_"))
        run = build_run(cfg, backend, "finetune" if name == "fp_finetune" else "train", with_teacher=kd)
        student, teacher, obj = run.student, run.teacher, run.objective

        def step(batch: dict) -> float:
            student.train()
            with backend.autocast():
                if obj is None:  # labels only
                    loss = student(**batch).loss
                elif name == "kd_naive":
                    loss = obj.naive(student, teacher, batch).total
                else:
                    loss = obj(student, teacher, batch).total
            value = float(loss.detach())
            backend.backward(loss)
            backend.step()
            return value

        cuda = backend.device.type == "cuda"
        times, losses, mem = [], [], []  # mem: (peak, allocated at the start) of every step, bytes
        for batch in batches:
            if cuda:
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            losses.append(step(batch))
            if cuda:
                torch.cuda.synchronize()
                mem.append((torch.cuda.max_memory_allocated(), start))
            times.append(time.perf_counter() - t0)
        measure_memory = measure_memory and (cuda or engine != "fsdp2")  # (module docstring: no CPU trace)
        if measure_memory and not cuda:
            held = _persistent_tensors(backend.student_module(), run.optimizer, unwrap(teacher) if teacher else None)
            mem = [_cpu_live_peak(held, lambda: step(batches[0]))]
        peak = max(p for p, _ in mem) / 2**20 if measure_memory else None
        working = max(p - s for p, s in mem) / 2**20 if measure_memory else None
        timed = times[args.warmup :] or times
        return VariantResult(
            name=name,
            precision=precision,
            step_s=statistics.median(timed),
            step_s_all=times,
            losses=losses,
            peak_mib=peak,
            working_mib=working,
            params_student=_n_params(backend.student_module()),
            params_teacher=_n_params(unwrap(teacher)) if teacher is not None else 0,
            teacher_dtype=str(next(teacher.parameters()).dtype) if teacher is not None else "",
            engine=engine,
        )
    finally:
        backend.teardown()  # the caller frees the memory once this frame (models, engine) is gone


def _cpu_live_peak(held: list, one_step) -> tuple[int, int]:
    """(peak bytes of live tensor storages over one step, bytes alive when it began): ``held`` (weights and
    optimizer state) included."""
    tracker = LiveTensors()
    for t in held:
        tracker.add(t)
    start = sum(n for _, n in tracker.refs.values())
    with tracker.mode:
        one_step()
    return tracker.peak, start


# --------------------------------------------------------------------------- peak FLOP/s


def peak_tflops(device, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): --peak-tflops, the table by GPU name, or a measured matmul."""
    import torch

    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_TFLOPS:
            if key in gpu:
                return value, f"table: {key} bf16 dense"
        return _measured_matmul_tflops(device, torch.bfloat16), f"measured bf16 matmul ({gpu} not in the table)"
    return _measured_matmul_tflops(device, torch.float32), "measured fp32 matmul (CPU: no table entry)"


def _measured_matmul_tflops(device, dtype) -> float:
    import torch

    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(10):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


# --------------------------------------------------------------------------- report


def summarise(
    results: dict[str, VariantResult],
    shape: Shape,
    peak: float,
    peak_source: str,
    non_embedding: tuple[int, int],
    device_name: str,
    cuda: bool,
    tiny: bool,
    args,
    wall_s: float,
) -> dict:
    kd, fp, qat, naive = (results[k] for k in ("kd_streaming", "fp_finetune", "qat_no_kd", "kd_naive"))
    tokens = shape.batch * shape.seq
    flops = tokens * (2 * kd.params_teacher + 6 * kd.params_student)
    flops_ne = tokens * (2 * non_embedding[0] + 6 * non_embedding[1])
    achieved = flops / kd.step_s / 1e12
    b16, f32 = results.get("curve_bf16"), results.get("curve_fp32")
    curve: dict = {
        "steps": len(b16.losses) if b16 else 0,
        "bf16": b16.losses if b16 else None,
        "fp32": f32.losses if f32 else None,
    }
    if b16 and f32:
        curve["max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(b16.losses, f32.losses, strict=True))
    else:
        curve["max_rel_diff"] = None
        curve["note"] = results.get("_bf16_skip_note", "bf16 not run")
    mfu = achieved / peak
    figures = {
        "kd_step_s": kd.step_s,
        "fp_step_s": fp.step_s,
        "qat_step_s": qat.step_s,
        "naive_step_s": naive.step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / kd.step_s,
        "flops_per_step": flops,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": mfu,
        "mfu_non_embedding": flops_ne / kd.step_s / 1e12 / peak,
        "fp_mfu": tokens * 6 * fp.params_student / fp.step_s / 1e12 / peak,
        "kd_over_fp": kd.step_s / fp.step_s,
    }
    fsdp2 = results.get("kd_streaming_fsdp2")
    if fsdp2 is not None:  # the same KD-QAT step under the other engine
        figures["fsdp2_kd_step_s"] = fsdp2.step_s
        figures["fsdp2_over_deepspeed"] = fsdp2.step_s / kd.step_s
    mem = {
        "method": "torch.cuda.max_memory_allocated"
        if cuda
        else "peak live tensor storages over one step (TorchDispatchMode; not RSS)",
        "kd_streaming_mib": kd.peak_mib,
        "qat_no_kd_mib": qat.peak_mib,
        "kd_naive_mib": naive.peak_mib,
        "streaming_over_qat": kd.peak_mib / qat.peak_mib,
        "streaming_over_naive": kd.peak_mib / naive.peak_mib,
        # the rise above what was allocated when a step began: the activations, without weights and state
        "kd_streaming_working_mib": kd.working_mib,
        "qat_no_kd_working_mib": qat.working_mib,
        "kd_naive_working_mib": naive.working_mib,
        "working_streaming_over_qat": kd.working_mib / qat.working_mib,
        "working_streaming_over_naive": kd.working_mib / naive.working_mib,
        "zero2_grad_bucket_mib": _grad_bucket_mib(Path(args.out) / "runs" / "kd_streaming"),
        "kd_streaming_fsdp2_mib": fsdp2.peak_mib if fsdp2 is not None else None,
    }
    targets = {
        "mfu": {"value": mfu, "target": f">= {TARGETS['mfu']:.2f}", "pass": mfu >= TARGETS["mfu"]},
        "kd_over_fp": {
            "value": figures["kd_over_fp"],
            "target": f"<= {TARGETS['kd_over_fp']}",
            "pass": figures["kd_over_fp"] <= TARGETS["kd_over_fp"],
        },
        "streaming_over_qat": {
            "value": mem["streaming_over_qat"],
            "target": f"<= {TARGETS['streaming_over_qat']}",
            "pass": mem["streaming_over_qat"] <= TARGETS["streaming_over_qat"],
        },
    }
    import deepspeed
    import torch
    import transformers

    return {
        "date": dt.date.today().isoformat(),
        "device": device_name,
        "tiny": tiny,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "shape": asdict(shape),
        "steps": args.steps,
        "warmup": args.warmup,
        "zero_stage": args.zero_stage,
        "teacher_mode": args.teacher,
        "precision": "bf16",
        "params": {
            "teacher": kd.params_teacher,
            "student": kd.params_student,
            "teacher_non_embedding": non_embedding[0],
            "student_non_embedding": non_embedding[1],
        },
        "figures": figures,
        "memory": mem,
        "loss_curves": curve,
        "targets": targets,
        "variants": {k: asdict(v) for k, v in results.items() if isinstance(v, VariantResult)},
        "wall_s": wall_s,
    }


def _grad_bucket_mib(run_dir: Path) -> float:
    """MiB of the bf16 gradient bucket ZeRO-2 with contiguous_gradients allocates at every backward (its
    ``reduce_bucket_size`` elements, from the resolved config); 0 for other stages."""
    z = json.loads((run_dir / "ds_config_student.json").read_text()).get("zero_optimization", {})
    if z.get("stage") != 2 or not z.get("contiguous_gradients"):
        return 0.0
    return float(z.get("reduce_bucket_size", 5e8)) * 2 / 2**20


def _fsdp2_rows(f: dict, m: dict) -> list[tuple[str, str, str]]:
    """The FSDP2 variant's rows of the table (none when it did not run)."""
    if "fsdp2_kd_step_s" not in f:
        return []
    peak = m.get("kd_streaming_fsdp2_mib")
    return [
        ("KD-QAT step, FSDP2", f"{f['fsdp2_kd_step_s'] * 1e3:.1f} ms", "the same step under FSDP2"),
        ("FSDP2 step / DeepSpeed step", f"{f['fsdp2_over_deepspeed']:.2f}x", ""),
        ("peak mem, streaming KD, FSDP2", "-" if peak is None else f"{peak:.1f} MiB", "" if peak else "GPU only"),
    ]


def render(r: dict) -> str:
    f, m, c, t = r["figures"], r["memory"], r["loss_curves"], r["targets"]

    def mark(key: str) -> str:
        return ("pass" if t[key]["pass"] else "MISS") + f" (target {t[key]['target']})"

    s = r["shape"]
    rows = [
        ("KD-QAT step (streaming)", f"{f['kd_step_s'] * 1e3:.1f} ms", ""),
        ("tokens/s (KD-QAT)", f"{f['tokens_per_s']:,.0f}", ""),
        ("model FLOP/step", f"{f['flops_per_step'] / 1e9:,.2f} GFLOP", "2N_t + 6N_s per token"),
        ("achieved", f"{f['achieved_tflops']:.3f} TFLOP/s", ""),
        ("peak", f"{f['peak_tflops']:.1f} TFLOP/s", f["peak_source"]),
        ("MFU", f"{f['mfu'] * 100:.1f}%", mark("mfu")),
        ("MFU, embeddings left out", f"{f['mfu_non_embedding'] * 100:.1f}%", ""),
        ("FP fine-tune step", f"{f['fp_step_s'] * 1e3:.1f} ms", f"MFU {f['fp_mfu'] * 100:.1f}% (6N_s)"),
        ("QAT without KD step", f"{f['qat_step_s'] * 1e3:.1f} ms", ""),
        ("naive KD step", f"{f['naive_step_s'] * 1e3:.1f} ms", ""),
        ("KD step / FP step", f"{f['kd_over_fp']:.2f}x", mark("kd_over_fp")),
        ("peak mem, streaming KD", f"{m['kd_streaming_mib']:.1f} MiB", ""),
        ("peak mem, QAT without KD", f"{m['qat_no_kd_mib']:.1f} MiB", ""),
        ("peak mem, naive KD", f"{m['kd_naive_mib']:.1f} MiB", ""),
        ("streaming / QAT-no-KD peak", f"{m['streaming_over_qat']:.2f}x", mark("streaming_over_qat")),
        ("streaming / naive peak", f"{m['streaming_over_naive']:.2f}x", ""),
        ("step working mem, streaming", f"{m['kd_streaming_working_mib']:.1f} MiB", "peak - allocated at step start"),
        ("step working mem, QAT-no-KD", f"{m['qat_no_kd_working_mib']:.1f} MiB", ""),
        ("step working mem, naive KD", f"{m['kd_naive_working_mib']:.1f} MiB", ""),
        (
            "working: streaming / QAT, / naive",
            f"{m['working_streaming_over_qat']:.2f}x, {m['working_streaming_over_naive']:.2f}x",
            "",
        ),
        *_fsdp2_rows(f, m),
        (
            f"bf16 vs fp32 loss, {c['steps']} steps",
            "skipped" if c["max_rel_diff"] is None else f"{c['max_rel_diff']:.2e}",
            c.get("note", "max relative difference"),
        ),
    ]
    head = (
        f"GPU check: {r['device']}{' (tiny)' if r['tiny'] else ''}; BERT {s['layers']}L/{s['hidden']}H/"
        f"{s['heads']}A/FFN {s['ffn']}, batch {s['batch']} x seq {s['seq']}, bf16, DeepSpeed ZeRO-"
        f"{r['zero_stage']} student (and FSDP2), {r['teacher_mode']} teacher, world size 1; "
        f"N_t={r['params']['teacher']:,}"
        f" N_s={r['params']['student']:,}; memory: {m['method']}; {r['date']}, {r['wall_s']:.0f} s"
    )
    w0, w1 = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
    lines = [head, "", f"| {'figure':<{w0}} | {'value':>{w1}} | note |", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|---|"]
    lines += [f"| {a:<{w0}} | {b:>{w1}} | {n} |" for a, b, n in rows]
    if r["tiny"]:
        lines += ["", "Tiny size: the targets are for the BERT-large run on a GPU; here they only show the code runs."]
    if m["zero2_grad_bucket_mib"]:
        lines += [
            "",
            f"Every variant's peak includes the {m['zero2_grad_bucket_mib']:.0f} MiB gradient bucket ZeRO-2 "
            "allocates at each backward (reduce_bucket_size in kdqat_dist/ds_configs/zero2.json); "
            "--zero-stage 0 has none.",
        ]
    notes = sorted({n for v in r["variants"].values() for n in v["notes"]})
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the run configs")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64 (the default without CUDA)")
    ap.add_argument("--batch", type=int, help="sequences per step (default 128 full size, 8 tiny)")
    ap.add_argument("--seq", type=int, help="sequence length (default 128 full size, 32 tiny)")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant (and of the loss curves)")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s of the device for the MFU")
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="student ZeRO stage")
    ap.add_argument("--teacher", default="replicated", choices=("replicated", "zero3"))
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must be larger than --warmup {args.warmup}")
    return args


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # as `kdqat` does: DeepSpeed's CPU accelerator, said up front
    _quiet()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    shape = TINY if tiny else FULL
    shape = Shape(**{**asdict(shape), **{k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v}})
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "runs").exists():
        shutil.rmtree(out / "runs")  # the resolved DeepSpeed configs of an earlier check
    batches = make_batches(shape, args.steps, device)
    tmp = Path(tempfile.mkdtemp(prefix="kdqat_gpu_check_"))
    results: dict = {}
    try:
        model_dir = save_random_bert(tmp / "bert", shape)
        for name in ("kd_streaming", "fp_finetune", "qat_no_kd", "kd_naive"):
            results[name] = _variant(name, "bf16", model_dir, shape, args, batches, measure_memory=True)
        results["kd_streaming_fsdp2"] = _variant(
            "kd_streaming_fsdp2", "bf16", model_dir, shape, args, batches, measure_memory=True, engine="fsdp2"
        )
        try:
            results["curve_bf16"] = _variant("curve_bf16", "bf16", model_dir, shape, args, batches, False, 0.0)
        except (RuntimeError, NotImplementedError) as exc:  # a CPU without bf16 kernels
            results["_bf16_skip_note"] = f"bf16 not supported here: {str(exc).splitlines()[0][:160]}"
        if "curve_bf16" in results:
            results["curve_fp32"] = _variant("curve_fp32", "fp32", model_dir, shape, args, batches, False, 0.0)
        non_embedding = _non_embedding_params(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak, source = peak_tflops(device, args.peak_tflops)
    report = summarise(
        results, shape, peak, source, non_embedding, device_name, cuda, tiny, args, time.perf_counter() - t_start
    )
    text = render(report)
    print(text)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(text + "\n")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return report


def _variant(*args, **kwargs) -> VariantResult:
    """:func:`run_variant`, then its memory freed before the next one starts; prints one progress line."""
    import torch

    r = run_variant(*args, **kwargs)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    peak = f", peak {r.peak_mib:.1f} MiB" if r.peak_mib is not None else ""
    print(f"[gpu_check] {r.name:13s} {r.precision}: {r.step_s * 1e3:9.2f} ms/step{peak}", flush=True)
    return r


def _non_embedding_params(model_dir: Path) -> tuple[int, int]:
    """Parameters outside the embeddings (teacher, student: the same architecture here), counted on the
    meta device (no memory)."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    with torch.device("meta"):
        m = BertForSequenceClassification(AutoConfig.from_pretrained(model_dir))
    n = sum(p.numel() for name, p in m.named_parameters() if ".embeddings." not in name)
    return n, n


if __name__ == "__main__":
    main()
