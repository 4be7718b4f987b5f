"""Records of processed event ids, so a redelivered event is not handled twice.

An id is recorded only after the handler's work is stored and its events are confirmed.

Example::

    processed = RedisProcessedEvents(redis.Redis(), namespace="conveyor", ttl_s=604800)
    if not processed.seen("ingestion", event.event_id): ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from uuid import UUID

import redis


class ProcessedEvents(ABC):
    """Which events a service has already handled successfully."""

    @abstractmethod
    def seen(self, service: str, event_id: UUID) -> bool:
        """Whether the service already handled this event."""

    @abstractmethod
    def mark(self, service: str, event_id: UUID) -> None:
        """Record that the service handled this event."""


class MemoryProcessedEvents(ProcessedEvents):
    """In-process record, for the in-process bus and unit tests."""

    def __init__(self) -> None:
        self._done: set[tuple[str, UUID]] = set()

    def seen(self, service: str, event_id: UUID) -> bool:
        return (service, event_id) in self._done

    def mark(self, service: str, event_id: UUID) -> None:
        self._done.add((service, event_id))


def processed_key(namespace: str, service: str, event_id: UUID) -> str:
    """Redis key recording that ``service`` processed ``event_id``."""
    return f"{namespace}:processed:{service}:{event_id}"


class RedisProcessedEvents(ProcessedEvents):
    """Record in Redis, one expiring key per (service, event id)."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_s: int) -> None:
        self.client, self.namespace, self.ttl_s = client, namespace, ttl_s

    def seen(self, service: str, event_id: UUID) -> bool:
        return bool(self.client.exists(processed_key(self.namespace, service, event_id)))

    def mark(self, service: str, event_id: UUID) -> None:
        self.client.set(processed_key(self.namespace, service, event_id), 1, ex=self.ttl_s)
