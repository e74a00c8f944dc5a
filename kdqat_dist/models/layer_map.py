"""Which teacher layer each student layer learns from (``distill.layer_map``).

The student normally keeps all of the teacher's layers (``identity``). A shallower student
(``student.num_layers``) uses the TinyBERT / KDLSQ-BERT uniform mapping or an explicit list.
Indices are 0-based Transformer layers; :func:`hidden_map` shifts them by one for hidden-state
lists, whose index 0 is the embedding output.
"""

from __future__ import annotations

from kdqat_dist.config import ConfigError

__all__ = ["hidden_map", "layer_map"]

_KEY = "distill.layer_map"
_ALLOWED = "allowed: identity, uniform, or a list of teacher layer indices"


def _check_counts(n_teacher: int, n_student: int) -> None:
    for name, n in (("teacher", n_teacher), ("student", n_student)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{_KEY}: the {name} layer count must be a positive integer, got {n!r}")


def layer_map(n_teacher: int, n_student: int, strategy: str | list[int]) -> list[tuple[int, int]]:
    """(student_layer, teacher_layer) pairs for the Transformer layers, 0-based.

    Strategies:
        ``"identity"``: student layer i <- teacher layer i; needs ``n_student == n_teacher``.
        ``"uniform"``: student layer i <- teacher layer ``(i + 1) * (n_teacher // n_student) - 1``, so
            the last student layer always learns from the last teacher layer; needs ``n_teacher`` to
            be a multiple of ``n_student``.
        a list of ``n_student`` ints: student layer i <- teacher layer ``strategy[i]``; each index must
            be in ``[0, n_teacher)``. Order and repeats are not restricted.

    Returns ``n_student`` pairs ordered by student layer; any invalid input raises a one-line
    ConfigError (a ValueError) naming ``distill.layer_map``.
    """
    _check_counts(n_teacher, n_student)
    if isinstance(strategy, str):
        if strategy == "identity":
            if n_student != n_teacher:
                raise ConfigError(
                    f"{_KEY}: 'identity' needs as many student as teacher layers, got {n_student} student "
                    f"and {n_teacher} teacher layers; use 'uniform' or an explicit list"
                )
            return [(i, i) for i in range(n_student)]
        if strategy == "uniform":
            if n_teacher % n_student != 0:
                raise ConfigError(
                    f"{_KEY}: 'uniform' needs the teacher's {n_teacher} layers to be a multiple of the "
                    f"student's {n_student}; use an explicit list of {n_student} teacher layer indices"
                )
            step = n_teacher // n_student
            return [(i, (i + 1) * step - 1) for i in range(n_student)]
        raise ConfigError(f"{_KEY}: got {strategy!r}; {_ALLOWED}")
    if not isinstance(strategy, (list, tuple)):
        raise ConfigError(f"{_KEY}: got {strategy!r}; {_ALLOWED}")
    if len(strategy) != n_student:
        raise ConfigError(f"{_KEY}: the list has {len(strategy)} entries but the student has {n_student} layers")
    for i, t in enumerate(strategy):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_teacher:
            raise ConfigError(f"{_KEY}[{i}]: got {t!r}; teacher layer indices must be integers in [0, {n_teacher - 1}]")
    return [(i, t) for i, t in enumerate(strategy)]


def hidden_map(n_teacher: int, n_student: int, strategy: str | list[int]) -> list[tuple[int, int]]:
    """(student_index, teacher_index) pairs into hidden-state lists that start with the embedding output.

    Hidden states are ``L + 1`` tensors: index 0 is the embedding output and index ``l + 1`` is the
    output of Transformer layer ``l``. The embeddings always pair with each other; errors as for
    :func:`layer_map`.
    """
    return [(0, 0)] + [(s + 1, t + 1) for s, t in layer_map(n_teacher, n_student, strategy)]
