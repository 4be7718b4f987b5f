"""The in-process bus: routing, Unroutable, retries on the virtual clock, DLQ and replay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from common.bus.dispatch import (
    ATTEMPT,
    ERROR_TYPE,
    Ack,
    DeadLetter,
    Dispatcher,
    HandlerSpec,
    RetryPolicy,
)
from common.bus.memory import InMemoryBus
from common.errors import Unroutable
from common.events import Event, ModelReady, RawDataExtracted, SourceDataAvailable
from tests.support.harness import wait_for_handler

POLICY = RetryPolicy(max_attempts=3, delays_s=(1.0, 5.0))


def source(uri: str = "tx.csv") -> SourceDataAvailable:
    return SourceDataAvailable(dataset="paysim", uri=uri, producer="test")


def raw_from(event: SourceDataAvailable) -> RawDataExtracted:
    return event.caused(
        RawDataExtracted, producer="ingestion", dataset=event.dataset, batch_id="b1",
        source_uri=event.uri, rows=1, columns=["a"],
    )


def register(bus: InMemoryBus, service: str, **handlers: Callable[[Any], Any]) -> Dispatcher:
    specs = {kind: HandlerSpec(kind, fn) for kind, fn in handlers.items()}
    dispatcher = Dispatcher(service, specs, bus.publish_many, policy=POLICY)
    bus.register(dispatcher)
    return dispatcher


class Flaky:
    """Fails its first ``failures`` calls, then records the events it gets."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0
        self.got: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"transient failure {self.calls}")
        self.got.append(event)


def test_an_event_reaches_every_bound_service_and_only_those() -> None:
    bus = InMemoryBus()
    a: list[Event] = []
    b: list[Event] = []
    c: list[Event] = []
    register(bus, "a", SourceDataAvailable=a.append)
    register(bus, "b", SourceDataAvailable=b.append, ModelReady=b.append)
    register(bus, "c", ModelReady=c.append)
    event = source()
    bus.publish(event)
    assert bus.run_until_idle() == 2
    assert a == [event] and b == [event] and c == []


def test_emitted_events_flow_downstream_with_causation() -> None:
    bus = InMemoryBus()
    got: list[RawDataExtracted] = []
    register(bus, "ingestion", SourceDataAvailable=raw_from)
    register(bus, "preparation", RawDataExtracted=got.append)
    cause = source()
    bus.publish(cause)
    bus.run_until_idle()
    [raw] = got
    assert raw.causation_id == cause.event_id and raw.correlation_id == cause.correlation_id
    assert [e.event_type for e in bus.published] == ["SourceDataAvailable", "RawDataExtracted"]


def test_unroutable_event_raises_and_nothing_is_published() -> None:
    bus = InMemoryBus()
    got: list[Event] = []
    register(bus, "a", SourceDataAvailable=got.append)
    ready = ModelReady(model_id="m", version="v1")
    with pytest.raises(Unroutable) as err:
        bus.publish_many([source(), ready])
    assert err.value.event_type == "ModelReady"
    bus.run_until_idle()
    assert got == [] and bus.published == []  # the batch is all or nothing


def test_retry_then_success_on_the_virtual_clock() -> None:
    bus = InMemoryBus()
    flaky = Flaky(failures=2)
    dispatcher = register(bus, "a", SourceDataAvailable=flaky)
    event = source()
    with wait_for_handler(dispatcher, "SourceDataAvailable", timeout=0, count=3) as waited:
        bus.publish(event)
        assert bus.run_until_idle() == 5  # 3 deliveries + 2 releases from the delay heap
    assert flaky.got == [event]
    assert bus.clock == 1.0 + 5.0  # the two back-offs, without sleeping
    assert [c.outcome.__class__.__name__ for c in waited.calls] == ["Retry", "Retry", "Ack"]
    assert bus.queue_depths("a") == {"ready": 0, "delayed": 0, "dead": 0}


