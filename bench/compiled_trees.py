"""Tree ensembles predicted by scikit-learn and by Treelite (``scoring.compiled``), side by side.

For each ensemble scoring may serve (100 trees, 20 float features, 20,000 training rows,
binary), the median milliseconds of one ``predict_proba`` of 1 row and of 64 rows, by the
fitted scikit-learn estimator and by what ``compiled_or_same`` made of it (the same object
when Treelite did not reproduce its probabilities), on one OpenMP thread as scoring
predicts, and whether it was compiled. Writes ``bench/results/compiled_trees.json``.

Example (~1 minute)::

    .venv/bin/python bench/compiled_trees.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, the repository root is not on the path (bench/ is).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import statistics  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from save import save_results  # noqa: E402
from sklearn.ensemble import (  # noqa: E402
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from threadpoolctl import threadpool_limits  # noqa: E402
from timing import times_ms  # noqa: E402

from scoring.compiled import CompiledTrees, compiled_or_same  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "compiled_trees.json"
ROWS, FEATURES, CALLS, SEED = 20_000, 20, 300, 0
ESTIMATORS = {
    "HistGradientBoostingClassifier": lambda: HistGradientBoostingClassifier(
        max_iter=100, random_state=SEED),
    "RandomForestClassifier": lambda: RandomForestClassifier(
        100, max_depth=12, random_state=SEED),
    "ExtraTreesClassifier": lambda: ExtraTreesClassifier(100, max_depth=12, random_state=SEED),
    "GradientBoostingClassifier": lambda: GradientBoostingClassifier(
        n_estimators=100, random_state=SEED),
}


def median_ms(predict: Callable[[np.ndarray], Any], matrix: np.ndarray) -> float:
    return round(statistics.median(times_ms(predict, [matrix] * CALLS)), 4)


def measure(name: str, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    estimator = ESTIMATORS[name]().fit(X, y)
    model = compiled_or_same(estimator)
    figures: dict[str, Any] = {"compiled": isinstance(model, CompiledTrees),
                               "float32_inputs": getattr(model, "float32_inputs", None)}
    for rows in (1, 64):
        matrix = X[:rows]
        sklearn_ms = median_ms(estimator.predict_proba, matrix)
        served_ms = median_ms(model.predict_proba, matrix)
        figures[f"rows_{rows}"] = {"scikit_learn_ms": sklearn_ms, "served_ms": served_ms,
                                   "speedup": round(sklearn_ms / served_ms, 1)}
    return figures


def main() -> None:
    rng = np.random.default_rng(SEED)
    X = rng.normal(size=(ROWS, FEATURES))
    y = (X @ rng.normal(size=FEATURES) + rng.normal(size=ROWS) > 0).astype(int)
    results: dict[str, Any] = {}
    with threadpool_limits(limits=1, user_api="openmp"):
        for name in ESTIMATORS:
            results[name] = measure(name, X, y)
            print(name, results[name], flush=True)
    save_results(RESULTS, {"estimators": results, "trees": 100, "features": FEATURES,
                           "train_rows": ROWS, "calls": CALLS,
                           "command": ".venv/bin/python bench/compiled_trees.py"})


if __name__ == "__main__":
    main()
