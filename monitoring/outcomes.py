"""Publishing observed outcomes: what an application calls once it learns the truth.

Monitoring joins each outcome to the score it judges: by ``request_id`` (the id the
``Score`` reply carried), or, without one, to the entity's latest score. Example::

    from monitoring.outcomes import publish_outcome
    publish_outcome(Settings(), entity_id="C42", outcome=1, request_id="3f9a...")

    report_outcome(bus, entity_id="C42", outcome="fraud")   # on a bus you already hold

``conveyor publish outcome --entity C42 --outcome 1 [--request-id R]`` does the same.
"""

from __future__ import annotations

from common.bus.base import MessageBus
from common.bus.rabbitmq import RabbitMQBus
from common.events import OutcomeObserved
from common.settings import Settings


def outcome_event(
    entity_id: str, outcome: str | float, request_id: str | None = None, *,
    producer: str = "app",
) -> OutcomeObserved:
    """The OutcomeObserved event (pydantic's ``ValidationError`` names a bad field)."""
    return OutcomeObserved(entity_id=entity_id, outcome=outcome, request_id=request_id or None,
                           producer=producer)


def report_outcome(
    bus: MessageBus, entity_id: str, outcome: str | float, request_id: str | None = None, *,
    producer: str = "app",
) -> OutcomeObserved:
    """Publish one outcome on ``bus`` (confirmed by the broker); returns the event."""
    event = outcome_event(entity_id, outcome, request_id, producer=producer)
    bus.publish(event)
    return event


def publish_outcome(
    settings: Settings, entity_id: str, outcome: str | float, request_id: str | None = None,
    *, producer: str = "app",
) -> OutcomeObserved:
    """Publish one outcome on a connection of its own; returns the event."""
    bus = RabbitMQBus(settings, name=producer)
    try:
        return report_outcome(bus, entity_id, outcome, request_id, producer=producer)
    finally:
        bus.close()
