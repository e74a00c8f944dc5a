"""Size of the `kdqat export` artifact for MiniLM-L6 (W2 ternary, E2 row-wise ternary, A8); logits check.

No training is needed for the size figure: MiniLM is prepared with the default QuantConfig, packed (2-bit and
base-3), reloaded from the packed file alone and compared with the fake-quant model on real text and on a
random probe batch (logits must be identical).

    HF_HUB_OFFLINE=1 python bench/bench_export.py [--model minilm] [--append bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

TEXTS = [
    "the movie was a delight from start to finish",
    "a dull, boring film with bad acting",
    "an ok story.",
    "I would not watch it again, even for free; the plot makes no sense at all",
]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} (CPU), {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--append", default=None, help="append the markdown section to this file")
    args = ap.parse_args()

    from kdqat_dist.config import QuantConfig
    from kdqat_dist.export import export_model, load
    from kdqat_dist.export.artifact import logits_of, probe_batch
    from kdqat_dist.models.encoders import load_classifier, load_tokenizer
    from kdqat_dist.quant.api import prepare
    from kdqat_dist.quant.size import size_report

    tok = load_tokenizer(args.model)
    model = prepare(load_classifier(args.model, 2), QuantConfig()).eval()
    text = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    probe = probe_batch(model.config, n=8, seq=64)
    ref = {k: logits_of(model, b) for k, b in (("text", text), ("probe", probe))}
    estimate = size_report(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for base3 in (False, True):
            out = Path(tmp) / ("base3" if base3 else "bits")
            t0 = time.perf_counter()
            rep = export_model(model, QuantConfig(), out, tokenizer=tok, base3=base3)
            t_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = load(out)
            t_load = time.perf_counter() - t0
            got = {k: logits_of(loaded, b) for k, b in (("text", text), ("probe", probe))}
            same = all(torch.equal(ref[k], got[k]) for k in ref)
            preds = all(torch.equal(ref[k].argmax(-1), got[k].argmax(-1)) for k in ref)
            rows.append((base3, rep, same, preds, t_export, t_load))

    date = datetime.date.today().isoformat()
    c = model.config
    lines = [
        "",
        f"## kdqat export: packed artifact size, MiniLM-L6 ({date})",
        "",
        f"Machine: {_machine()}. Command: `HF_HUB_OFFLINE=1 python bench/bench_export.py --model {args.model}`.",
        f"Model: `{args.model}` ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}) prepared with the default "
        "QuantConfig (weights TWN ternary per tensor, word embeddings TWN ternary per row, classifier FP32, "
        "8-bit activations), untrained classifier; no training is needed for sizes.",
        "",
        "| packing | model.safetensors | FP32 (4 B x params) | ratio (file) | packed weights | their FP32 "
        "| ratio (weights) | logits identical | export s | load s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mb(n: int) -> str:
        return f"{n / 1e6:.3f} MB"

    for base3, rep, same, _preds, te, tl in rows:
        lines.append(
            f"| {'base-3 (1.6 bit)' if base3 else '2 bit'} | {mb(rep.file_bytes)} | {mb(rep.fp32_bytes)} "
            f"| {rep.ratio:.2f}x | {mb(rep.quantized_packed_bytes)} | {mb(rep.quantized_fp32_bytes)} "
            f"| {rep.weight_ratio:.2f}x | {'yes' if same else 'NO'} | {te:.1f} | {tl:.1f} |"
        )
    lines += [
        "",
        f"- `quant.size.size_report` estimate for the same model: {estimate['packed_mb']:.3f} MB "
        f"({estimate['ratio']:.2f}x); the file adds the safetensors header and stores the same FP parts.",
        f"- What stays FP32 in the file: position ({c.max_position_embeddings} x {c.hidden_size}) and "
        "token-type embeddings, LayerNorms, biases and the classifier; they make the gap between the weight "
        "ratio and the file ratio.",
        f"- Logits compared with `torch.equal` on {len(TEXTS)} real sentences and an 8 x 64 random probe "
        "batch; identical logits, hence identical predictions: "
        + ", ".join(f"{'base-3' if b3 else '2 bit'} {'yes' if p else 'NO'}" for b3, _r, _s, p, _e, _l in rows)
        + ".",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if args.append:  # append only: other benchmarks keep their own sections in the same file
        path = Path(args.append)
        head = "" if path.exists() else "# Benchmark results\n"
        with open(path, "a") as f:
            f.write(head + section)


if __name__ == "__main__":
    main()
