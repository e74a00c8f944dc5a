"""Task registry and metrics, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kdqat_dist.config import ConfigError, DataConfig
from kdqat_dist.data.tasks import (
    GLUE_TASKS,
    TASKS,
    TaskSpec,
    compute_metrics,
    get_task,
    matthews_corrcoef,
    pearson,
    selection_value,
    spearman,
)
from kdqat_dist.errors import DataError

# --------------------------------------------------------------------------- registry


def test_every_glue_task_and_demo_is_registered():
    assert set(GLUE_TASKS) | {"demo", "conll2003", "squad", "squad_v2"} == set(TASKS)
    for name in TASKS:
        assert get_task(DataConfig(task=name)).name == name


@pytest.mark.parametrize(
    "alias, name",
    [
        ("SST-2", "sst2"),
        ("sst-2", "sst2"),
        ("sts-b", "stsb"),
        ("STS-B", "stsb"),
        ("STS_B", "stsb"),
        ("MNLI", "mnli"),
        ("Rte", "rte"),
        (" qqp ", "qqp"),
        ("CoLA", "cola"),
    ],
)
def test_aliases(alias, name):
    assert get_task(DataConfig(task=alias)).name == name
    assert get_task(alias).name == name


def test_unknown_task_lists_the_allowed_names():
    with pytest.raises(DataError) as exc:
        get_task(DataConfig(task="sst3"))
    msg = str(exc.value)
    assert "'sst3'" in msg and "\n" not in msg
    for name in (*GLUE_TASKS, "demo", "custom"):
        assert name in msg
    assert isinstance(exc.value, ConfigError)


def test_recipe_table_defaults():
    # the reference code's recipe: (max_seq_len, eval every)
    table = {
        "cola": (64, 50),
        "sst2": (64, 100),
        "mrpc": (128, 50),
        "stsb": (128, 100),
        "rte": (128, 20),
        "qnli": (128, 1000),
        "qqp": (128, 1000),
        "mnli": (128, 8000),
        "demo": (64, 50),
    }
    for name, (max_len, every) in table.items():
        spec = get_task(name)
        assert (spec.max_seq_length, spec.eval_every) == (max_len, every), name


def test_max_seq_length_override():
    assert get_task(DataConfig(task="cola", max_seq_length=96)).max_seq_length == 96
    with pytest.raises(DataError, match="data.max_seq_length"):
        get_task(DataConfig(task="cola", max_seq_length=0))


def test_labels_and_eval_splits():
    assert get_task("mnli").eval_splits == ("dev", "dev_mm")
    for name in TASKS:
        if name != "mnli":
            assert get_task(name).eval_splits == ("dev",)
    assert get_task("mnli").label_list == ("contradiction", "entailment", "neutral")
    assert get_task("mnli").num_labels == 3
    assert get_task("rte").label_list == ("entailment", "not_entailment")
    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_list is None
    demo = get_task("demo")
    assert demo.label_list == ("negative", "positive") and demo.text_b is None and not demo.is_regression
    assert get_task("mrpc").text_b == "sentence2"


def test_selection_metrics():
    expected = {
        "cola": "mcc",
        "sst2": "acc",
        "mrpc": "acc_and_f1",
        "stsb": "corr",
        "qqp": "acc_and_f1",
        "mnli": "acc",
        "qnli": "acc",
        "rte": "acc",
        "demo": "acc",
    }
    assert {n: get_task(n).selection_metric for n in expected} == expected


# --------------------------------------------------------------------------- custom tasks


def test_custom_classification():
    spec = get_task(
        DataConfig(task="custom", text_a="review", text_b="title", label="stars", label_list=["bad", "good", "great"])
    )
    assert spec.name == "custom" and spec.label_list == ("bad", "good", "great") and spec.num_labels == 3
    assert (spec.text_a, spec.text_b, spec.label) == ("review", "title", "stars")
    assert spec.selection_metric == "acc" and spec.max_seq_length == 128


def test_custom_regression_and_numbered_classes():
    reg = get_task(DataConfig(task="Custom", num_labels=1, max_seq_length=32))
    assert reg.is_regression and reg.selection_metric == "corr" and reg.max_seq_length == 32
    three = get_task(DataConfig(task="custom", num_labels=3))
    assert three.label_list == ("0", "1", "2")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "data.label_list"),
        ({"label_list": ["a", "b"], "num_labels": 3}, "data.num_labels"),
        ({"label_list": ["a"]}, "data.label_list"),
        ({"label_list": ["a", "a"]}, "data.label_list"),
        ({"num_labels": 0}, "data.num_labels"),
    ],
)
def test_custom_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        get_task(DataConfig(task="custom", **kwargs))


# --------------------------------------------------------------------------- metrics

P6 = np.array([1, 1, 0, 0, 1, 0])
L6 = np.array([1, 0, 0, 0, 1, 1])  # TP=2 FP=1 TN=2 FN=1


def test_mcc_hand_computed():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert compute_metrics("cola", P6, L6) == {"mcc": pytest.approx(1 / 3)}
    assert matthews_corrcoef(L6, L6) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - L6, L6) == pytest.approx(-1.0)


def test_mcc_constant_prediction_is_zero_not_nan():
    for const in (0, 1):
        m = compute_metrics("cola", np.full(6, const), L6)["mcc"]
        assert m == 0.0 and not math.isnan(m)
    assert matthews_corrcoef(np.zeros(4, int), np.zeros(4, int)) == 0.0  # one class only


def test_mcc_multiclass_matches_binary_form_and_perfect():
    y = np.array([0, 1, 2, 2, 1, 0])
    assert matthews_corrcoef(y, y) == pytest.approx(1.0)
    # Hand-computed multi-class form: C=4, N=6, t=p=(2,2,2) -> (4*6 - 12) / sqrt((36-12)(36-12)) = 0.5
    p = np.array([0, 1, 2, 1, 2, 0])
    assert matthews_corrcoef(p, y) == pytest.approx(0.5)


def test_acc_f1_hand_computed():
    # acc 4/6; F1 = 2TP / (2TP + FP + FN) = 4/6
    m = compute_metrics("mrpc", P6, L6)
    assert m == pytest.approx({"acc": 2 / 3, "f1": 2 / 3, "acc_and_f1": 2 / 3})
    # acc 0.5; TP=2 FP=2 FN=0 -> F1 = 4/6
    m = compute_metrics("qqp", np.array([1, 1, 1, 1]), np.array([1, 1, 0, 0]))
    assert m == pytest.approx({"acc": 0.5, "f1": 2 / 3, "acc_and_f1": (0.5 + 2 / 3) / 2})
    assert compute_metrics("qqp", np.zeros(4, int), np.array([1, 1, 0, 0]))["f1"] == 0.0


@pytest.mark.parametrize("name", ["sst2", "qnli", "rte", "demo", "mnli"])
def test_accuracy_tasks(name):
    assert compute_metrics(name, P6, L6) == {"acc": pytest.approx(4 / 6)}


def test_mnli_three_classes_and_logits():
    labels = np.array([0, 1, 2, 2])
    logits = np.array([[3.0, 0, 0], [0, 2, 1], [0, 5, 1], [0, 0, 9]])  # argmax 0 1 1 2
    assert compute_metrics("mnli", logits, labels) == {"acc": 0.75}


def test_pearson_spearman_hand_computed():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    # deviations (-1.5 -.5 .5 1.5) and (-1.5 .5 -.5 1.5): cov 4, variances 5 -> 0.8, same on ranks
    y = np.array([1.0, 3.0, 2.0, 4.0])
    m = compute_metrics("stsb", x, y)
    assert m == pytest.approx({"pearson": 0.8, "spearman": 0.8, "corr": 0.8})
    # monotonic but not linear: Spearman 1, Pearson below 1
    y2 = np.array([1.0, 4.0, 9.0, 100.0])
    assert spearman(x, y2) == pytest.approx(1.0) and pearson(x, y2) < 0.9
    # ties get their mean rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5)
    tied = np.array([1.0, 2.0, 2.0, 3.0])
    assert spearman(tied, x) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman(tied, y2) == pytest.approx(stats.spearmanr(tied, y2).statistic)
    assert pearson(x, y2) == pytest.approx(stats.pearsonr(x, y2).statistic)


def test_regression_shapes_and_constant_prediction():
    y = np.array([0.5, 1.5, 3.0, 4.5])
    m = compute_metrics("stsb", y.reshape(-1, 1) * 2 + 1, y)
    assert m["pearson"] == pytest.approx(1.0) and m["corr"] == pytest.approx(1.0)
    const = compute_metrics("stsb", np.full(4, 2.0), y)
    assert const == {"pearson": 0.0, "spearman": 0.0, "corr": 0.0}


def test_custom_task_metrics_need_the_spec():
    reg = get_task(DataConfig(task="custom", num_labels=1))
    assert set(compute_metrics(reg, np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 2.5]))) == {
        "pearson",
        "spearman",
        "corr",
    }
    cls = get_task(DataConfig(task="custom", label_list=["a", "b", "c"]))
    assert compute_metrics(cls, np.array([0, 2, 1]), np.array([0, 2, 2])) == {"acc": pytest.approx(2 / 3)}
    with pytest.raises(DataError, match="TaskSpec"):
        compute_metrics("custom", np.array([0]), np.array([0]))


def test_metric_input_errors():
    with pytest.raises(ValueError, match="equal-length"):
        compute_metrics("sst2", np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("sst2", np.array([], dtype=int), np.array([], dtype=int))


def test_selection_value():
    assert selection_value("mrpc", compute_metrics("mrpc", P6, L6)) == pytest.approx(2 / 3)
    assert selection_value("cola", {"mcc": 0.25}) == 0.25
    assert selection_value("stsb", {"pearson": 0.8, "spearman": 0.6, "corr": 0.7}) == 0.7
    assert selection_value("mnli", {"acc": 0.8, "mm_acc": 0.9}) == 0.8  # matched decides
    # MRPC/QQP select on the reported number, not on accuracy (reference hazard E.2-10)
    assert selection_value("qqp", {"acc": 0.9, "f1": 0.5, "acc_and_f1": 0.7}) == 0.7
    with pytest.raises(KeyError, match="acc_and_f1"):
        selection_value("mrpc", {"acc": 0.9})


def test_taskspec_is_frozen():
    spec = get_task("sst2")
    assert isinstance(spec, TaskSpec)
    with pytest.raises(AttributeError):
        spec.name = "x"  # type: ignore[misc]
