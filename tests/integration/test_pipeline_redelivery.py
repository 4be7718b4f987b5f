"""Redelivery on the real RabbitMQ and Redis: every event type again, nothing new stored.

Handlers are idempotent by content: the batch id is the hash of the bytes, the feature set
id a hash of the spec and batches, the model id a hash of the candidate and feature set.
Events re-published with new event ids get past the processed-event record, so only those
content-derived ids stand between a redelivery and a duplicate.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from common.events import (
    CandidatesTrained,
    Event,
    FeaturesGenerated,
    ModelReady,
    RawDataExtracted,
    SourceDataAvailable,
)
from common.settings import Settings
from common.wiring import Stores
from tests.fixtures.pipeline import (
    as_event,
    one_of,
    paysim_config,
    pipeline_namespace,
    write_paysim,
)
from tests.fixtures.warm import warm_training_workers
from tests.support.harness import BusNamespace, running_consumer, running_services, wait_for_handler

pytestmark = pytest.mark.integration
warm_training_workers()

STAGES = ("ingestion", "preparation", "training", "evaluation")
WATCHED = ("RawDataExtracted", "FeaturesGenerated", "CandidatesTrained", "ModelReady",
           "ModelRejected")


@pytest.fixture
def ns(tmp_path: Path, services_up: None) -> Iterator[BusNamespace]:
    namespace = pipeline_namespace(tmp_path, paysim_config())
    yield namespace
    namespace.close()


def snapshot(stores: Stores, settings: Settings, entities: list[str]) -> dict[str, Any]:
    """What the stores hold, with creation times so a rewrite would show."""
    registry = stores.registry(settings, "fraud")
    online = [row for r in stores.offline.list() for row in stores.online.read(
        r.feature_set_id, entities) if row is not None]
    return {
        "batches": [(b.batch_id, b.created_at) for b in stores.raw.list()],
        "feature_sets": [(r.feature_set_id, r.created_at) for r in stores.offline.list()],
        "models": [(m.model_id, m.created_at) for m in stores.models.list()],
        "feature_pipelines": [(m.model_id, m.created_at) for m in stores.feature_pipelines.list()],
        "versions": registry.versions(),
        "history": registry.history(),
        "online_rows": len(online),
    }


def again(event: Event) -> Event:
    """The same event under a new id, as a producer or a replay might send it."""
    return event.model_copy(update={"event_id": uuid.uuid4()})


def test_redelivering_every_event_type_stores_nothing_twice(
    ns: BusNamespace, tmp_path: Path
) -> None:
    path = write_paysim(tmp_path / "transactions.csv", 3_000, seed=4)
    first = SourceDataAvailable(dataset="paysim", uri=str(path), producer="test")
    entities = pd.read_csv(path)["nameOrig"].unique().tolist()
    seen: list[Event] = []
    watch = ns.dispatcher("watch", dict.fromkeys(WATCHED, seen.append))
    stores = Stores.from_settings(ns.settings)

    with running_services(ns, STAGES), running_consumer(ns.bus(), watch):
        with wait_for_handler(watch, "ModelReady", timeout=60):
            ns.bus().publish(first)
        ready = one_of(ModelReady, seen)
        trained = one_of(CandidatesTrained, seen)
        before = snapshot(stores, ns.settings, entities)
        copies = [again(first), again(one_of(RawDataExtracted, seen)),
                  again(one_of(FeaturesGenerated, seen)), again(trained)]
        with wait_for_handler(watch, "ModelReady", count=len(copies), timeout=60) as redone:
            for copy in copies:
                ns.bus().publish(copy)
        after = snapshot(stores, ns.settings, entities)
    stores.redis.close()

    assert after == before
    assert len(before["batches"]) == len(before["feature_sets"]) == 1
    assert len(before["models"]) == 2 and before["online_rows"] > 0
    assert before["versions"] == {"v1": ready.model_id}
    retrained = [e for e in seen if isinstance(e, CandidatesTrained) and e not in copies]
    assert len(retrained) == 1 + 3  # the first run, and one per copy upstream of training
    assert {tuple(e.model_ids) for e in retrained} == {tuple(trained.model_ids)}
    answers = [(e.model_id, e.version, e.previous_version)
               for e in (as_event(ModelReady, call.event) for call in redone.calls)]
    assert answers == [(ready.model_id, "v1", None)] * len(copies)
    assert not [e for e in seen if e.event_type == "ModelRejected"]
