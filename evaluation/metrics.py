"""The evaluators library: metrics registered by name, computed on a model and test data.

Each ``Evaluator`` knows its task (classification or regression), whether it scores
predicted labels or predicted probabilities, and whether higher is better. ``evaluate``
predicts and computes probabilities at most once, whatever the number of metrics.
Example::

    evaluate(model, X_test, y_test, ["average_precision", "f1", "log_loss"])
    # {"average_precision": 0.91, "f1": 0.84, "log_loss": 0.12}
    curves(model, X_test, y_test)["roc"]["fpr"]   # at most ~200 points, JSON-ready

Choices, following scikit-learn: the positive class of a binary classifier is
``model.classes_[1]`` (the greater label). For multiclass models precision, recall and f1
are macro averages; roc_auc is one-vs-rest with a macro average; average_precision is the
macro average over one-vs-rest columns; brier is the mean over rows of half the summed
squared error of the class probabilities (equal to scikit-learn's binary Brier score for
two classes). A binary roc_auc with a single class in ``y`` is undefined: NaN, which the
gate rejects. Data scikit-learn refuses (labels the model does not know, say) raises
``InvalidInput`` naming the metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from common.errors import InvalidInput

Task = Literal["classification", "regression"]
Needs = Literal["predictions", "probabilities"]
Score = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Evaluator:
    """A named metric: ``score(y_true, output, classes)`` where output is ``needs``."""

    name: str
    score: Score
    task: Task
    needs: Needs
    higher_is_better: bool


EVALUATORS: dict[str, Evaluator] = {}
"""Every known evaluator by name; ``register`` adds one."""


def register(evaluator: Evaluator) -> Evaluator:
    """Make an evaluator known by its name (a later one with the same name replaces it)."""
    EVALUATORS[evaluator.name] = evaluator
    return evaluator


def get_evaluator(name: str) -> Evaluator:
    """The evaluator called ``name``, or ``InvalidInput`` listing the known names."""
    try:
        return EVALUATORS[name]
    except KeyError:
        known = ", ".join(sorted(EVALUATORS))
        raise InvalidInput(f"unknown metric {name!r} (known: {known})") from None


def higher_is_better(name: str) -> bool:
    """Whether a larger value of the metric means a better model."""
    return get_evaluator(name).higher_is_better


def is_classifier(model: Any) -> bool:
    """Whether the model predicts classes (it has ``classes_``, as fitted sklearn ones do)."""
    return hasattr(model, "classes_")


def is_binary(model: Any) -> bool:
    """Whether the model is a classifier of exactly two classes."""
    return is_classifier(model) and len(model.classes_) == 2


def applicable(model: Any) -> list[str]:
    """The metrics this model can be scored on: its task, and probabilities if it has them."""
    task = "classification" if is_classifier(model) else "regression"
    has_proba = hasattr(model, "predict_proba")
    return [
        name
        for name, evaluator in EVALUATORS.items()
        if evaluator.task == task and (evaluator.needs == "predictions" or has_proba)
    ]


class Outputs:
    """A model's predictions and probabilities on ``X``, each computed once, when needed."""

    def __init__(self, model: Any, X: Any):
        self.model, self.X = model, X

    @cached_property
    def predictions(self) -> np.ndarray:
        return np.asarray(self.model.predict(self.X))

    @cached_property
    def probabilities(self) -> np.ndarray:
        return np.asarray(self.model.predict_proba(self.X))

    def get(self, needs: Needs) -> np.ndarray:
        return self.predictions if needs == "predictions" else self.probabilities


def evaluate(
    model: Any, X: Any, y: Any, metrics: list[str], outputs: Outputs | None = None
) -> dict[str, float]:
    """Each named metric of ``model`` on ``(X, y)``, as plain floats (``outputs``: the
    model's outputs on ``X`` if the caller keeps them for ``curves`` too)."""
    chosen = [get_evaluator(name) for name in metrics]
    for evaluator in chosen:
        check_fits(evaluator, model)
    outputs, y_true = outputs or Outputs(model, X), np.asarray(y)
    classes = np.asarray(getattr(model, "classes_", []))
    return {e.name: _compute(e, y_true, outputs.get(e.needs), classes) for e in chosen}


def check_fits(evaluator: Evaluator, model: Any) -> None:
    """``InvalidInput`` if the metric is not for this kind of model or needs what it lacks."""
    kind = "classifier" if is_classifier(model) else "regressor"
    if (evaluator.task == "classification") != is_classifier(model):
        raise InvalidInput(f"metric {evaluator.name} is for {evaluator.task}, not a {kind}")
    if evaluator.needs == "probabilities" and not hasattr(model, "predict_proba"):
        raise InvalidInput(f"metric {evaluator.name} needs predict_proba, which the model lacks")


def _compute(evaluator: Evaluator, y: np.ndarray, output: np.ndarray, classes: np.ndarray) -> float:
    try:
        return float(evaluator.score(y, output, classes))
    except ValueError as exc:
        raise InvalidInput(f"metric {evaluator.name} cannot be computed here: {exc}") from None


# --- classification on predicted labels -------------------------------------------------


def _averaged(metric: Callable[..., float]) -> Score:
    """A precision-like metric: binary on the positive class, macro-averaged for multiclass."""

    def score(y: np.ndarray, predicted: np.ndarray, classes: np.ndarray) -> float:
        if len(classes) == 2:
            return metric(y, predicted, pos_label=classes[1], zero_division=0)
        return metric(y, predicted, labels=classes, average="macro", zero_division=0)

    return score


