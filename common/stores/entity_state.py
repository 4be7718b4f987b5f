"""Entity state for streamed aggregates: each entity's recent values, bounded, in Redis.

A feature set's entity aggregates ("amount summed over 24 h", "mean of the last 5") are
computed at read time from the entity's recent history, so that a read at time t gives
what the offline transform gives a row at t. That history is this store's state: per
(feature set, entity), the entries the widest window still needs, each ``Entry(time_us,
record_id, values)`` (the aggregated columns' values of one record), sorted by event time,
ties in arrival order.

``apply`` merges new entries atomically, per entity, in a Lua script call (a few dozen
entities a call); the calls of a whole record batch go in one pipeline (one round
trip). For each entity the script

- skips an entry whose record id the state already holds (redelivery, duplicates);
- refuses a record older than the entity's newest minus ``late_tolerance_us`` (counted
  as late; -1 accepts any time, which batch materialisation uses);
- keeps what a read at any time from ``newest - tolerance_us`` on needs: every entry
  within the tolerance, the ``max_count`` before it and those within ``max_span_us``
  before it; the rest is dropped;
- sets the key's TTL (``ttl_s``), so an idle entity's state expires (Redis enforces it on
  every read).

``MemoryEntityState`` has the same semantics for unit tests and library use. Example::

    state = RedisEntityState(redis.Redis(), "conveyor")
    retention = Retention(max_count=5, max_span_us=86_400_000_000, tolerance_us=0, ttl_s=90_000)
    state.apply("fs1", {"C1": [Entry(1_700_000_000_000_000, "r1", (12.5,))]}, retention)
    state.read("fs1", ["C1", "C2"])        # [[Entry(...)], None]
"""

from __future__ import annotations

import bisect
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import redis
from redis.exceptions import NoScriptError

from common.errors import InvalidInput
from common.stores._fs import check_id


class Entry(NamedTuple):
    """One record's part of an entity's state."""

    time_us: int
    """Event time, epoch microseconds (the order; ties keep arrival order)."""
    record_id: str
    """What duplicates share: no spaces, no newlines."""
    values: tuple[float, ...]
    """The aggregated columns' values, in the plan's slot order (NaN: missing)."""


@dataclass(frozen=True)
class Retention:
    """How much of an entity's history its feature set's windows need, and for how long."""

    max_count: int = 0
    """The largest last-N window (0: none)."""
    max_span_us: int | None = None
    """The largest time window, microseconds (None: none)."""
    tolerance_us: int = 0
    """How late (behind the entity's newest record) a record may arrive and still count."""
    ttl_s: int = 0
    """An idle entity's state expires after this long (0: never)."""


@dataclass(frozen=True)
class Applied:
    """What one ``apply`` did."""

    applied: int = 0
    duplicates: int = 0
    late: int = 0
    late_records: tuple[str, ...] = ()
    """The record ids refused as late."""

    def __add__(self, other: Applied) -> Applied:
        return Applied(self.applied + other.applied, self.duplicates + other.duplicates,
                       self.late + other.late, self.late_records + other.late_records)


def state_key(namespace: str, feature_set_id: str, entity_id: object) -> bytes:
    """The Redis key of one entity's state in one feature set."""
    return f"{namespace}:st:{feature_set_id}:{entity_id}".encode()


def state_ready_key(namespace: str, feature_set_id: str) -> bytes:
    """The Redis key that marks a feature set's batch state written."""
    return f"{namespace}:stready:{feature_set_id}".encode()


def encode_entry(entry: Entry) -> bytes:
    """``time id [v1,v2,...]``: the values as a JSON array of shortest round-trip floats
    (every value reads back exactly), null for a missing one."""
    values = orjson.dumps([None if v != v else v for v in entry.values])
    return b"%d %s %s" % (entry.time_us, entry.record_id.encode(), values)


def decode_entries(raw: bytes) -> list[Entry]:
    """The entries of a stored state, in stored order."""
    entries = []
    for line in raw.split(b"\n"):
        time_us, record_id, values = line.split(b" ", 2)
        entries.append(Entry(int(time_us), record_id.decode(),
                             tuple(math.nan if v is None else v for v in orjson.loads(values))))
    return entries


