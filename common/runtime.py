"""The service runtime: services declare handlers; the runner wires them to a bus.

A service is a class with a ``name`` and one ``@handles`` method per event type; its
stores and settings come in through its constructor. A handler returns the events it
causes (or ``None``); the runtime publishes them with confirms before acknowledging.

Example::

    class IngestionService(Service):
        name = "ingestion"

        def __init__(self, raw_store: RawBatchStore) -> None:
            self.raw_store = raw_store

        @handles(SourceDataAvailable, expected=(FileNotFoundError,))
        def on_source_data_available(self, event: SourceDataAvailable) -> RawDataExtracted:
            ...

    ServiceRunner(IngestionService(store), RabbitMQBus(settings), settings).run(stop)
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import redis
from prometheus_client import CollectorRegistry

from common.bus.base import MessageBus
from common.bus.dispatch import Dispatcher, HandlerSpec, RetryPolicy
from common.bus.idempotency import ProcessedEvents, RedisProcessedEvents
from common.events import Event
from common.health import HealthServer
from common.metrics import BusMetrics, QueueDepthCollector
from common.settings import Settings

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
_HANDLES = "__conveyor_handles__"


def handles(
    event_cls: type[Event], *, expected: tuple[type[BaseException], ...] = ()
) -> Callable[[F], F]:
    """Mark a service method as the handler of one event type.

    ``expected`` lists errors that are the input's fault: they are dead-lettered at
    once, logged as warnings, never retried.
    """

    def mark(fn: F) -> F:
        setattr(fn, _HANDLES, (event_cls.model_fields["event_type"].default, expected))
        return fn

    return mark


class Service:
    """Base of every service: a name, decorated handlers and a readiness check."""

    name: ClassVar[str]
    concurrency: ClassVar[int] = 1
    """Consumers run side by side: several events (different datasets) in parallel."""
    prefetch: ClassVar[int | None] = None
    """Messages each consumer may hold ahead (None: the settings'); 1 for long handlers."""
    broadcast: ClassVar[frozenset[str]] = frozenset()
    """Event types every instance must hear (scoring's ModelReady, ModelDegraded), not one
    of several competing consumers: on RabbitMQ each instance reads them from a queue of
    its own (exclusive, auto-delete), and ``reconcile`` runs each time it is attached."""
    exports_bus_metrics: ClassVar[bool] = True
    """Whether /metrics shows the runner's own bus metrics; a supervisor of worker
    processes (which consume) shows the workers' instead, so each name appears once."""
    needs_processed_record: ClassVar[bool] = True
    """Whether the runner records each handled event id (``processed_ttl_s``) to skip a
    redelivery; a service whose handlers are idempotent on their own saves the keys."""
    ready_needs_broker: ClassVar[bool] = True
    """Whether readiness includes a live consumer connection; a service that does its work
    without the broker (scoring answers calls) stays ready through a broker outage."""

    def handler_specs(self) -> dict[str, HandlerSpec]:
        """The service's handlers by event type."""
        specs: dict[str, HandlerSpec] = {}
        for _, method in inspect.getmembers(self, inspect.ismethod):
            marked = getattr(method, _HANDLES, None)
            if marked:
                specs[marked[0]] = HandlerSpec(marked[0], method, marked[1])
        return specs

    def ready(self) -> bool:
        """Whether the service can do its work (models loaded, stores reachable...)."""
        return True

    def reconcile(self) -> None:  # noqa: B027 - only services with broadcast events need it
        """Catch up with the source of truth: called each time the instance's broadcast
        queue is attached (at start and after every reconnect), so an event sent while it
        was away is not missed."""

    def close(self) -> None:  # noqa: B027 - services without resources need no cleanup
        """Release the service's own resources at shutdown."""

    def register_metrics(self, registry: CollectorRegistry) -> None:  # noqa: B027
        """Add the service's own metrics to the registry its ``/metrics`` serves."""


def policy_from(settings: Settings) -> RetryPolicy:
    """The retry policy the settings describe."""
    return RetryPolicy(max_attempts=settings.max_attempts, delays_s=settings.retry_delays_s)


class ServiceRunner:
    """Runs one service: HTTP probes and metrics, then consuming until stopped."""

    def __init__(
        self,
        service: Service,
        bus: MessageBus,
        settings: Settings,
        *,
        processed: ProcessedEvents | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.service, self.bus, self.settings = service, bus, settings
        self.registry = registry or CollectorRegistry()
        """What /metrics serves: the bus metrics, unless the service exports its workers'."""
        bus_registry = self.registry if service.exports_bus_metrics else CollectorRegistry()
        self.metrics = BusMetrics(bus_registry)
        self.metrics.registry.register(QueueDepthCollector(service.name, bus.queue_depths))
        service.register_metrics(self.registry)
        self.processed = processed
        self.connected = threading.Event()
        self.http: HealthServer | None = None

    def dispatcher(self) -> Dispatcher:
        """The dispatcher that runs this service's shared-queue handlers (every handler
        on a bus without per-instance queues)."""
        specs = self.service.handler_specs()
        if self._per_instance_queues:
            specs = {kind: spec for kind, spec in specs.items()
                     if kind not in self.service.broadcast}
        return self._dispatcher(
            specs, self.processed if self.service.needs_processed_record else None)

    def broadcast_dispatcher(self) -> Dispatcher:
        """The dispatcher of the instance's own queue: its broadcast handlers, with no
        record of processed events (that record is shared by every instance, and each of
        them must handle the event)."""
        specs = self.service.handler_specs()
        return self._dispatcher(
            {kind: spec for kind, spec in specs.items() if kind in self.service.broadcast}, None)

    def _dispatcher(self, specs: dict[str, HandlerSpec],
                    processed: ProcessedEvents | None) -> Dispatcher:
        return Dispatcher(self.service.name, specs, self.bus.publish_many,
                          policy=policy_from(self.settings), processed=processed,
                          metrics=self.metrics, prefetch=self.service.prefetch)

    @property
    def _per_instance_queues(self) -> bool:
        return bool(self.service.broadcast) and hasattr(self.bus, "consume_broadcast")

    def _consume(self, stop: threading.Event) -> None:
        """Run the service's consumers (each with its own connection) until ``stop``; a
        service without handlers (a supervisor of worker processes) only waits."""
        dispatcher = self.dispatcher()
        extra = [
            threading.Thread(target=self.bus.consume, args=(dispatcher, stop, self.connected),
                             name=f"consumer-{i}", daemon=True)
            for i in range(1, self.service.concurrency)
        ]
        if self._per_instance_queues:
            extra.append(threading.Thread(
                target=self.bus.consume_broadcast,  # type: ignore[attr-defined]
                args=(self.broadcast_dispatcher(), stop, self.service.reconcile),
                name="broadcast-consumer", daemon=True))
        for thread in extra:
            thread.start()
        if dispatcher.handlers:
            self.bus.consume(dispatcher, stop, self.connected)
        else:
            # Waking now and then: a signal that lands on another thread only runs its
            # handler when the main thread next runs Python (a bare wait never returns).
            while not stop.wait(0.5):
                pass
        for thread in extra:
            thread.join()

    def ready(self) -> bool:
        """Ready means the service itself ready and, unless it works without the broker,
        consuming."""
        attached = self.connected.is_set() or not self.service.ready_needs_broker
        return attached and self.service.ready()

    def run(self, stop: threading.Event) -> None:
        """Serve probes and consume until ``stop`` is set; the message in hand finishes."""
        self.http = HealthServer(
            self.registry, self.ready, self.settings.http_host, self.settings.http_port
        ).start()
        log.info("service %s started; http on port %d", self.service.name, self.http.port)
        try:
            self._consume(stop)
        finally:
            self.http.stop()
            self.service.close()
            self.bus.close()
            log.info("service %s stopped", self.service.name)


def redis_processed(settings: Settings) -> RedisProcessedEvents:
    """The Redis record of processed events for the settings' namespace."""
    return RedisProcessedEvents.from_settings(redis.Redis.from_url(settings.redis_url), settings)


def stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (call from the main thread)."""

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("received %s; finishing the message in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
