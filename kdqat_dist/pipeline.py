"""End-to-end jobs built from the loop: a run with its summary table, the offline demo, evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kdqat_dist.config import ConfigError, RunConfig, load_config, parse_override


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    out = [line, fmt.format(*header), line]
    out += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(out + [line])


def _bits_label(cfg: RunConfig) -> str:
    q = cfg.quant
    if not q.enabled:
        return "fp32"
    w = "ternary" if q.weight.method == "twn" or (q.weight.bits == 2 and q.weight.narrow_range) else f"{q.weight.bits}"
    e = (f"{q.embedding.bits}" if q.quantize_embedding else "32")
    return f"W{q.weight.bits}({w}) E{e} A{q.act.bits if q.act.enabled else 32}"


def run_and_report(cfg: RunConfig, mode: str, resume: bool = False) -> dict:
    """Run ``kdqat train``/``finetune`` and print the summary table on the main rank."""
    from kdqat_dist.engine.loop import Trainer

    trainer = Trainer(cfg, mode, resume)
    try:
        trainer.setup()
        t0 = time.perf_counter()
        result = trainer.train()
        result["wall_s"] = time.perf_counter() - t0
        if trainer.backend.is_main:
            print(summary(cfg, result, trainer))
            (Path(cfg.train.output_dir) / "metrics.json").write_text(json.dumps(result, indent=2))
        return result
    finally:
        trainer.cleanup()


def summary(cfg: RunConfig, result: dict, trainer=None) -> str:
    metric = result["selection_metric"]
    best = result["best"] or {}
    rows = []
    if "teacher" in result:
        rows.append(["teacher (fp32)", f"{100 * result['teacher']['selection']:.2f}", "fp32", "-", "-"])
    size = ""
    if trainer is not None and trainer.mode == "train":
        from kdqat_dist.quant.size import size_report

        s = size_report(trainer.backend.student_module())
        size = f"{s['packed_mb']:.2f} MB ({s['ratio']:.1f}x smaller than {s['fp32_mb']:.1f})"
    label = "student" if trainer is None or trainer.mode == "train" else "fine-tuned model"
    bits = _bits_label(cfg) if label == "student" else "fp32"
    rows.append([label, f"{100 * best.get('selection', float('nan')):.2f}", bits, str(best.get("step", "-")),
                 size or "-"])
    head = f"{result['task']}: best {metric} (x100) after {result['total_steps']} steps, run dir {cfg.train.output_dir}"
    return head + "\n" + _table(rows, ["model", metric, "bits", "best step", "size"])


def _demo_dir_usable(root: Path) -> bool:
    """Nothing finished or half-written to lose: absent, or holding only a finished teacher to reuse."""
    if (root / "summary.json").exists() or (root / "student_run").exists():
        return False
    teacher = root / "teacher"
    return not teacher.exists() or _teacher_finished(teacher)


def _teacher_finished(teacher: Path) -> bool:
    # metrics.json is written when the run ends; model/ appears at the first better evaluation, mid-run
    return (teacher / "metrics.json").exists() and (teacher / "model" / "config.json").exists()


def pick_demo_dir(root: Path) -> Path:
    """``root``, or the first of ``root-2``, ``root-3``, ... that a new demo can use.

    So that running the demo again (or after an interruption) never fails and never overwrites a finished
    or half-written run; a folder whose teacher finished but whose student never started is reused.
    """
    n = 1
    cand = root
    while not _demo_dir_usable(cand):
        n += 1
        cand = root.with_name(f"{root.name}-{n}")
    return cand


def demo(config: str | None = None, overrides: list[str] | None = None) -> dict:
    """Fine-tune MiniLM on the built-in synthetic task, KD-QAT it to W2(ternary) E2 A8, print both.

    Everything runs offline. ``config`` defaults to the shipped ``demo`` recipe.
    """
    base = load_config(config or "demo", overrides)
    root = Path(base.train.output_dir)
    if any(parse_override(o)[0] == "train.output_dir" for o in overrides or []):
        if not _demo_dir_usable(root):  # a folder the user named: never write into a used one
            raise ConfigError(f"train.output_dir: {root} already holds a demo run; pass "
                              f"train.output_dir=<new folder> or delete it")
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
        print("[demo] 1/2 fine-tuning the full-precision teacher")
        ft = load_config(config or "demo_finetune", [*(overrides or []), f"train.output_dir={teacher_dir}"])
        run_and_report(ft, "finetune")
    print("[demo] 2/2 KD-QAT of the ternary student")
    st = load_config(config or "demo", [*(overrides or []), f"train.output_dir={root / 'student_run'}",
                                        f"teacher.path={teacher_dir / 'model'}"])
    res = run_and_report(st, "train")
    res["demo_wall_s"] = time.perf_counter() - t0
    (root / "summary.json").write_text(json.dumps(res, indent=2))
    print(f"[demo] done in {res['demo_wall_s'] / 60:.1f} min; results in {root}")
    return res


def evaluate_folder(cfg: RunConfig, path: str) -> dict:
    """Evaluate a student folder, an export, or a fine-tuned FP model folder on the task's dev split(s)."""
    from kdqat_dist.data.loaders import Collator, load_splits, tokenize_splits
    from kdqat_dist.data.tasks import get_task
    from kdqat_dist.engine.backend import pick_device
    from kdqat_dist.engine.evaluate import evaluate
    from kdqat_dist.models.encoders import load_classifier, load_tokenizer
    from kdqat_dist.models.student import is_student_dir, load_student

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--model: {p} does not exist")
    task = get_task(cfg.data)
    tokenizer = load_tokenizer(str(p))
    max_len = cfg.data.max_seq_length or task.max_seq_length
    dev = {k: v for k, v in load_splits(cfg.data, task).items() if k != "train"}
    data = tokenize_splits(dev, tokenizer, max_len, cfg.data.cache_dir or None)
    if (p / "kdqat_export.json").exists():  # a packed artifact from `kdqat export`
        from kdqat_dist.export import load

        model = load(p)
    elif is_student_dir(p):
        model = load_student(p)
    else:
        model = load_classifier(str(p), task.num_labels, strict=True)
    device = pick_device(cfg.train.device)
    collate = Collator(tokenizer, max_length=max_len if cfg.data.padding == "max_length" else None)
    metrics = evaluate(model.to(device), task, data, collate, cfg.train.eval_batch_size, device)
    print(_table([[k, f"{v:.4f}"] for k, v in metrics.items()], ["metric", "value"]))
    return metrics
