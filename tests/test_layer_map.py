"""distill.layer_map: identity, uniform and explicit student-to-teacher layer mappings."""

from __future__ import annotations

import pytest

from kdqat_dist.config import ConfigError
from kdqat_dist.models.layer_map import hidden_map, layer_map


def test_identity():
    assert layer_map(3, 3, "identity") == [(0, 0), (1, 1), (2, 2)]


def test_identity_needs_equal_depth():
    with pytest.raises(ConfigError, match=r"distill\.layer_map.*identity"):
        layer_map(12, 6, "identity")


@pytest.mark.parametrize(
    "n_teacher, n_student, want",
    [
        (12, 6, [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]),
        (12, 4, [(0, 2), (1, 5), (2, 8), (3, 11)]),
        (6, 6, [(i, i) for i in range(6)]),
        (6, 1, [(0, 5)]),
    ],
)
def test_uniform(n_teacher, n_student, want):
    assert layer_map(n_teacher, n_student, "uniform") == want


@pytest.mark.parametrize("n_teacher, n_student", [(12, 5), (4, 8)])
def test_uniform_needs_a_multiple(n_teacher, n_student):
    with pytest.raises(ValueError, match=r"distill\.layer_map.*uniform") as info:
        layer_map(n_teacher, n_student, "uniform")
    assert isinstance(info.value, ConfigError)
    assert "\n" not in str(info.value)


def test_explicit_list():
    assert layer_map(12, 3, [3, 7, 11]) == [(0, 3), (1, 7), (2, 11)]
    assert layer_map(4, 2, (3, 0)) == [(0, 3), (1, 0)]  # order is not restricted


@pytest.mark.parametrize("bad", [[0, 1], [0, 1, 2, 3], [0, 1, 12], [-1, 1, 2], [0, 1.0, 2], [0, True, 2]])
def test_explicit_list_rejects(bad):
    with pytest.raises(ConfigError, match=r"distill\.layer_map"):
        layer_map(12, 3, bad)


@pytest.mark.parametrize("strategy", ["skip", 3, None])
def test_unknown_strategy(strategy):
    with pytest.raises(ConfigError, match=r"distill\.layer_map.*allowed"):
        layer_map(12, 6, strategy)


@pytest.mark.parametrize("n_teacher, n_student", [(0, 1), (4, 0), (4, -2), (4.0, 2)])
def test_bad_counts(n_teacher, n_student):
    with pytest.raises(ConfigError, match=r"distill\.layer_map"):
        layer_map(n_teacher, n_student, "uniform")


def test_hidden_map_includes_embeddings():
    assert hidden_map(12, 4, "uniform") == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]
    assert hidden_map(2, 2, "identity") == [(0, 0), (1, 1), (2, 2)]
    assert hidden_map(4, 2, [0, 0]) == [(0, 0), (1, 1), (2, 1)]
    with pytest.raises(ConfigError):
        hidden_map(12, 5, "uniform")
