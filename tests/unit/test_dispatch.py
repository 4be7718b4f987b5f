"""The shared Dispatcher: one delivery in, Ack / Retry / DeadLetter out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from common.bus.dispatch import (
    ATTEMPT,
    DEAD_LETTERED_AT,
    ERROR_FIELD,
    ERROR_MESSAGE,
    ERROR_TYPE,
    FAILED_SERVICE,
    LAST_ERROR,
    ROUTING_KEY,
    TRACEBACK,
    Ack,
    DeadLetter,
    Delivery,
    Dispatcher,
    HandlerSpec,
    Retry,
    RetryPolicy,
    derived_event_id,
)
from common.bus.idempotency import MemoryProcessedEvents
from common.errors import InvalidInput, PublishError
from common.events import Event, RawDataExtracted, SourceDataAvailable

SERVICE = "ingestion"
POLICY = RetryPolicy(max_attempts=3, delays_s=(0.5, 2.0))


class Recorder:
    """A publish function that records what it confirmed, and can be made to fail."""

    def __init__(self) -> None:
        self.published: list[Event] = []
        self.fail: Exception | None = None

    def __call__(self, events: Sequence[Event]) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.extend(events)


def source(uri: str = "tx.csv") -> SourceDataAvailable:
    return SourceDataAvailable(dataset="paysim", uri=uri, producer="test")


def raw_from(event: SourceDataAvailable) -> RawDataExtracted:
    return event.caused(
        RawDataExtracted, producer=SERVICE, dataset=event.dataset, batch_id="b1",
        source_uri=event.uri, rows=1, columns=["a"],
    )


def delivery(event: Event, attempt: int | None = None, **headers: Any) -> Delivery:
    if attempt is not None:
        headers[ATTEMPT] = attempt
    return Delivery(event.to_json(), event.event_type, headers)


def boom(event: Event) -> None:
    raise RuntimeError(f"boom on {event.event_type}")


def counted(dispatcher: Dispatcher, what: str, event_type: str) -> float | None:
    labels = {"service": SERVICE, "event_type": event_type}
    return dispatcher.metrics.registry.get_sample_value(f"conveyor_events_{what}_total", labels)


def make(
    fn: Any, *, expected: tuple[type[BaseException], ...] = (), processed: Any = None
) -> tuple[Dispatcher, Recorder]:
    publish = Recorder()
    spec = HandlerSpec("SourceDataAvailable", fn, expected)
    dispatcher = Dispatcher(
        SERVICE, {"SourceDataAvailable": spec}, publish, policy=POLICY, processed=processed
    )
    return dispatcher, publish


def test_success_acks_and_hands_the_handler_the_exact_event() -> None:
    got: list[Event] = []
    dispatcher, publish = make(got.append)
    event = source()
    assert dispatcher.dispatch(delivery(event)) == Ack()
    assert got == [event]
    assert publish.published == []
    assert counted(dispatcher, "handled", event.event_type) == 1


def test_emitted_events_get_deterministic_derived_ids() -> None:
    dispatcher, publish = make(lambda ev: [raw_from(ev), raw_from(ev)])
    cause = source()
    assert dispatcher.dispatch(delivery(cause)) == Ack()
    assert dispatcher.dispatch(delivery(cause)) == Ack()  # a redelivery, no records kept
    first, second = publish.published[:2], publish.published[2:]
    assert [e.event_id for e in first] == [
        derived_event_id(cause, SERVICE, i, "RawDataExtracted") for i in range(2)
    ]
    assert [e.event_id for e in first] == [e.event_id for e in second]
    assert first[0].event_id != first[1].event_id
    assert all(e.causation_id == cause.event_id for e in first)
    assert all(e.correlation_id == cause.correlation_id for e in first)
    other = source()
    assert derived_event_id(other, SERVICE, 0, "RawDataExtracted") != first[0].event_id


def test_a_single_returned_event_is_published() -> None:
    dispatcher, publish = make(raw_from)
    dispatcher.dispatch(delivery(source()))
    assert [e.event_type for e in publish.published] == ["RawDataExtracted"]


def test_failure_is_retried_with_incremented_attempt_and_policy_delays() -> None:
    dispatcher, _ = make(boom)
    event = source()
    first = dispatcher.dispatch(delivery(event, x_trace="keep-me"))
    assert isinstance(first, Retry)
    assert first.delay_s == 0.5
    assert first.headers[ATTEMPT] == 2
    assert first.headers[LAST_ERROR] == "RuntimeError: boom on SourceDataAvailable"
    assert first.headers["x_trace"] == "keep-me"  # other headers travel along
    second = dispatcher.dispatch(Delivery(event.to_json(), event.event_type, first.headers))
    assert isinstance(second, Retry)
    assert (second.delay_s, second.headers[ATTEMPT]) == (2.0, 3)


def test_last_delay_repeats() -> None:
    policy = RetryPolicy(max_attempts=10, delays_s=(1.0, 5.0))
    assert [policy.delay(a) for a in (1, 2, 3, 9)] == [1.0, 5.0, 5.0, 5.0]


def test_dead_letter_after_max_attempts_carries_the_error() -> None:
    dispatcher, _ = make(boom)
    outcome = dispatcher.dispatch(delivery(source(), attempt=POLICY.max_attempts))
    assert isinstance(outcome, DeadLetter)
    headers = outcome.headers
    assert headers[ERROR_TYPE] == "RuntimeError"
    assert headers[ERROR_MESSAGE] == "boom on SourceDataAvailable"
    assert "Traceback" in headers[TRACEBACK] and "in boom" in headers[TRACEBACK]
    assert headers[FAILED_SERVICE] == SERVICE
    assert headers[ROUTING_KEY] == "SourceDataAvailable"
    assert headers[ATTEMPT] == POLICY.max_attempts
    assert DEAD_LETTERED_AT in headers and ERROR_FIELD not in headers
    assert counted(dispatcher, "dead_lettered", "SourceDataAvailable") == 1


class MissingFile(Exception):
    pass


@pytest.mark.parametrize(
    "error", [MissingFile("tx.csv"), InvalidInput("negative amount")], ids=["expected", "invalid"]
)
def test_expected_errors_and_invalid_input_are_dead_lettered_at_once(error: Exception) -> None:
    calls: list[Event] = []

    def handler(event: Event) -> None:
        calls.append(event)
        raise error

    dispatcher, _ = make(handler, expected=(MissingFile,))
    outcome = dispatcher.dispatch(delivery(source()))
    assert isinstance(outcome, DeadLetter)
    assert outcome.headers[ERROR_TYPE] == type(error).__name__
    assert outcome.headers[ERROR_MESSAGE] == str(error)
    assert len(calls) == 1


def test_event_without_handler_is_dead_lettered() -> None:
    dispatcher, _ = make(lambda ev: None)
    event = raw_from(source())
    outcome = dispatcher.dispatch(delivery(event))
    assert isinstance(outcome, DeadLetter)
    assert outcome.headers[ERROR_TYPE] == "InvalidEvent"
    assert outcome.headers[ERROR_FIELD] == "event_type"
    assert f"{SERVICE} has no handler for RawDataExtracted" in outcome.headers[ERROR_MESSAGE]


def test_invalid_body_is_dead_lettered_naming_the_field() -> None:
    dispatcher, _ = make(lambda ev: None)
    body = source().to_json().replace(b'"uri":"tx.csv"', b'"uri":""')
    outcome = dispatcher.dispatch(Delivery(body, "SourceDataAvailable"))
    assert isinstance(outcome, DeadLetter)
    assert outcome.headers[ERROR_FIELD] == "uri"
    assert outcome.headers[ROUTING_KEY] == "SourceDataAvailable"
    garbage = dispatcher.dispatch(Delivery(b"not json", "SourceDataAvailable"))
    assert isinstance(garbage, DeadLetter)
    assert "not JSON" in garbage.headers[ERROR_MESSAGE]


def test_processed_event_is_acked_as_duplicate_without_running_the_handler() -> None:
    calls: list[Event] = []
    processed = MemoryProcessedEvents()
    def handler(event: SourceDataAvailable) -> RawDataExtracted:
        calls.append(event)
        return raw_from(event)

    dispatcher, publish = make(handler, processed=processed)
    event = source()
    assert dispatcher.dispatch(delivery(event)) == Ack()
    assert processed.seen(SERVICE, event.event_id)
    assert dispatcher.dispatch(delivery(event)) == Ack(duplicate=True)
    assert len(calls) == 1 and len(publish.published) == 1
    assert not processed.seen("another-service", event.event_id)


def test_processed_mark_is_set_only_after_publish_succeeds() -> None:
    processed = MemoryProcessedEvents()
    dispatcher, publish = make(raw_from, processed=processed)
    event = source()
    publish.fail = PublishError("broker went away")
    outcome = dispatcher.dispatch(delivery(event))
    assert isinstance(outcome, Retry)
    assert outcome.headers[LAST_ERROR] == "PublishError: broker went away"
    assert not processed.seen(SERVICE, event.event_id)
    publish.fail = None
    retried = Delivery(event.to_json(), event.event_type, outcome.headers)
    assert dispatcher.dispatch(retried) == Ack()
    assert processed.seen(SERVICE, event.event_id)
    assert [e.causation_id for e in publish.published] == [event.event_id]


def test_failed_handler_is_not_marked_processed() -> None:
    processed = MemoryProcessedEvents()
    dispatcher, _ = make(boom, processed=processed)
    event = source()
    dispatcher.dispatch(delivery(event))
    dispatcher.dispatch(delivery(event, attempt=POLICY.max_attempts))
    assert not processed.seen(SERVICE, event.event_id)


def test_event_types_are_the_handled_types() -> None:
    dispatcher, _ = make(lambda ev: None)
    assert dispatcher.event_types == ["SourceDataAvailable"]


@pytest.mark.parametrize(("after_s", "releases"), [(0.0, 2), (1e9, 0)])
def test_freed_memory_is_released_after_a_handler_that_ran_long_enough(
        after_s: float, releases: int) -> None:
    calls: list[int] = []
    spec = HandlerSpec("SourceDataAvailable", lambda event: None, ())
    dispatcher = Dispatcher(SERVICE, {"SourceDataAvailable": spec}, Recorder(), policy=POLICY,
                            release_after_s=after_s, release=lambda: calls.append(1))
    assert dispatcher.dispatch(delivery(source())) == Ack()
    failing = Dispatcher(SERVICE, {"SourceDataAvailable": HandlerSpec("SourceDataAvailable",
                                                                      boom, ())},
                         Recorder(), policy=POLICY, release_after_s=after_s,
                         release=lambda: calls.append(1))
    assert isinstance(failing.dispatch(delivery(source())), Retry)
    assert len(calls) == releases  # a failed long handler frees its memory too


def test_the_allocator_can_be_asked_to_release_free_memory_here() -> None:
    from common.allocator import release_free_memory

    assert release_free_memory() is True  # glibc (the image and this machine)
