"""Where a trained student loses accuracy on long inputs: its accuracy by input length under variations
that switch one suspect off at evaluation time (issue: the full-budget student loses 2 points on whole
sentences).

For a saved student (``kdqat train``'s ``student/``) and the SST-2 folders of ``bench/sst2_data.py`` it
reports accuracy on the sentence-level split and on the holdout's length buckets for:

- ``as trained``: evaluation batch 64, every quantizer on (what ``kdqat eval`` reports);
- ``eval batch 1``: each example gets its own dynamic 8-bit activation ranges (per batch, a long row
  shares its max-abs with the batch: do other rows' ranges hurt it?);
- ``FP activations``: activation and attention quantizers off (ternary weights and embeddings kept);
- ``FP embeddings``: the word-embedding quantizer off (the ternary word vectors as a suspect).

Usage: ``python bench/bench_length_gap.py --student bench/out/acc/runs/bertadam-s42/student``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sst2_runs import DATA, accuracy_by_length


def main() -> None:
    from kdqat_dist.models.encoders import load_tokenizer
    from kdqat_dist.quant.api import set_quant_enabled
    from kdqat_dist.quant.fake_quant import QuantEmbedding
    from kdqat_dist.quant.student import load_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for name in ("as trained", "eval batch 1", "FP activations", "FP embeddings"):
        model = load_student(args.student)
        tok = load_tokenizer(str(args.student))
        if name == "FP activations":
            set_quant_enabled(model, False, weights=False, acts=True)
        if name == "FP embeddings":
            for m in model.modules():
                if isinstance(m, QuantEmbedding):
                    set_quant_enabled(m, False, weights=True, acts=False)
        batch = 1 if name == "eval batch 1" else 64
        sent, _ = accuracy_by_length(model, tok, DATA / "sentences", [], batch)
        hold, buckets = accuracy_by_length(model, tok, DATA / "teacher", [], batch)
        rows.append({"variant": name, "sentences": sent, "holdout": hold, "buckets": buckets})
        print(json.dumps(rows[-1]), flush=True)
    head = list(rows[0]["buckets"])
    print("| evaluation | sentence split | holdout | " + " | ".join(f"{b} words" for b in head) + " |")
    print("|---" * (3 + len(head)) + "|")
    for r in rows:
        print(
            f"| {r['variant']} | {100 * r['sentences']:.2f} | {100 * r['holdout']:.2f} | "
            + " | ".join(f"{100 * r['buckets'][b][1]:.2f}" for b in head)
            + " |"
        )


if __name__ == "__main__":
    main()
