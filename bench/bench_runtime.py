"""The deployed student against the teacher (issue #31): latency, throughput, peak memory, file size, accuracy.

Rows: torch FP32 teacher, torch fake-quant student, ONNX Runtime FP32 teacher (``torch.onnx.export`` of the
teacher, the same tracer as the student's), ONNX Runtime int8 student (``kdqat export --format onnx``) and
the 2-bit MatMulNBits layout (``--weights 2bit``). Columns, per batch size x sequence length x threads:
median latency of one batch, throughput (sequences/s) and its ratio to the torch FP32 teacher, the worker
process's peak resident memory, the model file's size, and accuracy on the SST-2 holdout (the last 2,000
rows of ../shared/data/sst2/train.tsv, bench/sst2_data.py's ``teacher/dev.tsv``) with the agreement of each
ONNX student's predictions with the fake-quant student's.

Latency is the median of one batch's repeated runs; each cell is measured ``--rounds`` times with the models
interleaved, and the round with the lowest median counts (on a shared CPU another job can slow one model's
whole measurement); throughput and its ratios come from that latency. Every measurement runs in its own
process (``--worker``) that imports only what that runtime needs (torch +
transformers for the torch rows; onnxruntime + numpy for the ONNX rows) and reads pre-tokenized batches,
so its peak RSS is what serving that model costs. Speed batches are real holdout rows padded or cut to
exactly L tokens; the accuracy pass batches the holdout in file order (32 rows, padded to the longest row,
at most 64 tokens: as `kdqat eval` scores it, so the fake-quant student's numbers are the training run's).

Usage (the artifacts are built once under --out):
    python bench/bench_runtime.py --teacher bench/out/acc/teacher/model --student bench/out/deploy/student/student
    python bench/bench_runtime.py ... --quick          # batch 32 x 64 tokens, 2 threads, 200 holdout rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HOLDOUT = HERE / "out" / "sst2" / "teacher" / "dev.tsv"
KINDS = ("torch_fp32_teacher", "torch_fakequant_student", "ort_fp32_teacher", "ort_int8_student", "ort_2bit_student")
LABELS = {
    "torch_fp32_teacher": "torch FP32 teacher",
    "torch_fakequant_student": "torch fake-quant student",
    "ort_fp32_teacher": "ORT FP32 teacher",
    "ort_int8_student": "ORT int8 student",
    "ort_2bit_student": "ORT 2-bit (MatMulNBits) student",
}
EVAL_BATCH, EVAL_LEN = 32, 64


# --------------------------------------------------------------------------- worker (one process each)


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike getrusage's ru_maxrss, which a
    subprocess inherits from the forked copy of its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _runner(kind: str, path: str, threads: int):
    """A callable batch -> logits (numpy) for ``kind``, loaded the way a server would load it."""
    if kind.startswith("ort_"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # as kdqat's own sessions
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return lambda batch: sess.run(None, {n: batch[n] for n in names})[0]
    import torch

    torch.set_num_threads(threads)
    if kind == "torch_fp32_teacher":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    else:
        from kdqat_dist.quant.student import load_student

        model = load_student(path).eval()

    def run(batch):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()

    return run


def worker(spec: dict) -> dict:
    """Time one model on one batch shape, or predict a list of batches; prints a JSON line."""
    run = _runner(spec["kind"], spec["path"], spec["threads"])
    data = np.load(spec["inputs"])
    if spec["mode"] == "speed":
        batch = {k: data[k] for k in data.files}
        run(batch)  # warm-up (ORT's first run allocates its arenas, torch's its caches)
        times, cpu, t_end = [], [], time.perf_counter() + spec["seconds"]
        while len(times) < spec["min_reps"] or (time.perf_counter() < t_end and len(times) < spec["max_reps"]):
            t0, c0 = time.perf_counter(), time.process_time()
            run(batch)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return {
            "latency_s": statistics.median(times),
            "min_s": min(times),
            "cpu_s": statistics.median(cpu),  # all threads' CPU time (ONNX Runtime's spinning threads included)
            "reps": len(times),
            "peak_rss_mib": _peak_rss_mib(),
        }
    preds = []
    for i in range(int(data["n_batches"])):
        batch = {k: data[f"{k}_{i}"] for k in ("input_ids", "attention_mask", "token_type_ids")}
        preds.append(run(batch).argmax(-1))
    return {"preds": np.concatenate(preds).tolist(), "peak_rss_mib": _peak_rss_mib()}


# --------------------------------------------------------------------------- orchestration


def _tokenize(tokenizer, texts: list[str], length: int | None, pad_to_length: bool) -> dict[str, np.ndarray]:
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=length,
        padding="max_length" if pad_to_length else "longest",
        return_tensors="np",
    )
    out = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    out["token_type_ids"] = enc.get("token_type_ids", np.zeros_like(out["input_ids"])).astype(np.int64)
    return out


def _holdout(path: Path, limit: int | None) -> tuple[list[str], np.ndarray]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    rows = [ln.split("\t") for ln in lines[1:] if ln]
    rows = rows[:limit] if limit else rows
    return [r[head.index("sentence")] for r in rows], np.array([int(r[head.index("label")]) for r in rows])


def build_artifacts(args, out: Path) -> dict[str, Path]:
    """The ONNX files (built once): the teacher's FP32 graph, the student's int8 and 2-bit exports."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from kdqat_dist.export.onnx_export import _trace, export_onnx, input_names

    paths = {
        "torch_fp32_teacher": Path(args.teacher),
        "torch_fakequant_student": Path(args.student),
        "ort_fp32_teacher": out / "teacher_fp32" / "model.onnx",
        "ort_int8_student": out / "student_int8" / "model.onnx",
        "ort_2bit_student": out / "student_2bit" / "model.onnx",
    }
    if not paths["ort_fp32_teacher"].exists():
        paths["ort_fp32_teacher"].parent.mkdir(parents=True, exist_ok=True)
        teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher, attn_implementation="eager")
        with torch.no_grad():
            _trace(teacher.eval(), paths["ort_fp32_teacher"], input_names(teacher.config))
    for kind, weights in (("ort_int8_student", "int8"), ("ort_2bit_student", "2bit")):
        if not paths[kind].exists():
            t0 = time.perf_counter()
            report = export_onnx(args.student, paths[kind].parent, weights=weights)
            print(f"[bench] {kind}: exported in {time.perf_counter() - t0:.0f} s; " + "; ".join(report.lines()))
    return paths


