"""The RabbitMQ bus against the real broker and Redis, each test in its own namespace."""

from __future__ import annotations

import shutil
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from common.bus.dispatch import (
    ATTEMPT,
    ERROR_FIELD,
    ERROR_MESSAGE,
    ERROR_TYPE,
    FAILED_SERVICE,
    TRACEBACK,
    Ack,
    DeadLetter,
    HandlerSpec,
    Retry,
)
from common.bus.idempotency import processed_key
from common.bus.rabbitmq import DELIVERY_LIMIT, delay_queue
from common.errors import Unroutable
from common.events import Event, ModelReady, RawDataExtracted, SourceDataAvailable
from common.metrics import QueueDepthCollector
from tests.support.harness import (
    BusNamespace,
    ServicesUnavailable,
    close_connections,
    delete_namespace,
    isolated_settings,
    running_consumer,
    wait_for_handler,
    wait_until,
)

pytestmark = pytest.mark.integration

SVC = "svc"
SOURCE = "SourceDataAvailable"
EMPTY = {"ready": 0, "dead": 0, "retry_50ms": 0, "retry_100ms": 0}


def source(uri: str = "tx.csv") -> SourceDataAvailable:
    return SourceDataAvailable(dataset="paysim", uri=uri, producer="test")


class Breakable:
    """A handler that records events and raises while ``broken`` is set."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.got: list[SourceDataAvailable] = []
        self.lock = threading.Lock()

    def __call__(self, event: SourceDataAvailable) -> None:
        with self.lock:
            self.got.append(event)
        if self.broken:
            raise RuntimeError(f"cannot handle {event.uri}")


def test_publish_consume_ack(ns: BusNamespace) -> None:
    handler = Breakable()
    dispatcher = ns.dispatcher(SVC, {SOURCE: handler})
    event = source()
    with running_consumer(ns.bus(), dispatcher):
        with wait_for_handler(dispatcher, SOURCE) as waited:
            ns.bus().publish(event)
        assert waited.outcome == Ack()
    assert handler.got == [event]  # the exact event, ids and timestamps included
    assert ns.depths(SVC) == EMPTY  # acked: nothing came back when the consumer left


def test_emitted_events_reach_the_next_service(ns: BusNamespace) -> None:
    got: list[RawDataExtracted] = []
    ns.declare("next", ["RawDataExtracted"])

    def extract(event: SourceDataAvailable) -> RawDataExtracted:
        return event.caused(
            RawDataExtracted, producer=SVC, dataset=event.dataset, batch_id="b",
            source_uri=event.uri, rows=1, columns=["a"],
        )

    first = ns.dispatcher(SVC, {SOURCE: extract})
    second = ns.dispatcher("next", {"RawDataExtracted": got.append})
    cause = source()
    with (
        running_consumer(ns.bus(), first),
        running_consumer(ns.bus(), second),
        wait_for_handler(second, "RawDataExtracted"),
    ):
        ns.bus().publish(cause)
    [raw] = got
    assert raw.causation_id == cause.event_id and raw.correlation_id == cause.correlation_id
    assert ns.depths(SVC) == EMPTY and ns.depths("next") == EMPTY


def test_failing_handler_is_retried_then_dead_lettered_and_consuming_goes_on(
    ns: BusNamespace,
) -> None:
    handler = Breakable(broken=True)
    dispatcher = ns.dispatcher(SVC, {SOURCE: handler})
    bad, good = source("bad.csv"), source("good.csv")
    attempts = ns.settings.max_attempts
    with running_consumer(ns.bus(), dispatcher):
        with wait_for_handler(dispatcher, SOURCE, count=attempts) as waited:
            ns.bus().publish(bad)
        outcomes = [call.outcome for call in waited.calls]
        assert [type(o) for o in outcomes] == [Retry, Retry, DeadLetter]
        assert [o.headers[ATTEMPT] for o in outcomes[:2]] == [2, 3]  # type: ignore[union-attr]
        assert [o.delay_s for o in outcomes[:2]] == [0.05, 0.1]  # type: ignore[union-attr]
        wait_until(lambda: ns.depths(SVC)["dead"] == 1, message="bad event in the DLQ")
        handler.broken = False
        with wait_for_handler(dispatcher, SOURCE) as after:
            ns.bus().publish(good)
        assert after.event == good and after.outcome == Ack()
    assert [e.event_id for e in handler.got] == [bad.event_id] * attempts + [good.event_id]
    [letter] = ns.bus().dead_letters(SVC)
    assert letter.body == bad.to_json()
    assert letter.headers[ERROR_TYPE] == "RuntimeError"
    assert letter.headers[ERROR_MESSAGE] == "cannot handle bad.csv"
    assert "Traceback" in letter.headers[TRACEBACK] and "in __call__" in letter.headers[TRACEBACK]
    assert letter.headers[FAILED_SERVICE] == SVC
    assert letter.headers[ATTEMPT] == attempts
    assert letter.routing_key == SOURCE  # kept through the delay queues' re-routing
    assert ns.depths(SVC) == {**EMPTY, "dead": 1}  # dead_letters() leaves them in place


def test_invalid_event_is_dead_lettered_at_once_naming_the_field(ns: BusNamespace) -> None:
    handler = Breakable()
    dispatcher = ns.dispatcher(SVC, {SOURCE: handler})
    body = b'{"event_type": "SourceDataAvailable", "uri": "tx.csv", "producer": "java"}'
    with running_consumer(ns.bus(), dispatcher):
        ns.bus().publish_raw(SOURCE, body)
        wait_until(lambda: ns.depths(SVC)["dead"] == 1, message="invalid event in the DLQ")
        with wait_for_handler(dispatcher, SOURCE):  # the service still consumes
            ns.bus().publish(source())
    assert len(handler.got) == 1
    [letter] = ns.bus().dead_letters(SVC)
    assert letter.body == body
    assert letter.headers[ERROR_TYPE] == "InvalidEvent"
    assert letter.headers[ERROR_FIELD] == "dataset"
    assert "in field 'dataset'" in letter.error
    assert ATTEMPT not in letter.headers  # never retried
    assert ns.depths(SVC) == {**EMPTY, "dead": 1}


def test_replayed_dead_letter_is_handled_once_the_handler_is_fixed(ns: BusNamespace) -> None:
    handler = Breakable(broken=True)
    dispatcher = ns.dispatcher(SVC, {SOURCE: handler})
    event = source()
    with running_consumer(ns.bus(), dispatcher):
        with wait_for_handler(dispatcher, SOURCE, count=ns.settings.max_attempts):
            ns.bus().publish(event)
        wait_until(lambda: ns.depths(SVC)["dead"] == 1, message="event in the DLQ")
        handler.broken = False
        with wait_for_handler(dispatcher, SOURCE) as replayed:
            assert ns.bus().replay_dead_letters(SVC) == 1
        assert replayed.event == event and replayed.outcome == Ack()
    assert ns.depths(SVC) == EMPTY
    assert ns.bus().replay_dead_letters(SVC) == 0


def test_unroutable_publish_raises(ns: BusNamespace) -> None:
    ns.declare(SVC, [SOURCE])  # the exchange exists, nothing is bound to ModelReady
    with pytest.raises(Unroutable) as err:
        ns.bus().publish(ModelReady(model_id="m", version="v1"))
    assert err.value.event_type == "ModelReady"
    assert err.value.exchange == ns.settings.exchange
    ns.bus().publish(source())  # the publisher is still usable
    assert ns.depths(SVC)["ready"] == 1


def test_publish_many_thousand_events_arrive_exactly_once(ns: BusNamespace) -> None:
    handler = Breakable()
    dispatcher = ns.dispatcher(SVC, {SOURCE: handler})
    events = [source(f"part-{i}.csv") for i in range(1000)]
    with (
        running_consumer(ns.bus(), dispatcher),
        wait_for_handler(dispatcher, SOURCE, timeout=30, count=len(events)),
    ):
        ns.bus().publish_many(events)
    counts = Counter(e.event_id for e in handler.got)
    assert set(counts) == {e.event_id for e in events}
    assert set(counts.values()) == {1}
    assert ns.depths(SVC) == EMPTY


def test_same_event_published_twice_is_handled_once(ns: BusNamespace) -> None:
    handler = Breakable()
    dispatcher = ns.dispatcher(SVC, {SOURCE: handler}, processed=ns.processed())
    event, later = source(), source("later.csv")
    with running_consumer(ns.bus(), dispatcher):
        with wait_for_handler(dispatcher, SOURCE):
            ns.bus().publish(event)
        assert ns.redis.exists(processed_key(ns.namespace, SVC, event.event_id))
        # one consumer takes the queue in order: once `later` is handled, the copy was seen
        with wait_for_handler(dispatcher, SOURCE, match=lambda ev: ev == later):
            ns.bus().publish(event)
            ns.bus().publish(later)
    assert [e.event_id for e in handler.got] == [event.event_id, later.event_id]
    labels = {"service": SVC, "event_type": SOURCE}
    duplicates = dispatcher.metrics.registry.get_sample_value(
        "conveyor_events_duplicate_total", labels
    )
    assert duplicates == 1
    assert ns.depths(SVC) == EMPTY


def test_stop_lets_the_handler_in_hand_finish_and_ack(ns: BusNamespace) -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[Event] = []

    def slow(event: Event) -> None:
        started.set()
        assert release.wait(10), "never released"
        finished.append(event)

    dispatcher = ns.dispatcher(SVC, {SOURCE: slow})
    first, waiting = source("first.csv"), source("waiting.csv")
    with running_consumer(ns.bus(), dispatcher) as consumer:
        ns.bus().publish_many([first, waiting])
        assert started.wait(10), "handler did not start"
        consumer.stop.set()  # what SIGTERM does in a service
        release.set()
        consumer.join()
    assert finished == [first]  # finished exactly once; `waiting` was never started
    assert ns.depths(SVC) == {**EMPTY, "ready": 1}  # `first` acked, `waiting` back in the queue
    [(_, _, body)] = _drain(ns, SVC)
    assert body == waiting.to_json()


def _drain(ns: BusNamespace, service: str) -> list[Any]:
    with ns.bus().channel() as channel:
        messages = []
        while (got := channel.basic_get(ns.settings.queue(service), auto_ack=True))[0]:
            messages.append(got)
        return messages


def test_unsettleable_message_is_requeued_until_the_delivery_limit(ns: BusNamespace) -> None:
    # With its delay queue gone, a failing event cannot be moved to a retry: the consumer
    # requeues it (nack) while the events around it are acked, until the queue's
    # delivery limit sends it to the DLQ. A nack swallowed by a batched ack would lose it.
    handler = Breakable()
    dispatcher = ns.dispatcher(SVC, {SOURCE: handler})
    before, bad, after = source("before.csv"), source("bad.csv"), source("after.csv")
    handler.broken = False

    def fail_bad(event: SourceDataAvailable) -> None:
        handler(event)
        if event == bad:
            raise RuntimeError("bad")

    dispatcher.handlers[SOURCE] = HandlerSpec(SOURCE, fail_bad)
    with running_consumer(ns.bus(), dispatcher):  # (it declares the topology again)
        with ns.bus().channel() as channel:
            channel.queue_delete(delay_queue(ns.settings, SVC, ns.settings.retry_delays_s[0]))
        with wait_for_handler(dispatcher, SOURCE, match=lambda ev: ev == after):
            ns.bus().publish_many([before, bad, after])
        wait_until(lambda: ns.depths(SVC)["dead"] == 1, message="bad event in the DLQ")
    calls = Counter(e.uri for e in handler.got)
    assert calls["before.csv"] == calls["after.csv"] == 1
    assert calls["bad.csv"] == DELIVERY_LIMIT + 1  # first delivery + the limit's redeliveries
    [letter] = ns.bus().dead_letters(SVC)
    assert letter.body == bad.to_json()
    assert letter.headers["x-death"][0]["reason"] == "delivery_limit"
    assert ns.depths(SVC)["ready"] == 0


def test_scrapes_from_many_threads_read_queue_depths_over_one_connection(
        ns: BusNamespace) -> None:
    ns.declare(SVC, [SOURCE])
    bus = ns.bus()
    bus.publish(source())
    wait_until(lambda: bus.queue_depths(SVC)["ready"] == 1, message="the event in the queue")
    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(SVC, bus.queue_depths))

    def scrape(_: int) -> float | None:
        return registry.get_sample_value("conveyor_queue_depth", {"service": SVC, "queue": "ready"})

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(scrape, range(40))) == [1.0] * 40
    assert bus.queue_depths("undeclared") == {key: -1 for key in EMPTY}
    assert bus.queue_depths(SVC) == {**EMPTY, "ready": 1}  # a missing queue cost a channel
    assert bus.depth_probe.connections_opened == 1


def test_the_depth_connection_closes_with_the_bus(ns: BusNamespace) -> None:
    ns.declare(SVC, [SOURCE])
    bus = ns.bus(f"{ns.namespace}-closing")
    probe = bus.depth_probe
    assert bus.queue_depths(SVC) == EMPTY
    bus.close()
    assert not probe.running
    assert bus.queue_depths(SVC) == EMPTY  # a closed bus opens a new one on demand
    assert bus.depth_probe is not probe
    bus.close()


@pytest.mark.faults
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")
def test_queue_depths_reconnect_once_after_the_broker_drops_the_connection(
        ns: BusNamespace) -> None:
    ns.declare(SVC, [SOURCE])
    bus = ns.bus()
    assert bus.queue_depths(SVC) == EMPTY
    assert close_connections(f"{ns.namespace}-test-depths") == 1
    assert bus.queue_depths(SVC) == EMPTY
    assert bus.depth_probe.connections_opened == 2


def test_clean_up_against_a_silent_broker_fails_fast_naming_it() -> None:
    # Accepts TCP (the kernel's backlog) but never speaks AMQP, as a wedged broker would.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        settings = isolated_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        with pytest.raises(ServicesUnavailable, match=f"at RabbitMQ amqp://127.0.0.1:{port}/"):
            delete_namespace(settings, [SVC], timeout_s=1.0)
