"""Records of processed event ids, so a redelivered event is not handled twice.

An id is recorded only after the handler's work is stored and its events are confirmed.
A Redis that does not answer (restarting, failing over, a network blip) is retried with
exponential back-off for ``idempotency_retry_s`` before ``IdempotencyUnavailable`` is
raised: the dispatcher then parks the message in a delay queue, its attempts untouched,
so a short outage never dead-letters what is in flight.

Example::

    processed = RedisProcessedEvents(redis.Redis(), namespace="conveyor", ttl_s=604800)
    if not processed.seen("ingestion", event.event_id): ...
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import redis

from common.errors import ConveyorError, Status

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,  # refused, reset, loading the dataset (BusyLoadingError)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during a failover
)
"""Redis errors that a later try can get past."""


class IdempotencyUnavailable(ConveyorError):
    """The record of processed events did not answer within its retry budget."""

    status = Status.UNAVAILABLE

    def __init__(self, call: str, waited_s: float, cause: BaseException):
        self.call, self.waited_s = call, waited_s
        super().__init__(f"idempotency store unavailable for {call} after {waited_s:.1f} s "
                         f"of retries: {type(cause).__name__}: {cause}")


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off (``first_s`` doubling up to ``max_s``) within ``budget_s``."""

    budget_s: float = 30.0
    first_s: float = 0.05
    max_s: float = 2.0

    def delays(self) -> Iterator[float]:
        """The waits between tries; they add up to at most the budget."""
        left, delay = self.budget_s, self.first_s
        while left > 0:
            yield min(delay, left)
            left -= delay
            delay = min(delay * 2, self.max_s)


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
    """Record in Redis, one expiring key per (service, event id); transient Redis errors
    are retried with ``backoff`` (``sleep`` is injectable for tests)."""

    def __init__(
        self, client: redis.Redis, namespace: str, ttl_s: int, *,
        backoff: Backoff | None = None, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client, self.namespace, self.ttl_s = client, namespace, ttl_s
        self.backoff, self._sleep = backoff or Backoff(), sleep

    def seen(self, service: str, event_id: UUID) -> bool:
        key = processed_key(self.namespace, service, event_id)
        return bool(self._retried("seen", lambda: self.client.exists(key)))

    def mark(self, service: str, event_id: UUID) -> None:
        key = processed_key(self.namespace, service, event_id)
        self._retried("mark", lambda: self.client.set(key, 1, ex=self.ttl_s))

    def _retried(self, call: str, action: Callable[[], T]) -> T:
        waited = 0.0
        delays = self.backoff.delays()
        while True:
            try:
                return action()
            except TRANSIENT_ERRORS as exc:
                delay = next(delays, None)
                if delay is None:
                    raise IdempotencyUnavailable(call, waited, exc) from exc
                log.warning("idempotency %s failed (%s); trying again in %.2f s", call, exc, delay)
                self._sleep(delay)
                waited += delay