def check_record_id(record_id: str) -> str:
    """A record id as the state can hold it, else ``InvalidInput``."""
    if not _ONE_WORD.fullmatch(record_id):
        raise InvalidInput(f"record id {record_id!r} is empty or holds white space")
    return record_id


_ONE_WORD = re.compile(r"\S+")


class EntityStateStore(ABC):
    """Per (feature set, entity), the recent entries its aggregates are read from."""

    @abstractmethod
    def apply(self, feature_set_id: str, updates: Mapping[str, Sequence[Entry]],
              retention: Retention, *, late_tolerance_us: int | None = None) -> Applied:
        """Merge each entity's new entries (see the module docstring); atomic per entity.
        ``late_tolerance_us`` defaults to the retention's; -1 accepts any time."""

    @abstractmethod
    def read(self, feature_set_id: str, entity_ids: Sequence[str]) -> list[list[Entry] | None]:
        """Each entity's entries in order (None: no state, or expired); one round trip."""

    def write_batch_states(self, feature_set_id: str, entities: Sequence[str],
                           states: Sequence[bytes], retention: Retention) -> Applied:
        """Batch materialisation: each entity's encoded state (``encode_entry`` lines,
        newline-joined), merged with what the stream wrote, any time accepted."""
        updates = {entity: decode_entries(state) for entity, state in zip(
            entities, states, strict=True)}
        return self.apply(feature_set_id, updates, retention, late_tolerance_us=-1)

    @abstractmethod
    def mark_ready(self, feature_set_id: str) -> None:
        """Record that the feature set's batch state is written: reads may use it."""

    @abstractmethod
    def is_ready(self, feature_set_id: str) -> bool:
        """Whether the feature set's batch state is written."""


_MERGE_LUA = """
-- ARGV[1..5]: ttl_s, late_tolerance_us (-1: accept any time), tolerance_us, span_us
-- (-1: no time window), max_count. merge(key, lines) merges new "time id values" lines
-- into one entity's state; the counts are summed into applied, duplicates and late.
local ttl, late_tol, tol = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local span, keep_n = tonumber(ARGV[4]), tonumber(ARGV[5])
local applied, duplicates, late = 0, 0, {}
local function parse(line)
  local first = string.find(line, ' ', 1, true)
  local second = string.find(line, ' ', first + 1, true) or (#line + 1)
  return tonumber(string.sub(line, 1, first - 1)), string.sub(line, first + 1, second - 1)
end
local function store(key, value)
  if ttl > 0 then
    redis.call('SET', key, value, 'EX', ttl)
  else
    redis.call('SET', key, value)
  end
end
local function merge(key, new_lines)
  local lines, times, ids = {}, {}, {}
  local old = redis.call('GET', key)
  if old then
    for line in string.gmatch(old, '[^\\n]+') do
      local t, id = parse(line)
      lines[#lines + 1], times[#times + 1], ids[id] = line, t, true
    end
  end
  for _, line in ipairs(new_lines) do
    local t, id = parse(line)
    if ids[id] then
      duplicates = duplicates + 1
    elseif late_tol >= 0 and #times > 0 and t < times[#times] - late_tol then
      late[#late + 1] = id
    else
      local at = #times + 1  -- after every entry timed at or before t: ties keep arrival order
      while at > 1 and times[at - 1] > t do at = at - 1 end
      table.insert(lines, at, line)
      table.insert(times, at, t)
      ids[id] = true
      applied = applied + 1
    end
  end
  if #lines == 0 then return end
  local cut = times[#times] - tol
  local first_recent = #times + 1
  while first_recent > 1 and times[first_recent - 1] >= cut do first_recent = first_recent - 1 end
  local start = math.max(1, first_recent - keep_n)
  if span >= 0 then
    local since = 1
    while since <= #times and times[since] < cut - span do since = since + 1 end
    start = math.min(start, since)
  end
  store(key, table.concat(lines, '\\n', start, #lines))
end
"""

_APPLY_LUA = _MERGE_LUA + """
-- KEYS: entities' states. ARGV[6..5+#KEYS]: how many new entries each key gets, then
-- those entries, one line each, key by key. Returns {applied, duplicates, late ids...}.
local next_entry = 6 + #KEYS
for k = 1, #KEYS do
  local count = tonumber(ARGV[5 + k])
  local new_lines = {}
  for i = next_entry, next_entry + count - 1 do new_lines[#new_lines + 1] = ARGV[i] end
  merge(KEYS[k], new_lines)
  next_entry = next_entry + count
end
return {applied, duplicates, unpack(late)}
"""

