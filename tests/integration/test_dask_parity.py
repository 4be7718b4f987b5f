"""The Dask path gives what the pandas path gives: the same fitted feature set (same object,
same fitted statistics), the same features and online rows, the same batch scores (of the
raw batch and of the feature set, written as parts), for the PaySim pipeline and for
a many-entity stream with count and time-window aggregates and every partial-statistics
fitter (mean and most-frequent imputation, standard and min-max scaling, one-hot, chi2),
each on a LocalCluster of two workers and a batch of several partitions. A worker killed
mid-transform: its tasks are recomputed and the set is complete and equal; a transform
that kills every worker it runs on fails with an error the runtime retries, and leaves no
complete feature set behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression

from app.config import PipelineConfig
from common.compute import Compute, ComputeSettings, open_compute
from common.datasets import paysim
from common.errors import InvalidInput
from common.events import RawDataExtracted
from common.stores import BatchScoreStore, ModelStore, OfflineFeatureStore, RawBatchStore
from common.stores.entity_state import MemoryEntityState, MemoryStreamTargets
from common.wiring import feature_pipeline_root
from ingestion.contract import ContractTyping, read_batch
from preparation import FittedFeatureSet, build_pipeline, feature_set_id
from preparation import distributed as on_cluster
from preparation.distributed import prepare_on_cluster
from preparation.service import PreparationService
from scoring.offline import (
    BatchModel,
    score_features,
    score_features_on_cluster,
    score_raw,
    score_raw_on_cluster,
)
from tests.fixtures.dask_faults import with_killer
from tests.fixtures.pipeline import MemoryOnlineStore, parsed, paysim_config
from tests.fixtures.streaming import stream_frame

pytestmark = pytest.mark.slow
CHUNK_ROWS = 700  # a few thousand rows in several partitions
TOLERANCE = 1e-12
KEY = b"dask-parity-signing-key"
TWO_WORKERS: dict[str, Any] = {"compute": "dask-local", "dask_workers": 2,
                               "dask_memory_limit": "1GB"}


@pytest.fixture(scope="module")
def compute() -> Iterator[Compute]:
    with open_compute(ComputeSettings(**TWO_WORKERS)) as shared:
        yield shared


def stream_spec() -> dict[str, Any]:
    """Every step kind whose fit needs statistics of all rows, after exact per-entity
    aggregates (a count window and a time window), on a random split."""
    data = paysim_config(split={"strategy": "random", "ratio": 0.7, "seed": 3})
    data["features"]["steps"] = [
        {"kind": "entity_aggregate", "params": {"column": "amount", "window": 4,
                                                "stats": ["count", "mean"]}},
        {"kind": "entity_aggregate", "params": {"column": "amount", "window": "2h",
                                                "stats": ["count", "sum", "mean"]}},
        {"kind": "filter", "params": {"where": {"type": {"!=": "DEBIT"}}}},
        {"kind": "impute", "params": {"columns": ["nameOrig_amount_mean_last4",
                                                 "nameOrig_amount_mean_2h"]}},
        {"kind": "impute", "params": {"columns": ["step"], "strategy": "most_frequent"}},
        {"kind": "ratio", "params": {"a": "amount", "b": "oldbalanceOrg",
                                     "name": "amountOverBalance"}},
        {"kind": "scale", "params": {"columns": ["amount", "oldbalanceOrg",
                                                "nameOrig_amount_sum_2h"], "method": "minmax"}},
        {"kind": "scale", "params": {"columns": ["newbalanceOrig", "amountOverBalance"]}},
        {"kind": "one_hot", "params": {"columns": ["type"]}},
        {"kind": "date_parts", "params": {"column": "timestamp", "parts": ["hour"]}},
        {"kind": "drop", "params": {"columns": ["nameDest"]}},
        {"kind": "select_k_best", "params": {"k": 9, "score_func": "chi2"}},
    ]
    return data


@pytest.fixture(params=["paysim", "stream"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    if request.param == "paysim":
        return World(tmp_path, parsed(paysim_config()), paysim(4_000, seed=5))
    return World(tmp_path, parsed(stream_spec()), stream_frame(4_000, accounts=60, seed=7))


class World:
    """A typed, partitioned raw batch and the pandas path's answers for it."""

    def __init__(self, root: Path, config: PipelineConfig, source: pd.DataFrame) -> None:
        self.config, self.root = config, str(root / "data")
        source.to_csv(root / "tx.csv", index=False)
        self.raw = RawBatchStore(self.root, chunk_rows=CHUNK_ROWS)
        contract = config.datasets["paysim"]
        batch = self.raw.put("paysim", str(root / "tx.csv"), typing=ContractTyping(contract),
                             partitioned=True)
        self.batches = {"paysim": batch.batch_id}
        self.fsid = feature_set_id(config.features, self.batches.values())
        self.offline = OfflineFeatureStore(self.root)
        self.frame = read_batch(self.raw, batch.batch_id, contract)

    def pandas(self) -> tuple[FittedFeatureSet, pd.DataFrame, pd.DataFrame]:
        """The fitted set, the features and the latest aggregates per entity, by pandas."""
        train = self.config.split.apply(self.frame, self.config.features.label).train
        fitted = build_pipeline(self.config.features).fit(train, self.batches.values())
        features, latest = fitted.transform_and_latest(self.frame)
        return fitted, features, latest.reset_index()

    def on_cluster(self, compute: Compute) -> on_cluster.Prepared:
        assert compute.client is not None
        done = prepare_on_cluster(compute.client, self.raw, self.offline, self.config,
                                  self.fsid, self.batches)
        self.offline.finish_parts(self.fsid, done.rows, done.columns, {}, online=done.online)
        return done


