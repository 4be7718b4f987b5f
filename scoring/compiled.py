"""Compiled tree predictors: a fitted scikit-learn tree ensemble answered by Treelite.

scikit-learn predicts a tree ensemble tree by tree from Python, so one row of a 100-tree
model costs ~0.4 ms (HistGradientBoosting) to ~4 ms (a random forest) however small the
batch; Treelite's GTIL evaluates the same trees in C++ in ~0.03 ms (bench/compiled_trees.py).
``compiled_or_same`` imports the estimator into Treelite and keeps the result only if it
gives the estimator's own probabilities, within ``tolerance``, on rows built to test every
split: each feature at its split thresholds, just below and just above them, beyond its
range, and missing (NaN). It tries the values as they are (HistGradientBoosting compares
float64 values), then rounded to float32, as scikit-learn's forests, ExtraTrees and
GradientBoosting round them before their trees compare. Anything else (an estimator
Treelite cannot import; a mismatch such as multiclass HistGradientBoosting's float32
softmax) keeps the scikit-learn estimator, with the reason logged. In practice binary
HistGradientBoosting (to within ~1e-17), random forests, ExtraTrees and binary
GradientBoosting (to within ~2e-16) are compiled. Example::

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
    estimator's; every other attribute (``classes_``, ...) is the estimator's. With
    ``float32_inputs`` the values are rounded to float32 first, as scikit-learn's forests
    and GradientBoosting do before their trees compare them, and refused as they refuse
    them (infinite or too large for float32; NaN where the estimator takes none)."""

    def __init__(self, estimator: Any, model: Any, *, float32_inputs: bool = False) -> None:
        self.estimator, self.model, self.float32_inputs = estimator, model, float32_inputs
        self._allow_nan = get_tags(estimator).input_tags.allow_nan
        self._predict = _gtil_predictor(model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.estimator, name)

    def predict_proba(self, X: Any) -> np.ndarray:
        matrix = np.asarray(X, dtype=np.float64)
        if self.float32_inputs:
            matrix = _as_float32_values(matrix, self._allow_nan)
        out = self._predict(matrix).reshape(len(matrix), -1)
        if out.shape[1] == 1:  # binary boosting: the positive class's probability
            proba = np.empty((len(out), 2))
            proba[:, 1] = out[:, 0]
            np.subtract(1.0, out[:, 0], out=proba[:, 0])
            return proba
        return out

    def predict(self, X: Any) -> np.ndarray:
        return np.asarray(self.estimator.classes_)[self.predict_proba(X).argmax(axis=1)]


def _as_float32_values(matrix: np.ndarray, allow_nan: bool) -> np.ndarray:
    """``matrix`` rounded to float32 values (kept as float64 for Treelite), refused with
    scikit-learn's own messages where its float32 input check refuses it."""
    with np.errstate(over="ignore"):
        rounded = matrix.astype(np.float32)
    if np.isinf(rounded).any():
        raise ValueError("Input X contains infinity or a value too large for "
                         "dtype('float32').")
    if not allow_nan and np.isnan(rounded).any():
        raise ValueError("Input X contains NaN.")
    return rounded.astype(np.float64)


def _gtil_predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """GTIL's predict on one thread, with what it would look up on every call (its
    configuration, the model's value types, the output's shape per row) looked up once:
    ``gtil.predict`` spends ~0.1 ms of Python per call on them, as long as the trees of a
    one-row predict take. Treelite's own call where this Treelite lacks those internals;
    ``compiled_or_same`` checks the answers either way."""
    try:
        from treelite.gtil.gtil import GTILConfig, _predict_impl
    except ImportError:
        from treelite import gtil

        return lambda matrix: gtil.predict(model, matrix, nthread=1)
    config = GTILConfig(nthread=1, predict_type="default")
    try:
        return _direct_gtil(model, config, lambda m: _predict_impl(model, m, config=config))
    except (ImportError, AttributeError) as exc:
        log.info("Treelite's GTIL called through its Python wrapper (%s)", exc)
        return lambda matrix: _predict_impl(model, matrix, config=config)


def _direct_gtil(model: Any, config: Any, wrapped: Callable[[np.ndarray], np.ndarray]
                 ) -> Callable[[np.ndarray], np.ndarray]:
    """``TreeliteGTILPredict`` called straight (a dense matrix of the model's width; any
    other goes through ``wrapped``, which pads missing features)."""
    import ctypes

    from treelite.core import _LIB, _check_call
    from treelite.util import c_str, typestr_to_ctypes_type, typestr_to_numpy_type

    in_type, out_type = model.input_type, model.output_type
    in_dtype, out_dtype = typestr_to_numpy_type(in_type), typestr_to_numpy_type(out_type)
    in_pointer = ctypes.POINTER(typestr_to_ctypes_type(in_type))
    out_pointer = ctypes.POINTER(typestr_to_ctypes_type(out_type))
    in_name, width = c_str(in_type), model.num_feature
    per_row = wrapped(np.zeros((1, width), dtype=in_dtype)).shape[1:]

    def predict(matrix: np.ndarray) -> np.ndarray:
        if matrix.ndim != 2 or matrix.shape[1] != width:
            return wrapped(matrix)
        data = np.ascontiguousarray(matrix, dtype=in_dtype)
        out = np.zeros((len(data), *per_row), dtype=out_dtype)
        _check_call(_LIB.TreeliteGTILPredict(
            model.handle, data.ctypes.data_as(in_pointer), in_name,
            ctypes.c_uint64(len(data)), out.ctypes.data_as(out_pointer), config.handle))
        return out

    return predict


def compiled_or_same(estimator: Any, tolerance: float = TOLERANCE) -> Any:
    """``CompiledTrees`` of ``estimator`` when it reproduces its probabilities, else the
    estimator itself."""
    splits = split_points(estimator)
    if splits is None or not hasattr(estimator, "predict_proba"):
        return estimator
    try:
        import treelite.sklearn

        model = treelite.sklearn.import_model(estimator)
        rows = check_rows(splits, missing=get_tags(estimator).input_tags.allow_nan)
        with warnings.catch_warnings():  # plain rows, on purpose: no feature-name check
            warnings.filterwarnings("ignore", "X does not have valid feature names")
            expected = estimator.predict_proba(rows)
        differences = []
        for float32_inputs in (False, True):  # HistGradientBoosting's values; the others'
            compiled = CompiledTrees(estimator, model, float32_inputs=float32_inputs)
            differences.append(float(np.max(np.abs(compiled.predict_proba(rows) - expected))))
            if differences[-1] <= tolerance:
                return compiled
    except Exception as exc:  # an estimator or a version Treelite does not take
        log.info("%s stays in scikit-learn: Treelite cannot take it (%s: %s)",
                 type(estimator).__name__, type(exc).__name__, exc)
        return estimator
    log.info("%s stays in scikit-learn: Treelite differs by %.3g (%.3g with float32 values; "
             "tolerance %.3g)", type(estimator).__name__, *differences, tolerance)
    return estimator


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
