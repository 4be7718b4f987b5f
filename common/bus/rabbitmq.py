"""The RabbitMQ message bus (pika): topology, confirmed publishing, resilient consuming.

Topology per namespace: one durable topic exchange ``<ns>.events``; per service a durable
quorum queue ``<ns>.<service>`` bound to its event types, a dead-letter queue
``<ns>.<service>.dlq`` and one delay queue per back-off step ``<ns>.<service>.retry.<ms>ms``
whose expired messages dead-letter back to the service queue (at-least-once).

Retries, dead letters and replays travel through the service's own direct exchange
``<ns>.retry.<service>``, to which only its own queues are bound (each under its name),
never through the default exchange: a service's broker user needs no write permission on
``amq.default``, which would let it put messages into any queue of the vhost.

Example::

    bus = RabbitMQBus(Settings())
    bus.declare("ingestion", ["SourceDataAvailable"])
    bus.publish(event)
    bus.consume(dispatcher, stop)   # until stop is set (SIGTERM in a service)
    bus.queue_depths("ingestion")   # {"ready": 0, "dead": 0, "retry_1000ms": 0, ...}
    bus.close()
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlparse

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPChannelError, AMQPConnectionError, ChannelClosedByBroker

from common.bus.base import DeadLetterMessage, MessageBus
from common.bus.dispatch import (
    ATTEMPT,
    ROUTING_KEY,
    Ack,
    DeadLetter,
    Delivery,
    Dispatcher,
    Outcome,
    Retry,
)
from common.bus.publisher import AsyncPublisher, Message
from common.events import Event
from common.settings import Settings

log = logging.getLogger(__name__)

PERSISTENT = pika.DeliveryMode.Persistent
DELIVERY_LIMIT = 20  # a message that crashes its consumer this often goes to the DLQ
MAX_ACK_DELAY_S = 0.05  # a batched ack waits about this long at most (+ one 0.2 s loop turn)
CONNECTION_ERRORS = (AMQPConnectionError, AMQPChannelError, ConnectionError, OSError)
DEPTH_TIMEOUT_S = 5.0  # a queue-depth query (a metrics scrape) waits this long at most


def connection_parameters(
    settings: Settings, name: str = "conveyor", *, timeout_s: float | None = None
) -> pika.URLParameters:
    """pika parameters from the settings, with heartbeats on.

    ``timeout_s`` bounds the TCP connect (``socket_timeout``), the whole AMQP handshake
    (``stack_timeout``) and how long the broker may keep the connection blocked
    (``blocked_connection_timeout``), so a wedged broker fails the caller instead of
    hanging it; without it pika's defaults apply and a blocked connection waits 60 s.
    """
    params = pika.URLParameters(settings.amqp_url)
    params.heartbeat = settings.heartbeat_s
    params.blocked_connection_timeout = 60
    params.client_properties = {"connection_name": name}
    if timeout_s is not None:
        params.socket_timeout = params.stack_timeout = timeout_s
        params.blocked_connection_timeout = timeout_s
    return params


def broker_address(settings: Settings) -> str:
    """The broker's URL for error messages, its credentials left out."""
    url = urlparse(settings.amqp_url)
    return f"{url.scheme}://{url.hostname}:{url.port or 5672}{url.path or '/'}"


def delay_queue(settings: Settings, service: str, delay_s: float) -> str:
    """Name of the service's delay queue for one back-off step."""
    return f"{settings.queue(service)}.retry.{round(delay_s * 1000)}ms"


def retry_exchange(settings: Settings, service: str) -> str:
    """Name of the service's own direct exchange for retries, dead letters and replays."""
    return f"{settings.namespace}.retry.{service}"


