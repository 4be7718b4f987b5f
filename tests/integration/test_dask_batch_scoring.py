"""Batch scoring on a Dask cluster through the real batch-scoring service, RabbitMQ and
Redis: BatchScoringRequested in, ScoringCompleted out, the same scores (within 1e-12, the
same columns and dtypes) with ``CONVEYOR_COMPUTE=local`` (pandas in process, one file) and
``dask-local`` (a LocalCluster of two workers; the raw batch in four parts, the feature
set one file of four row groups: the scores written as parts by the workers). A run that
fails midway leaves nothing a reader would take for scores."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest

from app.config import load_pipeline_config
from app.services import build_service
from common.events import BatchScoringRequested, Event, ScoringCompleted
from common.stores import BatchScoreStore, RawBatchStore
from ingestion.contract import ContractTyping
from scoring.batch_scoring import BatchScoring, batch_run_id
from tests.fixtures.dask_faults import FailsInWorker
from tests.fixtures.pipeline import as_event, watcher
from tests.fixtures.scoring import history
from tests.fixtures.scoring_service import DATASET, ServiceWorld, namespace_fixture, world_fixture
from tests.support.harness import BusNamespace, running_consumer, running_services, wait_for_handler

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROWS = 800
PART_ROWS = 200  # four parts, four row groups
TOLERANCE = 1e-12

ns = namespace_fixture(CONVEYOR_DASK_WORKERS="2", CONVEYOR_DASK_MEMORY_LIMIT="1GB",
                       CONVEYOR_BATCH_SCORING_CHUNK_ROWS="150")
world = world_fixture()


@pytest.fixture
def batch_id(world: ServiceWorld, tmp_path: Path) -> str:
    """A raw batch as ingestion stores it for a cluster: typed by its contract, in parts."""
    path = tmp_path / "batch.csv"
    history(ROWS, seed=11).to_csv(path, index=False)
    contract = load_pipeline_config(world.settings.pipeline_config).datasets[DATASET]
    raw = RawBatchStore(world.settings.data_root, chunk_rows=PART_ROWS)
    batch = raw.put(DATASET, str(path), typing=ContractTyping(contract, str(path)),
                    partitioned=True)
    assert batch.partitioned and batch.typed_by is not None
    return batch.batch_id


@pytest.fixture
def row_groups(world: ServiceWorld) -> str:
    """The world's feature set as one file of several row groups (as pandas writes a set
    of a few million rows)."""
    fsid = world.fitted.feature_set_id
    path = Path(world.settings.data_root) / "features" / fsid / "features.parquet"
    frame = pd.read_parquet(path)
    frame.to_parquet(path, use_dictionary=False, compression="lz4",
                     row_group_size=PART_ROWS // 2 + 50)  # 150 rows: four groups
    return fsid


def scored(ns: BusNamespace, compute: str, event: Event,
           monkeypatch: pytest.MonkeyPatch) -> tuple[ScoringCompleted, pd.DataFrame]:
    """Run the batch-scoring service on ``compute``, publish the request and return the
    ScoringCompleted it caused and the scores it wrote (then removed, for the next run)."""
    monkeypatch.setenv("CONVEYOR_COMPUTE", compute)
    watch = watcher(ns, ("ScoringCompleted",))
    with running_consumer(ns.bus(), watch), running_services(ns, ["batch-scoring"]), \
            wait_for_handler(watch, "ScoringCompleted", 180,
                             match=lambda e: e.causation_id == event.event_id) as waited:
        ns.bus().publish(event)
    done = as_event(ScoringCompleted, waited.event)
    run = Path(done.uri.removeprefix("file://")).parent
    scores = BatchScoreStore(ns.settings.data_root).read(run.name)
    shutil.rmtree(run)  # the same request would find its run written
    return done, scores


def same_scores(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert got.dtypes.to_dict() == want.dtypes.to_dict()
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=TOLERANCE)


def again(event: Event) -> Event:
    return event.model_copy(update={"event_id": uuid.uuid4()})


def test_a_raw_batch_scores_the_same_in_process_and_on_the_cluster(
        ns: BusNamespace, batch_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    event = BatchScoringRequested(batch_id=batch_id, model_version="v1", producer="test")
    local, want = scored(ns, "local", event, monkeypatch)
    cluster, got = scored(ns, "dask-local", again(event), monkeypatch)
    assert local.uri.endswith("/scores.parquet") and cluster.uri.endswith("/parts")
    assert (cluster.rows, cluster.model_version) == (local.rows, local.model_version) == (
        ROWS, "v1")
    assert got["row_id"].tolist() == list(range(ROWS))
    same_scores(got, want)


def test_a_feature_set_of_several_row_groups_scores_the_same(
        ns: BusNamespace, row_groups: str, monkeypatch: pytest.MonkeyPatch) -> None:
    event = BatchScoringRequested(feature_set_id=row_groups, producer="test")
    local, want = scored(ns, "local", event, monkeypatch)
    cluster, got = scored(ns, "dask-local", again(event), monkeypatch)
    assert cluster.uri.endswith("/parts") and cluster.rows == local.rows == len(want)
    assert got["row_id"].tolist() == want["row_id"].tolist() == list(range(len(want)))
    same_scores(got, want)


def test_a_run_that_fails_midway_leaves_no_scores(
        ns: BusNamespace, world: ServiceWorld, batch_id: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_COMPUTE", "dask-local")
    failing = FailsInWorker(world.estimators["v1"], str(tmp_path / "made"), after=2)
    world.stores.models.save("m-failing", failing, world.stores.models.metadata("m-v1").metadata)
    version = world.stores.registry(world.settings, "fraud").register("m-failing")
    service = build_service("batch-scoring", ns.settings)
    event = BatchScoringRequested(batch_id=batch_id, model_version=version, producer="test")
    try:
        with pytest.raises(RuntimeError, match="a prediction failed on the cluster"):
            service.on_batch_scoring_requested(event)
    finally:
        service.close()
    assert (tmp_path / "made").read_text() == "xx"  # two parts were scored before it failed
    batch: BatchScoring = service.batch
    runs = Path(ns.settings.data_root) / "scores"
    left = [p for p in runs.rglob("*") if p.is_file()] if runs.exists() else []
    assert left == []  # neither the parts written before the failure nor a record
    assert not batch.scores.exists(batch_run_id(world.stores.registry(
        world.settings, "fraud").model_id_of(version), event))
