"""How the RabbitMQ consumer's worker settles messages: batched multiple acks, in order.

The worker runs against a fake connection whose thread-safe callbacks the test runs by
hand, so which acks are sent, and when, is deterministic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from common.bus.dispatch import Dispatcher, HandlerSpec, RetryPolicy
from common.bus.rabbitmq import _Worker
from common.events import SourceDataAvailable
from common.settings import Settings
from tests.support.harness import wait_until

SOURCE = "SourceDataAvailable"


class FakeChannel:
    is_open = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.sent.append(("ack", tag, multiple))

    def basic_nack(self, tag: int, requeue: bool = True) -> None:
        self.sent.append(("nack", tag, requeue))


class FakeConnection:
    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def add_callback_threadsafe(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def run_callbacks(self) -> None:  # what the connection thread would do
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback()


def unreachable_broker(*_: Any) -> None:
    raise ConnectionError("broker gone")  # moving a message to a retry fails: requeue it


class Harness:
    """A worker with gates: the handler of uri X waits for ``gates[X]`` when there is one."""

    def __init__(self, prefetch: int) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.channel, self.connection = FakeChannel(), FakeConnection()
        spec = HandlerSpec(SOURCE, self.handle)
        dispatcher = Dispatcher("svc", {SOURCE: spec}, lambda _: None, policy=RetryPolicy(3))
        consumer = SimpleNamespace(
            settings=Settings(prefetch=prefetch), dispatcher=dispatcher, prefetch=prefetch,
            stop=threading.Event(), bus=SimpleNamespace(send_to_queue=unreachable_broker),
        )
        self.worker = _Worker(consumer, self.connection)  # type: ignore[arg-type]
        self.tag = 0

    def handle(self, event: SourceDataAvailable) -> None:
        if event.uri in self.gates:
            assert self.gates[event.uri].wait(10), f"{event.uri} never released"
        if event.uri.startswith("bad"):
            raise RuntimeError("retry me")

    def deliver(self, uri: str, gated: bool = False) -> None:
        if gated:
            self.gates[uri] = threading.Event()
        self.tag += 1
        body = SourceDataAvailable(dataset="d", uri=uri).to_json()
        method = SimpleNamespace(delivery_tag=self.tag, routing_key=SOURCE)
        self.worker.receive(self.channel, method, SimpleNamespace(headers=None), body)  # type: ignore[arg-type]

    def flushed(self, overdue_only: bool = True) -> list[tuple[str, int, bool]]:
        """Flush as the connection thread does (only what is overdue, or all); what was sent."""
        if overdue_only:
            self.worker.flush_overdue()
        else:
            self.worker._flush_settled()
        return self.channel.sent

    def idle(self) -> bool:
        with self.worker._cv:
            return not self.worker._in_hand and not self.worker._inbox


MakeHarness = Callable[[int], Harness]


@pytest.fixture
def harness() -> Iterator[MakeHarness]:
    made: list[Harness] = []

    def make(prefetch: int) -> Harness:
        made.append(Harness(prefetch))
        return made[-1]

    yield make
    for h in made:
        for gate in h.gates.values():
            gate.set()
        h.worker.halt()


def test_ack_is_deferred_while_messages_wait_and_flushed_when_overdue(harness: MakeHarness) -> None:
    h = harness(100)
    h.deliver("first", gated=True)
    h.deliver("slow", gated=True)
    h.gates["first"].set()  # `first` settles while `slow` is already waiting
    wait_until(h.flushed, message="overdue ack sent")
    assert h.channel.sent == [("ack", 1, True)]
    assert h.connection.callbacks == []  # no wake-up of the connection thread for it
    h.gates["slow"].set()  # the last message: the worker goes idle, so its ack goes now
    wait_until(lambda: h.connection.callbacks, message="wake-up requested")
    h.connection.run_callbacks()
    assert h.channel.sent == [("ack", 1, True), ("ack", 2, True)]


def test_acks_go_out_as_one_multiple_ack_and_requeues_are_kept(harness: MakeHarness) -> None:
    h = harness(8)  # acks are batched by 2
    h.deliver("a", gated=True)
    for uri in ("bad", "c", "d"):
        h.deliver(uri)
    h.gates["a"].set()
    wait_until(h.idle, message="all four handled")
    assert len(h.connection.callbacks) == 1  # one wake-up for the four of them
    h.connection.run_callbacks()
    # the ack of 1 goes before the requeue of 2; a multiple ack of 4 then covers 3 and 4
    assert h.channel.sent == [("ack", 1, True), ("nack", 2, True), ("ack", 4, True)]


def test_worker_takes_nothing_new_once_stopping(harness: MakeHarness) -> None:
    h = harness(100)
    h.deliver("first", gated=True)
    h.deliver("next")
    wait_until(h.worker._busy, message="first in hand")
    h.worker.consumer.stop.set()  # SIGTERM while `first` runs
    h.gates["first"].set()
    wait_until(lambda: h.flushed(overdue_only=False), message="first acked")
    assert not h.worker._busy()
    assert len(h.worker._inbox) == 1  # `next` was not taken: requeued when the channel closes
    h.worker._flush_settled()
    assert h.channel.sent == [("ack", 1, True)]
