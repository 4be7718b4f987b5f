"""Compiled tree predictors: a fitted scikit-learn tree ensemble answered by Treelite.

scikit-learn predicts a HistGradientBoosting model tree by tree from Python, so one row
of a 100-tree model costs ~0.4 ms however small the batch; Treelite's GTIL evaluates the
same trees in C++ in ~0.03 ms. ``compiled_or_same`` imports the estimator into Treelite
and keeps the result only if it gives the estimator's own probabilities, within
``tolerance``, on rows built to test every split: each feature at its split thresholds,
just below and just above them, beyond its range, and missing (NaN). Anything else (an
estimator Treelite cannot import; a mismatch such as the forests' and GradientBoosting's,
whose trees compare float32 copies of the values with their thresholds, ExtraTrees'
missing-value routing or multiclass HistGradientBoosting's float32 softmax) keeps the
scikit-learn estimator, with the reason logged. In practice binary HistGradientBoosting
models are compiled (to within ~1e-17). Example::

    model = compiled_or_same(estimator)      # CompiledTrees, or estimator itself
    model.predict_proba(X)                   # same values, [n, classes]
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.utils import get_tags

log = logging.getLogger(__name__)

TOLERANCE = 1e-12
"""Largest difference from scikit-learn's probabilities a compiled predictor may show."""
CHECK_ROWS = 512
MISSING_SHARE = 0.1
"""Of the check rows' values, the share that are missing (NaN)."""


class CompiledTrees:
    """The estimator's trees in Treelite: ``predict_proba`` and ``predict`` like the
    estimator's; every other attribute (``classes_``, ...) is the estimator's."""

    def __init__(self, estimator: Any, model: Any) -> None:
        self.estimator, self.model = estimator, model
        self._predict = _gtil_predictor(model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.estimator, name)

    def predict_proba(self, X: Any) -> np.ndarray:
        matrix = np.asarray(X, dtype=np.float64)
        out = self._predict(matrix).reshape(len(matrix), -1)
        if out.shape[1] == 1:  # binary boosting: the positive class's probability
            return np.column_stack([1.0 - out[:, 0], out[:, 0]])
        return out

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(self.estimator.classes_)[self.predict_proba(X).argmax(axis=1)]


def _gtil_predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """GTIL's predict on one thread, its configuration built once (``gtil.predict``
    builds one per call, ~7 % of a scoring server's time at concurrency 32); the public
    call where this Treelite lacks the internal one."""
    try:
        from treelite.gtil.gtil import GTILConfig, _predict_impl
    except ImportError:
        from treelite import gtil

        return lambda matrix: gtil.predict(model, matrix, nthread=1)
    config = GTILConfig(nthread=1, predict_type="default")
    return lambda matrix: _predict_impl(model, matrix, config=config)


def compiled_or_same(estimator: Any, tolerance: float = TOLERANCE) -> Any:
    """``CompiledTrees`` of ``estimator`` when it reproduces its probabilities, else the
    estimator itself."""
    splits = split_points(estimator)
    if splits is None or not hasattr(estimator, "predict_proba"):
        return estimator
    try:
        import treelite.sklearn

        compiled = CompiledTrees(estimator, treelite.sklearn.import_model(estimator))
        rows = check_rows(splits, missing=get_tags(estimator).input_tags.allow_nan)
        with warnings.catch_warnings():  # plain rows, on purpose: no feature-name check
            warnings.filterwarnings("ignore", "X does not have valid feature names")
            expected = estimator.predict_proba(rows)
        difference = float(np.max(np.abs(compiled.predict_proba(rows) - expected)))
    except Exception as exc:  # an estimator or a version Treelite does not take
        log.info("%s stays in scikit-learn: Treelite cannot take it (%s: %s)",
                 type(estimator).__name__, type(exc).__name__, exc)
        return estimator
    if not difference <= tolerance:
        log.info("%s stays in scikit-learn: Treelite differs by %.3g (tolerance %.3g)",
                 type(estimator).__name__, difference, tolerance)
        return estimator
    return compiled


def split_points(estimator: Any) -> list[np.ndarray] | None:
    """Each feature's split thresholds, for the tree ensembles we know; else None."""
    width = getattr(estimator, "n_features_in_", None)
    if width is None:
        return None
    if hasattr(estimator, "_bin_mapper"):  # HistGradientBoosting
        thresholds = list(estimator._bin_mapper.bin_thresholds_)
        return [np.asarray(t, dtype=np.float64) for t in thresholds]
    trees = getattr(estimator, "estimators_", None)
    if trees is None:
        return None
    found: list[list[float]] = [[] for _ in range(width)]
    for tree in np.ravel(trees):
        inner = tree.tree_.feature >= 0
        for feature, threshold in zip(tree.tree_.feature[inner], tree.tree_.threshold[inner],
                                      strict=True):
            found[feature].append(threshold)
    # A split that only sends missing values one way has an infinite threshold.
    return [np.unique([v for v in values if np.isfinite(v)]).astype(np.float64)
            for values in found]


def check_rows(splits: list[np.ndarray], rows: int = CHECK_ROWS, seed: int = 0,
               missing: bool = True) -> np.ndarray:
    """Rows whose every value sits on a split: at a threshold, one step either side of
    it, beyond the range, or (``missing``) NaN."""
    rng = np.random.default_rng(seed)
    columns = [_column(points, rows, rng, MISSING_SHARE if missing else 0.0)
               for points in splits]
    return np.column_stack(columns) if columns else np.zeros((rows, 0))


def _column(points: np.ndarray, rows: int, rng: np.random.Generator,
            missing_share: float) -> np.ndarray:
    if len(points) == 0:
        values = rng.normal(size=rows)
    else:
        edges = np.concatenate([points, np.nextafter(points, -np.inf),
                                np.nextafter(points, np.inf),
                                [points.min() - 1.0, points.max() + 1.0]])
        values = rng.choice(edges, size=rows)
    values[rng.random(rows) < missing_share] = np.nan
    return values
