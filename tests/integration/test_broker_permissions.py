"""The broker's users (deploy/rabbitmq/definitions.json, imported by scripts/setup.sh) on
the real RabbitMQ: an application may publish source, record and outcome events and
nothing else; a service publishes only its own event types and binds only to its own, and
its retries and dead letters go through its own retry exchange: it cannot write the default
exchange, so it cannot put a message into another service's queue.

Everything happens in the vhost ``conveyor`` on the exchange ``conveyor.events`` (the
permissions name them), through exclusive queues of the test's own: no service queue of
that vhost is touched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlparse
from uuid import uuid4

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker

from common.bus.dispatch import Dispatcher, HandlerSpec, RetryPolicy
from common.bus.rabbitmq import RabbitMQBus, delete_topology
from common.errors import InvalidInput, PublishError, Unroutable
from common.events import (
    BatchScoringRequested,
    Event,
    ModelReady,
    OutcomeObserved,
    RawDataExtracted,
    SourceDataAvailable,
)
from common.settings import Settings
from tests.support.harness import running_consumer, wait_for_handler, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS = ROOT / "var" / "rabbitmq" / "credentials.json"
VHOST, EXCHANGE = "conveyor", "conveyor.events"
Sink = tuple[BlockingChannel, str]


def url(user: str, password: str) -> str:
    local = urlparse(Settings().amqp_url)
    return (f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{local.hostname}:"
            f"{local.port or 5672}/{VHOST}")


def password(user: str) -> str:
    if not CREDENTIALS.exists():
        pytest.fail(f"{CREDENTIALS} is missing: run `bash scripts/setup.sh broker`",
                    pytrace=False)
    return str(json.loads(CREDENTIALS.read_text())[user])


def bus_of(user: str) -> RabbitMQBus:
    return RabbitMQBus(Settings(amqp_url=url(user, password(user)), namespace="conveyor"),
                       name=f"test-{user}")


@pytest.fixture
def sink(services_up: None) -> Iterator[Sink]:
    """An exclusive queue in the vhost, declared as guest, bound to every event type."""
    guest = urlparse(Settings().amqp_url)
    connection = pika.BlockingConnection(pika.URLParameters(url(
        guest.username or "guest", guest.password or "guest")))
    channel = connection.channel()
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    queue = channel.queue_declare(f"test-{uuid4().hex[:8]}", exclusive=True).method.queue
    channel.queue_bind(queue, EXCHANGE, routing_key="#")
    yield channel, queue
    connection.close()


def received(sink: Sink) -> list[str]:
    channel, queue = sink
    types = []
    while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
        types.append(got[0].routing_key)
    return types


def publish(user: str, event: Event) -> None:
    bus = bus_of(user)
    try:
        bus.publish(event)
    finally:
        bus.close()


def test_the_application_may_publish_a_source_but_not_model_ready(sink: Sink) -> None:
    publish("conveyor-app", SourceDataAvailable(dataset="d", uri="u.csv", producer="app"))
    publish("conveyor-app", OutcomeObserved(entity_id="C1", outcome=1, producer="app"))
    with pytest.raises(PublishError, match="ACCESS_REFUSED.*topic 'ModelReady'"):
        publish("conveyor-app", ModelReady(model_id="m-evil", version="v9", producer="app"))
    assert received(sink) == ["SourceDataAvailable", "OutcomeObserved"]


def test_a_service_publishes_only_its_own_event_types(sink: Sink) -> None:
    source = SourceDataAvailable(dataset="d", uri="u.csv", producer="test")
    raw = source.caused(RawDataExtracted, producer="ingestion", dataset="d", batch_id="b1",
                        source_uri="u.csv", rows=1, columns=["a"])
    publish("conveyor-ingestion", raw)
    for refused in (source, ModelReady(model_id="m", version="v1", producer="ingestion")):
        with pytest.raises(PublishError, match=f"ACCESS_REFUSED.*topic '{refused.event_type}'"):
            publish("conveyor-ingestion", refused)
    publish("conveyor-evaluation", ModelReady(model_id="m", version="v1", producer="evaluation"))
    assert received(sink) == ["RawDataExtracted", "ModelReady"]


def connect(user: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url(user, password(user))))


def test_a_service_binds_only_to_the_event_types_it_handles(sink: Sink) -> None:
    connection = connect("conveyor-scoring")
    try:
        channel = connection.channel()
        own = channel.queue_declare("", exclusive=True).method.queue  # a broadcast queue
        channel.queue_bind(own, EXCHANGE, routing_key="ModelReady")
        with pytest.raises(ChannelClosedByBroker, match="ACCESS_REFUSED.*topic 'OutcomeObserved'"):
            channel.queue_bind(own, EXCHANGE, routing_key="OutcomeObserved")
    finally:
        connection.close()


@pytest.mark.parametrize("user", ["conveyor-app", "conveyor-ingestion"])
def test_users_cannot_read_queues_that_are_not_theirs(sink: Sink, user: str) -> None:
    connection = connect(user)
    try:
        with pytest.raises(ChannelClosedByBroker, match="ACCESS_REFUSED.*queue 'conveyor.scoring'"):
            connection.channel().basic_get("conveyor.scoring")
    finally:
        connection.close()


def test_the_application_cannot_declare_or_delete_anything(sink: Sink) -> None:
    connection = connect("conveyor-app")
    try:
        with pytest.raises(ChannelClosedByBroker, match="ACCESS_REFUSED"):
            connection.channel().exchange_delete(EXCHANGE)
    finally:
        connection.close()


def queue_exists(channel: BlockingChannel, name: str) -> bool:
    probe = channel.connection.channel()  # a failed passive declare closes its channel
    try:
        probe.queue_declare(name, passive=True)
    except ChannelClosedByBroker:
        return False
    probe.close()
    return True


SERVICE = "batch-scoring"  # a service whose queues the tests below declare in the vhost


@pytest.fixture
def own_topology(sink: Sink) -> Iterator[Settings]:
    """Settings of the ``batch-scoring`` user in the vhost (quick retries); its queues and
    retry exchange are deleted afterwards. Skipped when its queue exists: someone's."""
    channel, _ = sink
    settings = Settings(amqp_url=url(user_of(SERVICE), password(user_of(SERVICE))),
                        namespace="conveyor", retry_delays_s=(0.05,), max_attempts=3)
    if queue_exists(channel, settings.queue(SERVICE)):
        pytest.skip(f"{settings.queue(SERVICE)} exists in vhost {VHOST}: someone's, not touched")
    yield settings
    delete_topology(channel, settings, SERVICE)


