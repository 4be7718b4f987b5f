"""The event log: every event on the exchange, recorded in Redis for operators and lineage.

``EventLog`` is the store (a bounded stream in arrival order, each event by id, and the
events each one caused); ``EventLogService`` is the service that fills it.

Everything it keeps is bounded (``CONVEYOR_EVENTLOG_*`` settings):

- ``eventlog`` (stream of summaries): at most about ``maxlen`` entries, none older than
  the retention; a ScoreServed summary carries its score count, not its scores, and a
  RecordsObserved summary its record count, not its records;
- ``event:<id>`` (one string per event, expires): the body, kept ``retention_s``; a
  ScoreServed body is not kept (``score_served_ttl_s`` 0, the default) or kept that long:
  at 1,000 scores/s with features included, bodies are tens of GB a day; an
  OutcomeObserved or RecordsObserved body (one per outcome, or per batch of streamed
  records: many a second) is kept ``observed_ttl_s`` (0, the default: not kept; the
  stream's summary of an outcome holds its whole payload): ~470 bytes an outcome for
  30 days is ~100 GB at 90 outcomes/s. None of them names an artifact, so lineage loses
  nothing;
- ``caused-by:<id>`` and ``artifact:<id>`` (sets, expire): the lineage links, kept as long
  as the bodies they point at, each write extending them.

Example::

    log = EventLog(redis.Redis(), "conveyor")
    for entry in log.recent(20): print(entry["event_type"], entry["event_id"])
    log.caused_by(source_event_id)   # the events it led to
"""

from __future__ import annotations

import json
import time
from typing import Any, cast
from uuid import UUID

import redis
from prometheus_client import CollectorRegistry

from common.bus.dispatch import HandlerSpec
from common.events import EVENT_TYPES, Event, RecordsObserved, ScoreServed, parse_event
from common.redis_memory import RedisMemoryCollector
from common.runtime import Service
from common.settings import Settings

STREAM_MAXLEN = 100_000
RETENTION_S = 30 * 24 * 3600
BULKY = frozenset({"ScoreServed"})
"""Event types whose bodies are many and large: kept only ``score_served_ttl_s``."""
OBSERVED = frozenset({"OutcomeObserved", "RecordsObserved"})
"""Event types that come at the rate of the applications' traffic: bodies kept only
``observed_ttl_s``."""


class EventLog:
    """Events recorded in Redis under one namespace, each kept for a bounded time."""

    def __init__(
        self, client: redis.Redis, namespace: str, maxlen: int = STREAM_MAXLEN, *,
        retention_s: int = RETENTION_S, score_served_ttl_s: int = 0, observed_ttl_s: int = 0,
    ) -> None:
        self.client, self.namespace, self.maxlen = client, namespace, maxlen
        self.retention_s, self.score_served_ttl_s = retention_s, score_served_ttl_s
        self.observed_ttl_s = observed_ttl_s
        self.stream = f"{namespace}:eventlog"

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> EventLog:
        """The event log with the settings' retention and bounds."""
        return cls(client, settings.namespace, settings.eventlog_maxlen,
                   retention_s=int(settings.eventlog_retention_days * 86_400),
                   score_served_ttl_s=settings.eventlog_score_served_ttl_s,
                   observed_ttl_s=settings.eventlog_observed_ttl_s)

    def _body_key(self, event_id: UUID | str) -> str:
        return f"{self.namespace}:event:{event_id}"

    def _children_key(self, event_id: UUID | str) -> str:
        return f"{self.namespace}:caused-by:{event_id}"

    def _artifact_key(self, ident: str) -> str:
        return f"{self.namespace}:artifact:{ident}"

    def ttl_of(self, event: Event) -> int:
        """How long the event's body is kept, in seconds (0: not kept)."""
        if event.event_type in BULKY:
            return self.score_served_ttl_s
        return self.observed_ttl_s if event.event_type in OBSERVED else self.retention_s

    def record(self, event: Event) -> None:
        """Record an event (idempotent for the id and the children; the stream may repeat)."""
        pipe = self.client.pipeline(transaction=True)
        ttl = self.ttl_of(event)
        if ttl:
            self._keep(pipe, event, ttl)
        fields: dict[Any, Any] = dict(summary(event))
        pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        oldest_ms = int((time.time() - self.retention_s) * 1000)
        pipe.xtrim(self.stream, minid=f"{oldest_ms}-0", approximate=True)
        pipe.execute()

    def _keep(self, pipe: Any, event: Event, ttl: int) -> None:
        """The body and lineage links, expiring; a link lives as long as its longest body."""
        event_id = str(event.event_id)
        pipe.set(self._body_key(event_id), event.model_dump_json(), ex=ttl)
        links = [self._artifact_key(ident) for ident in sorted(artifact_ids(event))]
        if event.causation_id:
            links.append(self._children_key(event.causation_id))
        for link in links:
            pipe.sadd(link, event_id)
            pipe.expire(link, ttl, gt=True)  # gt: a short-lived body never shortens a link
            pipe.expire(link, ttl, nx=True)  # nx: a new set gets one

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
        """An event by id, or None if it was never recorded or has expired."""
        body = cast(bytes | None, self.client.get(self._body_key(event_id)))
        return parse_event(body) if body else None

    def mentioning(self, ident: str) -> list[Event]:
        """The events that name an artifact (batch, feature set or model id), oldest first."""
        return self._events(cast(set[bytes], self.client.smembers(self._artifact_key(ident))))

    def caused_by(self, event_id: UUID | str) -> list[Event]:
        """The events directly caused by an event."""
        return self._events(cast(set[bytes], self.client.smembers(self._children_key(event_id))))

    def _events(self, members: set[bytes]) -> list[Event]:
        keys = [self._body_key(m.decode()) for m in sorted(members)]
        bodies = cast(list[bytes | None], self.client.mget(keys) if keys else [])
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
    """The stream entry of an event: its envelope and payload (a bulky one's size only)."""
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
    if isinstance(event, ScoreServed):
        return {"scores": len(event.scores)}  # the scores themselves: monitoring's business
    if isinstance(event, RecordsObserved):  # up to 10,000 records: the stream's entries
        return {"dataset": event.dataset, "records": len(event.records)}  # stay small
    envelope = set(Event.model_fields)
    return {k: v for k, v in event.model_dump(mode="json").items() if k not in envelope}


def _decoded(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


class EventLogService(Service):
    """Subscribes to every event type and records each event in the event log.

    Its handler is idempotent (the same body, the same links; a redelivered event only
    repeats its stream entry), so it keeps no record of processed events: that record
    would be a key per event for ``processed_ttl_s`` (7 days), ~100 bytes each, ~5 GB
    at 90 events/s, and two Redis round trips per event."""

    name = "eventlog"
    needs_processed_record = False

    def __init__(self, event_log: EventLog) -> None:
        self.event_log = event_log

    def handler_specs(self) -> dict[str, HandlerSpec]:
        return {t: HandlerSpec(t, self.on_event) for t in EVENT_TYPES}

    def on_event(self, event: Event) -> None:
        """Record the event; it causes nothing."""
        self.event_log.record(event)

    def ready(self) -> bool:
        return bool(self.event_log.client.ping())

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Redis's memory, on this service's /metrics: it is the one that writes to Redis
        for every event, and one exporter is enough."""
        registry.register(RedisMemoryCollector(self.event_log.client))


def build(settings: Settings) -> EventLogService:
    """The event-log service for the settings."""
    client = redis.Redis.from_url(settings.redis_url)
    return EventLogService(EventLog.from_settings(client, settings))
