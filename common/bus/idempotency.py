"""Records of processed event ids, so a redelivered event is not handled twice.

An id is recorded only after the handler's work is stored and its events are confirmed.
A Redis that does not answer (restarting, failing over, a network blip) is retried with
exponential back-off for ``idempotency_retry_s`` before ``IdempotencyUnavailable`` is
raised: the dispatcher then parks the message in a delay queue, its attempts untouched,
so a short outage never dead-letters what is in flight.

An id is remembered for its event type's retention (``Retention``): the high-volume
record events (outcomes, served-score batches, streamed records) for an hour by default,
since a redelivery of an event already handled comes within minutes, the others for 7 days.
Each id is one expiring Redis key ending in the id's 16 bytes (~112 bytes of Redis
memory; 165 with the id as text).

Example::

    processed = RedisProcessedEvents.from_settings(redis.Redis(), settings)  # or, by hand:
    processed = RedisProcessedEvents(redis.Redis(), namespace="conveyor", ttl_s=604800,
                                     ttl_by_event={"OutcomeObserved": 3600})
    if not processed.seen("monitoring", event.event_id): ...
    processed.mark("monitoring", event.event_id, event.event_type)  # expires in 1 h
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

import redis

from common.errors import ConveyorError, Status
from common.settings import Settings

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


@dataclass(frozen=True)
class Retention:
    """How long a processed event id is remembered: its type's ``by_event`` seconds, else
    ``default_s``."""

    default_s: int
    by_event: Mapping[str, int] = field(default_factory=dict)

    def ttl_s(self, event_type: str) -> int:
        """Seconds an id of this event type is remembered."""
        return self.by_event.get(event_type, self.default_s)


class ProcessedEvents(ABC):
    """Which events a service has already handled successfully."""

    @abstractmethod
    def seen(self, service: str, event_id: UUID) -> bool:
        """Whether the service already handled this event."""

    @abstractmethod
    def mark(self, service: str, event_id: UUID, event_type: str) -> None:
        """Record that the service handled this event, for its type's retention."""


class MemoryProcessedEvents(ProcessedEvents):
    """In-process record, for the in-process bus and unit tests: kept for ever, or with a
    ``retention`` for that long by ``clock`` (seconds)."""

    def __init__(self, retention: Retention | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retention, self._clock = retention, clock
        self._until: dict[tuple[str, UUID], float] = {}

    def seen(self, service: str, event_id: UUID) -> bool:
        return self._until.get((service, event_id), float("-inf")) > self._clock()

    def mark(self, service: str, event_id: UUID, event_type: str) -> None:
        kept_s = float("inf") if self.retention is None else self.retention.ttl_s(event_type)
        self._until[(service, event_id)] = self._clock() + kept_s


def processed_key(namespace: str, service: str, event_id: UUID) -> bytes:
    """Redis key recording that ``service`` processed ``event_id``: the id as its 16
    bytes, not its 36 characters of text (112 bytes of Redis memory a key, not 165)."""
    return f"{namespace}:processed:{service}:".encode() + event_id.bytes


class RedisProcessedEvents(ProcessedEvents):
    """Record in Redis, one expiring key per (service, event id), kept ``ttl_s`` or its
    type's ``ttl_by_event``; transient Redis errors are retried with ``backoff``
    (``sleep`` is injectable for tests)."""

    def __init__(
        self, client: redis.Redis, namespace: str, ttl_s: int, *,
        ttl_by_event: Mapping[str, int] | None = None,
        backoff: Backoff | None = None, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client, self.namespace = client, namespace
        self.retention = Retention(ttl_s, dict(ttl_by_event or {}))
        self.backoff, self._sleep = backoff or Backoff(), sleep

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> RedisProcessedEvents:
        """The record the settings describe: their namespace, retentions (``processed_ttl_s``
        and ``processed_ttl_by_event``) and retry budget (``idempotency_retry_s``)."""
        return cls(client, settings.namespace, settings.processed_ttl_s,
                   ttl_by_event=settings.processed_ttl_by_event,
                   backoff=Backoff(budget_s=settings.idempotency_retry_s))

    def seen(self, service: str, event_id: UUID) -> bool:
        key = processed_key(self.namespace, service, event_id)
        return bool(self._retried("seen", lambda: self.client.exists(key)))

    def mark(self, service: str, event_id: UUID, event_type: str) -> None:
        key = processed_key(self.namespace, service, event_id)
        ttl_s = self.retention.ttl_s(event_type)
        self._retried("mark", lambda: self.client.set(key, 1, ex=ttl_s))

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
