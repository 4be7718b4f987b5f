"""The Redis record of processed events keeps each id for its event type's retention, in a
key ending in the id's 16 bytes (the real Redis, database 15 as every test's)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast
from uuid import uuid4

import pytest

from common.bus.dispatch import Ack, Delivery, Dispatcher, HandlerSpec
from common.bus.idempotency import processed_key
from common.events import Event, OutcomeObserved, ScoreServed, ServedScore, SourceDataAvailable
from common.runtime import redis_processed
from common.settings import Settings
from tests.support.harness import delete_redis_keys, isolated_settings, redis_client

pytestmark = pytest.mark.integration
WEEK_S = 7 * 24 * 3600


@pytest.fixture
def settings(services_up: None) -> Iterator[Settings]:
    settings = isolated_settings()
    yield settings
    delete_redis_keys(settings)


def served() -> ScoreServed:
    score = ServedScore(request_id="r1", entity_id="C1", model_version="v1", score=0.5,
                        latency_ms=1.0)
    return ScoreServed(scores=[score], producer="scoring")


def handle(settings: Settings, *events: Event) -> list[object]:
    """Each event through a dispatcher of service ``monitoring`` with the settings' record
    (as ``conveyor run`` builds it); the outcomes."""
    specs = {e.event_type: HandlerSpec(e.event_type, lambda _: None) for e in events}
    processed = redis_processed(settings)
    dispatcher = Dispatcher("monitoring", specs, lambda _: None, processed=processed)
    try:
        return [dispatcher.dispatch(Delivery(e.to_json(), e.event_type)) for e in events]
    finally:
        processed.client.close()


def ttl_of(settings: Settings, event: Event) -> int:
    client = redis_client(settings)
    try:
        key = processed_key(settings.namespace, "monitoring", event.event_id)
        return cast(int, client.ttl(key))
    finally:
        client.close()


def test_record_events_expire_in_an_hour_and_the_others_in_a_week(settings: Settings) -> None:
    outcome = OutcomeObserved(entity_id="C1", outcome=1, producer="app")
    batch = served()
    source = SourceDataAvailable(dataset="d", uri="u.csv", producer="test")
    assert handle(settings, outcome, batch, source) == [Ack(), Ack(), Ack()]
    assert 3_590 <= ttl_of(settings, outcome) <= 3_600
    assert 3_590 <= ttl_of(settings, batch) <= 3_600
    assert WEEK_S - 10 <= ttl_of(settings, source) <= WEEK_S
    assert handle(settings, outcome, source) == [Ack(duplicate=True), Ack(duplicate=True)]


def test_the_setting_overrides_one_type(settings: Settings) -> None:
    tuned = settings.model_copy(update={"processed_ttl_by_event": Settings(
        processed_ttl_by_event={"OutcomeObserved": 120}).processed_ttl_by_event})
    outcome, batch = OutcomeObserved(entity_id="C1", outcome=1, producer="app"), served()
    handle(tuned, outcome, batch)
    assert 110 <= ttl_of(tuned, outcome) <= 120
    assert 3_590 <= ttl_of(tuned, batch) <= 3_600  # not named: its default


def test_an_id_as_sixteen_bytes_takes_less_redis_memory_than_as_text(
        settings: Settings) -> None:
    client = redis_client(settings)
    try:
        ids = [uuid4() for _ in range(50)]
        for event_id in ids:
            client.set(processed_key(settings.namespace, "monitoring", event_id), 1, ex=60)
            client.set(f"{settings.namespace}:processed:monitoring:{event_id}", 1, ex=60)
        as_bytes = [cast(int, client.memory_usage(
            processed_key(settings.namespace, "monitoring", i))) for i in ids]
        as_text = [cast(int, client.memory_usage(
            f"{settings.namespace}:processed:monitoring:{i}")) for i in ids]
    finally:
        client.close()
    assert max(as_bytes) <= min(as_text) - 16  # 88 against 120 bytes on Redis 7.0
