"""The offline pipeline end to end: a source file in, a champion model and its lineage out.

The first test runs the five services (event log, ingestion, preparation, training,
evaluation) as ``conveyor run`` runs them, on the real RabbitMQ and Redis, each on a
thread of its own. The second puts scikit-learn's breast cancer data set through the
whole pipeline (in-process bus, real Redis) and compares the champion with a plain
scikit-learn model fitted on the same rows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from app.config import load_pipeline_config
from app.services import build_service
from common.bus.idempotency import MemoryProcessedEvents
from common.bus.memory import InMemoryBus
from common.eventlog import EventLog
from common.events import (
    CandidatesTrained,
    Event,
    FeaturesGenerated,
    ModelReady,
    RawDataExtracted,
    SourceDataAvailable,
)
from common.runtime import ServiceRunner
from common.settings import Settings
from common.wiring import Stores
from segregation import split
from segregation.split import Split
from tests.fixtures.breast_cancer import CONFIG as BREAST_CANCER_CONFIG
from tests.fixtures.breast_cancer import LABEL, write_breast_cancer
from tests.fixtures.pipeline import (
    as_event,
    one_of,
    paysim_config,
    pipeline_namespace,
    watcher,
    write_paysim,
)
from tests.fixtures.warm import warm_training_workers
from tests.support.harness import (
    BusNamespace,
    delete_redis_keys,
    isolated_settings,
    running_consumer,
    running_services,
    wait_for_handler,
    wait_until,
)
from training.config import resolve_estimator

pytestmark = pytest.mark.e2e
warm_training_workers()

ROWS = 10_000
SERVICES = ("eventlog", "ingestion", "preparation", "training", "evaluation")
STAGES = SERVICES[1:]


@pytest.fixture
def ns(tmp_path: Path, services_up: None) -> Iterator[BusNamespace]:
    """A namespace whose services read the fast PaySim pipeline and keep data in tmp_path."""
    namespace = pipeline_namespace(tmp_path, paysim_config())
    yield namespace
    namespace.close()


def ancestry(log: EventLog, event: Event) -> list[Event]:
    """The event and its causes, each looked up in the event log by causation id."""
    chain = [event]
    while (cause := chain[-1].causation_id) is not None:
        found = log.get(cause)
        assert found is not None, f"{chain[-1].event_type}'s cause {cause} is not in the log"
        chain.append(found)
    return chain


def test_a_source_file_becomes_the_champion_traceable_to_its_bytes(
    ns: BusNamespace, tmp_path: Path
) -> None:
    source = write_paysim(tmp_path / "transactions.csv", ROWS, seed=11)
    published = SourceDataAvailable(dataset="paysim", uri=str(source), producer="e2e")
    watch = watcher(ns, ("ModelReady",))
    log = EventLog(ns.redis, ns.namespace)

    with running_services(ns, SERVICES), running_consumer(ns.bus(), watch):
        with wait_for_handler(watch, "ModelReady", timeout=90) as waited:
            ns.bus().publish(published)
        ready = as_event(ModelReady, waited.event)
        wait_until(lambda: log.get(ready.event_id), timeout=15, message="ModelReady logged")
        dead = {name: ns.depths(name)["dead"] for name in SERVICES}

    assert dead == dict.fromkeys(SERVICES, 0)
    chain = ancestry(log, ready)
    assert [type(e) for e in chain] == [
        ModelReady, CandidatesTrained, FeaturesGenerated, RawDataExtracted, SourceDataAvailable]
    assert chain[-1] == published
    assert {e.correlation_id for e in chain} == {published.correlation_id}
    trained = as_event(CandidatesTrained, chain[1])
    features = as_event(FeaturesGenerated, chain[2])
    raw = as_event(RawDataExtracted, chain[3])
    assert ready.model_id in trained.model_ids and trained.failures == []
    assert trained.feature_set_id == features.feature_set_id
    assert features.batch_ids == [raw.batch_id] and raw.rows == ROWS

    stores = Stores.from_settings(ns.settings)
    try:
        record = stores.models.metadata(ready.model_id)
        assert record.status == "champion"
        assert record.metadata["feature_set_id"] == features.feature_set_id
        assert record.metadata["batch_ids"] == [raw.batch_id]
        manifest = stores.raw.manifest(raw.batch_id)
        assert manifest.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert (manifest.source_uri, manifest.rows) == (str(source), ROWS)
        champion = stores.registry(ns.settings, "fraud").champion()
        assert (champion.model_id, champion.version) == (ready.model_id, ready.version)
        assert ready.version == "v1" and ready.metrics["average_precision"] >= 0.3

        entities = pd.read_csv(source)["nameOrig"].drop_duplicates().sample(20, random_state=0)
        online = stores.online.read(features.feature_set_id, entities.tolist())
        missing = [e for e, row in zip(entities, online, strict=True) if not row]
        assert not missing, f"no online features for {missing}"
        values = [v for row in online if row for v in row.values()]
        assert values and all(math.isfinite(float(v)) for v in values)
    finally:
        stores.redis.close()


# -- a real data set ---------------------------------------------------------------------


@pytest.fixture
def breast_cancer_settings(tmp_path: Path, services_up: None) -> Iterator[Settings]:
    settings = isolated_settings(data_root=str(tmp_path / "data"),
                                 pipeline_config=str(BREAST_CANCER_CONFIG))
    yield settings
    delete_redis_keys(settings)


def test_breast_cancer_champion_matches_plain_scikit_learn_on_the_same_split(
    breast_cancer_settings: Settings, tmp_path: Path
) -> None:
    settings = breast_cancer_settings
    source = tmp_path / "breast_cancer.csv"
    write_breast_cancer(source)
    bus = InMemoryBus()
    bus.declare("observer", ["IngestionFailed", "ModelReady", "ModelRejected"])
    for name in STAGES:
        runner = ServiceRunner(build_service(name, settings), bus, settings,
                               processed=MemoryProcessedEvents())
        bus.register(runner.dispatcher())

    bus.publish(SourceDataAvailable(dataset="breast_cancer", uri=str(source), producer="e2e"))
    bus.run_until_idle()

    assert not any(bus.dlq.values()), {s: [d.error for d in dl] for s, dl in bus.dlq.items()}
    ready = one_of(ModelReady, bus.published)
    features = one_of(FeaturesGenerated, bus.published)
    stores = Stores.from_settings(settings)
    try:
        champion = stores.models.metadata(ready.model_id).metadata
        offline = stores.offline.read(features.feature_set_id)
        plain, test_ids = plain_model_metrics(source, champion["config"])
        assert evaluation_ids(offline) == test_ids  # the plain model is judged on the same rows
        for metric in ("accuracy", "roc_auc"):
            assert ready.metrics[metric] == pytest.approx(plain[metric], abs=0.02), metric
        assert ready.metrics["roc_auc"] >= 0.9

        ids = offline["id"].iloc[:5].tolist()
        online = stores.online.read_frame(features.feature_set_id, ids)
        pd.testing.assert_frame_equal(  # the same values online as offline: no skew
            online[features.features], offline.set_index("id").loc[ids, features.features],
            check_names=False, check_dtype=False, check_index_type=False)
    finally:
        stores.redis.close()


def config_split(frame: pd.DataFrame) -> Split:
    """``frame`` split as the breast cancer pipeline config says."""
    config = load_pipeline_config(BREAST_CANCER_CONFIG).split
    return split(frame, config.strategy, config.ratio, config.seed, label=LABEL)


def evaluation_ids(features: pd.DataFrame) -> list[str]:
    """The ids of the rows evaluation scores the candidates on."""
    return config_split(features).test["id"].astype(str).tolist()


def plain_model_metrics(source: Path, candidate: dict) -> tuple[dict[str, float], list[str]]:
    """The champion's estimator fitted without Conveyor on the pipeline's split of the
    source: its metrics, and the ids of the rows it was scored on."""
    frame = pd.read_csv(source)
    measurements = [c for c in frame.columns if c not in ("id", "timestamp", LABEL)]
    parts = config_split(frame)
    estimator = resolve_estimator(candidate["estimator"])(**candidate["params"])
    model = make_pipeline(StandardScaler(), estimator)
    model.fit(parts.X_train[measurements], parts.y_train)
    scores = model.predict_proba(parts.X_test[measurements])[:, 1]
    return {
        "accuracy": skm.accuracy_score(parts.y_test, model.predict(parts.X_test[measurements])),
        "roc_auc": skm.roc_auc_score(parts.y_test, scores),
    }, parts.test["id"].tolist()
