"""Task heads (:class:`~kdqat_dist.data.heads.base.TaskHead`) and their registry, keyed by ``TaskSpec.head``."""

from __future__ import annotations

from kdqat_dist.data.heads.base import INPUT_COLUMNS, LABEL_KEYS, Head, HeadOutput, TaskHead
from kdqat_dist.data.heads.qa import QAHead
from kdqat_dist.data.heads.sequence import SequenceHead
from kdqat_dist.data.heads.token import TokenHead
from kdqat_dist.data.tasks import TaskSpec
from kdqat_dist.errors import DataError

# TaskSpec.head -> its head class (the QA head registers "qa" here)
HEADS: dict[str, type[TaskHead]] = {"sequence": SequenceHead, "token": TokenHead, "qa": QAHead}


def get_head(spec: TaskSpec) -> TaskHead:
    """The task head for ``spec`` (``spec.head`` names its kind)."""
    if spec.head not in HEADS:
        raise DataError(
            f"data.task: task {spec.name} needs the {spec.head!r} task head, which this build does not have "
            f"(heads: {', '.join(HEADS)})"
        )
    return HEADS[spec.head](spec)


__all__ = ["HEADS", "INPUT_COLUMNS", "LABEL_KEYS", "Head", "HeadOutput", "TaskHead", "get_head"]
