"""Run by tests/distributed/test_dist_fsdp2.py under ``torchrun --nproc_per_node 2``: the FSDP2 checks in one job.

Each rank writes ``<out>/rank<r>.json`` with:

- ``twn`` / ``lsq`` / ``relation`` / ``bertadam``: the training logs of short KD-QAT runs with an FSDP2 student
  and an FSDP2 teacher (TWN weights; LSQ weights and activations, whose steps of shape (1,) are sharded;
  relation KD with SEQ's per-row clips and SubLN; BertAdam's per-tensor clipping); ``accum``: TWN with two
  micro-batches per rank and step (gradients kept unsynchronised until the second); ``finetune``: `kdqat
  finetune` of the FP model; ``bf16``: TWN under ``engine.precision=bf16``;
- ``memory``: each run's per-rank memory table (``memory_per_rank`` of metrics.json) for ``twn``;
- ``resume``: the training logs, evaluations and saved student of a run that never stopped, and of one
  stopped in the middle of step 5 (after its step-3 checkpoint) and resumed, with the student's dropout on;
- ``taps``: max |FSDP2 teacher - unsharded teacher| for every tap, layer and the logits, and
  ``teacher_param_bytes`` / ``teacher_full_bytes``: this rank's shards of the teacher vs the whole model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from kdqat_dist.config import load_config
from kdqat_dist.engine import dist
from kdqat_dist.engine.fsdp2 import FSDP2Backend
from kdqat_dist.engine.loop import Trainer, run
from kdqat_dist.engine.memory import storage_bytes
from kdqat_dist.models.attention import MapInputs, use_kdqat_attention
from kdqat_dist.models.encoders import encoder_layers, load_classifier, load_tokenizer
from kdqat_dist.models.taps import ALL_TAPS, NormTap, TapStore, tapped

LSQ = ["quant.weight.method=lsq", "quant.act.method=lsq"]  # as conftest.LSQ
BERTADAM = ["train.optimizer=bertadam", "train.lr=1e-3", "train.max_grad_norm=0.05"]  # as conftest.BERTADAM
RELATION = [  # as conftest.RELATION
    "distill.attn_relation.weight=1",
    "distill.attn_relation.layers=all",
    "distill.attn_relation.relation_heads=4",
    "quant.weight.method=seq",
    "quant.weight.granularity=row",
    "quant.act.method=absmax_token",
    "quant.subln=true",
]
TEXTS = ["the film was a delight", "dull", "an uneven but moving story", "i would not watch it again"]


def _cfg(args, name: str, *extra: str):
    """The parity runs' config (tests/distributed/conftest.py) under FSDP2, one micro-batch per rank."""
    return load_config(
        "tiny_debug",
        [
            f"teacher.path={args.teacher}",
            f"train.output_dir={args.out / name}",
            "engine.backend=fsdp2",
            "train.log_every=1",
            "train.dropout=0",
            f"train.max_steps={args.steps}",
            "train.eval_every=1",
            *extra,
        ],
    )


class Killed(Exception):
    """Stands in for SIGKILL: raised on every rank in the middle of the same step."""


class KilledAfter(FSDP2Backend):
    """An FSDP2 engine whose ranks all 'die' in optimizer step ``n + 1`` (after its backward)."""

    def __init__(self, cfg, n: int):
        super().__init__(cfg)
        self.left = n

    def step(self) -> None:
        if self.left == 0:
            raise Killed
        super().step()
        self.left -= 1


def check_resume(args) -> dict:
    """An uninterrupted 6-step run and one killed in step 5 and resumed from its step-3 checkpoint; the
    student's dropout is on (each rank's restored RNG state matters)."""
    extra = ("train.max_steps=6", "train.save_every=3", "train.eval_every=3", "train.dropout=0.1")
    full = run(_cfg(args, "full", *extra), "train")
    cfg = _cfg(args, "killed", *extra)
    trainer = Trainer(cfg, "train", backend=KilledAfter(cfg, 4)).setup()
    try:
        trainer.train()
        raise AssertionError("the run was not stopped")
    except Killed:
        pass
    finally:
        trainer.cleanup()
    resumed = run(cfg, "train", resume=True)
    w_full = load_file(str(args.out / "full" / "student" / "model.safetensors"))
    w_res = load_file(str(args.out / "killed" / "student" / "model.safetensors"))
    same = w_full.keys() == w_res.keys() and all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    return {
        "full": {k: full[k] for k in ("train_log", "history", "best")},
        "resumed": {k: resumed[k] for k in ("train_log", "history", "best")},
        "student_equal": same,
        "checkpoints": sorted(p.name for p in (args.out / "killed" / "checkpoints").iterdir()),
    }


def check_teacher(args) -> dict:
    """Every tap of the FSDP2 teacher (called only by its own forward) against the unsharded teacher."""
    be = FSDP2Backend(_cfg(args, "taps"))
    teacher = be.setup_teacher(load_classifier(args.teacher, 2, "eager"))
    ref = load_classifier(args.teacher, 2, "eager").eval()
    use_kdqat_attention(teacher)
    use_kdqat_attention(ref)
    tok = load_tokenizer(str(args.teacher))
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    n = len(encoder_layers(ref))
    # every tap but attention_call: calling a block again outside the forward is what a sharded teacher
    # must never be asked to do (the objective does not, for a partitioned teacher)
    wanted = {tap: set(range(n + 1 if tap == "hidden" else n)) for tap in ALL_TAPS if tap != "attention_call"}
    wanted["hidden_norm"] = set(range(1, n + 1))
    sharded, whole = TapStore(), TapStore()
    with torch.no_grad(), tapped(teacher, wanted, sharded):
        logits = teacher(**batch).logits
    with torch.no_grad(), tapped(ref, wanted, whole):
        ref_logits = ref(**batch).logits

    def value(x):
        if isinstance(x, MapInputs):
            return x.probs()
        if isinstance(x, NormTap):
            return x.inputs.output()
        if isinstance(x, tuple):
            return torch.stack(x)
        return x

    diffs = {
        f"{tap}/{layer}": float((value(sharded[tap][layer]) - value(t)).abs().max())
        for tap in wanted
        for layer, t in whole[tap].items()
    }
    diffs["logits"] = float((logits - ref_logits).abs().max())
    out = {
        "taps": diffs,
        "teacher_param_bytes": storage_bytes(p.data for p in teacher.parameters()),
        "teacher_full_bytes": storage_bytes(p.data for p in ref.parameters()),
        "teacher_training": any(m.training for m in teacher.modules()),
    }
    be.teardown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("cpu")  # owned here; each engine below reuses it and leaves it up
    result: dict = {"world_size": dist.world_size()}
    twn = run(_cfg(args, "twn"), "train")
    result["twn"], result["memory"] = twn["train_log"], twn["memory_per_rank"]
    for name, extra in (("lsq", LSQ), ("relation", RELATION), ("bertadam", BERTADAM)):
        result[name] = run(_cfg(args, name, *extra), "train")["train_log"]
    result["accum"] = run(_cfg(args, "accum", "train.grad_accum=2"), "train")["train_log"]
    result["bf16"] = run(_cfg(args, "bf16", "engine.precision=bf16"), "train")["train_log"]
    result["finetune"] = run(_cfg(args, "finetune", f"model.name_or_path={args.teacher}"), "finetune")["train_log"]
    result["resume"] = check_resume(args)
    result.update(check_teacher(args))
    (args.out / f"rank{dist.rank()}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