def _spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"[bench] worker {spec['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default="bench/out/acc/teacher/model")
    ap.add_argument("--student", default="bench/out/deploy/student/student")
    ap.add_argument("--holdout", default=str(HOLDOUT))
    ap.add_argument("--out", default="bench/out/runtime")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--seconds", type=float, default=4.0, help="timing budget per cell and round (>= 5 repetitions)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="times each cell is measured, the models interleaved; a cell's latency is its least disturbed "
        "round's (on a shared CPU another job can slow one model's whole measurement)",
    )
    ap.add_argument("--eval-rows", type=int, default=None, help="holdout rows scored (default: all 2,000)")
    ap.add_argument("--quick", action="store_true", help="batch 32 x 64 tokens, 2 threads, 200 holdout rows")
    ap.add_argument(
        "--speed-only", action="store_true", help="keep the accuracy, agreement and sizes of <out>/results.json"
    )
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.batches, args.lengths, args.threads, args.eval_rows = [32], [64], [2], args.eval_rows or 200
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = build_artifacts(args, out)
    from kdqat_dist.models.encoders import load_tokenizer

    tokenizer = load_tokenizer(args.student)
    texts, labels = _holdout(Path(args.holdout), args.eval_rows)

    if args.speed_only:
        previous = json.loads((out / "results.json").read_text())
        results = {k: previous[k] for k in ("accuracy", "file_mb", "agreement") if k in previous}
        results["speed"] = []
        _speed(args, out, paths, tokenizer, texts, results)
        return
    # accuracy: the holdout in file order, EVAL_BATCH rows per batch, at most EVAL_LEN tokens
    eval_file = out / f"eval_{len(texts)}.npz"
    starts = range(0, len(texts), EVAL_BATCH)
    batches = [_tokenize(tokenizer, texts[i : i + EVAL_BATCH], EVAL_LEN, False) for i in starts]
    np.savez(eval_file, n_batches=len(batches), **{f"{k}_{i}": b[k] for i, b in enumerate(batches) for k in b})
    results: dict = {"accuracy": {}, "speed": [], "file_mb": {}}
    preds = {}
    for kind in args.kinds:
        r = _spawn({"kind": kind, "path": str(paths[kind]), "threads": 2, "mode": "predict", "inputs": str(eval_file)})
        preds[kind] = np.array(r["preds"])
        results["accuracy"][kind] = float((preds[kind] == labels).mean())
        size = paths[kind].stat().st_size if paths[kind].is_file() else _folder_weights(paths[kind])
        results["file_mb"][kind] = size / 1e6
        print(f"[bench] {LABELS[kind]}: holdout accuracy {100 * results['accuracy'][kind]:.2f}")
    if "torch_fakequant_student" in preds:
        results["agreement"] = {
            k: float((preds[k] == preds["torch_fakequant_student"]).mean())
            for k in ("ort_int8_student", "ort_2bit_student")
            if k in preds
        }

    _speed(args, out, paths, tokenizer, texts, results)


