"""The transport-free core of consuming: one delivery in, one outcome out.

Both buses (RabbitMQ and in-process) hand every message to a ``Dispatcher`` and carry
out the ``Outcome`` it returns, so they share the same semantics:

- a message that is not a valid event, or whose handler raises an *expected* error
  (the input's fault), is dead-lettered at once with the error in its headers;
- any other handler error is retried after a back-off, then dead-lettered after
  ``max_attempts`` attempts;
- on success the events the handler returned are published (confirmed) first, then the
  event id is recorded as processed, and only then is the message acknowledged;
- an event already recorded as processed is acknowledged without running the handler;
- the record of processed events retries its own store's transient errors with back-off
  (``common.bus.idempotency``); still unavailable after that, the message waits in the
  longest delay queue with its attempt count untouched, so an outage never dead-letters;
- the attempt header comes from the exchange, where anyone may set it: it is read as an
  integer clamped to ``1..max_attempts``.
"""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from common.allocator import RELEASE_AFTER_S, release_free_memory
from common.bus.idempotency import IdempotencyUnavailable, ProcessedEvents
from common.errors import InvalidEvent, InvalidInput
from common.events import Event, parse_event
from common.logs import event_context
from common.metrics import BusMetrics, pipeline_stage

log = logging.getLogger(__name__)

HEADER_PREFIX = "x-conveyor-"
ATTEMPT = f"{HEADER_PREFIX}attempt"
LAST_ERROR = f"{HEADER_PREFIX}last-error"
ERROR_TYPE = f"{HEADER_PREFIX}error-type"
ERROR_MESSAGE = f"{HEADER_PREFIX}error-message"
ERROR_FIELD = f"{HEADER_PREFIX}error-field"
TRACEBACK = f"{HEADER_PREFIX}traceback"
FAILED_SERVICE = f"{HEADER_PREFIX}failed-service"
ROUTING_KEY = f"{HEADER_PREFIX}routing-key"
DEAD_LETTERED_AT = f"{HEADER_PREFIX}dead-lettered-at"
MAX_TRACEBACK_CHARS = 8000

HandlerResult = Event | Iterable[Event] | None


@dataclass(frozen=True)
class HandlerSpec:
    """A handler of one event type, and the errors that are the input's fault."""

    event_type: str
    fn: Callable[[Any], HandlerResult]
    expected: tuple[type[BaseException], ...] = ()


@dataclass(frozen=True)
class Delivery:
    """A message as it came off a queue."""

    body: bytes
    routing_key: str
    headers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        """The attempt this delivery is (1 for a first delivery), at least 1 whatever the
        header says; the dispatcher also caps it at its policy's ``max_attempts``."""
        return max(1, _header_int(self.headers.get(ATTEMPT, 1)))


def _header_int(value: Any) -> int:
    """An integer header, 1 when it is not one (a publisher may send anything)."""
    if isinstance(value, bool) or not isinstance(value, int | str | bytes):
        return 1
    try:
        return int(value)
    except ValueError:
        return 1


@dataclass(frozen=True)
class Ack:
    """The message is done with: acknowledge it."""

    duplicate: bool = False


@dataclass(frozen=True)
class Retry:
    """Send the message to a delay and back, with these headers."""

    delay_s: float
    headers: dict[str, Any]


@dataclass(frozen=True)
class DeadLetter:
    """Send the message to the service's dead-letter queue, with these headers."""

    headers: dict[str, Any]