def user_of(service: str) -> str:
    return f"conveyor-{service}"


def test_a_service_user_declares_and_uses_its_own_topology(own_topology: Settings) -> None:
    bus = RabbitMQBus(own_topology, name="test-own-topology")
    try:
        bus.declare(SERVICE, ["BatchScoringRequested"])
        bus.send_to_queue(SERVICE, f"conveyor.{SERVICE}.dlq", b"{}", {})  # a dead letter
        assert bus.queue_depths(SERVICE)["dead"] == 1
    finally:
        bus.close()


def confirmed_publish(user: str, exchange: str, routing_key: str) -> None:
    """Publish one message as ``user`` and wait for the broker's confirm."""
    connection = connect(user)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, b"{}", mandatory=True)
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.parametrize("exchange", ["", "conveyor.retry.scoring"])
def test_no_service_writes_the_default_exchange_or_another_services_retry_exchange(
        sink: Sink, exchange: str) -> None:
    shown = exchange or "amq.default"
    with pytest.raises(ChannelClosedByBroker, match=f"ACCESS_REFUSED.*exchange '{shown}'"):
        confirmed_publish(user_of("ingestion"), exchange, "conveyor.scoring")


def test_a_services_retry_exchange_reaches_its_own_queues_only(own_topology: Settings) -> None:
    bus = RabbitMQBus(own_topology, name="test-retry-exchange")
    try:
        bus.declare(SERVICE, ["BatchScoringRequested"])
        with pytest.raises(Unroutable):  # nothing of scoring's is bound to it
            bus.send_to_queue(SERVICE, "conveyor.scoring", b"{}", {})
        with bus.channel() as channel, pytest.raises(
                ChannelClosedByBroker, match="ACCESS_REFUSED.*queue 'conveyor.scoring'"):
            channel.queue_bind("conveyor.scoring", f"conveyor.retry.{SERVICE}", "conveyor.scoring")
    finally:
        bus.close()


def test_a_service_user_retries_and_dead_letters_without_the_default_exchange(
        own_topology: Settings) -> None:
    failed: set[str] = set()

    def flaky(event: BatchScoringRequested) -> None:
        if event.batch_id == "bad":
            raise InvalidInput("batch 'bad' does not exist")
        if event.batch_id not in failed:
            failed.add(str(event.batch_id))
            raise RuntimeError("transient")

    bus = RabbitMQBus(own_topology, name="test-service-retry")
    policy = RetryPolicy(own_topology.max_attempts, own_topology.retry_delays_s)
    dispatcher = Dispatcher(SERVICE, {"BatchScoringRequested": HandlerSpec(
        "BatchScoringRequested", flaky)}, bus.publish_many, policy=policy)
    retried = BatchScoringRequested(batch_id="b1", producer="test")
    bad = BatchScoringRequested(batch_id="bad", producer="test")
    try:
        with running_consumer(bus, dispatcher):
            with wait_for_handler(dispatcher, "BatchScoringRequested", count=3) as waited:
                for event in (retried, bad):
                    publish(user_of("operator"), event)
            wait_until(lambda: bus.queue_depths(SERVICE)["dead"] == 1, message="dead letter")
    finally:
        bus.close()
    outcomes = [(c.event.batch_id, type(c.outcome).__name__) for c in waited.calls]
    assert sorted(outcomes) == [("b1", "Ack"), ("b1", "Retry"), ("bad", "DeadLetter")]
