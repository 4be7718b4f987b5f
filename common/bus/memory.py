"""An in-process bus with the RabbitMQ bus's semantics, for unit tests and library use.

Events are serialised to the same JSON as on the wire, routed by event type, handed to
the same ``Dispatcher``; retries wait on a virtual clock, so tests never sleep.

Example::

    bus = InMemoryBus()
    bus.register(dispatcher)          # declares the queue and its bindings
    bus.publish(event)
    bus.run_until_idle()              # handles everything, retries included
    bus.dead_letters("ingestion")
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import defaultdict, deque
from collections.abc import Sequence

from common.bus.base import DeadLetterMessage, MessageBus
from common.bus.dispatch import ATTEMPT, Ack, DeadLetter, Delivery, Dispatcher, Retry
from common.errors import Unroutable
from common.events import Event

EXCHANGE = "in-memory"


class InMemoryBus(MessageBus):
    """Queues, bindings, delays and dead letters held in memory."""

    def __init__(self) -> None:
        self.bindings: dict[str, set[str]] = defaultdict(set)
        self.queues: dict[str, deque[Delivery]] = defaultdict(deque)
        self.dlq: dict[str, list[DeadLetterMessage]] = defaultdict(list)
        self.dispatchers: dict[str, Dispatcher] = {}
        self.clock = 0.0
        self._delayed: list[tuple[float, int, str, Delivery]] = []
        self._seq = itertools.count()
        self.published: list[Event] = []

    def declare(self, service: str, event_types: Sequence[str]) -> None:
        for event_type in event_types:
            self.bindings[event_type].add(service)
        self.queues.setdefault(service, deque())

    def register(self, dispatcher: Dispatcher) -> None:
        """Declare the dispatcher's queue and let ``run_until_idle`` feed it."""
        self.declare(dispatcher.service, dispatcher.event_types)
        self.dispatchers[dispatcher.service] = dispatcher

    def publish_many(self, events: Sequence[Event]) -> None:
        for event in events:
            if not self.bindings.get(event.event_type):
                raise Unroutable(event.event_type, EXCHANGE)
        for event in events:
            self.publish_raw(event.event_type, event.to_json())
            self.published.append(event)

    def publish_raw(self, routing_key: str, body: bytes, headers: dict | None = None) -> None:
        """Route raw bytes as a producer in another language would (no validation)."""
        for service in self.bindings.get(routing_key, ()):
            self.queues[service].append(Delivery(body, routing_key, dict(headers or {})))

    def run_until_idle(self, max_deliveries: int = 100_000) -> int:
        """Deliver until every queue is empty and no retry is pending; returns deliveries."""
        for count in range(max_deliveries):
            if not self._step():
                return count
        raise RuntimeError(f"bus still busy after {max_deliveries} deliveries (a loop?)")

    def _step(self) -> bool:
        for service, queue in self.queues.items():
            if queue and service in self.dispatchers:
                self._deliver(service, queue.popleft())
                return True
        return self._release_next_delayed()

    def _deliver(self, service: str, delivery: Delivery) -> None:
        outcome = self.dispatchers[service].dispatch(delivery)
        if isinstance(outcome, Retry):
            due = self.clock + outcome.delay_s
            retry = Delivery(delivery.body, delivery.routing_key, outcome.headers)
            heapq.heappush(self._delayed, (due, next(self._seq), service, retry))
        elif isinstance(outcome, DeadLetter):
            self.dlq[service].append(DeadLetterMessage(delivery.body, outcome.headers))
        else:
            assert isinstance(outcome, Ack)

    def _release_next_delayed(self) -> bool:
        if not self._delayed:
            return False
        due, _, service, delivery = heapq.heappop(self._delayed)
        self.clock = max(self.clock, due)
        self.queues[service].append(delivery)
        return True

    def consume(
        self,
        dispatcher: Dispatcher,
        stop: threading.Event,
        connected: threading.Event | None = None,
    ) -> None:
        self.register(dispatcher)
        if connected is not None:
            connected.set()
        while not stop.is_set():
            if not self._step():
                stop.wait(0.01)

    def dead_letters(self, service: str, limit: int = 100) -> list[DeadLetterMessage]:
        return self.dlq[service][:limit]

    def replay_dead_letters(self, service: str) -> int:
        letters, self.dlq[service] = self.dlq[service], []
        for letter in letters:
            headers = {k: v for k, v in letter.headers.items() if k != ATTEMPT}
            self.queues[service].append(Delivery(letter.body, letter.routing_key, headers))
        return len(letters)

    def queue_depths(self, service: str) -> dict[str, int]:
        delayed = sum(1 for *_, name, _ in self._delayed if name == service)
        ready, dead = len(self.queues[service]), len(self.dlq[service])
        return {"ready": ready, "delayed": delayed, "dead": dead}
