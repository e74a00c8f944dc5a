"""``kdqat``: the command line. Parses arguments and calls into the library, nothing else.

User errors print one line ``kdqat: error: ...`` (exit 2), bugs their traceback (exit 1): see :mod:`kdqat_dist.errors`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap

from kdqat_dist import __version__
from kdqat_dist.config import RECIPES_DIR, load_config, to_dict
from kdqat_dist.errors import USER_ERRORS, report

# torch, transformers and the commands' modules (kdqat_dist.pipeline, the subcommands) are imported in main():
# `kdqat --version` answers without them (seconds of CPU otherwise).

EPILOG = """examples:
  kdqat demo                                    # the whole pipeline on the built-in task (offline)
  kdqat finetune --config tiny_debug model.name_or_path=minilm train.output_dir=runs/teacher
  kdqat train --config bert_base_w2a8_kd data.task=rte teacher.path=models/rte distill.gamma=0.5
  kdqat eval --model runs/x                     # its student on the run's own dev set
  deepspeed --num_gpus 8 -m kdqat_dist.cli train --config bert_large_w2a8_kd engine.backend=deepspeed
  torchrun --nproc_per_node 8 -m kdqat_dist.cli train --config bert_large_w2a8_kd engine.backend=fsdp2

Overrides are dotted keys: section.field=value (values parsed as YAML). Recipes shipped in the package
can be named without a path; see `kdqat recipes`."""


EVAL_EPILOG = """The task and data come from the config.yaml of the run that wrote the model (beside its student/
or model/ folder; an export names its student). --config replaces it, but must name the same task; data
settings that differ from the run's are stated on stderr. --json prints the result on stdout as JSON."""


SECTIONS_HELP = """config sections: model teacher student data quant distill train engine tune analysis
  kdqat config RECIPE [key=value ...]   prints every key of the resolved config with its value (YAML)"""


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; must be a positive integer")
    return int(text)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="recipe YAML (a path or a shipped recipe name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdqat",
        description="Quantization-aware training of BERT-class encoders (ternary/2-8-bit weights, 8-bit "
        "activations) with knowledge distillation from the full-precision teacher.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The `deepspeed` launcher appends --local_rank=N (before the subcommand); the rank comes from the
    # environment (LOCAL_RANK) anyway, so the flag is accepted and ignored.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"kdqat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, help_ in (
        ("finetune", "fine-tune the full-precision teacher on a task (saves HF format)"),
        ("train", "KD-QAT: train the quantized student from the fine-tuned teacher"),
    ):
        p = sub.add_parser(name, help=help_, epilog=SECTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")

    p = sub.add_parser(
        "eval",
        help="evaluate a model folder (FP model, kdqat student or export) on its run's dev set",
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a run folder, its student/ or model/, or an export folder")
    p.add_argument(
        "--config", "-c", default=None, help="recipe to score on instead of the run's own config.yaml (same task)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.dev_file=x.tsv")
    p.add_argument("--json", action="store_true", help="print one JSON object (model, config, task, metrics)")

    p = sub.add_parser(
        "demo", help="finetune, QAT without KD and KD-QAT on N sharded ranks, on the built-in task, offline"
    )
    _add_config_args(p)
    p.add_argument(
        "--num-procs",
        type=_positive_int,
        default=None,
        help="ranks of the KD-QAT stage (default: one per GPU, else 2 CPU ranks)",
    )
    p.add_argument(
        "--engine",
        choices=("deepspeed", "fsdp2"),
        default="deepspeed",
        help="the KD-QAT stage's engine: DeepSpeed ZeRO (deepspeed launcher) or PyTorch FSDP2 (torchrun)",
    )

    p = sub.add_parser("config", help="print the fully resolved config (YAML) of a recipe and overrides; runs nothing")
    p.add_argument("recipe", nargs="?", default=None, help="recipe YAML (a path or a shipped recipe name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-5")

    sub.add_parser("recipes", help="list the recipes shipped in the package")
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Subcommands whose modules register themselves (sweep, analyze, export, predict); a failed import is a bug."""
    for mod in ("tune.cli", "analysis.cli", "export.cli", "export.predict_cli"):
        __import__(f"kdqat_dist.{mod}", fromlist=["add_parser"]).add_parser(sub)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, except that key=value overrides may stand anywhere, also after an option
    (``train --config X --resume a=b``): argparse alone stops the positional list at the first option."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


# What gloo and NCCL say when the other side of a collective is gone.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "ncclRemoteError", "Broken pipe")


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"kdqat {__version__}")
        return 0
    import torch
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # What DeepSpeed falls back to anyway on a machine without CUDA, said up front: otherwise its
        # "Setting accelerator to CPU ... unable to detect it" warning lands in the middle of a run
        # (transformers imports DeepSpeed lazily). CUDA and CPU are the accelerators kdqat supports.
        os.environ["DS_ACCELERATOR"] = "cpu"
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown our own progress bar
    try:
        parser = build_parser()  # imports the subcommands' modules
        args = parse_args(parser, argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _dispatch(args)
    except KeyboardInterrupt:
        print("kdqat: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a user error: one line, exit 2; anything else is a bug: its traceback, exit 1
        lost = isinstance(exc, RuntimeError) and not isinstance(exc, USER_ERRORS)
        if not lost or not any(s in str(exc) for s in _PEER_LOST):
            return report(exc)
        # another rank died (killed, out of memory, a node lost): the launcher reports which one; the
        # survivors' collective tracebacks would only bury that report
        rank = os.environ.get("RANK", "?")
        print(
            f"kdqat: error: rank {rank} lost its connection to another rank, which probably died (see the "
            f"launcher's report): {str(exc).splitlines()[0][:200]}",
            file=sys.stderr,
        )
        return 1


def recipes_table(width: int = 100) -> str:
    """The shipped recipes, one per line: name and the one-sentence description on its YAML's first line,
    wrapped to ``width`` columns under the description column."""
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    col = max(len(p.stem) for p in paths) + 2
    lines = []
    for p in paths:
        text = p.read_text().splitlines()[0].lstrip("# ").strip()
        wrapped = textwrap.wrap(text, width=max(width - col, 30)) or [""]
        lines += [f"{p.stem:{col}s}{wrapped[0]}", *(" " * col + w for w in wrapped[1:])]
    return "\n".join(lines)


def _dispatch(args) -> int:
    import yaml

    from kdqat_dist import pipeline

    if args.command == "recipes":
        print(recipes_table(shutil.get_terminal_size().columns))
        return 0
    if args.command == "config":
        print(yaml.safe_dump(to_dict(load_config(args.recipe, args.overrides)), sort_keys=False), end="")
        return 0
    if args.command == "export":  # its round trip evaluates through the pipeline, which sits above export/
        return args.func(args, evaluate_folder=pipeline.evaluate_folder)
    if hasattr(args, "func"):
        return args.func(args)
    if args.command == "demo":
        pipeline.demo(args.config, args.overrides, args.num_procs, args.engine)
        return 0
    if args.command == "eval":
        pipeline.eval_model(args.model, args.config, args.overrides, as_json=args.json)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command in ("train", "finetune"):
        result = pipeline.run_and_report(cfg, args.command, resume=args.resume)
        return 0 if result else 1
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
