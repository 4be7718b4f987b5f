"""The broker's users (deploy/rabbitmq/definitions.json, imported by scripts/setup.sh) on
the real RabbitMQ: an application may publish source, record and outcome events and
nothing else; a service publishes only its own event types and binds only to its own.

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

from common.bus.rabbitmq import RabbitMQBus
from common.errors import PublishError
from common.events import (
    Event,
    ModelReady,
    OutcomeObserved,
    RawDataExtracted,
    SourceDataAvailable,
)
from common.settings import Settings

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


def test_a_service_user_declares_and_uses_its_own_topology(sink: Sink) -> None:
    channel, _ = sink
    service = "batch-scoring"
    queues = [f"conveyor.{service}", f"conveyor.{service}.dlq",
              *(f"conveyor.{service}.retry.{round(d * 1000)}ms"
                for d in sorted(set(Settings().retry_delays_s)))]
    if queue_exists(channel, queues[0]):
        pytest.skip(f"{queues[0]} exists in vhost {VHOST}: someone's, not touched")
    bus = bus_of(f"conveyor-{service}")
    try:
        bus.declare(service, ["BatchScoringRequested"])
        bus.send_to_queue(f"conveyor.{service}.dlq", b"{}", {})  # a dead letter of its own
        assert bus.queue_depths(service)["dead"] == 1
    finally:
        bus.close()
        for name in queues:
            channel.queue_delete(name)
