"""Publishes the broker refuses fail at once with the broker's reason, not after a timeout."""

from __future__ import annotations

import pytest

from common.bus.rabbitmq import RabbitMQBus
from common.errors import PublishError
from common.events import ModelReady, SourceDataAvailable
from tests.support.harness import BusNamespace

pytestmark = pytest.mark.integration


def test_publishing_to_a_missing_exchange_names_it(ns: BusNamespace) -> None:
    bus = RabbitMQBus(ns.settings, name="refused")  # nothing declared: no exchange yet
    try:
        with pytest.raises(PublishError, match=f"no exchange '{ns.settings.exchange}'"):
            bus.publish_many([ModelReady(model_id="m", version="v1")])
    finally:
        bus.close()


def test_the_publisher_keeps_working_after_a_refusal(ns: BusNamespace) -> None:
    bus = ns.bus()
    with pytest.raises(PublishError):
        bus.publish(ModelReady(model_id="m", version="v1"))
    ns.declare("sink", ["SourceDataAvailable"])
    bus.publish(SourceDataAvailable(dataset="d", uri="u", producer="test"))
    assert ns.depths("sink")["ready"] == 1
