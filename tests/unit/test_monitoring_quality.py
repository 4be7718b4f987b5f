"""Live quality from outcomes: the sliding window, the metrics, the degradation rule."""

from __future__ import annotations

import pytest
from sklearn import metrics as skm

from monitoring.quality import (
    Degradation,
    QualityRule,
    QualityWindow,
    degradation,
    label_of,
    quality_of,
)


@pytest.mark.parametrize(("value", "label"), [
    (1.0, "1"), (0.0, "0"), (0.25, "0.25"), ("1", "1"), (" yes ", "yes"), (True, "True"),
])
def test_outcomes_become_labels_like_the_models(value: object, label: str) -> None:
    assert label_of(value) == label


def test_the_window_keeps_the_latest_pairs() -> None:
    window = QualityWindow(3)
    for pair in [("1", "1"), ("0", "1"), ("1", "0"), ("0", "0")]:
        window.add(*pair)
    assert len(window) == 3
    assert window.columns() == (["0", "1", "0"], ["1", "0", "0"])


def test_binary_quality_uses_the_last_class_as_positive() -> None:
    predicted = ["1", "1", "0", "0", "1", "0"]
    observed = ["1", "0", "0", "1", "1", "0"]
    live = quality_of(predicted, observed, classes=["0", "1"])
    assert live == pytest.approx({
        "accuracy": skm.accuracy_score(observed, predicted),
        "precision": skm.precision_score(observed, predicted, pos_label="1"),
        "recall": skm.recall_score(observed, predicted, pos_label="1"),
        "f1": skm.f1_score(observed, predicted, pos_label="1"),
    })


def test_quality_with_only_negatives_has_no_error() -> None:
    live = quality_of(["0"] * 5, ["0"] * 5, classes=["0", "1"])
    assert live == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_multiclass_quality_is_macro_averaged() -> None:
    predicted, observed = ["a", "b", "c", "a"], ["a", "b", "b", "c"]
    live = quality_of(predicted, observed)
    assert live["f1"] == pytest.approx(skm.f1_score(observed, predicted, average="macro"))
    assert quality_of([], []) == {}


def test_degraded_only_below_the_margin_with_enough_outcomes() -> None:
    rule = QualityRule("accuracy", margin=0.05, min_outcomes=100)
    expected = {"accuracy": 0.95}
    assert degradation({"accuracy": 0.80}, expected, count=100, rule=rule) == Degradation(
        "accuracy", 0.80, 0.95)
    assert degradation({"accuracy": 0.91}, expected, count=100, rule=rule) is None
    assert degradation({"accuracy": 0.10}, expected, count=99, rule=rule) is None
    assert degradation({"accuracy": 0.10}, {}, count=500, rule=rule) is None
    f1_rule = QualityRule("f1", margin=0.1, min_outcomes=1)
    assert degradation({"f1": 0.5}, {"f1": 0.7}, count=1, rule=f1_rule) is not None
