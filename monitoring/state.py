"""Monitoring's state in Redis: the live view, the outcome join, and decisions already made.

All keys live under ``<namespace>:monitoring:`` and are bounded:

- ``model:<version>`` (hash): the live view of a version (served, latency figures, drift,
  quality...) and its running totals, so a restarted service carries on counting;
  ``versions`` (set) names the versions that have one.
- ``served:<bucket>`` (hash, expires): the request (``R`` and the 16 bytes of scoring's
  uuid4 ids, ``r:<request_id>`` for others) and ``e:<entity_id>`` -> the version, label
  and score of each served score (packed: ~16 bytes; ``_pack``), one hash per time
  bucket, ~88 bytes of Redis per score (122 as JSON with the id as text), written
  with one HSET per ScoreServed batch; an outcome looks its score up in the buckets of
  the last ``served_ttl_s``, newest first (so ``e:`` finds the entity's latest score).
  Bounded by size as well as time: once the buckets hold more than ``served_max_entries``
  fields, the oldest buckets are dropped (the join's window shrinks under load), and a
  current bucket past the bound on its own is emptied (logged). Memory stays within
  about ``served_max_entries`` fields plus one batch, whatever the scoring rate.
- ``outcomes:<version>`` (list, trimmed): the last ``outcome_window`` (predicted,
  observed) pairs of a version.
- ``claim:<what>`` (string, expires): the event that made a decision (retrain, drift
  level, degradation) within its cooldown; ``decided:<event_id>`` (expires): the events
  that decision emitted, so a redelivered cause re-emits exactly them.

Example::

    state = MonitoringState(redis.Redis(), "conveyor", served_ttl_s=86_400)
    state.remember(event.scores)
    state.served(request_id="r-1", entity_id="C42")   # Served("v3", "1", 0.93) or None
    state.claim("retrain", event.event_id, ttl_s=3600) # True once per cooldown (same id: True)
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis

from common.events import Event, ServedScore, parse_event
from monitoring.core import Counters

log = logging.getLogger(__name__)
COUNTER_FIELDS = ("served", "fallbacks", "latency_sum_ms", "latency_min_ms", "latency_max_ms")
SERVED_MAX_ENTRIES = 2_000_000
"""Default bound of the outcome join's fields (two per score: by request, by entity)."""


@dataclass(frozen=True)
class Served:
    """What was answered for a request: the version, the label and the score."""

    version: str
    label: str | None
    score: float


