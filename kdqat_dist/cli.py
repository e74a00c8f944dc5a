"""``kdqat``: the command line. Parses arguments and calls into the library, nothing else.

User errors (bad config, data, paths) print one line ``kdqat: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import torch
import yaml
from transformers.utils import logging as hf_logging

from kdqat_dist import pipeline
from kdqat_dist.config import RECIPES_DIR, load_config, to_dict
from kdqat_dist.errors import ConfigError, TrainingError

EPILOG = """examples:
  kdqat demo                                    # the whole pipeline on the built-in task (offline)
  kdqat finetune --config tiny_debug model.name_or_path=minilm train.output_dir=runs/teacher
  kdqat train --config bert_base_w2a8_kd data.task=rte teacher.path=models/rte distill.gamma=0.5
  kdqat eval --model runs/x/student --config tiny_debug
  deepspeed --num_gpus 8 -m kdqat_dist.cli train --config bert_large_w2a8_kd engine.backend=deepspeed
  torchrun --nproc_per_node 8 -m kdqat_dist.cli train --config bert_large_w2a8_kd engine.backend=fsdp2

Overrides are dotted keys: section.field=value (values parsed as YAML). Recipes shipped in the package
can be named without a path; see `kdqat recipes`."""


SECTIONS_HELP = """config sections: model teacher student data quant distill train engine tune analysis
  kdqat config RECIPE [key=value ...]   prints every key of the resolved config with its value (YAML)"""


def _version() -> str:
    try:
        return version("kdqat-dist")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


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
    parser.add_argument("--version", action="version", version=f"kdqat {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, help_ in (
        ("finetune", "fine-tune the full-precision teacher on a task (saves HF format)"),
        ("train", "KD-QAT: train the quantized student from the fine-tuned teacher"),
    ):
        p = sub.add_parser(name, help=help_, epilog=SECTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")

    p = sub.add_parser("eval", help="evaluate a model folder (FP model or kdqat student) on the task's dev set")
    p.add_argument("--model", required=True, help="a fine-tuned model folder or a `kdqat train` student/")
    _add_config_args(p)

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
    """Subcommands whose modules register themselves (sweep, analyze, export)."""
    for mod in ("kdqat_dist.tune.cli", "kdqat_dist.analysis.cli", "kdqat_dist.export.cli"):
        try:
            module = __import__(mod, fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)


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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # What DeepSpeed falls back to anyway on a machine without CUDA, said up front: otherwise its
        # "Setting accelerator to CPU ... unable to detect it" warning lands in the middle of a run
        # (transformers imports DeepSpeed lazily). CUDA and CPU are the accelerators kdqat supports.
        os.environ["DS_ACCELERATOR"] = "cpu"
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown our own progress bar
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except (ConfigError, TrainingError, FileNotFoundError) as exc:  # DataError is a ConfigError
        print(f"kdqat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdqat: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not any(s in str(exc) for s in _PEER_LOST):
            raise
        # another rank died (killed, out of memory, a node lost): the launcher reports which one; the
        # survivors' collective tracebacks would only bury that report
        rank = os.environ.get("RANK", "?")
        print(
            f"kdqat: error: rank {rank} lost its connection to another rank, which probably died (see the "
            f"launcher's report): {str(exc).splitlines()[0][:200]}",
            file=sys.stderr,
        )
        return 1


def _dispatch(args) -> int:
    if args.command == "recipes":
        for p in sorted(RECIPES_DIR.glob("*.yaml")):
            first = p.read_text().splitlines()[0].lstrip("# ").strip()
            print(f"{p.stem:28s} {first}")
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
    cfg = load_config(args.config, args.overrides)
    if args.command in ("train", "finetune"):
        result = pipeline.run_and_report(cfg, args.command, resume=args.resume)
        return 0 if result else 1
    if args.command == "eval":
        pipeline.evaluate_folder(cfg, args.model)
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
