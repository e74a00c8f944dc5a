"""Run by tests/distributed/test_dist_zero.py under ``torchrun --nproc_per_node 2``: several ZeRO checks in one job.

Each rank writes ``<out>/rank<r>.json`` with:

- ``zero2`` / ``zero3`` / ``zero3_lsq``: the training log of a short KD-QAT run with a ZeRO-3 teacher and
  a ZeRO-2 or ZeRO-3 student (TWN weights, the default), and a ZeRO-3 student with LSQ weights and
  activations (per-tensor steps of shape (1,)); ``zero0`` (ZeRO-3 teacher) and ``zero1_replicated`` (a replicated
  teacher); ``bertadam_zero{0,1,2,3}``: BertAdam under each stage; ``finetune_zero2``: `kdqat finetune`
  of the FP model under ZeRO-2;
- ``taps``: max |ZeRO-3 teacher - unsharded teacher| for every tap, layer and the logits;
- ``teacher_param_bytes`` / ``teacher_full_bytes``: this rank's ZeRO-3 teacher storage vs the whole model;
- ``fake_quant``: max |ZeRO-3 student - unsharded student| logits, and whether the gathered state dict
  equals the unsharded one exactly.
"""

from __future__ import annotations

import argparse
import copy

import torch
from rank_job import deepspeed_config, rank_job
from transformers import AutoConfig

from kdqat_dist.engine.backend import gathered_student
from kdqat_dist.engine.ds_backend import DeepSpeedBackend, _param_bytes
from kdqat_dist.engine.loop import run
from kdqat_dist.engine.memory import storage_bytes
from kdqat_dist.models.attention import MapInputs, use_kdqat_attention
from kdqat_dist.models.encoders import encoder_layers, load_classifier, load_tokenizer
from kdqat_dist.models.student import init_student
from kdqat_dist.models.taps import ALL_TAPS, AttentionCall, NormTap, TapStore, tapped
from kdqat_dist.quant.api import calibrate_activations, prepare

LSQ = ["quant.weight.method=lsq", "quant.act.method=lsq"]
BERTADAM = ["train.optimizer=bertadam", "train.lr=1e-3", "train.max_grad_norm=0.05"]  # as conftest.BERTADAM
RELATION = [
    "distill.attn_relation.weight=1",
    "distill.attn_relation.layers=all",  # as conftest.RELATION
    "distill.attn_relation.relation_heads=4",
    "quant.weight.method=seq",
    "quant.weight.granularity=row",
    "quant.act.method=absmax_token",
    "quant.subln=true",
]
TEXTS = [
    "the film was a delight from start to finish",
    "dull",
    "an uneven but moving story about two friends",
    "i would not watch it again",
    "bright and funny",
    "the plot makes no sense at all and drags",
    "great",
    "a slow, quiet and beautiful film",
]


def _batch(path: str) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(path)
    return dict(tok(TEXTS, padding=True, return_tensors="pt"))