_BATCH_LUA = _MERGE_LUA + """
-- KEYS: entities' states. ARGV[6]: their new states (already pruned), newline-joined
-- lines, one state per key, separated by a 0x1e byte. A key the stream has not written
-- yet is set at once; one it has is merged (late_tolerance_us should be -1 here).
-- Returns {applied, duplicates, late ids...}: applied counts a key set at once as one,
-- and a merged key's applied entries.
local packed, at = ARGV[6], 1
local any_written = redis.call('EXISTS', unpack(KEYS)) > 0  -- most often none: a new set
for k = 1, #KEYS do
  local stop = string.find(packed, '\\30', at, true) or (#packed + 1)
  local state = string.sub(packed, at, stop - 1)
  at = stop + 1
  if not any_written or redis.call('EXISTS', KEYS[k]) == 0 then
    store(KEYS[k], state)
    applied = applied + 1
  else
    local new_lines = {}
    for line in string.gmatch(state, '[^\\n]+') do new_lines[#new_lines + 1] = line end
    merge(KEYS[k], new_lines)
  end
end
return {applied, duplicates, unpack(late)}
"""
BATCH_KEYS_PER_CALL = 500
"""Keys of one batch-write script call (Lua's ``unpack`` takes a few thousand)."""
STATE_SEPARATOR = b"\x1e"
"""Between entities' states in a batch write (never in a state: ids and JSON hold none)."""


class RedisEntityState(EntityStateStore):
    """Entity state in Redis: one string key per (feature set, entity) holding its entries.

    The client must return bytes (``decode_responses=False``). A script call merges
    ``entities_per_call`` entities (fewer calls: less per-call work on both sides); on
    Redis Cluster set it to 1, as a script may only touch keys of one slot.
    """

    def __init__(self, redis_client: redis.Redis, namespace: str = "conveyor", *,
                 entities_per_call: int = 64) -> None:
        if redis_client.get_encoder().decode_responses:
            raise InvalidInput("RedisEntityState needs a Redis client with decode_responses=False")
        self._redis, self._namespace = redis_client, namespace
        self._per_call = max(1, entities_per_call)
        self._shas = {script: redis_client.register_script(script).sha
                      for script in (_APPLY_LUA, _BATCH_LUA)}

    def apply(self, feature_set_id: str, updates: Mapping[str, Sequence[Entry]],
              retention: Retention, *, late_tolerance_us: int | None = None) -> Applied:
        """See ``EntityStateStore.apply``: one pipeline of script calls (one round trip),
        each merging ``entities_per_call`` entities."""
        check_id("feature set id", feature_set_id)
        late = retention.tolerance_us if late_tolerance_us is None else late_tolerance_us
        head = _head(retention, late)
        work = [(state_key(self._namespace, feature_set_id, entity), entries)
                for entity, entries in updates.items() if entries]
        if not work:
            return Applied()
        calls = [_script_call(work[first:first + self._per_call], head)
                 for first in range(0, len(work), self._per_call)]
        return sum((_applied(reply) for reply in self._run(calls)), Applied())

    def write_batch_states(self, feature_set_id: str, entities: Sequence[str],
                           states: Sequence[bytes], retention: Retention) -> Applied:
        """Batch materialisation: each entity's encoded, pruned state (``encode_entry``
        lines joined by newlines), set at once where the stream has written nothing yet,
        merged (any time accepted) where it has. ``BATCH_KEYS_PER_CALL`` keys a call (1
        when ``entities_per_call`` is 1), one argument holding their states. ``applied``
        counts a state set at once as one, and a merged one's new entries."""
        check_id("feature set id", feature_set_id)
        head = _head(retention, -1)
        self._redis.script_load(_BATCH_LUA)  # once, before the pipelines race to load it
        per_call = BATCH_KEYS_PER_CALL if self._per_call > 1 else 1
        prefix = state_key(self._namespace, feature_set_id, "").decode()
        calls = [([f"{prefix}{e}" for e in entities[first:first + per_call]],
                  [*head, STATE_SEPARATOR.join(states[first:first + per_call])])
                 for first in range(0, len(entities), per_call)]
        batches = [calls[i:i + 20] for i in range(0, len(calls), 20)]  # ~10,000 entities
        # Two pipelines in flight: the next is encoded and sent while Redis runs the last.
        with ThreadPoolExecutor(2) as pool:
            replies = [r for done in pool.map(lambda b: self._run(b, _BATCH_LUA), batches)
                       for r in done]
        return sum((_applied(r) for r in replies), Applied())

    def mark_ready(self, feature_set_id: str) -> None:
        """See ``EntityStateStore.mark_ready``: a key beside the states, no TTL."""
        self._redis.set(state_ready_key(self._namespace, feature_set_id), 1)

    def is_ready(self, feature_set_id: str) -> bool:
        """See ``EntityStateStore.is_ready``."""
        return bool(self._redis.exists(state_ready_key(self._namespace, feature_set_id)))

    def read(self, feature_set_id: str, entity_ids: Sequence[str]) -> list[list[Entry] | None]:
        """See ``EntityStateStore.read``: one MGET."""
        if not entity_ids:
            return []
        keys = [state_key(self._namespace, feature_set_id, e) for e in entity_ids]
        raws: list[bytes | None] = self._redis.mget(keys)  # type: ignore[assignment]
        return [None if raw is None else decode_entries(raw) for raw in raws]

    def _run(self, calls: list[tuple[list[bytes], list[Any]]],
             script: str = _APPLY_LUA) -> list[Any]:
        sha = self._shas[script]
        try:
            return self._pipeline(calls, sha).execute()
        except NoScriptError:
            # The server lost its scripts (a restart): load it, then run again. Safe: a
            # repeated entry is a duplicate by its record id.
            self._redis.script_load(script)
            return self._pipeline(calls, sha).execute()

    def _pipeline(self, calls: list[tuple[list[bytes], list[Any]]], sha: str) -> Any:
        pipe = self._redis.pipeline(transaction=False)  # each script call is atomic alone
        for keys, args in calls:
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        return pipe


