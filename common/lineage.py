"""Lineage: from any batch, feature set, model or event back to its source and forward.

The event log records every event with its cause; walking ``causation_id`` upwards
reaches the SourceDataAvailable that started the run, and walking the events each one
caused reaches what came of it (features, candidates, the promoted model...).

Lineage lasts as long as the event log keeps it (``CONVEYOR_EVENTLOG_RETENTION_DAYS``):
the links (``caused-by:``, ``artifact:`` sets) expire with the bodies they point at, so an
older history ends where its first expired event was, and an id older than that is
``NotFound``. ScoreServed events are not part of any lineage (their bodies are not kept).

Example::

    found = trace(event_log, "3f2a9c0d1e2b4a5c")     # a model id
    for event in found.ancestors: print(event.event_type)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from uuid import UUID

from common.errors import NotFound
from common.eventlog import EventLog
from common.events import Event

# Which event type brings each kind of artifact into being, so a lineage starts there.
PRODUCERS = ("SourceDataAvailable", "RawDataExtracted", "FeaturesGenerated",
             "CandidatesTrained", "ModelReady", "ModelRejected")


@dataclass
class Lineage:
    """An artifact's or event's history: where it came from and what came of it."""

    subject: Event
    ancestors: list[Event] = field(default_factory=list)
    descendants: list[tuple[int, Event]] = field(default_factory=list)


def trace(log: EventLog, ident: str) -> Lineage:
    """The lineage of an event id, batch id, feature set id or model id."""
    subject = _subject(log, ident)
    return Lineage(subject, list(_ancestors(log, subject)), list(_descendants(log, subject, 1)))


def _subject(log: EventLog, ident: str) -> Event:
    if _is_uuid(ident) and (event := log.get(ident)):
        return event
    events = log.mentioning(ident)
    if not events:
        raise NotFound("event, batch, feature set or model", ident)
    return min(events, key=lambda e: (PRODUCERS.index(e.event_type)
                                      if e.event_type in PRODUCERS else 99, e.occurred_at))


def _ancestors(log: EventLog, event: Event) -> Iterator[Event]:
    chain = []
    while event.causation_id and (cause := log.get(event.causation_id)):
        chain.append(cause)
        event = cause
    return reversed(chain)


def _descendants(log: EventLog, event: Event, depth: int) -> Iterator[tuple[int, Event]]:
    for child in log.caused_by(event.event_id):
        yield depth, child
        yield from _descendants(log, child, depth + 1)


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
        return True
    except ValueError:
        return False