def _at_least_once_dead_lettering(exchange: str, target_queue: str) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": exchange,
        "x-dead-letter-routing-key": target_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def declare_dead_letter_path(channel: BlockingChannel, settings: Settings, service: str) -> str:
    """Declare the service's retry exchange and its DLQ bound to it; the exchange's name."""
    exchange, dlq = retry_exchange(settings, service), settings.dead_letter_queue(service)
    channel.exchange_declare(exchange, exchange_type="direct", durable=True)
    channel.queue_declare(dlq, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(dlq, exchange, routing_key=dlq)
    return exchange


def declare_topology(
    channel: BlockingChannel, settings: Settings, service: str, event_types: Sequence[str]
) -> None:
    """Declare the exchange and the service's queue, bindings, delay queues and DLQ.

    Every queue of the service is bound to its retry exchange under its own name, and the
    queues dead-letter through that exchange (declaring a queue with a dead-letter
    exchange needs write permission on it): nothing goes through the default exchange.
    """
    main, dlq = settings.queue(service), settings.dead_letter_queue(service)
    channel.exchange_declare(settings.exchange, exchange_type="topic", durable=True)
    exchange = declare_dead_letter_path(channel, settings, service)
    main_args = {**_at_least_once_dead_lettering(exchange, dlq), "x-delivery-limit": DELIVERY_LIMIT}
    channel.queue_declare(main, durable=True, arguments=main_args)
    channel.queue_bind(main, exchange, routing_key=main)
    for event_type in event_types:
        channel.queue_bind(main, settings.exchange, routing_key=event_type)
    for delay_s in sorted(set(settings.retry_delays_s)):
        name = delay_queue(settings, service, delay_s)
        args = {**_at_least_once_dead_lettering(exchange, main),
                "x-message-ttl": round(delay_s * 1000)}
        channel.queue_declare(name, durable=True, arguments=args)
        channel.queue_bind(name, exchange, routing_key=name)


def delete_topology(channel: BlockingChannel, settings: Settings, service: str) -> None:
    """Delete what ``declare_topology`` declares for a service (not the shared exchange)."""
    delays = [delay_queue(settings, service, d) for d in sorted(set(settings.retry_delays_s))]
    for name in (settings.queue(service), settings.dead_letter_queue(service), *delays):
        channel.queue_delete(name)  # idempotent on RabbitMQ 3.x
    channel.exchange_delete(retry_exchange(settings, service))


def properties(headers: dict[str, Any] | None = None, event: Event | None = None) -> Any:
    """Persistent JSON message properties, carrying the event's ids where there is one."""
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        headers=headers or {},
        message_id=str(event.event_id) if event else None,
        correlation_id=str(event.correlation_id) if event else None,
        type=event.event_type if event else None,
    )


