"""A Redis outage under the idempotency check: messages wait, then are handled once.

The record of processed events talks to a real Redis through a client that can be
switched to a port where nothing listens (the outage) and back. Back-off sleeps are
recorded instead of slept, and the end of the outage happens inside one of them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import redis

from common.bus.dispatch import ATTEMPT, Dispatcher, HandlerSpec, RetryPolicy
from common.bus.idempotency import Backoff, RedisProcessedEvents, processed_key
from common.bus.memory import InMemoryBus
from common.events import Event, RawDataExtracted, SourceDataAvailable
from tests.support.harness import BusNamespace

pytestmark = pytest.mark.integration
POLICY = RetryPolicy(max_attempts=3, delays_s=(1.0, 5.0))


def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again: connections are refused


class Switchable:
    """A Redis client that is down (a refused port) until ``back()``."""

    def __init__(self, real: redis.Redis) -> None:
        self.real = real
        self.current = redis.Redis(port=dead_port(), socket_connect_timeout=1)

    def back(self) -> None:
        self.current = self.real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)


class Outage:
    """The sleep function of the back-off: records each wait, ends the outage after n."""

    def __init__(self, client: Switchable, waits_until_back: int) -> None:
        self.client, self.left = client, waits_until_back
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.left -= 1
        if self.left == 0:
            self.client.back()


def ingestion(bus: InMemoryBus, processed: RedisProcessedEvents, handled: list[Event],
              then: Callable[[], None] = lambda: None) -> None:
    def handle(event: SourceDataAvailable) -> RawDataExtracted:
        handled.append(event)
        then()
        return event.caused(RawDataExtracted, producer="ingestion", dataset=event.dataset,
                            batch_id="b1", source_uri=event.uri, rows=1, columns=["a"])

    spec = HandlerSpec("SourceDataAvailable", handle)
    bus.register(Dispatcher("ingestion", {"SourceDataAvailable": spec}, bus.publish_many,
                            policy=POLICY, processed=processed))


def setup(ns: BusNamespace, budget_s: float, waits: int) -> tuple[InMemoryBus, Outage, list[Event],
                                                                    Callable[[Event], bool]]:
    client = Switchable(ns.redis)
    outage = Outage(client, waits)
    processed = RedisProcessedEvents(client, ns.namespace, 60,  # type: ignore[arg-type]
                                     backoff=Backoff(budget_s, first_s=0.05, max_s=2.0),
                                     sleep=outage)
    bus, handled = InMemoryBus(), list[Event]()
    bus.declare("observer", ["RawDataExtracted"])  # so the handler's event is routable
    ingestion(bus, processed, handled)

    def recorded(event: Event) -> bool:
        return bool(ns.redis.exists(processed_key(ns.namespace, "ingestion", event.event_id)))

    return bus, outage, handled, recorded


def test_a_short_outage_is_waited_out_with_back_off(ns: BusNamespace) -> None:
    bus, outage, handled, recorded = setup(ns, budget_s=30.0, waits=5)
    event = SourceDataAvailable(dataset="d", uri="u.csv", producer="test")
    bus.publish(event)
    bus.run_until_idle()

    assert outage.waits == [0.05, 0.1, 0.2, 0.4, 0.8]  # exponential, not a tight loop
    assert handled == [event] and recorded(event)
    assert bus.dlq["ingestion"] == [] and bus.clock == 0  # no delay queue was needed
    assert [e.event_type for e in bus.published] == ["SourceDataAvailable", "RawDataExtracted"]


def test_an_outage_longer_than_the_budget_parks_the_message_without_spending_attempts(
    ns: BusNamespace,
) -> None:
    # A budget of 0.35 s is 3 waits per delivery; Redis returns after 30 waits, that is
    # on the 10th delivery: far more deliveries than max_attempts (3).
    bus, outage, handled, recorded = setup(ns, budget_s=0.35, waits=30)
    event = SourceDataAvailable(dataset="d", uri="u.csv", producer="test")
    bus.publish(event)
    steps = bus.run_until_idle()

    assert steps == 10 + 9 and len(outage.waits) == 30  # 10 deliveries, 9 from the delay
    assert bus.dlq["ingestion"] == []  # not dead-lettered
    assert handled == [event] and recorded(event)
    assert bus.clock == 9 * POLICY.delays_s[-1]  # each parking used the longest delay


def test_a_duplicate_after_the_outage_is_recognised(ns: BusNamespace) -> None:
    bus, outage, handled, _ = setup(ns, budget_s=30.0, waits=2)
    event = SourceDataAvailable(dataset="d", uri="u.csv", producer="test")
    bus.publish(event)
    bus.publish_raw("SourceDataAvailable", event.to_json(), {ATTEMPT: 2})
    bus.run_until_idle()
    assert handled == [event] and len(outage.waits) == 2


def test_redis_lost_after_the_work_is_done_still_acknowledges_it(ns: BusNamespace) -> None:
    client = Switchable(ns.redis)
    client.back()  # up for the check; down from inside the handler, so the mark fails
    processed = RedisProcessedEvents(client, ns.namespace, 60,  # type: ignore[arg-type]
                                     backoff=Backoff(0.35), sleep=lambda _: None)
    bus, handled = InMemoryBus(), list[Event]()
    bus.declare("observer", ["RawDataExtracted"])
    ingestion(bus, processed, handled, then=lambda: down(client))
    event = SourceDataAvailable(dataset="d", uri="u.csv", producer="test")
    bus.publish(event)
    bus.run_until_idle()
    assert handled == [event] and bus.dlq["ingestion"] == []  # acknowledged, once
    assert [e.event_type for e in bus.published] == ["SourceDataAvailable", "RawDataExtracted"]


def down(client: Switchable) -> None:
    client.current = redis.Redis(port=dead_port(), socket_connect_timeout=1)
