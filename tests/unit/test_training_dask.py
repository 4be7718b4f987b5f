"""Training past one machine: the seeded, class-stratified sample of a training set over
CONVEYOR_TRAIN_MAX_ROWS (the same rows from pandas and from a Dask frame in several
partitions), the split of a Dask frame, and candidates trained on a LocalCluster's
workers giving the models and metadata of the local worker pool."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

from app.config import load_pipeline_config
from common.compute import Compute, ComputeSettings, open_compute
from common.stores import OfflineFeatureStore
from segregation.config import SplitConfig
from segregation.partitioned import partition_lengths, split_partitioned
from tests.fixtures.warm import warm_training_workers
from training.config import TrainingConfig
from training.sampling import (
    TrainingSettings,
    class_counts_by_partition,
    needs_sample,
    sample_plan,
    take_sample,
    take_sample_partitioned,
)
from training.service import TrainingService
from training.trainer import train_candidates

warm_training_workers()
dd = pytest.importorskip("dask.dataframe")  # a dependency; the import is only slow

CANDIDATES = [
    {"name": "logreg", "estimator": "LogisticRegression", "params": {"max_iter": 500}},
    {"name": "hgb", "estimator": "HistGradientBoostingClassifier",
     "params": {"max_iter": 20, "random_state": 0}},
]


@pytest.fixture(scope="module")
def compute() -> Iterator[Compute]:
    settings = ComputeSettings(compute="dask-local", dask_workers=2, dask_memory_limit="1GB")
    with open_compute(settings) as opened:
        yield opened


def frame(rows: int = 2_000, fraud: float = 0.05, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 3))
    label = (rng.random(rows) < fraud).astype(int)
    X[:, 0] += 2 * label  # something to learn
    return pd.DataFrame({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "label": label})


# -- the sample -----------------------------------------------------------------------------


def test_a_sample_has_the_size_asked_for_and_each_class_s_share() -> None:
    data = frame(10_000, fraud=0.03)
    plan = sample_plan(data["label"].value_counts(), max_rows=1_000, seed=7)
    X, y = take_sample(data[["a", "b", "c"]], data["label"], plan)
    assert len(X) == len(y) == plan.rows == 1_000
    share = data["label"].mean()
    assert abs(y.sum() - 1_000 * share) <= 1  # stratified: the minority keeps its share
    assert list(X.index) == sorted(X.index)  # original order kept
    assert X.index.equals(y.index)


def test_a_sample_is_seeded() -> None:
    counts = frame(10_000)["label"].value_counts()
    same = [sample_plan(counts, 500, seed=1).chosen for _ in range(2)]
    other = sample_plan(counts, 500, seed=2).chosen
    assert all(np.array_equal(same[0][k], same[1][k]) for k in same[0])
    assert not all(np.array_equal(same[0][k], other[k]) for k in other)


def test_every_class_keeps_a_row_however_rare() -> None:
    counts = pd.Series({0: 99_990, 1: 10})
    plan = sample_plan(counts, max_rows=100, seed=0)
    assert {k: len(v) for k, v in plan.chosen.items()} == {0: 99, 1: 1}
    assert plan.rows == 100


def test_the_metadata_says_where_the_rows_came_from() -> None:
    plan = sample_plan(pd.Series({0: 900, 1: 100}), max_rows=50, seed=3)
    assert plan.metadata() == {
        "method": "class-stratified", "seed": 3, "rows_available": 1_000, "rows": 50,
        "class_rows_available": {"0": 900, "1": 100}, "class_rows": {"0": 45, "1": 5}}


def test_no_cap_means_no_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not needs_sample(10**9, None)
    assert needs_sample(11, 10) and not needs_sample(10, 10)
    assert TrainingSettings().train_max_rows is None
    monkeypatch.setenv("CONVEYOR_TRAIN_MAX_ROWS", "1000")
    assert TrainingSettings().train_max_rows == 1_000


def test_a_dask_frame_in_partitions_gives_the_same_sample(compute: Compute) -> None:
    data = frame(5_000)
    plan = sample_plan(data["label"].value_counts(), max_rows=700, seed=11)
    expected = pd.concat(take_sample(data[["a", "b", "c"]], data["label"], plan), axis=1)
    parts = dd.from_pandas(data, npartitions=7)
    counts = class_counts_by_partition(parts["label"], compute.client)
    assert len(counts) == 7
    sampled = compute.client.compute(  # type: ignore[union-attr]
        take_sample_partitioned(parts, "label", plan, counts), sync=True)
    pd.testing.assert_frame_equal(sampled, expected)


# -- the split --------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["sequential", "random"])
def test_a_dask_frame_splits_into_the_rows_pandas_gives(compute: Compute, strategy: str) -> None:
    data = frame(3_001)
    config = SplitConfig(strategy=strategy, ratio=0.8, seed=5)
    expected = config.apply(data, "label")
    parts_in = dd.from_pandas(data, npartitions=4)
    parts = split_partitioned(parts_in, config, partition_lengths(parts_in, compute.client))
    for mine, theirs in ((parts.train, expected.train), (parts.test, expected.test)):
        pd.testing.assert_frame_equal(compute.client.compute(mine, sync=True), theirs)


# -- training ---------------------------------------------------------------------------------


def trained(result: Any) -> dict[str, Any]:
    return {t.name: t for t in result.trained}


def test_candidates_trained_on_the_cluster_equal_the_local_ones(compute: Compute) -> None:
    data = frame(3_000)
    X, y = data[["a", "b", "c"]], data["label"]
    config = TrainingConfig.model_validate({"candidates": CANDIDATES})
    kwargs: dict[str, Any] = {"feature_set_id": "fs1", "batch_ids": ["b1"]}
    local = trained(train_candidates(config, X, y, **kwargs))
    remote = trained(train_candidates(config, X, y, client=compute.client, **kwargs))
    assert sorted(local) == sorted(remote) == ["hgb", "logreg"]
    for name in local:
        np.testing.assert_array_equal(local[name].model.predict_proba(X),
                                      remote[name].model.predict_proba(X))
        ignore = {"timings", "trained_at"}
        assert ({k: v for k, v in local[name].metadata.items() if k not in ignore}
                == {k: v for k, v in remote[name].metadata.items() if k not in ignore})


def test_a_failing_candidate_on_the_cluster_sinks_only_itself(compute: Compute) -> None:
    data = frame(500)
    config = TrainingConfig.model_validate({"candidates": [
        CANDIDATES[0], {"name": "bad", "estimator": "LogisticRegression",
                        "params": {"max_iter": 10, "C": -1.0}}]})
    result = train_candidates(config, data[["a", "b", "c"]], data["label"],
                              feature_set_id="fs1", batch_ids=["b1"], client=compute.client)
    assert [t.name for t in result.trained] == ["logreg"]
    [failure] = result.failures
    assert failure.name == "bad" and "C" in failure.error


# -- the service's training part ----------------------------------------------------------------


def service(tmp_path: Any, compute: Compute | None, max_rows: int | None) -> TrainingService:
    config = load_pipeline_config("config/pipeline.yaml")
    offline = OfflineFeatureStore(str(tmp_path))
    return TrainingService(config, offline, models=None,  # type: ignore[arg-type]
                           compute=compute, settings=TrainingSettings(train_max_rows=max_rows))


def test_the_service_trains_on_the_same_sample_locally_and_on_the_cluster(
    tmp_path: Any, compute: Compute
) -> None:
    data = frame(20_000)
    offline = OfflineFeatureStore(str(tmp_path))
    offline.start_parts("fs1")  # as preparation on a cluster writes it: parts in row order
    for number, start in enumerate(range(0, 20_000, 6_000)):
        offline.write_part("fs1", number, data.iloc[start:start + 6_000])
    record = offline.finish_parts(
        "fs1", len(data), {str(c): str(t) for c, t in data.dtypes.items()},
        {"label": "label", "features": ["a", "b", "c"], "batch_ids": {"d": "b1"}})
    assert offline.read_dask("fs1").lengths == [6_000, 6_000, 6_000, 2_000]
    X_here, y_here, sample_here = service(tmp_path, None, 1_000)._training_part(record)
    X_there, y_there, sample_there = service(tmp_path, compute, 1_000)._training_part(record)
    assert sample_here == sample_there and sample_here is not None
    assert sample_here["rows_available"] == 16_000 and sample_here["rows"] == 1_000
    np.testing.assert_array_equal(X_here.to_numpy(), X_there.to_numpy())
    np.testing.assert_array_equal(y_here.to_numpy(), y_there.to_numpy())
    X_all, _, none = service(tmp_path, compute, None)._training_part(record)
    assert none is None and len(X_all) == 16_000


def test_a_model_s_metadata_records_its_sample_and_only_then(compute: Compute) -> None:
    data = frame(4_000)
    plan = sample_plan(data["label"].value_counts(), max_rows=1_000, seed=4)
    X, y = take_sample(data[["a", "b", "c"]], data["label"], plan)
    config = TrainingConfig.model_validate({"candidates": CANDIDATES[:1]})
    [sampled] = train_candidates(config, X, y, feature_set_id="fs1", batch_ids=["b1"],
                                 client=compute.client, sample=plan.metadata()).trained
    assert sampled.metadata["training_sample"] == plan.metadata()
    assert sampled.metadata["training_rows"] == 1_000
    [whole] = train_candidates(config, X, y, feature_set_id="fs1", batch_ids=["b1"],
                               client=compute.client).trained
    assert "training_sample" not in whole.metadata
