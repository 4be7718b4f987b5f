"""The broker drops the bus's connections mid-stream: nothing confirmed is lost.

A publisher thread streams events in batches while a consumer consumes them; the broker
closes both connections twice (``rabbitmqctl close_connection``, for this test's
connections only, so tests running alongside are untouched). Every event whose
``publish_many`` returned must be consumed at least once, and both sides must keep
working after each drop.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from uuid import UUID

import pytest

from common.errors import PublishError
from common.events import Event, SourceDataAvailable
from tests.support.harness import (
    BusNamespace,
    close_connections,
    running_consumer,
    wait_for_handler,
)

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed"),
]

SOURCE = "SourceDataAvailable"
MIN_EVENTS = 2000
BATCH = 50
WINDOW = 400  # the publisher stays at most this many events ahead of the consumer
PROGRESS = 300  # events consumed between drops, to see both sides working again
DROPS = 2


class Stream:
    """Shared state of the publisher thread, the consumer and the test."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.confirmed: list[UUID] = []
        self.consumed: Counter[UUID] = Counter()
        self.publish_errors = 0
        self.drops_done = threading.Event()
        self.abandoned = threading.Event()  # the test failed: the publisher gives up
        self.failure: BaseException | None = None

    def handle(self, event: Event) -> None:
        with self.cond:
            self.consumed[event.event_id] += 1
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"{what} within {timeout}s"

    def publish_until_done(self, ns: BusNamespace) -> None:
        try:
            sent = 0
            while not (len(self.confirmed) >= MIN_EVENTS and self.drops_done.is_set()):
                if self.abandoned.is_set():
                    return
                batch = [source(sent + i) for i in range(BATCH)]
                sent += BATCH
                self.publish_confirmed(ns, batch)
                self.wait_for(
                    lambda: len(self.consumed) >= len(self.confirmed) - WINDOW
                    or self.abandoned.is_set(),
                    30,
                    "consumer kept up with the publisher",
                )
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.failure = exc
        finally:
            with self.cond:
                self.cond.notify_all()

    def publish_confirmed(self, ns: BusNamespace, batch: Sequence[Event]) -> None:
        for _ in range(5):
            try:
                ns.bus().publish_many(batch)
            except PublishError:  # during the outage: retry, as a real producer would
                self.publish_errors += 1
                continue
            with self.cond:
                self.confirmed.extend(e.event_id for e in batch)
            return
        raise PublishError("batch not confirmed after 5 attempts")


def source(i: int) -> SourceDataAvailable:
    return SourceDataAvailable(dataset="stream", uri=f"part-{i}.csv", producer="test")


def test_confirmed_events_survive_dropped_connections(
    ns: BusNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="common.bus")
    service = ns.namespace  # its consumer connection is named after it, like the publisher's
    stream = Stream()
    dispatcher = ns.dispatcher(service, {SOURCE: stream.handle})
    publisher = threading.Thread(target=stream.publish_until_done, args=(ns,), daemon=True)
    with running_consumer(ns.bus(), dispatcher):
        publisher.start()
        try:
            run_drops(ns, stream, publisher)
        finally:
            stream.abandoned.set()
            with stream.cond:
                stream.cond.notify_all()
        confirmed = set(stream.confirmed)
        stream.wait_for(lambda: confirmed <= set(stream.consumed), 30, "all confirmed consumed")

    assert len(confirmed) == len(stream.confirmed) >= MIN_EVENTS
    assert confirmed <= set(stream.consumed)  # at least once: nothing confirmed was lost
    lost_logs = [r.getMessage() for r in caplog.records]
    assert sum("consumer connection lost" in m for m in lost_logs) >= DROPS, lost_logs
    assert sum("publisher connection lost" in m for m in lost_logs) >= DROPS, lost_logs
    duplicates = sum(n - 1 for n in stream.consumed.values())
    print(
        f"confirmed={len(confirmed)} consumed={len(stream.consumed)} duplicates={duplicates}"
        f" publish_errors={stream.publish_errors}"
    )


def run_drops(ns: BusNamespace, stream: Stream, publisher: threading.Thread) -> None:
    """Drop our connections twice mid-stream, each time once both sides work again."""
    stream.wait_for(lambda: len(stream.consumed) >= PROGRESS, 30, "first progress")
    for drop in range(DROPS):
        closed = close_connections(ns.namespace)
        assert closed >= 2, f"drop {drop}: only {closed} connection(s) of ours were open"
        # only events published after the drop can take the consumer this far: so the
        # publisher has reconnected and the consumer too
        target = len(stream.confirmed) + PROGRESS
        stream.wait_for(lambda: len(stream.consumed) >= target, 30, f"progress {drop}")  # noqa: B023
    stream.drops_done.set()
    publisher.join(60)
    assert not publisher.is_alive(), "publisher thread did not finish"
    assert stream.failure is None, f"publisher failed: {stream.failure!r}"


def test_only_unacked_messages_come_back_after_a_drop(ns: BusNamespace) -> None:
    # The connection drops while `slow` is in hand: only `slow` comes back. `quick`, handled
    # before it, was acked although acks are batched (flushed once the worker idles or
    # within a fraction of a second; tests/unit/test_consumer_acks.py pins which).
    service = ns.namespace
    calls: list[str] = []
    started, release = threading.Event(), threading.Event()

    def handle(event: SourceDataAvailable) -> None:
        calls.append(event.uri)
        if event.uri == "slow" and not started.is_set():
            started.set()
            assert release.wait(30), "never released"

    dispatcher = ns.dispatcher(service, {SOURCE: handle})
    quick = SourceDataAvailable(dataset="d", uri="quick", producer="test")
    slow = SourceDataAvailable(dataset="d", uri="slow", producer="test")
    try:
        with running_consumer(ns.bus(), dispatcher):
            # the first `slow` is still blocked: the run that settles is the redelivery
            with wait_for_handler(dispatcher, SOURCE, match=lambda ev: ev == slow):
                ns.bus().publish_many([quick, slow])
                assert started.wait(10), "slow handler did not start"
                assert close_connections(f"{service}-consumer") == 1
            release.set()
    finally:
        release.set()
    assert calls.count("quick") == 1, calls  # acked before the drop: not redelivered
    assert calls.count("slow") == 2, calls  # unacked when the connection dropped
