"""End-to-end jobs built from the loop: a run with its summary table, the offline demo, evaluation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kdqat_dist.config import ConfigError, RunConfig, load_config, parse_override
from kdqat_dist.data.heads import get_head
from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
from kdqat_dist.data.tasks import get_task
from kdqat_dist.distill.terms import KD_TERMS
from kdqat_dist.engine.backend import pick_device
from kdqat_dist.engine.evaluate import evaluate
from kdqat_dist.engine.launch import default_num_procs, run_launcher
from kdqat_dist.engine.loop import run
from kdqat_dist.engine.memory import memory_table
from kdqat_dist.export import load
from kdqat_dist.export.deploy import deploy_student
from kdqat_dist.export.onnx_check import OrtModel
from kdqat_dist.export.onnx_export import ONNX_META
from kdqat_dist.models.encoders import load_classifier, load_tokenizer
from kdqat_dist.models.positions import check_max_length
from kdqat_dist.quant.quantizers import make_quantizer
from kdqat_dist.quant.student import is_student_dir, load_student
from kdqat_dist.run_folder import model_run, resolve_model_dir


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [line, fmt.format(*header), line]
    out += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(out + [line])


def _bits_label(cfg: RunConfig) -> str:
    """``W2(ternary) E2 A8`` and the like: weight, word-embedding and Linear-input bits (32: not quantized).

    Ternary weights (codes -1, 0, 1, whatever the method) are ``W1.58(ternary)`` for BitNet's absmean,
    as BitNet b1.58 and BitDistill name them, and ``W2(ternary)`` for the others, as the 2020-2022 papers
    (TernaryBERT, Kim et al.) name theirs; both are stored at 2 bits.
    """
    q = cfg.quant
    if not q.enabled:
        return "fp32"
    if make_quantizer(q.weight).code_range() == (-1, 1):
        w = "W1.58(ternary)" if q.weight.method == "absmean" else f"W{q.weight.bits}(ternary)"
    else:
        w = f"W{q.weight.bits}({q.weight.bits})"
    e = f"{q.embedding.bits}" if q.quantize_embedding else "32"
    return f"{w} E{e} A{q.act.bits if q.act.enabled else 32}"


def run_and_report(cfg: RunConfig, mode: str, resume: bool = False) -> dict:
    """Run ``kdqat train``/``finetune`` (:func:`~kdqat_dist.engine.loop.run`) and print the summary table
    on the main rank."""
    return run(cfg, mode, resume, on_finish=lambda result: print(summary(cfg, result, mode)))


def summary(cfg: RunConfig, result: dict, mode: str = "train") -> str:
    metric = result["selection_metric"]
    best = result["best"] or {}
    rows = []
    if "teacher" in result:
        rows.append(["teacher (fp32)", f"{100 * result['teacher']['selection']:.2f}", "fp32", "-", "-"])
    label, bits = ("student", _bits_label(cfg)) if mode == "train" else ("fine-tuned model", "fp32")
    score = f"{100 * best.get('selection', float('nan')):.2f}"
    rows.append([label, score, bits, str(best.get("step", "-")), result.get("size", "-")])
    head = f"{result['task']}: best {metric} (x100) after {result['total_steps']} steps, run dir {cfg.train.output_dir}"
    return head + "\n" + _table(rows, ["model", metric, "bits", "best step", "size"])


# QAT without KD: the same ternary student trained on the labels alone (the demo's yardstick): every term
# that reads the teacher off
NO_KD = [*(f"distill.{t}.weight=0" for t in KD_TERMS), "distill.gamma=null", "distill.ground_truth.weight=1"]
# the product's main shape, per engine: the teacher sharded over the ranks (DeepSpeed: student ZeRO-2)
SHARDED = {
    "deepspeed": (
        ["engine.deepspeed.zero_stage=2", "engine.deepspeed.teacher=zero3"],
        "student ZeRO-2, teacher ZeRO-3",
    ),
    "fsdp2": (["engine.fsdp2.teacher=sharded"], "student and teacher sharded per layer"),
}
_STAGES = ("teacher", "qat_no_kd", "kd_qat")


def _demo_dir_usable(root: Path) -> bool:
    """Nothing finished or half-written to lose: absent, or holding only a finished teacher to reuse."""
    if (root / "summary.json").exists() or any((root / d).exists() for d in _STAGES[1:]):
        return False
    teacher = root / "teacher"
    return not teacher.exists() or _teacher_finished(teacher)


def _teacher_finished(teacher: Path) -> bool:
    # metrics.json is written when the run ends; model/ appears at the first better evaluation, mid-run
    return (teacher / "metrics.json").exists() and (teacher / "model" / "config.json").exists()


def pick_demo_dir(root: Path) -> Path:
    """``root``, or the first of ``root-2``, ``root-3``, ... that a new demo can use, so that running the demo
    again (or after an interruption) never fails and never overwrites a finished or half-written run; a
    folder whose teacher finished but whose students never started is reused."""
    n, cand = 1, root
    while not _demo_dir_usable(cand):
        n += 1
        cand = root.with_name(f"{root.name}-{n}")
    return cand


def demo(
    config: str | None = None,
    overrides: list[str] | None = None,
    num_procs: int | None = None,
    engine: str = "deepspeed",
) -> dict:
    """The offline pipeline on the built-in task: fine-tune the teacher, train the ternary student without
    KD (labels only) and with KD-QAT on ``num_procs`` ranks of ``engine`` (``deepspeed``: student ZeRO-2,
    teacher ZeRO-3; ``fsdp2``: both sharded per layer; default ranks: one per GPU, else 2 CPU ranks), deploy
    the KD-QAT student (ONNX, int8 kernels: its dev score and its speed over the teacher), then print them side
    by side and the per-rank memory.

    ``config`` defaults to the shipped ``demo_finetune`` / ``demo`` recipes.
    """
    overrides = list(overrides or [])
    num_procs = num_procs or default_num_procs()
    recipe = config or "demo"
    base = load_config(recipe, overrides)
    root = Path(base.train.output_dir)
    if any(parse_override(o)[0] == "train.output_dir" for o in overrides):
        if not _demo_dir_usable(root):  # a folder the user named: never write into a used one
            raise ConfigError(
                f"train.output_dir: {root} already holds a demo run; pass train.output_dir=<new folder> or delete it"
            )
    else:
        chosen = pick_demo_dir(root)
        if chosen != root:
            print(f"[demo] {root} already holds a demo run; this one goes to {chosen}")
        root = chosen
    t0 = time.perf_counter()
    teacher_dir = root / "teacher"
    if _teacher_finished(teacher_dir):
        print(f"[demo] reusing the fine-tuned teacher in {teacher_dir / 'model'}")
    else:
        print("[demo] 1/4 fine-tuning the full-precision teacher")
        ft = load_config(config or "demo_finetune", [*overrides, f"train.output_dir={teacher_dir}"])
        run_and_report(ft, "finetune")
    student = [*overrides, f"teacher.path={teacher_dir / 'model'}"]
    print("[demo] 2/4 QAT without KD: the ternary student on the labels alone (one process)")
    no_kd_overrides = [*student, *NO_KD, f"train.output_dir={root / 'qat_no_kd'}", "engine.backend=none"]
    no_kd = run_and_report(load_config(recipe, no_kd_overrides), "train")
    sharded, shape = SHARDED[engine]
    name = {"deepspeed": "DeepSpeed", "fsdp2": "FSDP2"}[engine]
    print(f"[demo] 3/4 KD-QAT on {num_procs} {name} ranks ({shape})")
    kd_overrides = [*student, *sharded, f"train.output_dir={root / 'kd_qat'}"]
    load_config(recipe, [*kd_overrides, f"engine.backend={engine}"])  # bad input: one line, here
    run_launcher(engine, "train", recipe, kd_overrides, num_procs)
    kd = json.loads((root / "kd_qat" / "metrics.json").read_text())
    print("[demo] 4/4 deploying the KD-QAT student: ONNX with int8 kernels, checked on the dev set")
    deployed = deploy_student(base, root / "kd_qat" / "student", root / "deployed", teacher_dir / "model")
    wall = time.perf_counter() - t0
    res = {
        "teacher": kd["teacher"],
        "qat_no_kd": no_kd,
        "kd_qat": kd,
        "deployed": deployed,
        "num_procs": num_procs,
        "demo_wall_s": wall,
        "engine": engine,
    }
    (root / "summary.json").write_text(json.dumps(res, indent=2))
    print(demo_table(res, base))
    print(memory_table(kd["memory_per_rank"]))
    print(f"[demo] done in {res['demo_wall_s'] / 60:.1f} min; results in {root}")
    return res


def demo_table(res: dict, cfg: RunConfig) -> str:
    """Teacher, QAT without KD and KD-QAT side by side (the selection metric x100, bits, size)."""
    metric = res["kd_qat"]["selection_metric"]
    bits = _bits_label(cfg)
    rows = [["teacher (fp32)", f"{100 * res['teacher']['selection']:.2f}", "fp32", "-", "1.00x"]]
    for name, r in (("QAT without KD", res["qat_no_kd"]), (f"KD-QAT ({res['num_procs']} ranks)", res["kd_qat"])):
        rows.append([name, f"{100 * r['best']['selection']:.2f}", bits, r.get("size", "-"), "-"])
    dep = res.get("deployed")
    if dep:  # the KD-QAT student as ONNX Runtime runs it, on the same dev set
        speed = dep["speed"]
        rows.append(
            [
                "KD-QAT, deployed (ONNX int8)",
                f"{100 * dep['dev']['onnx']['selection']:.2f}",
                bits,
                f"{dep['file_mb']:.1f} MB",
                f"{speed['speedup']:.2f}x",
            ]
        )
    head = f"{res['kd_qat']['task']}: best dev {metric} (x100)"
    if dep:
        d, sp = dep["dev"], dep["speed"]
        agree = f"; deployed = trained on {d['agree']}/{d['rows']} dev rows" if "agree" in d else ""
        head += (
            f"{agree}; speed: throughput over the torch FP32 teacher, a {sp['batch'][0]} x {sp['batch'][1]} "
            f"batch, {sp['threads']} threads"
        )
    return head + "\n" + _table(rows, ["model", metric, "bits", "size", "speed"])


def evaluate_folder(cfg: RunConfig, path: str, table: bool = True) -> dict:
    """Evaluate a student folder, an export, or a fine-tuned FP model folder (or the run folder around one)
    on the dev split(s) of ``cfg``'s task; prints the metric table unless ``table`` is false."""
    p = resolve_model_dir(path)
    task = get_task(cfg.data)
    tokenizer = load_tokenizer(str(p))
    max_len = cfg.data.max_seq_length or task.max_seq_length
    check_max_length(max_len, str(p), explicit=cfg.data.max_seq_length is not None)
    head = get_head(task)
    dev = {k: v for k, v in load_splits(cfg.data, task).items() if k != "train"}
    data = tokenize_splits(dev, tokenizer, max_len, cfg.data.cache_dir or None, head)
    if (p / "kdqat_export.json").exists():  # a packed artifact from `kdqat export`
        model = load(p)
    elif (p / ONNX_META).exists():  # `kdqat export --format onnx`: ONNX Runtime on the CPU
        model = OrtModel(p)
    elif is_student_dir(p):
        model = load_student(p)
    else:
        model = load_classifier(str(p), head.num_labels, strict=True, auto_class=head.auto_class)
    device = "cpu" if isinstance(model, OrtModel) else pick_device(cfg.train.device)  # ORT: the CPU provider
    collate = Collator(tokenizer, max_length=max_len if cfg.data.padding == "max_length" else None, head=head)
    metrics = evaluate(model.to(device), task, data, collate, cfg.train.eval_batch_size, device, raw=dev, head=head)
    if table:
        print(_table([[k, f"{v:.4f}"] for k, v in metrics.items()], ["metric", "value"]))
    return metrics


def eval_model(
    model: str, config: str | None = None, overrides: list[str] | None = None, as_json: bool = False
) -> dict:
    """``kdqat eval``: score a model folder (or run folder) on its run's own task and data, or on
    ``config``'s (checked against the run's: :func:`~kdqat_dist.run_folder.model_run`). Prints the metric
    table, or with ``as_json`` one JSON object on stdout: ``model``, ``config``, ``task``, ``metrics``,
    ``notes`` (how the data differs from the run's)."""
    run = model_run(model, config, overrides)
    for note in run.notes:
        print(f"kdqat eval: note: {note}", file=sys.stderr)
    if not as_json:
        print(f"kdqat eval: {run.model_dir} on {run.config.data.task} (config: {run.config_source})")
    metrics = evaluate_folder(run.config, str(run.model_dir), table=not as_json)
    result = {
        "model": str(run.model_dir),
        "config": run.config_source,
        "task": get_task(run.config.data).name,
        "metrics": metrics,
        "notes": list(run.notes),
    }
    if as_json:
        print(json.dumps(result))
    return result