Outcome = Ack | Retry | DeadLetter
Publish = Callable[[Sequence[Event]], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failing handler is tried again."""

    max_attempts: int = 5
    delays_s: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)

    def delay(self, attempt: int) -> float:
        """Back-off after the given failed attempt (1-based); the last delay repeats."""
        return self.delays_s[min(attempt, len(self.delays_s)) - 1]


def derived_event_id(cause: Event, service: str, index: int, event_type: str) -> uuid.UUID:
    """A deterministic id for the index-th event a service emits for a cause.

    A redelivered cause therefore re-publishes events with the same ids, and the
    consumers downstream recognise them as already processed.
    """
    return uuid.uuid5(cause.event_id, f"{service}/{index}/{event_type}")


class Dispatcher:
    """Turns deliveries for one service into outcomes, running its handlers."""

    def __init__(
        self,
        service: str,
        handlers: Mapping[str, HandlerSpec],
        publish: Publish,
        *,
        policy: RetryPolicy | None = None,
        processed: ProcessedEvents | None = None,
        metrics: BusMetrics | None = None,
        prefetch: int | None = None,
        release_after_s: float = RELEASE_AFTER_S,
        release: Callable[[], object] = release_free_memory,
    ) -> None:
        self.service = service
        # After a handler this long, malloc's freed memory goes back to the system
        # (common.allocator): a batch's high-water mark does not stay in the RSS.
        self.release_after_s, self._release = release_after_s, release
        # How many messages a transport may hand over ahead of time (None: the bus's own
        # setting); services with long handlers and several consumers want 1.
        self.prefetch = prefetch
        self.handlers = dict(handlers)
        self.publish = publish
        self.policy = policy or RetryPolicy()
        self.processed = processed
        self.metrics = metrics or BusMetrics()
        self.metrics.precreate(service, self.handlers)
        self._stages = {kind: pipeline_stage(service, kind) for kind in self.handlers}
        self._children: dict[tuple[int, str], Any] = {}

    @property
    def event_types(self) -> list[str]:
        """The event types this service handles (its queue bindings)."""
        return sorted(self.handlers)

    def dispatch(self, delivery: Delivery) -> Outcome:
        """Handle one delivery and say what to do with the message."""
        try:
            event = parse_event(delivery.body, hint=delivery.routing_key)
        except InvalidEvent as exc:
            return self._invalid(delivery, exc)
        with event_context(event):
            log.debug("received (attempt %d)", self._attempt(delivery))
            return self._dispatch_event(delivery, event)

    def _attempt(self, delivery: Delivery) -> int:
        # Past max_attempts means nothing more (a forged 10**9 would not retry for ever, a
        # negative one not index the delays from the end): clamped into the policy's range.
        return min(delivery.attempt, self.policy.max_attempts)

    def _dispatch_event(self, delivery: Delivery, event: Event) -> Outcome:
        spec = self.handlers.get(event.event_type)
        if spec is None:
            problem = f"service {self.service} has no handler for {event.event_type}"
            return self._invalid(delivery, InvalidEvent(problem, field="event_type"))
        try:
            duplicate = bool(self.processed and self.processed.seen(self.service, event.event_id))
        except IdempotencyUnavailable as exc:
            return self._store_unavailable(delivery, event, exc)
        if duplicate:
            log.info("duplicate delivery acknowledged; work already done")
            self._count(self.metrics.duplicates, event.event_type)
            return Ack(duplicate=True)
        return self._run(spec, delivery, event)

    def _run(self, spec: HandlerSpec, delivery: Delivery, event: Event) -> Outcome:
        started = time.perf_counter()
        try:
            emitted = self._emitted(event, spec.fn(event))
            self.publish(emitted)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an outcome
            self._count(self.metrics.failed, event.event_type)
            return self._failed(spec, delivery, event, exc)
        finally:
            elapsed = time.perf_counter() - started
            self._labelled(self.metrics.duration, event.event_type).observe(elapsed)
            if elapsed >= self.release_after_s:
                self._release()
        self._mark(event)
        self._count(self.metrics.handled, event.event_type)
        self._count_success(event.event_type, emitted, elapsed)
        log.debug("handled; emitted %d event(s)", len(emitted))
        return Ack()

    def _mark(self, event: Event) -> None:
        if self.processed is None:
            return
        try:
            self.processed.mark(self.service, event.event_id, event.event_type)
        except IdempotencyUnavailable as exc:
            # The work is stored and its events confirmed: acknowledging is right. A later
            # duplicate would run the (idempotent) handler again rather than be skipped.
            log.error("handled, but not recorded as processed: %s", exc)

    def _store_unavailable(
        self, delivery: Delivery, event: Event, exc: IdempotencyUnavailable
    ) -> Retry:
        """Park the message until the store answers; its attempts are not the handler's."""
        delay = self.policy.delays_s[-1]
        log.error("%s; the message waits %g s in a delay queue (attempt %d kept)",
                  exc, delay, self._attempt(delivery))
        self._count(self.metrics.retried, event.event_type)
        headers = {**delivery.headers, ATTEMPT: self._attempt(delivery), LAST_ERROR: _describe(exc)}
        return Retry(delay, headers)

    def _count_success(self, event_type: str, emitted: list[Event], elapsed: float) -> None:
        """Count the events published and time the stage the handler carried, if any."""
        for caused in emitted:
            self._count(self.metrics.published, caused.event_type)
        stage = self._stages.get(event_type)
        if stage is not None:
            self.metrics.stage_duration.labels(stage).observe(elapsed)

    def _emitted(self, cause: Event, result: HandlerResult) -> list[Event]:
        def derive(i: int, ev: Event) -> Event:
            return ev.model_copy(
                update={"event_id": derived_event_id(cause, self.service, i, ev.event_type)}
            )

        events = [] if result is None else [result] if isinstance(result, Event) else list(result)
        return [derive(i, ev) for i, ev in enumerate(events)]

    def _failed(
        self, spec: HandlerSpec, delivery: Delivery, event: Event, exc: Exception
    ) -> Outcome:
        expected = isinstance(exc, (InvalidInput, *spec.expected))
        attempt = self._attempt(delivery)
        if expected or attempt >= self.policy.max_attempts:
            return self._dead_letter(delivery, exc, event.event_type, expected=expected)
        delay = self.policy.delay(attempt)
        log.exception(
            "handler failed; retrying",
            extra={"fields": {"attempt": attempt, "retry_in_s": delay}},
        )
        self._count(self.metrics.retried, event.event_type)
        headers = {**delivery.headers, ATTEMPT: attempt + 1, LAST_ERROR: _describe(exc)}
        return Retry(delay, headers)

    def _invalid(self, delivery: Delivery, exc: InvalidEvent) -> Outcome:
        return self._dead_letter(delivery, exc, exc.event_type or delivery.routing_key, True)

    def _dead_letter(
        self, delivery: Delivery, exc: Exception, event_type: str, expected: bool
    ) -> DeadLetter:
        if expected:
            log.warning("dead-lettered: %s", _describe(exc))
        else:
            log.error("dead-lettered after %d attempts", self._attempt(delivery), exc_info=exc)
        self._count(self.metrics.dead_lettered, event_type)
        return DeadLetter(dead_letter_headers(delivery, exc, self.service))

    def _count(self, counter: Any, event_type: str) -> None:
        self._labelled(counter, event_type).inc()

    def _labelled(self, metric: Any, event_type: str) -> Any:
        # labels() costs microseconds per call (a lock, a tuple): keep the children
        key = (id(metric), event_type)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.service, event_type)
        return child


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def dead_letter_headers(delivery: Delivery, exc: BaseException, service: str) -> dict[str, Any]:
    """The headers that tell an operator why a message was dead-lettered."""
    trace = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:]
    headers = {
        **delivery.headers,
        ERROR_TYPE: type(exc).__name__,
        ERROR_MESSAGE: str(exc),
        TRACEBACK: trace,
        FAILED_SERVICE: service,
        ROUTING_KEY: delivery.routing_key,
        DEAD_LETTERED_AT: datetime.now(UTC).isoformat(),
        LAST_ERROR: _describe(exc),
    }
    if isinstance(exc, InvalidEvent) and exc.field:
        headers[ERROR_FIELD] = exc.field
    return headers
