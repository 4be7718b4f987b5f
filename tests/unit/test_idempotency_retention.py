"""Processed-event ids are kept by event type: the record events an hour, the others 7 days
(in memory; the Redis record is tested in tests/integration/test_idempotency_redis.py)."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

import pytest
import redis
from pydantic import ValidationError

from common.bus.dispatch import Ack, Delivery, Dispatcher, HandlerSpec
from common.bus.idempotency import (
    Backoff,
    MemoryProcessedEvents,
    RedisProcessedEvents,
    Retention,
    processed_key,
)
from common.events import Event, OutcomeObserved, SourceDataAvailable
from common.settings import PROCESSED_TTL_BY_EVENT, Settings

WEEK_S = 7 * 24 * 3600


class Clock:
    """Seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def dispatcher(processed: MemoryProcessedEvents, handled: list[Event]) -> Dispatcher:
    specs = {kind: HandlerSpec(kind, handled.append)
             for kind in ("OutcomeObserved", "SourceDataAvailable")}
    return Dispatcher("monitoring", specs, lambda _: None, processed=processed)


def deliver(dispatcher: Dispatcher, event: Event) -> Any:
    return dispatcher.dispatch(Delivery(event.to_json(), event.event_type))


def test_the_record_events_are_kept_an_hour_and_the_others_a_week() -> None:
    settings = Settings()
    assert settings.processed_ttl_s == WEEK_S
    assert settings.processed_ttl_by_event == {
        "OutcomeObserved": 3_600, "ScoreServed": 3_600, "RecordsObserved": 3_600}
    retention = Retention(settings.processed_ttl_s, settings.processed_ttl_by_event)
    assert retention.ttl_s("OutcomeObserved") == 3_600
    assert retention.ttl_s("ModelReady") == WEEK_S


def test_a_type_named_in_the_setting_overrides_its_default_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_PROCESSED_TTL_BY_EVENT",
                       '{"OutcomeObserved": 86400, "ModelReady": 600}')
    assert Settings().processed_ttl_by_event == {
        **PROCESSED_TTL_BY_EVENT, "OutcomeObserved": 86_400, "ModelReady": 600}


@pytest.mark.parametrize(("by_event", "problem"), [
    ({"OutcomeObserve": 60}, "unknown event type(s) ['OutcomeObserve']"),
    ({"ScoreServed": 0}, "retention under 1 s for ['ScoreServed']"),
])
def test_a_typo_or_no_retention_fails_at_start(by_event: dict[str, int], problem: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(problem)):
        Settings(processed_ttl_by_event=by_event)


def test_a_redelivered_outcome_is_skipped_for_an_hour_then_handled_again() -> None:
    clock, handled = Clock(), list[Event]()
    settings = Settings()
    processed = MemoryProcessedEvents(
        Retention(settings.processed_ttl_s, settings.processed_ttl_by_event), clock)
    consumer = dispatcher(processed, handled)
    outcome = OutcomeObserved(entity_id="C1", outcome=1, producer="app")
    source = SourceDataAvailable(dataset="d", uri="u.csv", producer="test")
    assert deliver(consumer, outcome) == Ack() and deliver(consumer, source) == Ack()
    clock.now = 3_599.0
    assert deliver(consumer, outcome) == Ack(duplicate=True)
    clock.now = 3_600.0
    assert deliver(consumer, outcome) == Ack()  # its id is forgotten: handled again
    clock.now = WEEK_S - 1.0
    assert deliver(consumer, source) == Ack(duplicate=True)  # still known after a week
    assert handled == [outcome, source, outcome]


def test_without_a_retention_the_memory_record_never_forgets() -> None:
    clock = Clock()
    processed = MemoryProcessedEvents(clock=clock)
    event_id = UUID(int=7)
    processed.mark("monitoring", event_id, "OutcomeObserved")
    clock.now = 10.0 * WEEK_S
    assert processed.seen("monitoring", event_id)
    assert not processed.seen("eventlog", event_id)


def test_the_key_ends_in_the_ids_sixteen_bytes() -> None:
    event_id = UUID("0123456789abcdef0123456789abcdef")
    assert processed_key("conveyor", "monitoring", event_id) == (
        b"conveyor:processed:monitoring:"
        b"\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef")


def test_the_redis_record_is_built_from_the_settings_alone() -> None:
    settings = Settings(namespace="ns-1", processed_ttl_s=600, idempotency_retry_s=4.0,
                        processed_ttl_by_event={"OutcomeObserved": 120})
    client = redis.Redis()  # connects on first command: none is sent here
    processed = RedisProcessedEvents.from_settings(client, settings)
    assert (processed.client, processed.namespace) == (client, "ns-1")
    assert processed.retention == Retention(600, settings.processed_ttl_by_event)
    assert processed.retention.ttl_s("OutcomeObserved") == 120
    assert processed.retention.ttl_s("ScoreServed") == PROCESSED_TTL_BY_EVENT["ScoreServed"]
    assert processed.backoff == Backoff(budget_s=4.0)