class MonitoringState:
    """Monitoring's keys in one Redis namespace."""

    def __init__(
        self, client: redis.Redis, namespace: str, *, served_ttl_s: int = 86_400,
        outcome_window: int = 500, served_max_entries: int = SERVED_MAX_ENTRIES,
    ) -> None:
        self.client, self.prefix = client, f"{namespace}:monitoring"
        self.served_ttl_s, self.outcome_window = served_ttl_s, outcome_window
        self.served_max_entries = served_max_entries
        self.bucket_s = max(60, served_ttl_s // 24)

    def key(self, *parts: str) -> str:
        """A key of monitoring in this namespace."""
        return ":".join((self.prefix, *parts))

    # -- the outcome join ------------------------------------------------------------

    def remember(
        self, scores: Sequence[ServedScore], views: Mapping[str, Mapping[str, Any]] | None = None,
        now: float | None = None,
    ) -> None:
        """Keep each score's answer by request id and as its entity's latest, for a while;
        with ``views`` (version -> fields), update those live views in the same round trip."""
        mapping: dict[bytes, bytes] = {}
        for score in scores:
            value = _pack(score.model_version, score.label, score.score)
            mapping[_request_field(score.request_id)] = value
            mapping[f"e:{score.entity_id}".encode()] = value
        buckets = [self._bucket_key(b) for b in self._live_buckets(now)]
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(buckets[0], mapping=mapping)  # type: ignore[arg-type]
        pipe.expire(buckets[0], self.served_ttl_s + self.bucket_s)
        for version, fields in (views or {}).items():
            self._set_live(pipe, version, fields)
        for key in buckets:
            pipe.hlen(key)
        sizes = pipe.execute()[-len(buckets):]
        self._bound(buckets, sizes)

    def _bound(self, buckets: list[str], sizes: list[int]) -> None:
        """Drop the oldest buckets while all hold more than ``served_max_entries``."""
        total, dropped = sum(sizes), []
        for key, size in reversed(list(zip(buckets, sizes, strict=True))):  # oldest first
            if total <= self.served_max_entries:
                break
            if size:
                dropped.append(key)
                total -= size
        if dropped:
            if buckets[0] in dropped:  # too many scores for the bound within one bucket
                log.warning("outcome join state past %d entries within %d s: emptied (raise "
                            "CONVEYOR_MONITORING_SERVED_MAX_ENTRIES to join more)",
                            self.served_max_entries, self.bucket_s)
            self.client.delete(*dropped)

    def _live_buckets(self, now: float | None) -> range:
        """The buckets an outcome may find its score in, newest first."""
        newest = self._bucket(now)
        return range(newest, newest - self.served_ttl_s // self.bucket_s - 2, -1)

    def served(self, request_id: str | None, entity_id: str, now: float | None = None
               ) -> Served | None:
        """The answer a request got (by its id, else the entity's latest), or None."""
        fields = [f"e:{entity_id}".encode()]
        if request_id:  # and r:<id>, as scoring's ids were written before the packed form
            fields = list(dict.fromkeys([_request_field(request_id),
                                         f"r:{request_id}".encode()]))
        pipe = self.client.pipeline(transaction=False)
        for bucket in self._live_buckets(now):
            pipe.hmget(self._bucket_key(bucket), fields)
        found = next((raw for values in pipe.execute() for raw in values if raw is not None),
                     None)
        return None if found is None else _unpack(found)

    def _bucket(self, now: float | None) -> int:
        return int((time.time() if now is None else now) // self.bucket_s)

    def _bucket_key(self, bucket: int) -> str:
        return self.key("served", str(bucket))

    # -- outcomes --------------------------------------------------------------------

    def add_outcome(self, version: str, predicted: str, observed: str) -> list[tuple[str, str]]:
        """Add a (predicted, observed) pair to the version's window; the window after it."""
        key = self.key("outcomes", version)
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(key, orjson.dumps([predicted, observed]))
        pipe.ltrim(key, -self.outcome_window, -1)
        pipe.lrange(key, 0, -1)
        pairs = pipe.execute()[-1]
        return [tuple(orjson.loads(raw)) for raw in pairs]  # type: ignore[misc]

    def count_unmatched(self) -> int:
        """One more outcome that matched no served score; the total."""
        return cast(int, self.client.incr(self.key("outcomes_unmatched")))

    def unmatched(self) -> int:
        """How many outcomes matched no served score."""
        return int(cast(bytes | None, self.client.get(self.key("outcomes_unmatched"))) or 0)

    # -- the live view ---------------------------------------------------------------

    def counters(self, version: str) -> Counters | None:
        """The running totals of a version, as last written (None if never)."""
        raw = cast(list[bytes | None],
                   self.client.hmget(self.key("model", version), [*COUNTER_FIELDS, "histogram"]))
        if raw[0] is None:
            return None
        served, fallbacks, total, low, high = (json.loads(v or b"0") for v in raw[:-1])
        histogram = json.loads(raw[-1]) if raw[-1] else Counters().histogram
        return Counters(int(served), int(fallbacks), float(total), float(low), float(high),
                        histogram)

    def write_live(self, version: str, fields: Mapping[str, Any]) -> None:
        """Set fields of a version's live view (each value as JSON)."""
        pipe = self.client.pipeline(transaction=False)
        self._set_live(pipe, version, fields)
        pipe.execute()

    def _set_live(self, pipe: Any, version: str, fields: Mapping[str, Any]) -> None:
        encoded = {name: _encode(value) for name, value in fields.items()}
        pipe.hset(self.key("model", version), mapping=encoded)
        pipe.sadd(self.key("versions"), version)

    def live(self, version: str) -> dict[str, Any]:
        """A version's live view, decoded ({} if none)."""
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.key("model", version)))
        return {name.decode(): _decode(value) for name, value in raw.items()}

    def live_all(self) -> dict[str, dict[str, Any]]:
        """The live view of every version, by version."""
        members = cast(set[bytes], self.client.smembers(self.key("versions")))
        versions = sorted(v.decode() for v in members)
        return {version: self.live(version) for version in versions}

    # -- decisions -------------------------------------------------------------------

    def claim(self, what: str, event_id: object, ttl_s: int) -> bool:
        """Whether the event ``event_id`` may make decision ``what`` now: the first in a
        cooldown of ``ttl_s`` takes it, and the same event asking again still has it."""
        key, owner = self.key("claim", what), str(event_id)
        if self.client.set(key, owner, nx=True, ex=max(1, ttl_s)):
            return True
        held = cast(bytes | None, self.client.get(key))
        return held is not None and held.decode() == owner

    def record_decisions(self, cause_id: object, events: Sequence[Event], ttl_s: int) -> None:
        """Remember the events a cause emitted (their ids are derived from the cause's)."""
        body = orjson.dumps([json.loads(event.to_json()) for event in events])
        self.client.set(self.key("decided", str(cause_id)), body, ex=max(1, ttl_s))

    def decisions(self, cause_id: object) -> list[Event] | None:
        """The events a cause emitted before (None if it emitted none, or was never seen)."""
        raw = cast(bytes | None, self.client.get(self.key("decided", str(cause_id))))
        return None if raw is None else [parse_event(data) for data in orjson.loads(raw)]


def _request_field(request_id: str) -> bytes:
    """The join's field of a request: scoring's own ids (uuid4 hex) as ``R`` and their 16
    bytes, any other as ``r:<id>`` (24 bytes less per score in Redis's allocations)."""
    if len(request_id) == 32:
        try:
            return b"R" + bytes.fromhex(request_id)
        except ValueError:
            pass
    return f"r:{request_id}".encode()


def _pack(version: str, label: str | None, score: float) -> bytes:
    """A served answer in ~16 bytes: a zero byte, the score as a float64, the version and
    (if any) a unit separator and the label; JSON if a text holds the separator."""
    if "\x1f" in version or (label is not None and "\x1f" in label):
        return orjson.dumps([version, label, score])
    text = version if label is None else f"{version}\x1f{label}"
    return b"\x00" + struct.pack("<d", score) + text.encode()


def _unpack(raw: bytes) -> Served:
    """``_pack``'s answer back (or an answer written as JSON, as it was before)."""
    if not raw.startswith(b"\x00"):
        version, label, score = orjson.loads(raw)
        return Served(version, label, float(score))
    (score,) = struct.unpack("<d", raw[1:9])
    version, separator, label = raw[9:].decode().partition("\x1f")
    return Served(version, label if separator else None, score)


def _encode(value: Any) -> str:
    return json.dumps(value, default=str)  # NaN and Infinity included, as json reads them


def _decode(raw: bytes) -> Any:
    text = raw.decode()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