def test_several_partitions_on_two_workers(world: World, compute: Compute) -> None:
    assert compute.client is not None
    assert len(compute.client.scheduler_info()["workers"]) == 2
    assert len(world.raw.pieces(world.batches["paysim"])) >= 5


def test_the_same_feature_set_features_and_online_rows(world: World, compute: Compute) -> None:
    fitted, features, latest = world.pandas()
    done = world.on_cluster(compute)

    same_fitted(done.fitted, fitted)
    stored = world.offline.read(world.fsid)
    assert list(stored.columns) == list(features.columns)
    assert stored.dtypes.to_dict() == features.dtypes.to_dict()
    assert done.columns == {str(c): str(t) for c, t in features.dtypes.items()}
    pd.testing.assert_frame_equal(stored, features, check_exact=False, rtol=0,
                                  atol=TOLERANCE)
    assert done.online is None  # the workers wrote them, a part each
    assert len(list(world.offline.iter_online(world.fsid))) > 1
    pd.testing.assert_frame_equal(by_entity(world.offline.read_online(world.fsid)),
                                  by_entity(latest), check_exact=False, rtol=0,
                                  atol=TOLERANCE)
    # Scoring's fitted transform of a few rows: the same answers from either set.
    rows = world.frame.head(20)
    pd.testing.assert_frame_equal(done.fitted.transform_online(rows),
                                  fitted.transform_online(rows), check_exact=False, rtol=0,
                                  atol=TOLERANCE)


def by_entity(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("nameOrig", kind="stable").reset_index(drop=True)


def same_fitted(got: FittedFeatureSet, want: FittedFeatureSet) -> None:
    """The same object: type, spec, ids, features, input dtypes, and every fitted step's
    parameters and learned state (numbers within the tolerance, relative)."""
    assert type(got) is type(want)
    assert (got.spec, got.feature_set_id, got.batch_ids, got.feature_names) == (
        want.spec, want.feature_set_id, want.batch_ids, want.feature_names)
    assert dict(got.input_dtypes) == dict(want.input_dtypes)
    assert [n for n, _ in got.pipeline.steps] == [n for n, _ in want.pipeline.steps]
    for (name, mine), (_, theirs) in zip(got.pipeline.steps, want.pipeline.steps, strict=True):
        same_state(mine, theirs, name)


def same_state(got: Any, want: Any, where: str) -> None:
    if isinstance(want, BaseEstimator) or hasattr(want, "__dict__") and not callable(want):
        assert type(got) is type(want), where
        assert sorted(vars(got)) == sorted(vars(want)), where
        for name, value in vars(want).items():
            same_state(vars(got)[name], value, f"{where}.{name}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for number, (a, b) in enumerate(zip(got, want, strict=True)):
            same_state(a, b, f"{where}[{number}]")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for name in want:
            same_state(got[name], want[name], f"{where}[{name}]")
    elif isinstance(want, np.ndarray) and want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=0, err_msg=where)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), where
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=TOLERANCE, nan_ok=True), where
    else:
        assert got == want, where


