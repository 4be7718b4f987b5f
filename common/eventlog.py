"""The event log: every event on the exchange, recorded in Redis for operators and lineage.

``EventLog`` is the store (a bounded stream in arrival order, each event by id, and the
events each one caused); ``EventLogService`` is the service that fills it.

Example::

    log = EventLog(redis.Redis(), "conveyor")
    for entry in log.recent(20): print(entry["event_type"], entry["event_id"])
    log.caused_by(source_event_id)   # the events it led to
"""

from __future__ import annotations

import json
from typing import Any, cast
from uuid import UUID

import redis

from common.bus.dispatch import HandlerSpec
from common.events import EVENT_TYPES, Event, parse_event
from common.runtime import Service
from common.settings import Settings

STREAM_MAXLEN = 1_000_000


class EventLog:
    """Events recorded in Redis under one namespace."""

    def __init__(self, client: redis.Redis, namespace: str, maxlen: int = STREAM_MAXLEN) -> None:
        self.client, self.namespace, self.maxlen = client, namespace, maxlen
        self.stream = f"{namespace}:eventlog"
        self.bodies = f"{namespace}:events"

    def _children_key(self, event_id: UUID | str) -> str:
        return f"{self.namespace}:caused-by:{event_id}"

    def _artifact_key(self, ident: str) -> str:
        return f"{self.namespace}:artifact:{ident}"

    def record(self, event: Event) -> None:
        """Record an event (idempotent for the id and the children; the stream may repeat)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.bodies, str(event.event_id), event.model_dump_json())
        if event.causation_id:
            pipe.sadd(self._children_key(event.causation_id), str(event.event_id))
        for ident in artifact_ids(event):
            pipe.sadd(self._artifact_key(ident), str(event.event_id))
        fields: dict[Any, Any] = dict(summary(event))
        pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        pipe.execute()

    def recent(self, count: int = 50) -> list[dict[str, str]]:
        """The latest entries, oldest first."""
        entries = cast(list[Any], self.client.xrevrange(self.stream, count=count))
        return [_decoded(fields) for _, fields in reversed(entries)]

    def last_entry_id(self) -> str:
        """The stream id of the latest entry ("0-0" when empty), to read what follows."""
        last = cast(list[Any], self.client.xrevrange(self.stream, count=1))
        return last[0][0].decode() if last else "0-0"

    def read_after(self, entry_id: str, block_ms: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """Entries after ``entry_id``, waiting up to ``block_ms`` for the first one."""
        found = cast(list[Any], self.client.xread({self.stream: entry_id}, block=block_ms))
        return [(i.decode(), _decoded(f)) for _, entries in found or [] for i, f in entries]

    def get(self, event_id: UUID | str) -> Event | None:
        """An event by id, or None if it was never recorded."""
        body = cast(bytes | None, self.client.hget(self.bodies, str(event_id)))
        return parse_event(body) if body else None

    def mentioning(self, ident: str) -> list[Event]:
        """The events that name an artifact (batch, feature set or model id), oldest first."""
        return self._events(cast(set[bytes], self.client.smembers(self._artifact_key(ident))))

    def caused_by(self, event_id: UUID | str) -> list[Event]:
        """The events directly caused by an event."""
        return self._events(cast(set[bytes], self.client.smembers(self._children_key(event_id))))

    def _events(self, members: set[bytes]) -> list[Event]:
        ids = sorted(m.decode() for m in members)
        bodies = cast(list[bytes | None], self.client.hmget(self.bodies, ids) if ids else [])
        return sorted((parse_event(b) for b in bodies if b), key=lambda e: e.occurred_at)


ARTIFACT_FIELDS = ("batch_id", "feature_set_id", "model_id")
ARTIFACT_LIST_FIELDS = ("batch_ids", "model_ids")


def artifact_ids(event: Event) -> set[str]:
    """The ids of the batches, feature sets and models an event names."""
    names = {getattr(event, f) for f in ARTIFACT_FIELDS if getattr(event, f, None)}
    for field in ARTIFACT_LIST_FIELDS:
        names.update(getattr(event, field, None) or [])
    return names


def summary(event: Event) -> dict[str, str]:
    return {
        "event_id": str(event.event_id),
        "event_type": event.event_type,
        "correlation_id": str(event.correlation_id),
        "causation_id": str(event.causation_id or ""),
        "producer": event.producer,
        "occurred_at": event.occurred_at.isoformat(),
        "payload": json.dumps(_payload(event), default=str),
    }


def _payload(event: Event) -> dict[str, Any]:
    envelope = set(Event.model_fields)
    return {k: v for k, v in event.model_dump(mode="json").items() if k not in envelope}


def _decoded(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


class EventLogService(Service):
    """Subscribes to every event type and records each event in the event log."""

    name = "eventlog"

    def __init__(self, event_log: EventLog) -> None:
        self.event_log = event_log

    def handler_specs(self) -> dict[str, HandlerSpec]:
        return {t: HandlerSpec(t, self.on_event) for t in EVENT_TYPES}

    def on_event(self, event: Event) -> None:
        """Record the event; it causes nothing."""
        self.event_log.record(event)

    def ready(self) -> bool:
        return bool(self.event_log.client.ping())


def build(settings: Settings) -> EventLogService:
    """The event-log service for the settings."""
    client = redis.Redis.from_url(settings.redis_url)
    return EventLogService(EventLog(client, settings.namespace))
