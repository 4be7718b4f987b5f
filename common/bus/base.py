"""The message-bus interface every transport implements.

Example::

    bus.declare("ingestion", ["SourceDataAvailable"])
    bus.publish(SourceDataAvailable(dataset="paysim", uri="tx.csv", producer="cli"))
    bus.consume(dispatcher, stop_event)   # blocks until stop_event is set
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.bus.dispatch import ERROR_MESSAGE, ERROR_TYPE, LAST_ERROR, ROUTING_KEY, Dispatcher
from common.events import Event


@dataclass(frozen=True)
class DeadLetterMessage:
    """A dead-lettered message as an operator sees it."""

    body: bytes
    headers: dict[str, Any]

    @property
    def error(self) -> str:
        """'ErrorType: message' of the failure that dead-lettered it."""
        kind, message = self.headers.get(ERROR_TYPE), self.headers.get(ERROR_MESSAGE)
        return f"{kind}: {message}" if kind else str(self.headers.get(LAST_ERROR, "unknown"))

    @property
    def routing_key(self) -> str:
        """The routing key (event type) it was published with."""
        return str(self.headers.get(ROUTING_KEY, ""))


class MessageBus(ABC):
    """Publishes events on one topic exchange and feeds services' queues to dispatchers."""

    @abstractmethod
    def declare(self, service: str, event_types: Sequence[str]) -> None:
        """Create the service's queue, bound to the event types, with its retry and DLQ."""

    @abstractmethod
    def publish_many(self, events: Sequence[Event]) -> None:
        """Publish events and return once the broker has confirmed every one.

        Raises ``Unroutable`` when no queue is bound to an event's type.
        """

    def publish(self, event: Event) -> None:
        """Publish one event and wait for its confirmation."""
        self.publish_many([event])

    @abstractmethod
    def consume(
        self,
        dispatcher: Dispatcher,
        stop: threading.Event,
        connected: threading.Event | None = None,
    ) -> None:
        """Feed the dispatcher's service queue to it until ``stop`` is set.

        ``connected`` is set while the consumer is attached to its queue (readiness).
        """

    @abstractmethod
    def dead_letters(self, service: str, limit: int = 100) -> list[DeadLetterMessage]:
        """The first dead letters of a service, left in place."""

    @abstractmethod
    def replay_dead_letters(self, service: str) -> int:
        """Publish a service's dead letters again with fresh attempts; returns how many."""

    @abstractmethod
    def queue_depths(self, service: str) -> dict[str, int]:
        """Messages waiting in the service's queue, retry delays and DLQ."""

    def close(self) -> None:  # noqa: B027 - optional for transports without connections
        """Release connections."""
