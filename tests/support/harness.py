"""Test helpers for every stage: isolated namespaces, handler waiters, consumer threads.

Tests wait for handlers, not for the clock. A typical integration test::

    ns = BusNamespace()                                   # its own queues and Redis keys
    dispatcher = ns.dispatcher("ingestion", {"SourceDataAvailable": handle})
    with running_consumer(ns.bus(), dispatcher):
        with wait_for_handler(dispatcher, "SourceDataAvailable") as waited:
            ns.bus().publish(event)
        assert waited.event == event
    ns.close()                                            # deletes queues, exchange, keys

``wait_until`` polls external state (a queue depth, a Redis key) where no handler runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse
from uuid import uuid4

import pika
import redis

from app.local import wait_until  # noqa: F401 - the tests import it from here
from common.bus.dispatch import (
    Delivery,
    Dispatcher,
    HandlerResult,
    HandlerSpec,
    Outcome,
    RetryPolicy,
)
from common.bus.idempotency import ProcessedEvents, RedisProcessedEvents
from common.bus.rabbitmq import (
    CONNECTION_ERRORS,
    Consumer,
    RabbitMQBus,
    broker_address,
    connection_parameters,
    delete_topology,
)
from common.events import Event
from common.settings import Settings

Handler = Callable[[Any], HandlerResult]
CONNECT_TIMEOUT_S = 10.0  # connecting to RabbitMQ or Redis, in the helpers below
CLEANUP_TIMEOUT_S = 60.0  # deleting one namespace's queues, exchange or keys


class ServicesUnavailable(RuntimeError):
    """RabbitMQ or Redis does not answer where the settings say they are."""


def isolated_settings(**overrides: Any) -> Settings:
    """Settings of a fresh namespace with quick retries, for one test."""
    values: dict[str, Any] = {
        "namespace": f"test-{uuid4().hex[:8]}",
        "retry_delays_s": (0.05, 0.1),
        "max_attempts": 3,
        "http_port": 0,
    }
    return Settings(**{**values, **overrides})


def policy_for(settings: Settings) -> RetryPolicy:
    """The retry policy the settings describe (the delay queues are declared from them)."""
    return RetryPolicy(max_attempts=settings.max_attempts, delays_s=settings.retry_delays_s)


# -- services --------------------------------------------------------------------------


AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
AMQP_METHOD_FRAME = 1
"""A broker answers the protocol header with Connection.Start, a method frame."""


def _amqp_first_byte(connection: socket.socket) -> int | None:
    """The first byte the broker sends back for the protocol header (None: nothing in
    the socket's timeout, or the connection closed)."""
    connection.sendall(AMQP_PROTOCOL_HEADER)
    try:
        first = connection.recv(1)
    except TimeoutError:
        return None
    return first[0] if first else None


def check_services(settings: Settings, timeout: float = 3.0) -> None:
    """Raise ``ServicesUnavailable`` with a clear message unless RabbitMQ and Redis answer."""
    amqp = urlparse(settings.amqp_url)
    address = f"{amqp.hostname}:{amqp.port or 5672}"
    try:
        with socket.create_connection((amqp.hostname, amqp.port or 5672), timeout=timeout) as s:
            first = _amqp_first_byte(s)
    except OSError as exc:
        raise ServicesUnavailable(
            f"RabbitMQ does not answer at {address} ({exc}); run `bash scripts/setup.sh services`"
        ) from None
    if first != AMQP_METHOD_FRAME:
        raise ServicesUnavailable(
            f"RabbitMQ at {address} accepts connections but does not answer the AMQP handshake "
            f"within {timeout:g} s (a wedged broker): `bash scripts/setup.sh services` restarts it"
        )
    try:
        redis.Redis.from_url(settings.redis_url, socket_timeout=timeout).ping()
    except redis.RedisError as exc:
        raise ServicesUnavailable(
            f"Redis does not answer at {settings.redis_url} ({exc}); "
            "run `bash scripts/setup.sh services`"
        ) from None


def delete_namespace(
    settings: Settings, services: Iterable[str], timeout_s: float = CLEANUP_TIMEOUT_S
) -> None:
    """Delete the namespace's queues and retry exchanges for these services, its events
    exchange and its Redis keys.

    Raises ``ServicesUnavailable`` naming the broker's URL when the broker cannot be
    reached or has not finished within ``timeout_s``: a wedged broker once hung this
    clean-up for more than 20 minutes, as pika bounds connecting but not a call.
    """
    doing = f"deleting namespace {settings.namespace} at RabbitMQ {broker_address(settings)}"
    within(timeout_s, doing, lambda: _delete_topology(settings, list(services), timeout_s))
    delete_redis_keys(settings)


def _delete_topology(settings: Settings, services: list[str], timeout_s: float) -> None:
    connect_s = min(timeout_s, CONNECT_TIMEOUT_S)
    params = connection_parameters(settings, "conveyor-test-cleanup", timeout_s=connect_s)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        for service in services:
            delete_topology(channel, settings, service)
        channel.exchange_delete(settings.exchange)
    finally:
        connection.close()


def within(timeout_s: float, doing: str, work: Callable[[], None]) -> None:
    """Run ``work`` on a daemon thread, raising ``ServicesUnavailable`` about ``doing`` if
    it cannot reach the broker or is not done within ``timeout_s`` (it is then left to the
    thread, which ends with the process)."""
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(exc)
        done.set()

    threading.Thread(target=run, name="bounded-broker-call", daemon=True).start()
    if not done.wait(timeout_s):
        raise ServicesUnavailable(f"{doing}: no answer within {timeout_s}s (is the broker wedged?)")
    if failure and isinstance(failure[0], CONNECTION_ERRORS):
        raise ServicesUnavailable(f"{doing} failed: {failure[0]!r}") from failure[0]
    if failure:
        raise failure[0]


def redis_client(settings: Settings, *, call_timeout_s: float | None = None) -> redis.Redis:
    """A Redis client on the settings' URL that fails fast when Redis does not accept the
    connection; ``call_timeout_s`` also bounds each command (leave it out for blocking
    reads)."""
    return redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=call_timeout_s
    )