def test_a_service_on_the_cluster_writes_what_the_pandas_service_writes(
        tmp_path: Path, compute: Compute, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="preparation.service")
    world = World(tmp_path, parsed(paysim_config()), paysim(3_000, seed=9))
    event = RawDataExtracted(dataset="paysim", batch_id=world.batches["paysim"],
                             source_uri="tx.csv", rows=3_000, columns=[], producer="test")
    local = service(world, Compute("local"), "local")
    cluster = service(world, compute, "cluster")
    want, got = local.on_raw_data_extracted(event), cluster.on_raw_data_extracted(event)
    assert want is not None and got is not None
    assert (got.feature_set_id, got.rows, got.features) == (
        want.feature_set_id, want.rows, want.features)
    pd.testing.assert_frame_equal(cluster.offline.read(got.feature_set_id),
                                  local.offline.read(want.feature_set_id), check_exact=False,
                                  rtol=0, atol=TOLERANCE)
    mine, theirs = (s.offline.metadata(got.feature_set_id) for s in (cluster, local))
    assert mine.columns == theirs.columns and mine.rows == theirs.rows
    assert {k: v for k, v in mine.metadata.items()} == theirs.metadata
    same_fitted(cluster.pipelines.load(got.feature_set_id),
                local.pipelines.load(want.feature_set_id))
    assert by_entity(cluster.offline.read_online(got.feature_set_id)).equals(
        by_entity(local.offline.read_online(want.feature_set_id)))
    for each in (cluster, local):  # what the FeaturesGenerated handler writes to Redis
        each.on_features_generated(got)
    entities = local.offline.read_online(want.feature_set_id)["nameOrig"].tolist()
    assert cluster.online.read(got.feature_set_id, entities) == local.online.read(
        want.feature_set_id, entities)
    assert cluster.state is not None and local.state is not None
    assert cluster.state.is_ready(got.feature_set_id)  # built on the cluster, a part at a time
    assert cluster.state.read(got.feature_set_id, entities) == local.state.read(
        want.feature_set_id, entities)
    assert "in process" not in caplog.text  # neither the set nor the state fell back


def service(world: World, compute: Compute, root: str) -> PreparationService:
    where = str(Path(world.root).parent / root)
    return PreparationService(world.config, world.raw, OfflineFeatureStore(where),
                              MemoryOnlineStore(), ModelStore(feature_pipeline_root(where), KEY),
                              state=MemoryEntityState(), targets=MemoryStreamTargets(),
                              compute=compute)


# -- a worker killed mid-transform -----------------------------------------------------------

def test_a_worker_killed_mid_transform_is_recomputed(tmp_path: Path, compute: Compute) -> None:
    world = World(tmp_path, parsed(paysim_config()), paysim(3_000, seed=2))
    fitted, features, _ = world.pandas()
    marker = tmp_path / "killed"
    assert compute.client is not None
    with on_cluster.plain_strings():
        frame = on_cluster.read_batch_dask(compute.client, world.raw, world.batches["paysim"],
                                           world.config.datasets["paysim"])
        written = on_cluster.write_features(compute.client, with_killer(fitted, marker, 1),
                                            frame, world.offline, world.fsid)
    assert marker.read_text() == "x"  # one worker died, mid-transform
    world.offline.finish_parts(world.fsid, written.rows, written.columns, {})
    pd.testing.assert_frame_equal(world.offline.read(world.fsid), features)
    compute.client.wait_for_workers(2, timeout=60)  # the nanny restarts it


