"""``python -m kdqat_dist.precheck train|finetune [--resume] --config RECIPE [key=value ...]``: what every
rank of a multi-rank job would check first, checked once, before a launcher starts any rank.

The launch scripts (``launch/*.sh``, ``launch/*.sbatch``) run it in front of ``deepspeed`` / ``torchrun`` /
``srun``: a bad recipe, override, task or output folder is then one line and exit status 2, instead of the
same error from every rank followed by the launcher's own report (torchrun's is a traceback). It loads the
config and the task and checks the run's folders (:func:`kdqat_dist.files.check_run_folder`); it does not
load models or data, so it takes the seconds of an import, not of a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from kdqat_dist.config import load_config
from kdqat_dist.data.tasks import get_task
from kdqat_dist.errors import ConfigError, report
from kdqat_dist.files import check_run_folder


def check(command: str, recipe: str, overrides: list[str], resume: bool = False, world_size: int | None = None) -> None:
    """Raise :class:`ConfigError` (one line) for what the ranks of ``kdqat <command>`` would refuse first.

    ``world_size``: the job's number of ranks, when the launcher knows it (the batch must split over them).
    """
    cfg = load_config(recipe, overrides)
    task = get_task(cfg.data)
    check_run_folder(cfg, command, resume)
    if command == "train":
        if not cfg.teacher.path:
            raise ConfigError("teacher.path: required for `kdqat train` (a `kdqat finetune` output folder)")
        for key, p in (("teacher.path", cfg.teacher.path), ("student.init_from", cfg.student.init_from)):
            if p and not Path(p).expanduser().exists():
                raise ConfigError(f"{key}: {p} does not exist (expected a fine-tuned model folder)")
    if world_size is not None:
        train = dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size or task.batch_size)
        train.micro_batch_size(world_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kdqat", description=__doc__.split("\n\n")[0])
    p.add_argument("command")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--world-size", type=int, default=None, help="ranks of the job, when known")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    # key=value may follow an option (`--config X --world-size 2 a=b`), where argparse's positional list ends
    args, extra = p.parse_known_args(argv)
    try:
        if bad := [x for x in extra if x.startswith("-") or "=" not in x]:
            raise ConfigError(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = [*args.overrides, *extra]
        if args.command not in ("train", "finetune"):
            raise ConfigError(f"command {args.command!r}: allowed: train, finetune")
        check(args.command, args.config, args.overrides, args.resume, args.world_size)
    except Exception as exc:  # a user error: one line, exit 2; anything else: a bug, with its traceback
        return report(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