def _ignoring_classes(metric: Callable[..., float]) -> Score:
    """A metric of ``(y_true, predicted)`` alone: label agreement or regression error."""
    return lambda y, predicted, classes: metric(y, predicted)


# --- classification on probabilities ----------------------------------------------------


def _positive(y: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> tuple:
    """The binary view: whether each row is the positive class, and its probability."""
    return (y == classes[1]).astype(int), probabilities[:, 1]


def _roc_auc(y: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> float:
    if len(classes) == 2:
        positive, probability = _positive(y, probabilities, classes)
        # Undefined with one class in y: NaN, as newer scikit-learn returns (older ones raise).
        if positive.min() == positive.max():
            return float("nan")
        return skm.roc_auc_score(positive, probability)
    return skm.roc_auc_score(y, probabilities, multi_class="ovr", average="macro", labels=classes)


def _average_precision(y: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> float:
    if len(classes) == 2:
        return skm.average_precision_score(*_positive(y, probabilities, classes))
    return skm.average_precision_score(_one_hot(y, classes), probabilities, average="macro")


def _log_loss(y: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> float:
    return skm.log_loss(y, probabilities, labels=classes)


def _brier(y: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> float:
    squared = (probabilities - _one_hot(y, classes)) ** 2
    return 0.5 * float(squared.sum(axis=1).mean())


def _one_hot(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One column per class in ``classes`` order (two columns for a binary model too)."""
    columns = label_binarize(y, classes=classes)
    return np.hstack([1 - columns, columns]) if len(classes) == 2 else columns


# --- regression -------------------------------------------------------------------------


def _rmse(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.sqrt(skm.mean_squared_error(y, predicted)))


def _classification(
    name: str, score: Score, needs: Needs = "predictions", higher_is_better: bool = True
) -> Evaluator:
    return Evaluator(name, score, "classification", needs, higher_is_better)


def _regression(name: str, score: Score, higher_is_better: bool = True) -> Evaluator:
    return Evaluator(name, score, "regression", "predictions", higher_is_better)


for _evaluator in (
    _classification("accuracy", _ignoring_classes(skm.accuracy_score)),
    _classification("balanced_accuracy", _ignoring_classes(skm.balanced_accuracy_score)),
    _classification("precision", _averaged(skm.precision_score)),
    _classification("recall", _averaged(skm.recall_score)),
    _classification("f1", _averaged(skm.f1_score)),
    _classification("roc_auc", _roc_auc, needs="probabilities"),
    _classification("average_precision", _average_precision, needs="probabilities"),
    _classification("cohen_kappa", _ignoring_classes(skm.cohen_kappa_score)),
    _classification("log_loss", _log_loss, needs="probabilities", higher_is_better=False),
    _classification("brier", _brier, needs="probabilities", higher_is_better=False),
    _regression("rmse", _ignoring_classes(_rmse), higher_is_better=False),
    _regression("mae", _ignoring_classes(skm.mean_absolute_error), higher_is_better=False),
    _regression("r2", _ignoring_classes(skm.r2_score)),
):
    register(_evaluator)


# --- curves -----------------------------------------------------------------------------

MAX_CURVE_POINTS = 200
"""Curves are thinned to this many points so they fit in model metadata JSON."""


def curves(
    model: Any, X: Any, y: Any, max_points: int = MAX_CURVE_POINTS,
    outputs: Outputs | None = None,
) -> dict[str, dict]:
    """ROC and precision-recall points of a binary classifier, thinned to ``max_points``.

    ``{"roc": {"fpr", "tpr", "thresholds"}, "pr": {"precision", "recall", "thresholds"}}``
    as lists of floats. As in scikit-learn, the PR curve has one threshold fewer than
    points (its last point, recall 0, has none). The ROC curve's first threshold, infinite
    in scikit-learn, is stored as the highest probability plus one, so the JSON stays valid.
    """
    if not (is_binary(model) and hasattr(model, "predict_proba")):
        raise InvalidInput("curves need a binary classifier with predict_proba")
    probabilities = (outputs or Outputs(model, X)).probabilities
    positive, probability = _positive(np.asarray(y), probabilities, model.classes_)
    if positive.min() == positive.max():
        raise InvalidInput("curves need both classes in y")
    return {"roc": roc_points(positive, probability, max_points),
            "pr": pr_points(positive, probability, max_points)}


def roc_points(positive: np.ndarray, probability: np.ndarray, max_points: int) -> dict:
    """The thinned ROC curve of 0/1 labels and positive-class probabilities."""
    fpr, tpr, thresholds = skm.roc_curve(positive, probability)
    thresholds = np.where(np.isinf(thresholds), probability.max() + 1, thresholds)
    keep = thin(len(fpr), max_points)
    return {"fpr": _floats(fpr[keep]), "tpr": _floats(tpr[keep]),
            "thresholds": _floats(thresholds[keep])}


def pr_points(positive: np.ndarray, probability: np.ndarray, max_points: int) -> dict:
    """The thinned precision-recall curve; its last point (recall 0) has no threshold."""
    precision, recall, thresholds = skm.precision_recall_curve(positive, probability)
    keep = thin(len(precision), max_points)
    return {"precision": _floats(precision[keep]), "recall": _floats(recall[keep]),
            "thresholds": _floats(thresholds[keep[:-1]])}


def thin(points: int, max_points: int) -> np.ndarray:
    """At most ``max_points`` evenly spread indices of ``points``, always the first and last."""
    if points <= max_points:
        return np.arange(points)
    return np.unique(np.linspace(0, points - 1, max(max_points, 2)).round().astype(int))


def _floats(values: np.ndarray) -> list[float]:
    return [float(value) for value in values]