@pytest.fixture
def fragile() -> Iterator[Compute]:
    """A cluster of its own that gives up on a task after one lost worker."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            open_compute(ComputeSettings(**{**TWO_WORKERS, "dask_workers": 1})) as cluster:
        yield cluster


def test_a_transform_that_keeps_killing_fails_retryably_with_nothing_complete(
        tmp_path: Path, fragile: Compute, monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(tmp_path, parsed(paysim_config()), paysim(2_000, seed=4))
    marker = tmp_path / "killed"
    real = on_cluster.write_features

    def killing(client: Any, fitted: FittedFeatureSet, *args: Any) -> Any:
        return real(client, with_killer(fitted, marker, 10**6), *args)

    monkeypatch.setattr(on_cluster, "write_features", killing)
    event = RawDataExtracted(dataset="paysim", batch_id=world.batches["paysim"],
                             source_uri="tx.csv", rows=2_000, columns=[], producer="test")
    prepare = service(world, fragile, "cluster")
    with pytest.raises(Exception) as failed:
        prepare.on_raw_data_extracted(event)
    assert not isinstance(failed.value, InvalidInput)  # retried by the runtime, not refused
    assert "KilledWorker" in type(failed.value).__name__
    assert not prepare.offline.exists(world.fsid)  # no record: the set is not complete
    monkeypatch.setattr(on_cluster, "write_features", real)
    again = prepare.on_raw_data_extracted(event)  # the retry, with workers that stay up
    assert again is not None and prepare.offline.exists(world.fsid)
    assert len(prepare.offline.read(world.fsid)) == 2_000


# -- batch scoring ---------------------------------------------------------------------------

def trained(fitted: FittedFeatureSet, features: pd.DataFrame) -> BatchModel:
    names = list(fitted.feature_names)
    estimator = LogisticRegression(max_iter=500).fit(features[names],
                                                     features["isFraud"].astype(int))
    return BatchModel("v1", estimator, fitted, names)


def test_the_same_batch_scores(world: World, compute: Compute, tmp_path: Path) -> None:
    fitted, features, _ = world.pandas()
    model = trained(fitted, features)
    assert compute.client is not None
    store = BatchScoreStore(str(tmp_path / "scores"))
    with on_cluster.plain_strings():
        frame = on_cluster.read_batch_dask(compute.client, world.raw, world.batches["paysim"],
                                           world.config.datasets["paysim"])
        uri, rows = score_raw_on_cluster(compute.client, model, frame, store, "raw-run")
    want = score_raw(model, world.frame, chunk_rows=1_000)
    got = store.read("raw-run")
    assert (rows, store.rows("raw-run")) == (len(want), len(want))
    assert uri.endswith("/parts") and store.exists("raw-run")
    assert got.dtypes.to_dict() == want.dtypes.to_dict()
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=TOLERANCE)

    world.on_cluster(compute)  # the feature set, stored as parts
    stored = world.offline.read_dask(world.fsid)
    score_features_on_cluster(compute.client, model, stored.frame, store, "features-run")
    want = score_features(model, world.offline.read(world.fsid))
    pd.testing.assert_frame_equal(store.read("features-run"), want, check_exact=False,
                                  rtol=0, atol=TOLERANCE)


def test_a_set_the_cluster_cannot_prepare_is_prepared_with_pandas(
        tmp_path: Path, compute: Compute, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="preparation.service")
    shuffled = parsed(paysim_config(split={"shuffle": True}))
    world = World(tmp_path, shuffled, paysim(1_500, seed=3))
    event = RawDataExtracted(dataset="paysim", batch_id=world.batches["paysim"],
                             source_uri="tx.csv", rows=1_500, columns=[], producer="test")
    got = service(world, compute, "cluster").on_raw_data_extracted(event)
    want = service(world, Compute("local"), "local").on_raw_data_extracted(event)
    assert got is not None and want is not None and got.features == want.features
    assert "prepared with pandas in process: split strategy 'sequential' with shuffle" in (
        caplog.text)
    stored = Path(world.root).parent / "cluster" / "features" / got.feature_set_id
    assert (stored / "features.parquet").is_file()  # one file: the pandas path wrote it
