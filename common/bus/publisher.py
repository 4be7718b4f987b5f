"""A thread-safe RabbitMQ publisher with mandatory routing and asynchronous confirms.

It owns one pika ``SelectConnection`` on an I/O thread. Callers from any thread submit
messages and get futures that resolve when the broker confirms each one, so a batch of
events costs one wait, not one round trip per event. Unroutable messages (basic.return)
fail with ``Unroutable``; nacks with ``PublishError``. When the connection drops, every
message not yet confirmed is sent again after reconnecting (at-least-once; consumers
deduplicate by event id).

Example::

    publisher = AsyncPublisher(pika.URLParameters(url))
    publisher.publish([Message("conveyor.events", "ModelReady", body, properties)])
    publisher.close()
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.exceptions import ChannelClosedByBroker
from pika.spec import Basic

from common.errors import PublishError, Unroutable

log = logging.getLogger(__name__)
REFUSALS = {403, 404}  # access refused, no such exchange: a resend would fail the same way


@dataclass
class Message:
    """One message to publish."""

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    future: Future = field(default_factory=Future, compare=False)
    returned: bool = False

    def __post_init__(self) -> None:
        # basic.return is matched to its message by message id, so every message has one.
        if self.properties.message_id is None:
            self.properties.message_id = uuid.uuid4().hex


class AsyncPublisher:
    """Publishes from any thread through one confirming channel on an I/O thread."""

    def __init__(
        self, params: pika.ConnectionParameters, *, max_reconnect_delay_s: float = 30.0
    ) -> None:
        self._params = params
        self._max_delay = max_reconnect_delay_s
        self._lock = threading.Lock()
        self._outbox: deque[Message] = deque()
        self._unconfirmed: dict[int, Message] = {}
        self._connection: pika.SelectConnection | None = None
        self._channel: Any = None
        self._flush_scheduled = False
        self._closing = threading.Event()
        self._next_tag = 0
        self._opened = False
        self._thread = threading.Thread(target=self._run, name="amqp-publisher", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------

    def publish(self, messages: Sequence[Message], timeout_s: float = 30.0) -> None:
        """Send the messages and wait until the broker confirmed all of them."""
        with self._lock:
            self._outbox.extend(messages)
        self._schedule_flush()
        _, pending = wait([m.future for m in messages], timeout=timeout_s)
        for message in messages:
            message.future.cancel()  # a no-op once resolved; stops a late send otherwise
        if pending:
            raise PublishError(
                f"{len(pending)} of {len(messages)} message(s) not confirmed within {timeout_s}s"
                " (broker unreachable?)"
            )
        for message in messages:
            message.future.result()

    def close(self) -> None:
        """Close the connection and stop the I/O thread."""
        self._closing.set()
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):  # the loop may already be gone
                connection.ioloop.add_callback_threadsafe(self._close_connection)
        self._thread.join(timeout=10)

    def _schedule_flush(self) -> None:
        with self._lock:
            if self._flush_scheduled or self._channel is None or self._connection is None:
                return
            self._flush_scheduled = True
            connection = self._connection
        try:
            connection.ioloop.add_callback_threadsafe(self._flush)
        except Exception:  # noqa: BLE001 - reconnecting; the open channel flushes
            with self._lock:
                self._flush_scheduled = False

    # -- I/O thread --------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.2
        while not self._closing.is_set():
            self._connection = pika.SelectConnection(
                self._params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_stopped,
                on_close_callback=self._on_stopped,
            )
            self._opened = False
            self._connection.ioloop.start()
            self._requeue(list(self._unconfirmed.values()))
            self._unconfirmed.clear()
            delay = 0.2 if self._opened else min(delay * 2, self._max_delay)
            if not self._closing.is_set():
                log.warning("publisher connection lost; reconnecting in %.1fs", delay)
                self._closing.wait(delay)

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Any) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=lambda _frame: self._ready(channel))

    def _ready(self, channel: Any) -> None:
        with self._lock:
            self._channel, self._next_tag, self._flush_scheduled = channel, 0, True
        self._opened = True
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            channel = self._channel
            batch = list(self._outbox)
            self._outbox.clear()
        if channel is None or not channel.is_open:
            self._requeue(batch)  # in order, ahead of anything submitted since
            return
        for message in batch:
            if message.future.set_running_or_notify_cancel():
                self._send(channel, message)

    def _send(self, channel: Any, message: Message) -> None:
        self._next_tag += 1
        self._unconfirmed[self._next_tag] = message
        channel.basic_publish(
            message.exchange, message.routing_key, message.body, message.properties, mandatory=True
        )

    def _on_return(self, _channel: Any, method: Basic.Return, props: Any, _body: bytes) -> None:
        for message in self._unconfirmed.values():
            if not message.returned and message.properties.message_id == props.message_id:
                message.returned = True
                return

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [t for t in self._unconfirmed if t <= method.delivery_tag] if method.multiple else [
            method.delivery_tag
        ]
        for tag in tags:
            message = self._unconfirmed.pop(tag, None)
            if message is not None:
                _resolve(message, acked=isinstance(method, Basic.Ack))

    def _on_channel_closed(self, _channel: Any, reason: Exception) -> None:
        if not self._closing.is_set():
            log.warning("publisher channel closed: %s", reason)
        if isinstance(reason, ChannelClosedByBroker) and reason.reply_code in REFUSALS:
            self._fail_unconfirmed(PublishError(f"the broker refused the publish: {reason}"))
        with self._lock:
            self._channel = None
        if self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _fail_unconfirmed(self, error: PublishError) -> None:
        """Sending again cannot help (no such exchange, access refused): tell the callers."""
        for message in self._unconfirmed.values():
            message.future.set_exception(error)
        self._unconfirmed.clear()

    def _on_stopped(self, connection: pika.SelectConnection, reason: Any = None) -> None:
        with self._lock:
            self._channel = None
        if not self._closing.is_set():
            log.warning("publisher connection stopped: %s", reason)
        connection.ioloop.stop()

    def _close_connection(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        elif self._connection is not None:
            self._connection.ioloop.stop()

    def _requeue(self, messages: list[Message]) -> None:
        for message in messages:
            message.returned = False
            if message.future.running():
                message.future = _rearmed(message.future)
        with self._lock:
            self._outbox.extendleft(reversed(messages))


def _rearmed(future: Future) -> Future:
    """A running future cannot go back to pending; hand its waiter a chained one."""
    fresh: Future = Future()
    fresh.add_done_callback(lambda f: _copy_result(f, future))
    return fresh


def _copy_result(source: Future, target: Future) -> None:
    if source.cancelled():
        target.set_exception(PublishError("publish abandoned"))
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(None)


def _resolve(message: Message, *, acked: bool) -> None:
    if not acked:
        message.future.set_exception(PublishError(f"broker refused {message.routing_key} (nack)"))
    elif message.returned:
        message.future.set_exception(Unroutable(message.routing_key, message.exchange))
    else:
        message.future.set_result(None)