def check_teacher(args, batch) -> dict:
    be = DeepSpeedBackend(deepspeed_config(args, "taps"))
    with be.building_teacher(AutoConfig.from_pretrained(args.teacher).hidden_size):  # built partitioned
        model = load_classifier(args.teacher, 2, "eager")
    teacher = be.setup_teacher(model)
    ref = load_classifier(args.teacher, 2, "eager").eval()
    use_kdqat_attention(teacher.module)
    use_kdqat_attention(ref)
    n = len(encoder_layers(ref))
    wanted = {tap: set(range(n + 1 if tap == "hidden" else n)) for tap in ALL_TAPS}
    wanted["hidden_norm"] = set(range(1, n + 1))  # layer outputs only
    sharded, whole = TapStore(), TapStore()
    with torch.no_grad(), tapped(teacher.module, wanted, sharded):
        logits = teacher(**batch).logits
    with torch.no_grad(), tapped(ref, wanted, whole):
        ref_logits = ref(**batch).logits

    def value(x):
        if isinstance(x, MapInputs):  # the probabilities recomputed from the tapped Q, K and mask
            return x.probs()
        if isinstance(x, NormTap):  # the LayerNorm output recomputed from its input
            return x.inputs.output()
        if isinstance(x, AttentionCall):  # the attention block called again (ZeRO-3 gathers again)
            return x.run()[0]
        if isinstance(x, tuple):  # qkv: (Q, K, V), each [B, H, S, d_h]
            return torch.stack(x)
        return x

    diffs = {
        f"{tap}/{layer}": float((value(sharded[tap][layer]) - value(t)).abs().max())
        for tap in ALL_TAPS
        for layer, t in whole[tap].items()
    }
    diffs["logits"] = float((logits - ref_logits).abs().max())
    out = {
        "taps": diffs,
        "teacher_param_bytes": _param_bytes(teacher.module),
        "teacher_full_bytes": storage_bytes(p.data for p in ref.parameters()),
    }
    be.teardown()
    return out


def check_fake_quant(args, batch) -> dict:
    cfg = deepspeed_config(args, "fake_quant", "engine.deepspeed.zero_stage=3", *LSQ)
    be = DeepSpeedBackend(cfg)
    student = init_student(args.teacher, 2, None, "identity")
    prepare(student, cfg.quant)
    calibrate_activations(student, batch)
    ref = copy.deepcopy(student).eval()
    engine = be.setup_student(student, total_steps=10)
    engine.eval()
    with torch.no_grad():
        diff = float((engine(**batch).logits - ref(**batch).logits).abs().max())
    with gathered_student(be) as module:
        gathered = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    whole = ref.state_dict()
    same = gathered.keys() == whole.keys() and all(torch.equal(gathered[k], whole[k]) for k in whole)
    partitioned = sum(1 for p in engine.module.parameters() if p.data.numel() == 0)
    be.teardown()
    return {"fake_quant": {"logits_max_diff": diff, "state_dict_equal": same, "partitioned": partitioned}}


def checks(args: argparse.Namespace) -> dict:
    result: dict = {}
    result["zero2"] = run(deepspeed_config(args, "zero2", "engine.deepspeed.zero_stage=2"), "train")["train_log"]
    result["zero3"] = run(deepspeed_config(args, "zero3", "engine.deepspeed.zero_stage=3"), "train")["train_log"]
    result["zero3_lsq"] = run(deepspeed_config(args, "zero3_lsq", "engine.deepspeed.zero_stage=3", *LSQ), "train")[
        "train_log"
    ]
    result["zero3_relation"] = run(
        deepspeed_config(args, "zero3_relation", "engine.deepspeed.zero_stage=3", *RELATION), "train"
    )["train_log"]
    # the other stages and the replicated teacher, and `kdqat finetune` under DeepSpeed
    result["zero0"] = run(deepspeed_config(args, "zero0", "engine.deepspeed.zero_stage=0"), "train")["train_log"]
    result["zero1_replicated"] = run(
        deepspeed_config(args, "zero1_rep", "engine.deepspeed.zero_stage=1", "engine.deepspeed.teacher=replicated"),
        "train",
    )["train_log"]
    for stage in (0, 1, 2, 3):  # BertAdam: per-tensor clipping of whole gradients under every stage
        result[f"bertadam_zero{stage}"] = run(
            deepspeed_config(args, f"bertadam{stage}", f"engine.deepspeed.zero_stage={stage}", *BERTADAM), "train"
        )["train_log"]
    result["finetune_zero2"] = run(
        deepspeed_config(args, "finetune_zero2", "engine.deepspeed.zero_stage=2", f"model.name_or_path={args.teacher}"),
        "finetune",
    )["train_log"]
    batch = _batch(args.teacher)
    result.update(check_teacher(args, batch))
    result.update(check_fake_quant(args, batch))
    return result


if __name__ == "__main__":
    rank_job(checks)
