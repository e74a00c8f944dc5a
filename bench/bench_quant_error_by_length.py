"""How much each 8-bit activation quantizer of a trained student distorts its input, by input length
(issue #20: the student's gap to the teacher grows with sentence length).

For a saved student and the SST-2 sentence test set of ``bench/sst2_data.py``, the rows are grouped by
length in words; each group runs through the student in batches of 32 (padded to the batch's longest row,
as evaluation does) while a forward hook on every activation quantizer records, over real tokens only,
the relative error ``‖q(x) − x‖ / ‖x‖``. For the attention probabilities it also records the L1 distance
``Σ_k |q(p)_k − p_k|`` of each real query row (0: intact, 2: disjoint) and the share of probability mass
that rounds to 0. Quantizers are grouped by role (Q/K/V, probs, the inputs of the QKV, W_o, FFN-in and
FFN-out projections) and averaged over layers.

Usage: ``python bench/bench_quant_error_by_length.py --student bench/out/acc/sent/fullsent_bertadam_valid-s42/student``
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from sst2_runs import DATA

BUCKETS = ((6, 10), (11, 20), (21, 10_000))


def role(name: str) -> str:
    for key, label in (
        ("attn_quant.query", "Q"),
        ("attn_quant.key", "K"),
        ("attn_quant.value", "V"),
        ("attn_quant.probs", "probs"),
        ("attention.self.query", "QKV in"),
        ("attention.self.key", "QKV in"),
        ("attention.self.value", "QKV in"),
        ("attention.output.dense", "W_o in"),
        ("intermediate.dense", "FFN in"),
        ("output.dense", "FFN out in"),
        ("pooler", "pooler in"),
    ):
        if key in name:
            return label
    return "other"


def main() -> None:
    from kdqat_dist.config import ActQuantConfig
    from kdqat_dist.models.encoders import load_tokenizer
    from kdqat_dist.quant.fake_quant import ActFakeQuant
    from kdqat_dist.quant.quantizers import make_quantizer
    from kdqat_dist.quant.student import load_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=256, help="rows per length bucket")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_student(args.student).eval()
    tok = load_tokenizer(str(args.student))
    lines = (DATA / "sentence_test" / "dev.tsv").read_text().splitlines()[1:]
    texts = [ln.split("\t")[0] for ln in lines if ln]
    state: dict = {}
    unclamped = make_quantizer(ActQuantConfig(clip=None), activation=True)  # the same 8-bit grid, no ±2.5

    def hook(name: str):
        def fn(mod, inp, out):
            x, q, mask = inp[0].float(), out.float(), state["mask"]
            r = role(name)
            if r == "probs":  # [B, H, S, S]: real query rows, real keys
                m = (mask[:, None, :, None] * mask[:, None, None, :]).expand_as(x)
                l1 = ((q - x).abs() * m).sum(-1)  # [B, H, S]
                rows = mask[:, None, :].expand_as(l1)
                state["acc"]["probs L1"].append(float(l1[rows].mean()))
                lost = (x * (q == 0) * m).sum() / (x * m).sum()
                state["acc"]["probs mass to 0"].append(float(lost))
            elif x.dim() == 2:  # the pooler's [B, D]: no token axis
                m = torch.ones_like(x, dtype=torch.bool)
            elif x.dim() == 4:  # Q/K/V after the head split: [B, H, S, d_h]
                m = mask[:, None, :, None].expand_as(x)
            else:  # [B, S, D]
                m = mask[:, :, None].expand_as(x)
            err = ((q - x) * m).norm() / (x * m).norm()
            state["acc"][r].append(float(err))
            alt = unclamped.fake_quant(x)
            state["acc"][r + " (no clamp)"].append(float(((alt - x) * m).norm() / (x * m).norm()))
            if r == "probs":  # unsigned: [0, max] on 255 steps (not a project quantizer)
                s = x.abs().amax().clamp_min(1e-12) / 255
                u = torch.round(x / s) * s
                l1 = ((u - x).abs() * m).sum(-1)
                state["acc"]["probs L1 (unsigned)"].append(float(l1[mask[:, None, :].expand_as(l1)].mean()))

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, ActFakeQuant):
            mod.register_forward_hook(hook(name))
    result = {}
    for lo, hi in BUCKETS:
        rows = [t for t in texts if lo <= len(t.split()) <= hi][: args.rows]
        state["acc"] = defaultdict(list)
        with torch.no_grad():
            for i in range(0, len(rows), 32):
                enc = tok(rows[i : i + 32], padding="longest", truncation=True, max_length=64, return_tensors="pt")
                state["mask"] = enc["attention_mask"].bool()
                model(**enc)
        label = f"{lo}-{hi}" if hi < 10_000 else f"{lo}+"
        result[label] = {k: sum(v) / len(v) for k, v in state["acc"].items()}
        result[label]["rows"] = len(rows)
        print(json.dumps({label: result[label]}), flush=True)
    keys = [k for k in result[next(iter(result))] if k != "rows"]
    print("| quantizer input | " + " | ".join(f"{b} words" for b in result) + " |")
    print("|---" * (1 + len(result)) + "|")
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{result[b][k]:.4f}" for b in result) + " |")


if __name__ == "__main__":
    main()