class RabbitMQBus(MessageBus):
    """The production bus: RabbitMQ through pika."""

    def __init__(
        self, settings: Settings, *, name: str = "conveyor",
        depth_timeout_s: float = DEPTH_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.name = name
        self.depth_timeout_s = depth_timeout_s
        self._publisher: AsyncPublisher | None = None
        self._publisher_lock = threading.Lock()
        self._depth_probe: DepthProbe | None = None
        self._depth_probe_lock = threading.Lock()

    @property
    def publisher(self) -> AsyncPublisher:
        """The shared confirming publisher, connected on first use."""
        with self._publisher_lock:
            if self._publisher is None:
                params = connection_parameters(self.settings, f"{self.name}-publisher")
                self._publisher = AsyncPublisher(
                    params, max_reconnect_delay_s=self.settings.reconnect_max_delay_s
                )
            return self._publisher

    @property
    def depth_probe(self) -> DepthProbe:
        """The long-lived connection that answers ``queue_depths``, started on first use."""
        with self._depth_probe_lock:
            if self._depth_probe is None:
                probe = DepthProbe(self.settings, f"{self.name}-depths", self.depth_timeout_s)
                weakref.finalize(self, probe.stop)  # a bus dropped unclosed frees it too
                self._depth_probe = probe
            return self._depth_probe

    @contextlib.contextmanager
    def connection(self) -> Iterator[pika.BlockingConnection]:
        """A short-lived blocking connection for declarations and inspection."""
        connection = pika.BlockingConnection(connection_parameters(self.settings, self.name))
        try:
            yield connection
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    @contextlib.contextmanager
    def channel(self) -> Iterator[BlockingChannel]:
        """A short-lived blocking channel for declarations and inspection."""
        with self.connection() as connection:
            yield connection.channel()

    def declare(self, service: str, event_types: Sequence[str]) -> None:
        with self.channel() as channel:
            declare_topology(channel, self.settings, service, event_types)

    def publish_many(self, events: Sequence[Event]) -> None:
        if not events:
            return
        exchange = self.settings.exchange
        messages = [
            Message(exchange, ev.event_type, ev.to_json(), properties(event=ev)) for ev in events
        ]
        self.publisher.publish(messages)

    def send_to_queue(
        self, service: str, queue_name: str, body: bytes, headers: dict[str, Any]
    ) -> None:
        """Publish raw bytes to one of the service's own queues (a retry delay, its DLQ, a
        replay) through its retry exchange, confirmed; ``Unroutable`` for any other queue."""
        props = properties(headers)
        props.message_id = headers.get("message-id")
        exchange = retry_exchange(self.settings, service)
        self.publisher.publish([Message(exchange, queue_name, body, props)])

    def publish_raw(self, routing_key: str, body: bytes) -> None:
        """Publish bytes on the exchange unvalidated, as a foreign producer would."""
        message = Message(self.settings.exchange, routing_key, body, properties())
        self.publisher.publish([message])

    def consume(
        self,
        dispatcher: Dispatcher,
        stop: threading.Event,
        connected: threading.Event | None = None,
    ) -> None:
        Consumer(self, dispatcher, stop, connected).run()

    def consume_broadcast(
        self, dispatcher: Dispatcher, stop: threading.Event,
        on_attached: Callable[[], None] | None = None,
    ) -> None:
        """Feed the dispatcher's event types to it from a queue of this instance's own
        (exclusive, auto-delete, server-named) until ``stop``: every instance hears every
        one, instead of one of several competing consumers. ``on_attached`` runs (on a
        thread of its own) each time the queue is bound, at start and after a reconnect,
        so the instance can catch up with what it missed while it had no queue."""
        BroadcastConsumer(self, dispatcher, stop, on_attached).run()

    def dead_letters(self, service: str, limit: int = 100) -> list[DeadLetterMessage]:
        dlq = self.settings.dead_letter_queue(service)
        letters: list[DeadLetterMessage] = []
        with self.channel() as channel:
            for _ in range(limit):
                method, props, body = channel.basic_get(dlq)
                if method is None:
                    break
                letters.append(DeadLetterMessage(body, dict(props.headers or {})))
            if letters:
                _put_back(channel, dlq)
        return letters

    def replay_dead_letters(self, service: str) -> int:
        dlq, main = self.settings.dead_letter_queue(service), self.settings.queue(service)
        with self.channel() as channel:
            waiting = channel.queue_declare(dlq, passive=True).method.message_count
            for count in range(waiting):
                method, props, body = channel.basic_get(dlq)
                if method is None:
                    return count
                headers = {k: v for k, v in (props.headers or {}).items() if k != ATTEMPT}
                self.send_to_queue(service, main, body, headers)
                channel.basic_ack(method.delivery_tag)
        return waiting

    def queue_depths(self, service: str) -> dict[str, int]:
        """Depths of the service's queues (-1 for one not declared yet), over one connection
        kept for them; raises ``TimeoutError`` when the broker does not answer in time."""
        names = {
            "ready": self.settings.queue(service),
            "dead": self.settings.dead_letter_queue(service),
        }
        for delay_s in sorted(set(self.settings.retry_delays_s)):
            names[f"retry_{round(delay_s * 1000)}ms"] = delay_queue(self.settings, service, delay_s)
        return self.depth_probe.depths(names)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        with self._depth_probe_lock:
            probe, self._depth_probe = self._depth_probe, None
        if probe is not None:
            probe.close()


def _ack_up_to(channel: BlockingChannel, tag: int) -> None:
    """Acknowledge every outstanding delivery up to ``tag`` on the channel."""
    channel.basic_ack(tag, multiple=True)
    log.debug("acked deliveries up to %d", tag)


_STOP = object()  # tells a DepthProbe's thread to close its connection and end


class DepthProbe:
    """Queue depths (passive declares) over one long-lived connection, for every scrape.

    A connection per scrape cost the broker a connection (and a file descriptor) every
    few seconds per service. pika connections are not thread-safe and scrapes arrive on
    the metrics server's threads, so one daemon thread owns the connection: it answers
    requests in turn, keeps heartbeats going between them and, when the connection has
    died, reconnects once. The caller waits ``timeout_s`` at most and connecting is bounded
    by the same timeout, so a wedged broker fails a query, never hangs a scrape; a thread
    stuck on a connection that went silent is freed by pika's heartbeat check.

    Example::

        probe = DepthProbe(settings, "ingestion-depths")
        probe.depths({"ready": "conveyor.ingestion"})   # {"ready": 0}
        probe.close()
    """

    def __init__(self, settings: Settings, name: str, timeout_s: float = DEPTH_TIMEOUT_S) -> None:
        self.settings, self.name, self.timeout_s = settings, name, timeout_s
        self.connections_opened = 0
        self._requests: queue.Queue[Any] = queue.Queue()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        # wake often enough to send heartbeats (every heartbeat_s / 2) between requests
        self._idle_s = settings.heartbeat_s / 4 if settings.heartbeat_s > 0 else 60.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def depths(self, queues: Mapping[str, str]) -> dict[str, int]:
        """Messages in each queue by key, -1 where the queue does not exist."""
        future: Future[dict[str, int]] = Future()
        self._requests.put((dict(queues), future))
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            future.cancel()  # still queued: the thread skips it
            raise TimeoutError(
                f"RabbitMQ at {broker_address(self.settings)} did not report queue depths "
                f"within {self.timeout_s}s"
            ) from None

    @property
    def running(self) -> bool:
        """Whether the thread (and so possibly its connection) is still alive."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ask the thread to close the connection and end; returns at once."""
        self._requests.put(_STOP)

    def close(self) -> None:
        """Stop, waiting up to ``timeout_s`` for the connection to close."""
        self.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(self.timeout_s)

    def _run(self) -> None:
        try:
            while (request := self._next()) is not _STOP:
                if request is None:
                    self._keep_alive()
                elif request[1].set_running_or_notify_cancel():
                    self._answer(*request)
        finally:
            self._disconnect()

    def _next(self) -> Any:
        try:
            return self._requests.get(timeout=self._idle_s)
        except queue.Empty:
            return None

    def _answer(self, queues: dict[str, str], future: Future[dict[str, int]]) -> None:
        try:
            future.set_result(self._query(queues))
        except Exception as exc:  # noqa: BLE001 - raised to the caller by future.result
            future.set_exception(exc)

    def _query(self, queues: dict[str, str]) -> dict[str, int]:
        connected = self._connection is not None and self._connection.is_open
        try:
            return {key: self._depth(name) for key, name in queues.items()}
        except CONNECTION_ERRORS as exc:
            self._disconnect()
            if not connected:
                raise  # a fresh connection failed: the broker is down, not our connection
            log.info("queue-depth connection %s lost (%s); reconnecting once", self.name, exc)
            return {key: self._depth(name) for key, name in queues.items()}

    def _depth(self, name: str) -> int:
        channel = self._open_channel()
        try:
            return channel.queue_declare(name, passive=True).method.message_count
        except ChannelClosedByBroker:
            self._channel = None  # a failed passive declare closes its channel
            return -1  # the queue does not exist (yet)

    def _open_channel(self) -> BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            self._channel = self._open_connection().channel()
        return self._channel

    def _open_connection(self) -> pika.BlockingConnection:
        if self._connection is None or not self._connection.is_open:
            params = connection_parameters(self.settings, self.name, timeout_s=self.timeout_s)
            self._connection = pika.BlockingConnection(params)
            self.connections_opened += 1
        return self._connection

    def _keep_alive(self) -> None:
        if self._connection is None:
            return
        try:
            self._connection.process_data_events(time_limit=0)  # sends heartbeats when due
        except Exception:  # noqa: BLE001 - the next request reconnects; the thread must live
            self._disconnect()

    def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()


class Consumer:
    """Consumes one service queue with manual acks, reconnecting with back-off.

    The pika connection lives on the calling thread, which keeps heartbeats going while a
    worker thread runs the handlers; acks travel back with ``add_callback_threadsafe``.
    """

    def __init__(
        self,
        bus: RabbitMQBus,
        dispatcher: Dispatcher,
        stop: threading.Event,
        connected: threading.Event | None = None,
    ) -> None:
        self.bus, self.dispatcher, self.stop = bus, dispatcher, stop
        self.settings = bus.settings
        self.connected = connected if connected is not None else threading.Event()
        self.prefetch = dispatcher.prefetch or self.settings.prefetch

    def run(self) -> None:
        """Consume until ``stop`` is set, surviving broker restarts and dropped connections."""
        delay = 0.2
        while not self.stop.is_set():
            try:
                self._consume_until_stopped()
                delay = 0.2
            except CONNECTION_ERRORS as exc:
                self.connected.clear()
                log.warning("consumer connection lost (%s); reconnecting in %.1fs", exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max_delay_s)

    connection_suffix = "consumer"
    """Ends the name the connection shows in the broker's management views."""

    def _consume_until_stopped(self) -> None:
        name = f"{self.dispatcher.service}-{self.connection_suffix}"
        connection = pika.BlockingConnection(connection_parameters(self.settings, name))
        worker = self._worker(connection)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.prefetch)
            queue_name = self._declare(channel)
            channel.basic_consume(queue_name, worker.receive)
            self.connected.set()
            log.info("consuming %s from %s", ", ".join(self.dispatcher.event_types), queue_name)
            self._attached()
            while not self.stop.is_set():
                connection.process_data_events(time_limit=0.2)
                worker.flush_overdue()
            worker.finish(channel, connection)
        finally:
            self.connected.clear()
            worker.halt()
            with contextlib.suppress(Exception):
                connection.close()

    def _worker(self, connection: pika.BlockingConnection) -> _Worker:
        return _Worker(self, connection)

    def _declare(self, channel: BlockingChannel) -> str:
        """Declare what this consumer reads from; the name of its queue."""
        declare_topology(channel, self.settings, self.dispatcher.service,
                         self.dispatcher.event_types)
        return self.settings.queue(self.dispatcher.service)

    def _attached(self) -> None:
        """Called each time the consumer is attached to its queue (a new connection)."""


