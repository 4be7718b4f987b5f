"""Live quality of a model from observed outcomes, against the figures of its evaluation.

A ``QualityWindow`` keeps the last ``size`` (predicted, observed) label pairs of one model
version; ``quality_of`` scores them with scikit-learn's metrics, with the evaluation's
conventions: for a binary model the positive class is the last of its classes; for more
classes precision, recall and F1 are macro averages. ``degradation`` says whether the
live figure fell below the evaluation's by more than the margin. Example::

    window = QualityWindow(500)
    window.add("1", label_of(0.0))                 # predicted "1", observed 0.0 -> "0"
    live = quality_of(*window.columns(), classes=["0", "1"])
    degradation(live, {"accuracy": 0.97}, count=len(window),
                rule=QualityRule("accuracy", margin=0.05, min_outcomes=100))
    # Degradation(metric="accuracy", observed=0.41, expected=0.97) or None
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sklearn import metrics as skm

METRICS = ("accuracy", "precision", "recall", "f1")


def label_of(value: object) -> str:
    """An outcome as a label comparable with the model's: 1.0 -> "1", True -> "True"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class QualityWindow:
    """The last ``size`` (predicted, observed) pairs of one model version."""

    def __init__(self, size: int, pairs: Sequence[tuple[str, str]] = ()) -> None:
        self.pairs: deque[tuple[str, str]] = deque(pairs, maxlen=size)

    def add(self, predicted: str, observed: str) -> None:
        """One more outcome; the oldest goes once the window is full."""
        self.pairs.append((predicted, observed))

    def columns(self) -> tuple[list[str], list[str]]:
        """The predicted labels and the observed ones."""
        return [p for p, _ in self.pairs], [o for _, o in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)


def quality_of(
    predicted: Sequence[str], observed: Sequence[str], classes: Sequence[str] = ()
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of predictions against outcomes ({} if none)."""
    if not predicted:
        return {}
    labels = list(classes) or sorted(set(predicted) | set(observed))
    binary = len(labels) <= 2
    chosen = labels[-1:] if binary else labels
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        observed, predicted, labels=chosen, average="macro", zero_division=0.0)
    return {"accuracy": float(skm.accuracy_score(observed, predicted)),
            "precision": float(precision), "recall": float(recall), "f1": float(f1)}


def confusion(pairs: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Predicted versus observed: how many of each ``"predicted->observed"`` pair."""
    return dict(sorted(Counter(f"{p}->{o}" for p, o in pairs).items()))


@dataclass(frozen=True)
class QualityRule:
    """Which metric is watched, by how much it may fall, after how many outcomes."""

    metric: str = "accuracy"
    margin: float = 0.05
    min_outcomes: int = 100


@dataclass(frozen=True)
class Degradation:
    """A live figure below the evaluation's by more than the margin."""

    metric: str
    observed: float
    expected: float


def degradation(
    live: Mapping[str, float], expected: Mapping[str, float], *, count: int, rule: QualityRule
) -> Degradation | None:
    """The degradation the live figures show, or None (too few outcomes, no figure, fine)."""
    if count < rule.min_outcomes or rule.metric not in live or rule.metric not in expected:
        return None
    observed, wanted = live[rule.metric], float(expected[rule.metric])
    if observed < wanted - rule.margin:
        return Degradation(rule.metric, observed, wanted)
    return None