def test_pending_retry_is_counted_as_delayed() -> None:
    bus = InMemoryBus()
    seen: list[dict[str, int]] = []
    register(bus, "a", SourceDataAvailable=Flaky(failures=1))
    # b runs right after a's failed first attempt, while a's retry waits on the clock
    register(bus, "b", SourceDataAvailable=lambda ev: seen.append(bus.queue_depths("a")))
    bus.publish(source())
    bus.run_until_idle()
    assert seen == [{"ready": 0, "delayed": 1, "dead": 0}]
    assert bus.queue_depths("a") == {"ready": 0, "delayed": 0, "dead": 0}


def test_dead_letter_after_max_attempts_then_replay_after_fix() -> None:
    bus = InMemoryBus()
    flaky = Flaky(failures=POLICY.max_attempts)
    register(bus, "a", SourceDataAvailable=flaky)
    event = source()
    bus.publish(event)
    bus.run_until_idle()
    assert flaky.calls == POLICY.max_attempts and flaky.got == []
    [letter] = bus.dead_letters("a")
    assert letter.error == "ConnectionError: transient failure 3"
    assert letter.routing_key == "SourceDataAvailable"
    assert letter.headers[ATTEMPT] == POLICY.max_attempts
    assert bus.queue_depths("a")["dead"] == 1
    # the handler is "fixed" (its failures are used up): replay delivers with fresh attempts
    assert bus.replay_dead_letters("a") == 1
    assert bus.dead_letters("a") == []
    bus.run_until_idle()
    assert flaky.got == [event]
    assert bus.replay_dead_letters("a") == 0


def test_invalid_raw_message_is_dead_lettered_at_once() -> None:
    bus = InMemoryBus()
    got: list[Event] = []
    register(bus, "a", SourceDataAvailable=got.append)
    bus.publish_raw("SourceDataAvailable", b'{"event_type": "SourceDataAvailable", "uri": "x"}')
    assert bus.run_until_idle() == 1
    [letter] = bus.dead_letters("a")
    assert letter.headers[ERROR_TYPE] == "InvalidEvent"
    assert "'dataset'" in letter.error
    assert got == []


def test_run_until_idle_stops_a_loop() -> None:
    bus = InMemoryBus()
    # every SourceDataAvailable causes another one: an endless chain
    register(bus, "echo", SourceDataAvailable=lambda ev: ev.caused(
        SourceDataAvailable, producer="echo", dataset=ev.dataset, uri=ev.uri
    ))
    bus.publish(source())
    with pytest.raises(RuntimeError, match="still busy after 50 deliveries"):
        bus.run_until_idle(max_deliveries=50)


def test_wait_for_handler_reports_a_handler_that_did_not_run() -> None:
    bus = InMemoryBus()
    dispatcher = register(bus, "a", SourceDataAvailable=lambda ev: None)
    with pytest.raises(TimeoutError, match="ran 0 of 1"), wait_for_handler(
        dispatcher, "SourceDataAvailable", timeout=0
    ):
        bus.publish(source())  # not run: nobody drives the bus
    assert "dispatch" not in vars(dispatcher)  # the wrapper is gone again


def test_wait_for_handler_sees_the_exception_and_outcome() -> None:
    bus = InMemoryBus()
    dispatcher = register(bus, "a", SourceDataAvailable=Flaky(failures=9))
    with wait_for_handler(
        dispatcher, "SourceDataAvailable", timeout=0, count=POLICY.max_attempts
    ) as waited:
        bus.publish(source())
        bus.run_until_idle()
    assert isinstance(waited.exception, ConnectionError)
    assert isinstance(waited.outcome, DeadLetter)
    assert not isinstance(waited.calls[0].outcome, Ack)


def test_a_retry_comes_back_to_the_failing_service_only() -> None:
    # As on RabbitMQ, where it travels through the service's own retry exchange, bound
    # to its own queues only: the other services bound to the event type see it once.
    bus = InMemoryBus()
    flaky, other = Flaky(failures=1), Flaky(failures=0)
    register(bus, "a", SourceDataAvailable=flaky)
    register(bus, "b", SourceDataAvailable=other)
    event = source()
    bus.publish(event)
    bus.run_until_idle()
    assert (flaky.calls, flaky.got) == (2, [event])
    assert (other.calls, other.got) == (1, [event])