class _Worker:
    """Runs the dispatcher on messages in delivery order; acks travel back in batches."""

    def __init__(self, consumer: Consumer, connection: pika.BlockingConnection) -> None:
        self.consumer, self.connection = consumer, connection
        self._inbox: deque[tuple[BlockingChannel, Any, Any, bytes]] = deque()
        self._settled: list[tuple[BlockingChannel, int, bool]] = []
        self._settled_since = 0.0  # when the oldest unsent settlement was made
        self._ack_batch = max(1, consumer.prefetch // 4)
        self._cv = threading.Condition()
        self._in_hand = self._halted = self._flush_requested = False
        self._thread = threading.Thread(target=self._loop, name="handler", daemon=True)
        self._thread.start()

    def receive(self, channel: BlockingChannel, method: Any, props: Any, body: bytes) -> None:
        with self._cv:
            self._inbox.append((channel, method, props, body))
            self._cv.notify()

    def _loop(self) -> None:
        while (item := self._take()) is not None:
            acked = self._handle(*item)
            self._settle(item[0], item[1].delivery_tag, acked)

    def _take(self) -> tuple[BlockingChannel, Any, Any, bytes] | None:
        with self._cv:
            self._in_hand = False
            self._cv.notify_all()
            while not self._inbox and not self._halted:
                self._cv.wait()
            if self._halted or self.consumer.stop.is_set():
                return None  # stopping: prefetched messages stay unacked and are requeued
            self._in_hand = True
            return self._inbox.popleft()

    def _handle(self, _channel: BlockingChannel, method: Any, props: Any, body: bytes) -> bool:
        headers = dict(props.headers or {})
        delivery = Delivery(body, str(headers.get(ROUTING_KEY, method.routing_key)), headers)
        try:
            self._carry_out(self.consumer.dispatcher.dispatch(delivery), delivery)
        except Exception:  # noqa: BLE001 - requeued; the queue's delivery limit bounds loops
            log.exception("message could not be settled; the broker will deliver it again")
            return False
        return True

    def _carry_out(self, outcome: Outcome, delivery: Delivery) -> None:
        settings, service = self.consumer.settings, self.consumer.dispatcher.service
        if isinstance(outcome, Retry):
            headers = {ROUTING_KEY: delivery.routing_key, **outcome.headers}
            target = delay_queue(settings, service, outcome.delay_s)
            self.consumer.bus.send_to_queue(service, target, delivery.body, headers)
        elif isinstance(outcome, DeadLetter):
            dlq = settings.dead_letter_queue(service)
            self.consumer.bus.send_to_queue(service, dlq, delivery.body, outcome.headers)
        else:
            assert isinstance(outcome, Ack)

    def _settle(self, channel: BlockingChannel, tag: int, ack: bool) -> None:
        # Waking the connection thread for every message was most of the consumer's cost:
        # while more messages wait, acks are sent in batches (or by the connection thread
        # once overdue); when the worker is about to go idle they go at once.
        with self._cv:
            if not self._settled:
                self._settled_since = time.monotonic()
            self._settled.append((channel, tag, ack))
            urgent = len(self._settled) >= self._ack_batch or not self._inbox
            wake = urgent and not self._flush_requested
            self._flush_requested |= wake
        if wake:
            with contextlib.suppress(Exception):  # connection gone: redelivery will follow
                self.connection.add_callback_threadsafe(self._flush_settled)

    def flush_overdue(self) -> None:
        """Send settlements that waited too long for a batch (on the connection thread)."""
        with self._cv:
            overdue = bool(self._settled) and (
                time.monotonic() - self._settled_since >= MAX_ACK_DELAY_S
            )
        if overdue:
            self._flush_settled()

    def _flush_settled(self) -> None:
        # Messages are handled and settled in delivery order, so every outstanding tag
        # below an ack's was settled already: a run of acks goes out as one multiple ack
        # (each BlockingChannel call flushes the socket; one per message was the
        # consumer's bottleneck). A requeue first sends the acks before it.
        with self._cv:
            settled, self._settled = self._settled, []
            self._flush_requested = False
        run: tuple[BlockingChannel, int] | None = None  # acks not yet sent: channel, last tag
        for channel, tag, ack in settled:
            if not channel.is_open:
                continue  # the broker requeued it when the channel closed
            if run is not None and (not ack or run[0] is not channel):
                _ack_up_to(*run)
                run = None
            if ack:
                run = (channel, tag)
            else:
                channel.basic_nack(tag, requeue=True)
                log.debug("requeued delivery %d", tag)
        if run is not None:
            _ack_up_to(*run)

    def finish(self, channel: BlockingChannel, connection: pika.BlockingConnection) -> None:
        """Stop taking messages, let the one in hand finish, and ack it (the SIGTERM path)."""
        channel.stop_consuming()
        with self._cv:
            self._inbox.clear()  # not acked: the broker requeues them when the channel closes
        while self._busy():
            connection.process_data_events(time_limit=0.1)
        connection.process_data_events(time_limit=0)
        self._flush_settled()

    def _busy(self) -> bool:
        with self._cv:
            return self._in_hand

    def halt(self) -> None:
        """Stop the worker thread; messages not yet handled stay unacked."""
        with self._cv:
            self._inbox.clear()
            self._halted = True
            self._cv.notify_all()


class BroadcastConsumer(Consumer):
    """Consumes a service's broadcast event types from a queue of this instance's own.

    The queue is exclusive and auto-delete: it lives as long as the connection, so an
    instance that dies leaves nothing behind, and one that reconnects gets a fresh queue
    and calls ``on_attached`` (a reconcile with the source of truth) for what it missed.
    A handler that fails is not retried through the service's delay queues (they lead to
    the shared queue, where one instance only would see it): ``on_attached`` is called
    again after the back-off instead. Dead letters go to the service's DLQ as usual.
    """

    def __init__(self, bus: RabbitMQBus, dispatcher: Dispatcher, stop: threading.Event,
                 on_attached: Callable[[], None] | None = None) -> None:
        super().__init__(bus, dispatcher, stop)
        self.on_attached = on_attached

    connection_suffix = "broadcast"

    def _worker(self, connection: pika.BlockingConnection) -> _Worker:
        return _BroadcastWorker(self, connection)

    def _attached(self) -> None:
        self.attached()

    def _declare(self, channel: BlockingChannel) -> str:
        channel.exchange_declare(self.settings.exchange, exchange_type="topic", durable=True)
        declare_dead_letter_path(channel, self.settings, self.dispatcher.service)
        declared = channel.queue_declare("", exclusive=True, auto_delete=True)
        queue_name = str(declared.method.queue)
        for event_type in self.dispatcher.event_types:
            channel.queue_bind(queue_name, self.settings.exchange, routing_key=event_type)
        return queue_name

    def attached(self, delay_s: float = 0.0) -> None:
        """Run ``on_attached`` on a thread of its own (it may load models for seconds; the
        connection thread must keep its heartbeats), after ``delay_s``."""
        if self.on_attached is None:
            return
        timer = threading.Timer(delay_s, self._run_on_attached)
        timer.daemon = True
        timer.start()

    def _run_on_attached(self) -> None:
        if self.stop.is_set() or self.on_attached is None:
            return
        try:
            self.on_attached()
        except Exception:  # noqa: BLE001 - the next attachment or failure tries again
            log.exception("catching up after attaching the %s broadcast queue failed",
                          self.dispatcher.service)


class _BroadcastWorker(_Worker):
    """A ``_Worker`` whose retries are a later ``on_attached`` call instead of a trip
    through the delay queues."""

    consumer: BroadcastConsumer

    def _carry_out(self, outcome: Outcome, delivery: Delivery) -> None:
        if isinstance(outcome, Retry):
            log.warning("broadcast %s failed; catching up in %.1fs", delivery.routing_key,
                        outcome.delay_s)
            self.consumer.attached(outcome.delay_s)
            return
        super()._carry_out(outcome, delivery)


def _put_back(channel: BlockingChannel, queue_name: str) -> None:
    """Return every message this channel got un-acked to its queue before answering.

    Closing the channel would requeue them too, but the broker does that after the close
    returns, so a depth read at once could miss them. A nack is handled in order with the
    channel's next synchronous call (a passive declare of the same queue)."""
    channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
    channel.queue_declare(queue_name, passive=True)
