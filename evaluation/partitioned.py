"""Metrics of models on a Dask test set, computed partition by partition on the cluster.

Each partition's task runs every model on its rows and returns small partial statistics,
never the rows: the confusion counts (accuracy, balanced accuracy, precision, recall, f1
and Cohen's kappa all follow from the summed confusion matrix), the summed log loss and
Brier terms, and, for regression, the sums of errors and labels (RMSE, MAE, R²). The
ranking metrics (ROC AUC, average precision) and the curves need every score in order:
for those each partition returns the scores alone, one positive flag and one probability
per row for a binary model (about 9 bytes a row, ~36 MB for 4M rows; the whole class
probability matrix and labels for a multiclass one), and they are computed over them
exactly as on the pandas path. No histogram approximation: the figures equal the pandas
path's up to floating-point summation order. A metric registered without a partial form
here is computed the same way, from its collected outputs. Example::

    measured = measure_partitioned({"m1": m1}, X_test, y_test, {"m1": ["roc_auc", "f1"]},
                                   client)
    measured["m1"].metrics        # {"roc_auc": 0.93, "f1": 0.71}
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from common.errors import InvalidInput
from evaluation.metrics import (
    MAX_CURVE_POINTS,
    Outputs,
    check_fits,
    get_evaluator,
    is_binary,
    is_classifier,
    pr_points,
    roc_points,
)

if TYPE_CHECKING:
    from distributed import Client

RANKING = {"roc_auc", "average_precision"}


@dataclass
class Parts:
    """A model's partial statistics over some rows; ``+`` adds two partitions' parts."""

    rows: int = 0
    confusion: np.ndarray | None = None
    log_loss: float = 0.0
    brier: float = 0.0
    regression: np.ndarray = field(default_factory=lambda: np.zeros(5))
    """n, sum of squared errors, of absolute errors, of labels, of squared labels."""
    collected: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """Per-row arrays kept whole: ``y``, ``positive``, ``score``, ``predictions``,
    ``probabilities`` (only those some metric or the curves need)."""

    def __add__(self, other: Parts) -> Parts:
        confusion = other.confusion if self.confusion is None else (
            self.confusion if other.confusion is None else self.confusion + other.confusion)
        collected = {k: self.collected.get(k, []) + other.collected.get(k, [])
                     for k in self.collected.keys() | other.collected.keys()}
        return Parts(self.rows + other.rows, confusion, self.log_loss + other.log_loss,
                     self.brier + other.brier, self.regression + other.regression, collected)

    def array(self, name: str) -> np.ndarray:
        """A collected per-row array, partitions joined in order."""
        return np.concatenate(self.collected[name])


@dataclass(frozen=True)
class Measured:
    """A model's metrics on the whole test set and, for a binary classifier, its curves."""

    metrics: dict[str, float]
    curves: dict[str, dict[str, list[float]]] | None


def measure_partitioned(
    models: dict[str, Any], X: Any, y: Any, metrics: dict[str, list[str]], client: Client,
) -> dict[str, Measured]:
    """Each model's ``metrics`` on the Dask test set (X, y), one pass over its partitions."""
    import dask

    for key, model in models.items():
        for name in metrics[key]:
            check_fits(get_evaluator(name), model)
    shipped = dask.delayed(models, traverse=False)  # one task: shipped once to each worker
    tasks = [dask.delayed(_partition_parts)(X_part, y_part, shipped, metrics)
             for X_part, y_part in zip(X.to_delayed(), y.to_delayed(), strict=True)]
    per_partition: list[dict[str, Parts]] = client.compute(tasks, sync=True)
    totals = {key: sum((p[key] for p in per_partition), Parts()) for key in models}
    return {key: Measured(_metrics(models[key], totals[key], metrics[key]),
                          _curves(models[key], totals[key])) for key in models}


def warm_workers(client: Client) -> None:
    """Import what the partition tasks run (this module, scikit-learn's metrics) on every
    worker now, not in the first evaluation's tasks."""
    client.run(_import, __name__)


def _import(module: str) -> None:
    importlib.import_module(module)  # the module itself does not travel back


def _partition_parts(X: pd.DataFrame, y: pd.Series, models: dict[str, Any],
                     metrics: dict[str, list[str]]) -> dict[str, Parts]:
    return {key: partition_parts(model, X, np.asarray(y), metrics[key])
            for key, model in models.items()}


def partition_parts(model: Any, X: pd.DataFrame, y: np.ndarray, names: list[str]) -> Parts:
    """One partition's partial statistics of ``model`` for the metrics ``names``."""
    outputs, parts = Outputs(model, X), Parts(rows=len(y))
    if len(y) == 0:  # a partition with no test rows (a sequential split's early ones)
        return parts
    if not is_classifier(model):
        errors = y - outputs.predictions
        parts.regression = np.array([len(y), (errors ** 2).sum(), np.abs(errors).sum(),
                                     y.sum(), (y.astype(float) ** 2).sum()])
    else:
        _classification_parts(model, outputs, y, names, parts)
    for name in names:
        if name not in FROM_PARTS and name not in RANKING:  # kept whole: no partial form
            needs = get_evaluator(name).needs
            parts.collected.setdefault("y", [y])
            parts.collected[needs] = [outputs.get(needs)]
    return parts