def _speed(args, out: Path, paths: dict, tokenizer, texts: list[str], results: dict) -> None:
    """The speed matrix (real rows padded or cut to exactly L tokens); writes results.json, prints the tables."""
    for length in args.lengths:
        for bs in args.batches:
            shape_file = out / f"speed_{bs}x{length}.npz"
            np.savez(shape_file, **_tokenize(tokenizer, (texts * 2)[:bs], length, True))
            for threads in args.threads:
                rounds: dict[str, list[dict]] = {k: [] for k in args.kinds}
                for _ in range(args.rounds):
                    for kind in args.kinds:
                        spec = {
                            "kind": kind,
                            "path": str(paths[kind]),
                            "threads": threads,
                            "mode": "speed",
                            "inputs": str(shape_file),
                            "seconds": args.seconds,
                            "min_reps": 5,
                            "max_reps": 200,
                        }
                        rounds[kind].append(_spawn(spec))
                for kind, rs in rounds.items():
                    best = min(rs, key=lambda r: r["latency_s"])  # the round least disturbed by other jobs
                    row = {"kind": kind, "batch": bs, "length": length, "threads": threads, **best}
                    row["rounds_latency_s"] = [r["latency_s"] for r in rs]
                    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
                    row["throughput"] = bs / best["latency_s"]
                    results["speed"].append(row)
                    print(f"[bench] {json.dumps(row)}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results, args.kinds))


def _folder_weights(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def table(results: dict, kinds: list[str]) -> str:
    """Markdown tables: accuracy/agreement/size, then speed and memory per shape."""
    acc, size, agree = results["accuracy"], results["file_mb"], results.get("agreement", {})
    lines = [
        "| model | holdout acc | agreement with the fake-quant student | file MB | file / ORT FP32 file |",
        "|---|---|---|---|---|",
    ]
    base_file = size.get("ort_fp32_teacher")
    for k in kinds:
        if k not in acc:
            continue
        a = f"{100 * agree[k]:.2f} %" if k in agree else "-"
        ratio = f"{size[k] / base_file:.3f}" if base_file and k.startswith("ort_") else "-"
        lines.append(f"| {LABELS[k]} | {100 * acc[k]:.2f} | {a} | {size[k]:.1f} | {ratio} |")
    lines += [
        "",
        "| batch x tokens | threads | model | latency ms (median) | min ms | CPU ms | seq/s | x torch FP32 teacher "
        "| x ORT FP32 teacher | peak RSS MiB | RSS / torch FP32 teacher |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[tuple, dict] = {}
    for r in results["speed"]:
        cells[(r["batch"], r["length"], r["threads"], r["kind"])] = r
    for (bs, length, threads, kind), r in sorted(cells.items(), key=lambda x: (x[0][1], x[0][0], x[0][2])):
        base = cells.get((bs, length, threads, "torch_fp32_teacher"))
        ort_base = cells.get((bs, length, threads, "ort_fp32_teacher"))
        x_t = f"{r['throughput'] / base['throughput']:.2f}" if base else "-"
        x_o = f"{r['throughput'] / ort_base['throughput']:.2f}" if ort_base else "-"
        rss = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}" if base else "-"
        lines.append(
            f"| {bs} x {length} | {threads} | {LABELS[kind]} | {1000 * r['latency_s']:.1f} "
            f"| {1000 * r.get('min_s', r['latency_s']):.1f} | {1000 * r.get('cpu_s', float('nan')):.1f} "
            f"| {r['throughput']:.1f} | {x_t} | {x_o} | {r['peak_rss_mib']:.0f} | {rss} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