def _head(retention: Retention, late_tolerance_us: int) -> tuple[int, ...]:
    """The scripts' first five arguments."""
    return (retention.ttl_s, late_tolerance_us, retention.tolerance_us,
            -1 if retention.max_span_us is None else retention.max_span_us,
            retention.max_count)


def _script_call(work: list[tuple[bytes, Sequence[Entry]]],
                 head: tuple[int, ...]) -> tuple[list[bytes], list[Any]]:
    """The keys and arguments of one script call: the head, each key's entry count,
    then every key's encoded entries in order."""
    keys = [key for key, _ in work]
    lines = [encode_entry(entry) for _, entries in work for entry in entries]
    return keys, [*head, *(len(entries) for _, entries in work), *lines]


def _applied(reply: list[Any]) -> Applied:
    late = tuple(r.decode() if isinstance(r, bytes) else str(r) for r in reply[2:])
    return Applied(int(reply[0]), int(reply[1]), len(late), late)


class MemoryEntityState(EntityStateStore):
    """``RedisEntityState``'s semantics in a dict (TTL on the monotonic clock)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._states: dict[tuple[str, str], tuple[list[Entry], float]] = {}
        self._clock = clock
        self._ready: set[str] = set()

    def mark_ready(self, feature_set_id: str) -> None:
        """See ``EntityStateStore.mark_ready``."""
        self._ready.add(feature_set_id)

    def is_ready(self, feature_set_id: str) -> bool:
        """See ``EntityStateStore.is_ready``."""
        return feature_set_id in self._ready

    def apply(self, feature_set_id: str, updates: Mapping[str, Sequence[Entry]],
              retention: Retention, *, late_tolerance_us: int | None = None) -> Applied:
        """See ``EntityStateStore.apply``."""
        late = retention.tolerance_us if late_tolerance_us is None else late_tolerance_us
        total = Applied()
        for entity, entries in updates.items():
            if not entries:
                continue
            held = self._live(feature_set_id, entity) or []
            merged, result = merge_entries(held, entries, late)
            kept = prune_entries(merged, retention)
            expires = self._clock() + retention.ttl_s if retention.ttl_s else math.inf
            if kept:
                self._states[(feature_set_id, entity)] = (kept, expires)
            total += result
        return total

    def read(self, feature_set_id: str, entity_ids: Sequence[str]) -> list[list[Entry] | None]:
        """See ``EntityStateStore.read``."""
        return [self._live(feature_set_id, e) for e in entity_ids]

    def _live(self, feature_set_id: str, entity: str) -> list[Entry] | None:
        held = self._states.get((feature_set_id, entity))
        if held is None or held[1] <= self._clock():
            return None
        return list(held[0])


def merge_entries(held: Sequence[Entry], new: Sequence[Entry],
                  late_tolerance_us: int) -> tuple[list[Entry], Applied]:
    """The Lua script's merge: duplicates skipped, late records refused, ties after."""
    merged, ids = list(held), {e.record_id for e in held}
    applied = duplicates = 0
    late: list[str] = []
    for entry in new:
        if entry.record_id in ids:
            duplicates += 1
        elif late_tolerance_us >= 0 and merged and \
                entry.time_us < merged[-1].time_us - late_tolerance_us:
            late.append(entry.record_id)
        else:
            at = bisect.bisect_right([e.time_us for e in merged], entry.time_us)
            merged.insert(at, entry)
            ids.add(entry.record_id)
            applied += 1
    return merged, Applied(applied, duplicates, len(late), tuple(late))