def delete_redis_keys(settings: Settings) -> int:
    """Delete every Redis key of the namespace; returns how many."""
    client = redis_client(settings, call_timeout_s=CLEANUP_TIMEOUT_S)
    try:
        # a large COUNT: SCAN walks the whole keyspace, which other namespaces share
        keys = list(client.scan_iter(match=f"{settings.namespace}:*", count=10_000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        return len(keys)
    finally:
        client.close()


def close_connections(name_part: str, reason: str = "test") -> int:
    """Close, broker-side, every AMQP connection whose name contains ``name_part``.

    Like ``rabbitmqctl close_all_connections`` but only for one test's connections (named
    after its namespace), so tests running at the same time are left alone. Needs
    ``rabbitmqctl`` and the rights to run it; returns how many connections were closed.
    """
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        raise FileNotFoundError("rabbitmqctl is not on PATH")
    listing = _run([rabbitmqctl, "-q", "list_connections", "--no-table-headers",
                    "pid", "client_properties"])
    pattern = re.compile(r'\{"connection_name","([^"]*)"\}')
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if (found := pattern.search(line)) and name_part in found.group(1)
    ]
    closers = [
        subprocess.Popen([rabbitmqctl, "-q", "close_connection", pid, reason],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in pids
    ]
    for closer in closers:  # in parallel: each rabbitmqctl call costs about a second
        out, _ = closer.communicate(timeout=30)
        if closer.returncode != 0:
            raise RuntimeError(f"rabbitmqctl close_connection failed: {out}")
    return len(pids)


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")
    return done.stdout


# -- namespaces ------------------------------------------------------------------------


class BusNamespace:
    """One test's corner of the real broker and Redis; ``close`` removes all of it."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or isolated_settings()
        self.services: set[str] = set()
        self._buses: list[RabbitMQBus] = []
        self._redis: redis.Redis | None = None

    @property
    def namespace(self) -> str:
        """The prefix of every queue, exchange and Redis key of this namespace."""
        return self.settings.namespace

    def bus(self, name: str | None = None) -> RabbitMQBus:
        """The namespace's first bus (created on demand), or a new one when named."""
        if name is None and self._buses:
            return self._buses[0]
        bus = RabbitMQBus(self.settings, name=name or f"{self.namespace}-test")
        self._buses.append(bus)
        return bus

    @property
    def redis(self) -> redis.Redis:
        """A Redis client on the settings' URL."""
        if self._redis is None:
            self._redis = redis_client(self.settings)
        return self._redis

    def processed(self) -> RedisProcessedEvents:
        """The Redis record of processed events in this namespace."""
        return RedisProcessedEvents.from_settings(self.redis, self.settings)

    def declare(self, service: str, event_types: Iterable[str]) -> None:
        """Declare a service's queues (and remember them for clean-up)."""
        self.services.add(service)
        self.bus().declare(service, list(event_types))

    def dispatcher(
        self,
        service: str,
        handlers: Mapping[str, Handler],
        *,
        expected: tuple[type[BaseException], ...] = (),
        processed: ProcessedEvents | None = None,
    ) -> Dispatcher:
        """A dispatcher for plain handler functions, publishing through ``bus()``."""
        self.declare(service, handlers)
        specs = {kind: HandlerSpec(kind, fn, expected) for kind, fn in handlers.items()}
        return Dispatcher(
            service, specs, self.bus().publish_many,
            policy=policy_for(self.settings), processed=processed,
        )

    def depths(self, service: str) -> dict[str, int]:
        """Messages ready in the service's queue, its delay queues and its DLQ."""
        return self.bus().queue_depths(service)

    def close(self) -> None:
        """Close the buses and delete the namespace's queues, exchange and keys."""
        for bus in self._buses:
            bus.close()
        if self._redis is not None:
            self._redis.close()
        delete_namespace(self.settings, self.services)


# -- consumers -------------------------------------------------------------------------


@dataclass
class RunningConsumer:
    """A consumer on a thread of its own; set ``stop`` to make it finish and ack."""

    consumer: Consumer
    stop: threading.Event
    thread: threading.Thread
    error: BaseException | None = None

    def join(self, timeout: float = 15.0) -> None:
        """Stop consuming, wait for the thread, and re-raise what killed it, if anything."""
        self.stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"consumer did not stop within {timeout}s")
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def running_consumer(
    bus: RabbitMQBus, dispatcher: Dispatcher, timeout: float = 10.0
) -> Iterator[RunningConsumer]:
    """Consume on a thread, attached to the queue when the block starts, stopped at its end."""
    stop = threading.Event()
    consumer = Consumer(bus, dispatcher, stop)
    running = RunningConsumer(consumer, stop, threading.Thread())

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            running.error = exc

    running.thread = threading.Thread(target=run, name=f"consume-{dispatcher.service}")
    running.thread.start()
    try:
        if not consumer.connected.wait(timeout):
            raise TimeoutError(f"consumer of {dispatcher.service} not attached within {timeout}s")
        yield running
    finally:
        running.join()


# -- waiting for handlers ----------------------------------------------------------------


@dataclass
class HandlerCall:
    """One run of a handler: the event it got, what it returned or raised, the outcome."""

    event: Event
    result: Any = None
    exception: BaseException | None = None
    outcome: Outcome | None = None


@dataclass
class HandlerWait:
    """What ``wait_for_handler`` saw; the properties describe the last matching call."""

    calls: list[HandlerCall] = field(default_factory=list)

    @property
    def last(self) -> HandlerCall:
        """The last matching call (the one that released the wait)."""
        if not self.calls:
            raise LookupError("the handler has not run")
        return self.calls[-1]

    @property
    def event(self) -> Event:
        """The event the handler got."""
        return self.last.event

    @property
    def result(self) -> Any:
        """What the handler returned."""
        return self.last.result

    @property
    def exception(self) -> BaseException | None:
        """What the handler raised, if anything."""
        return self.last.exception

    @property
    def outcome(self) -> Outcome | None:
        """What the dispatcher decided: Ack, Retry or DeadLetter."""
        return self.last.outcome


@contextlib.contextmanager
def wait_for_handler(
    dispatcher: Dispatcher,
    event_type: str,
    timeout: float = 10.0,
    *,
    count: int = 1,
    match: Callable[[Event], bool] | None = None,
) -> Iterator[HandlerWait]:
    """Release the block's end once the handler has run ``count`` times, outcome decided.

    Like nameko's ``entrypoint_waiter``: wrap the publish in the block. Only calls whose
    event satisfies ``match`` count. "Decided" means the dispatcher returned: emitted
    events are confirmed and the processed record written; the transport's ack (or its
    move to a delay queue or DLQ) follows right after, so observe queues with
    ``wait_until``. Raises ``TimeoutError`` when the handler has not run in time.
    """
    spec = dispatcher.handlers[event_type]
    waited, done, lock = HandlerWait(), threading.Event(), threading.Lock()
    local = threading.local()  # links a handler call to the dispatch that made it

    def handler(event: Event) -> HandlerResult:
        local.call = call = HandlerCall(event)
        try:
            call.result = spec.fn(event)
        except BaseException as exc:
            call.exception = exc
            raise
        return call.result

    def dispatch(delivery: Delivery) -> Outcome:
        local.call = None
        outcome = inner_dispatch(delivery)
        call: HandlerCall | None = local.call
        if call is not None and (match is None or match(call.event)):
            call.outcome = outcome
            with lock:
                waited.calls.append(call)
                if len(waited.calls) >= count:
                    done.set()
        return outcome

    inner_dispatch = dispatcher.dispatch
    shadowed = dispatcher.__dict__.get("dispatch")  # an enclosing waiter's wrapper, if any
    dispatcher.handlers[event_type] = dataclasses.replace(spec, fn=handler)
    dispatcher.dispatch = dispatch  # type: ignore[method-assign]
    try:
        yield waited
        if not done.wait(timeout):
            raise TimeoutError(
                f"handler of {event_type} in service {dispatcher.service} ran "
                f"{len(waited.calls)} of {count} time(s) within {timeout}s"
            )
    finally:
        dispatcher.handlers[event_type] = spec
        if shadowed is None:
            del dispatcher.dispatch
        else:
            dispatcher.dispatch = shadowed  # type: ignore[method-assign]



# -- pipeline services -------------------------------------------------------------------


@dataclass
class RunningService:
    """A service run by a ``ServiceRunner`` (``runner``) on a thread, as ``conveyor run`` does."""

    runner: Any
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set, on a thread of its own."""
        self.thread = threading.Thread(
            target=self._run, args=(stop,), name=f"service-{self.runner.service.name}", daemon=True
        )
        self.thread.start()

    def _run(self, stop: threading.Event) -> None:
        try:
            self.runner.run(stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised by running_services
            self.error = exc


@contextlib.contextmanager
def running_services(
    ns: BusNamespace, names: Iterable[str], timeout: float = 30.0
) -> Iterator[dict[str, RunningService]]:
    """Run the named services of the namespace's settings, each on its own bus and thread.

    Each is built by ``build_service`` and run by a ``ServiceRunner`` with the Redis record
    of processed events, as ``conveyor run NAME`` runs it. The block starts once every
    consumer is attached to its queue and ends once every service has finished its message
    in hand and stopped; what killed one is re-raised. ``ns.close()`` deletes the queues.
    """
    stop = threading.Event()
    running = {name: _service(ns, name) for name in names}
    try:
        for service in running.values():
            service.start(stop)
        for name, service in running.items():
            if not service.runner.connected.wait(timeout):
                raise service.error or TimeoutError(f"{name} not consuming within {timeout}s")
        yield running
    finally:
        stop.set()
        _join_services(running, timeout)


def _service(ns: BusNamespace, name: str) -> RunningService:
    # Imported here: the bus helpers above must not need the stage packages.
    from app.services import build_service
    from common.runtime import ServiceRunner, redis_processed

    ns.services.add(name)
    bus = RabbitMQBus(ns.settings, name=f"{ns.namespace}-{name}")
    built = build_service(name, ns.settings)
    return RunningService(
        ServiceRunner(built, bus, ns.settings, processed=redis_processed(ns.settings))
    )


def _join_services(running: Mapping[str, RunningService], timeout: float) -> None:
    for name, service in running.items():
        if service.thread is not None:
            service.thread.join(timeout)
            if service.thread.is_alive():
                raise TimeoutError(f"service {name} did not stop within {timeout}s")
    errors = [s.error for s in running.values() if s.error is not None]
    if errors:
        raise errors[0]
