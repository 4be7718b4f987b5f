"""Evaluation on a Dask test set: metrics summed partition by partition on a LocalCluster
equal the pandas path's for binary, multiclass and regression models (scikit-learn's own
data sets), partitions holding a single class included; so do the curves and the report."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression

from common.compute import Compute, ComputeSettings, open_compute
from evaluation import EvaluationConfig, curves, evaluate, evaluate_candidates
from evaluation.metrics import applicable
from evaluation.partitioned import FROM_PARTS, measure_partitioned

dd = pytest.importorskip("dask.dataframe")  # a dependency; the import is only slow
CLOSE = {"rel": 1e-12, "abs": 1e-12}


@pytest.fixture(scope="module")
def compute() -> Iterator[Compute]:
    settings = ComputeSettings(compute="dask-local", dask_workers=2, dask_memory_limit="1GB")
    with open_compute(settings) as opened:
        yield opened


def dataset(loader: Any, by_label: bool = False) -> tuple[pd.DataFrame, pd.Series]:
    X, y = loader(return_X_y=True, as_frame=True)
    if by_label:  # sorted by label: the first partitions hold one class only
        order = np.argsort(y.to_numpy(), kind="stable")
        X, y = X.iloc[order].reset_index(drop=True), y.iloc[order].reset_index(drop=True)
    return X, y


def partitioned(X: pd.DataFrame, y: pd.Series, parts: int = 5) -> tuple[Any, Any]:
    frame = dd.from_pandas(X.assign(__y=y), npartitions=parts)
    return frame[list(X.columns)], frame["__y"].rename(y.name)


def assert_same_curves(mine: Any, theirs: Any) -> None:
    """Equal up to the last bits a model's predict gives on a partition instead of all rows."""
    assert mine.keys() == theirs.keys()
    for curve in theirs:
        assert mine[curve].keys() == theirs[curve].keys()
        for points in theirs[curve]:
            np.testing.assert_allclose(mine[curve][points], theirs[curve][points],
                                       rtol=1e-12, atol=1e-12)


CASES = {
    "binary": (load_breast_cancer, lambda: LogisticRegression(max_iter=5000)),
    "multiclass": (load_wine, lambda: LogisticRegression(max_iter=5000)),
    "regression": (load_diabetes, LinearRegression),
}


@pytest.mark.parametrize("by_label", [False, True], ids=["mixed", "one-class-partitions"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_metrics_by_partition_equal_the_pandas_path(
    compute: Compute, case: str, by_label: bool
) -> None:
    loader, make = CASES[case]
    X, y = dataset(loader, by_label)
    model = make().fit(X, y)
    names = applicable(model)
    expected = evaluate(model, X, y, names)
    measured = measure_partitioned({"m": model}, *partitioned(X, y), {"m": names},
                                   compute.client)  # type: ignore[arg-type]
    assert measured["m"].metrics == pytest.approx(expected, **CLOSE)
    assert set(names) - {"roc_auc", "average_precision"} <= set(FROM_PARTS)  # summed, not kept


def test_the_curves_equal_the_pandas_path(compute: Compute) -> None:
    X, y = dataset(load_breast_cancer)
    model = LogisticRegression(max_iter=5000).fit(X, y)
    measured = measure_partitioned({"m": model}, *partitioned(X, y), {"m": ["roc_auc"]},
                                   compute.client)  # type: ignore[arg-type]
    assert_same_curves(measured["m"].curves, curves(model, X, y))


def test_the_report_on_the_cluster_is_the_pandas_one(compute: Compute) -> None:
    X, y = dataset(load_breast_cancer)
    candidates = {"lr": LogisticRegression(max_iter=5000).fit(X, y),
                  "hgb": HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(X, y)}
    champion = LogisticRegression(max_iter=5000, C=0.1).fit(X, y)
    config = EvaluationConfig(metric="average_precision", minimum=0.5, latency_repeats=5,
                              latency_batch_repeats=2)
    here = evaluate_candidates(candidates, champion, X, y, config)
    there = evaluate_candidates(candidates, champion, *partitioned(X, y), config,
                                client=compute.client)
    for key in here.candidates:
        assert there.candidates[key] == pytest.approx(here.candidates[key], **CLOSE)
    assert there.champion_metrics == pytest.approx(here.champion_metrics, **CLOSE)
    assert (there.ranking, there.chosen_id) == (here.ranking, here.chosen_id)
    assert_same_curves(there.curves, here.curves)
    assert set(there.latency) == set(here.latency)


def test_partitions_without_test_rows_count_for_nothing(compute: Compute) -> None:
    from segregation.config import SplitConfig
    from segregation.partitioned import split_partitioned

    X, y = dataset(load_breast_cancer)
    model = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(X, y)
    frame = dd.from_pandas(X.assign(__y=y), npartitions=5)
    lengths = [int(n) for n in compute.client.compute(  # type: ignore[union-attr]
        [part.shape[0] for part in frame.to_delayed()], sync=True)]
    test = split_partitioned(frame, SplitConfig(strategy="sequential", ratio=0.8), lengths).test
    expected = SplitConfig(strategy="sequential", ratio=0.8).apply(X.assign(__y=y), "__y")
    names = applicable(model)
    measured = measure_partitioned({"m": model}, test[list(X.columns)], test["__y"],
                                   {"m": names}, compute.client)  # type: ignore[arg-type]
    assert measured["m"].metrics == pytest.approx(
        evaluate(model, expected.X_test, expected.y_test, names), **CLOSE)
