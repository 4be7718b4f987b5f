"""Monitoring's state in Redis: the live view, the outcome join, and decisions already made.

All keys live under ``<namespace>:monitoring:`` and are bounded:

- ``model:<version>`` (hash): the live view of a version (served, latency figures, drift,
  quality...) and its running totals, so a restarted service carries on counting;
  ``versions`` (set) names the versions that have one.
- ``served:<bucket>`` (hash, expires): the request (``R`` and the 16 bytes of scoring's
  uuid4 ids, ``r:<request_id>`` for others) and ``e:<entity_id>`` -> the version, label
  and score of each served score (packed: ~16 bytes; ``_pack``), ~88 bytes of Redis per
  score (122 as JSON with the id as text), written with one HSET per ScoreServed batch,
  in one round trip with the bucket's HLEN and the index (the size bound counts the other
  buckets by what this instance knows of them; ``MonitoringState._known_sizes``).
  A bucket takes the scores of at most ``bucket_s`` (``served_ttl_s / 24``) and at most
  ``bucket_entries`` fields (``served_max_entries / 16``), then the next one opens; it
  expires ``served_ttl_s`` after its last second. ``served_buckets`` (sorted set) names
  the buckets by their first second; an outcome looks its score up in those of the last
  ``served_ttl_s``, newest first (so ``e:`` finds the entity's latest score). Bounded by
  size as well as time: once the buckets hold more than ``served_max_entries`` fields,
  the oldest buckets are dropped, a sixteenth of the bound at a time (the join's window
  shrinks under load, logged), never the bucket being written. Memory stays within about
  ``served_max_entries`` fields plus one batch, whatever the scoring rate.
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
import math
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
BUCKETS_PER_BOUND = 16
"""A bucket closes at this fraction of the size bound: what the bound drops at a time."""


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
        self.bucket_entries = max(1, served_max_entries // BUCKETS_PER_BOUND)
        self._open: tuple[float, str] | None = None  # (first second, key) written to
        self._sizes: dict[str, int] = {}  # fields of the indexed buckets, as last known
        self._warned_at = float("-inf")

    def key(self, *parts: str) -> str:
        """A key of monitoring in this namespace."""
        return ":".join((self.prefix, *parts))

    # -- the outcome join ------------------------------------------------------------

    def remember(
        self, scores: Sequence[ServedScore], views: Mapping[str, Mapping[str, Any]] | None = None,
        now: float | None = None,
    ) -> None:
        """Keep each score's answer by request id and as its entity's latest, for a while;
        with ``views`` (version -> fields), update those live views in the same round trip
        (one in all, but when the size bound drops buckets or buckets of an earlier
        instance are first seen)."""
        now = time.time() if now is None else now
        first_s, key = self._bucket(now)
        index = self.key("served_buckets")
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=_answers(scores))  # type: ignore[arg-type]
        pipe.hlen(key)
        pipe.expire(key, max(1, math.ceil(first_s + self.bucket_s + self.served_ttl_s - now)))
        pipe.zadd(index, {key: first_s})
        pipe.zremrangebyscore(index, "-inf", f"({self._oldest_live(now)}")
        pipe.expire(index, self.served_ttl_s + 2 * self.bucket_s)
        for version, fields in (views or {}).items():
            self._set_live(pipe, version, fields)
        pipe.zrange(index, 0, -1, withscores=True)
        replies = pipe.execute()
        self._sizes[key] = replies[1]
        self._bound([(name.decode(), first) for name, first in replies[-1]], key, now)

    def _bucket(self, now: float) -> tuple[float, str]:
        """The bucket to write into: the open one, or a new one once the open one has
        had its ``bucket_s`` or its ``bucket_entries``."""
        if self._open is not None:
            first_s, key = self._open
            fields = self._sizes.get(key, 0)  # after the last write
            if first_s <= now < first_s + self.bucket_s and fields < self.bucket_entries:
                return self._open
        self._open = (now, self.key("served", str(round(now * 1000))))
        return self._open

    def _oldest_live(self, now: float) -> float:
        """The first second of the oldest bucket that may hold a score of the last
        ``served_ttl_s``."""
        return now - self.served_ttl_s - self.bucket_s

    def _bound(self, buckets: list[tuple[str, float]], written: str, now: float) -> None:
        """Drop the oldest buckets (``buckets``: name and first second, oldest first) while
        all hold more than ``served_max_entries``; never the one written, nor any newer."""
        sizes = self._known_sizes([name for name, _ in buckets])
        total, dropped = sum(sizes.values()), list[str]()
        for name, _ in buckets:
            if total <= self.served_max_entries or name == written:
                break
            dropped.append(name)
            total -= sizes[name]
        if dropped:
            self._drop(dropped, buckets[len(dropped)][1], now)

    def _known_sizes(self, names: list[str]) -> dict[str, int]:
        """The fields of the buckets ``names``, by name. This instance's own are known: the
        one just written by its HLEN, the others as they were when it moved on from them;
        they no longer change, since monitoring runs as one replica (deploy/k8s/base/
        monitoring.yaml), the only writer of its buckets. Any other was written by an
        instance before this one (a restart) and is read once, in one more round trip."""
        unknown = [name for name in names if name not in self._sizes]
        if unknown:
            pipe = self.client.pipeline(transaction=False)
            for name in unknown:
                pipe.hlen(name)
            self._sizes.update(zip(unknown, pipe.execute(), strict=True))
        self._sizes = {name: self._sizes[name] for name in names}  # those pruned: forgotten
        return self._sizes

    def _drop(self, dropped: list[str], kept_from: float, now: float) -> None:
        """Delete the buckets; say so when the join now reaches back less than its TTL."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(*dropped)
        pipe.zrem(self.key("served_buckets"), *dropped)
        pipe.execute()
        if now - kept_from < self.served_ttl_s and now - self._warned_at >= self.bucket_s:
            self._warned_at = now
            log.warning("outcome join state past %d entries: it now joins the last %.0f s "
                        "of scores, not %d (raise CONVEYOR_MONITORING_SERVED_MAX_ENTRIES to "
                        "join more)", self.served_max_entries, now - kept_from,
                        self.served_ttl_s)

    def buckets(self, now: float | None = None) -> list[str]:
        """The keys of the buckets an outcome may find its score in, newest first."""
        now = time.time() if now is None else now
        names = cast(list[bytes], self.client.zrevrangebyscore(
            self.key("served_buckets"), "+inf", f"({self._oldest_live(now)}"))
        return [name.decode() for name in names]

    def served(self, request_id: str | None, entity_id: str, now: float | None = None
               ) -> Served | None:
        """The answer a request got (by its id, else the entity's latest), or None."""
        fields = [f"e:{entity_id}".encode()]
        if request_id:  # and r:<id>, as scoring's ids were written before the packed form
            fields = list(dict.fromkeys([_request_field(request_id),
                                         f"r:{request_id}".encode()]))
        pipe = self.client.pipeline(transaction=False)
        for bucket in self.buckets(now):
            pipe.hmget(bucket, fields)
        found = next((raw for values in pipe.execute() for raw in values if raw is not None),
                     None)
        return None if found is None else _unpack(found)

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


def _answers(scores: Sequence[ServedScore]) -> dict[bytes, bytes]:
    """The join's fields of a batch: each score's answer by request and by entity (a
    ModelInfer row has none: by request only)."""
    mapping: dict[bytes, bytes] = {}
    for score in scores:
        value = _pack(score.model_version, score.label, score.score)
        mapping[_request_field(score.request_id)] = value
        if score.entity_id:
            mapping[f"e:{score.entity_id}".encode()] = value
    return mapping


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