def prune_entries(entries: Sequence[Entry], retention: Retention) -> list[Entry]:
    """The Lua script's pruning: what a read from ``newest - tolerance`` on still needs."""
    if not entries:
        return []
    times = [e.time_us for e in entries]
    cut = times[-1] - retention.tolerance_us
    first_recent = bisect.bisect_left(times, cut)
    start = max(0, first_recent - retention.max_count)
    if retention.max_span_us is not None:
        start = min(start, bisect.bisect_left(times, cut - retention.max_span_us))
    return list(entries[start:])


class StreamTargets(ABC):
    """The feature sets whose entity state the stream keeps, per dataset, oldest first."""

    @abstractmethod
    def add(self, dataset: str, feature_set_id: str) -> None:
        """Keep ``feature_set_id`` up to date from ``dataset``'s records (idempotent)."""

    @abstractmethod
    def of(self, dataset: str) -> list[str]:
        """The feature sets kept from ``dataset``'s records, oldest first."""

    @abstractmethod
    def remove(self, dataset: str, feature_set_ids: Sequence[str]) -> None:
        """Stop keeping these feature sets (their state then expires with its TTL)."""


class RedisStreamTargets(StreamTargets):
    """``StreamTargets`` in Redis: a sorted set per dataset, scored by when each set was
    added."""

    def __init__(self, redis_client: redis.Redis, namespace: str = "conveyor") -> None:
        self._redis, self._namespace = redis_client, namespace

    def add(self, dataset: str, feature_set_id: str) -> None:
        self._redis.zadd(self._key(dataset), {check_id("feature set id", feature_set_id):
                                              time.time()}, nx=True)

    def of(self, dataset: str) -> list[str]:
        members: list[bytes] = self._redis.zrange(self._key(dataset), 0, -1)  # type: ignore[assignment]
        return [m.decode() if isinstance(m, bytes) else str(m) for m in members]

    def remove(self, dataset: str, feature_set_ids: Sequence[str]) -> None:
        if feature_set_ids:
            self._redis.zrem(self._key(dataset), *feature_set_ids)

    def _key(self, dataset: str) -> str:
        return f"{self._namespace}:stream:{check_id('dataset', dataset)}"


class MemoryStreamTargets(StreamTargets):
    """``StreamTargets`` in a dict, for unit tests and library use."""

    def __init__(self) -> None:
        self._sets: dict[str, list[str]] = {}

    def add(self, dataset: str, feature_set_id: str) -> None:
        held = self._sets.setdefault(dataset, [])
        if feature_set_id not in held:
            held.append(feature_set_id)

    def of(self, dataset: str) -> list[str]:
        return list(self._sets.get(dataset, []))

    def remove(self, dataset: str, feature_set_ids: Sequence[str]) -> None:
        self._sets[dataset] = [f for f in self._sets.get(dataset, []) if f not in feature_set_ids]