def _classification_parts(model: Any, outputs: Outputs, y: np.ndarray, names: list[str],
                          parts: Parts) -> None:
    classes = np.asarray(model.classes_)
    if any(get_evaluator(n).needs == "predictions" for n in names):
        parts.confusion = skm.confusion_matrix(y, outputs.predictions, labels=classes)
    if "log_loss" in names and len(y):
        parts.log_loss = float(skm.log_loss(y, outputs.probabilities, labels=classes,
                                            normalize=False))
    if "brier" in names:
        one_hot = (y[:, None] == classes[None, :]).astype(float)
        parts.brier = 0.5 * float(((outputs.probabilities - one_hot) ** 2).sum())
    if is_binary(model) and hasattr(model, "predict_proba"):  # ranking metrics and curves
        parts.collected["positive"] = [(y == classes[1]).astype(np.int8)]
        parts.collected["score"] = [outputs.probabilities[:, 1]]
    elif RANKING & set(names):
        parts.collected["y"] = [y]
        parts.collected["probabilities"] = [outputs.probabilities]


# -- metrics from the summed parts -------------------------------------------------------


def _metrics(model: Any, parts: Parts, names: list[str]) -> dict[str, float]:
    classes = np.asarray(getattr(model, "classes_", []))
    out = {}
    for name in names:
        if name in FROM_PARTS:
            out[name] = float(FROM_PARTS[name](parts, classes))
        else:  # ranking metrics and metrics without a partial form: their outputs, whole
            out.update(_whole(model, parts, name, classes))
    return out


def _whole(model: Any, parts: Parts, name: str, classes: np.ndarray) -> dict[str, float]:
    evaluator = get_evaluator(name)
    if name in RANKING and "positive" in parts.collected:
        positive, score = parts.array("positive"), parts.array("score")
        y, probabilities = np.where(positive == 1, classes[1], classes[0]), \
            np.column_stack([1 - score, score])
        return {name: _scored(name, evaluator.score, y, probabilities, classes)}
    output = parts.array(evaluator.needs)
    return {name: _scored(name, evaluator.score, parts.array("y"), output, classes)}


def _scored(name: str, score: Callable[..., float], y: np.ndarray, output: np.ndarray,
            classes: np.ndarray) -> float:
    try:
        return float(score(y, output, classes))
    except ValueError as exc:
        raise InvalidInput(f"metric {name} cannot be computed here: {exc}") from None


def _from_confusion(metric: Callable[..., float]) -> Callable[[Parts, np.ndarray], float]:
    """A label metric of the summed confusion matrix: its cells as weighted (true,
    predicted) pairs, so scikit-learn computes it exactly as on every row."""

    def score(parts: Parts, classes: np.ndarray) -> float:
        assert parts.confusion is not None
        true, predicted = np.nonzero(parts.confusion)
        weights = parts.confusion[true, predicted]
        return metric(classes[true], classes[predicted], weights, classes)

    return score


def _averaged(metric: Callable[..., float]) -> Callable[..., float]:
    def score(y: np.ndarray, predicted: np.ndarray, weights: np.ndarray,
              classes: np.ndarray) -> float:
        if len(classes) == 2:
            return metric(y, predicted, pos_label=classes[1], zero_division=0,
                          sample_weight=weights)
        return metric(y, predicted, labels=classes, average="macro", zero_division=0,
                      sample_weight=weights)

    return score


def _weighted(metric: Callable[..., float]) -> Callable[..., float]:
    return lambda y, predicted, weights, classes: metric(y, predicted, sample_weight=weights)


def _regression(index: Callable[[np.ndarray], float]) -> Callable[[Parts, np.ndarray], float]:
    return lambda parts, classes: index(parts.regression)


def _r2(sums: np.ndarray) -> float:
    n, squared_errors, _, total, squares = sums
    spread = squares - total * total / n
    return float(1 - squared_errors / spread) if spread else float("nan")


FROM_PARTS: dict[str, Callable[[Parts, np.ndarray], float]] = {
    "accuracy": _from_confusion(_weighted(skm.accuracy_score)),
    "balanced_accuracy": _from_confusion(_weighted(skm.balanced_accuracy_score)),
    "precision": _from_confusion(_averaged(skm.precision_score)),
    "recall": _from_confusion(_averaged(skm.recall_score)),
    "f1": _from_confusion(_averaged(skm.f1_score)),
    "cohen_kappa": _from_confusion(_weighted(skm.cohen_kappa_score)),
    "log_loss": lambda parts, classes: parts.log_loss / parts.rows,
    "brier": lambda parts, classes: parts.brier / parts.rows,
    "rmse": _regression(lambda s: float(np.sqrt(s[1] / s[0]))),
    "mae": _regression(lambda s: float(s[2] / s[0])),
    "r2": _regression(_r2),
}
"""The metrics summed partition by partition, and how each follows from the sums."""


def _curves(model: Any, parts: Parts) -> dict[str, dict[str, list[float]]] | None:
    if "positive" not in parts.collected:
        return None
    positive, score = parts.array("positive"), parts.array("score")
    if positive.min() == positive.max():
        raise InvalidInput("curves need both classes in y")
    return {"roc": roc_points(positive, score, MAX_CURVE_POINTS),
            "pr": pr_points(positive, score, MAX_CURVE_POINTS)}
