"""Feature store: feature sets offline as Parquet, their latest rows online in Redis.

Offline, ``OfflineFeatureStore`` keeps ``features/<feature_set_id>/`` under the data root:
the frame as Parquet, optionally each entity's latest values for the online store
(``online.parquet``), and a metadata JSON written last (it marks the set complete).

Online, ``OnlineFeatureStore`` is the small interface the scoring path needs and
``RedisOnlineStore`` its Redis adapter. Each (feature set, entity) is one Redis hash at
``online_key(...)`` (``<namespace>:fs:<feature_set_id>:<entity_id>``) with two fields:
``_ts``, the row's event time in epoch microseconds, and ``_v``, the row as a JSON array
in the order of the feature set's schema, stored once at ``online_schema_key(...)``
(see ``common.stores._codec``). One encoded field per entity instead of one per feature
keeps Redis's work per entity small: a materialisation is bounded by the server, which
spends most of its time per hash field. Writes run a Lua script through non-transactional
pipelines, a few dozen entities per script call, so that per key, atomically, an older
row never replaces a newer one (an equal time overwrites: rematerialising is idempotent)
and the TTL is set. A script call packs its rows into one argument (and their times
into another, or one time for all), so the client sends about one argument per entity,
its key; a call whose keys are all new (a new feature set) skips the per-key time check.
A read of any number of entities is one round trip. Once every entity of a set is
written, the writer marks the set complete (``online_complete_key``, holding the count),
which is what evaluation waits for before promoting a model of the set. Example::

    online = RedisOnlineStore(redis.Redis.from_url(settings.redis_url), settings.namespace)
    online.materialize("fs1", frame, entity_column="account", timestamp_column="at")
    online.read("fs1", ["C1", "C2"])     # [{"amount": 12.5, ...}, None]  (None: unknown)

    offline = OfflineFeatureStore(settings.data_root)
    offline.write("fs1", frame, {"spec": "..."})
    offline.read("fs1", columns=["amount"])
"""

from __future__ import annotations

import builtins
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
import redis
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from redis.client import Pipeline
from redis.exceptions import NoScriptError

from common.errors import InvalidInput, NotFound
from common.events import utc_now
from common.stores._codec import RowSchema, encode_rows, timestamps_us
from common.stores._fs import RootedStore, check_id

Command = tuple[Any, ...]
FIELD_TS = "_ts"
"""Hash field holding the row's event time, epoch microseconds."""
FIELD_ROW = "_v"
"""Hash field holding the row, a JSON array in schema order."""

_WRITE_LUA = """
-- KEYS: one hash per entity. ARGV[1]: TTL in seconds (0: none). ARGV[2]: the event time
-- (epoch microseconds) of every row, or one per key, newline-separated. ARGV[3]: one row
-- per key, in order, newline-separated (encoded JSON never holds a raw newline). The keys
-- are distinct. Returns how many rows were written.
local ttl, times, rows = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local shared = not string.find(times, '\\n', 1, true)
-- No key exists yet (a new feature set): no stored time to compare with.
local fresh = redis.call('EXISTS', unpack(KEYS)) == 0
local written, row_at, ts_at, ts = 0, 1, 1, times
for i = 1, #KEYS do
  local row_end = string.find(rows, '\\n', row_at, true) or #rows + 1
  local row = string.sub(rows, row_at, row_end - 1)
  row_at = row_end + 1
  if not shared then
    local ts_end = string.find(times, '\\n', ts_at, true) or #times + 1
    ts = string.sub(times, ts_at, ts_end - 1)
    ts_at = ts_end + 1
  end
  local key = KEYS[i]
  local old = not fresh and redis.call('HGET', key, '_ts')
  if not old or tonumber(old) <= tonumber(ts) then
    redis.call('HSET', key, '_ts', ts, '_v', row)
    if ttl > 0 then
      redis.call('EXPIRE', key, ttl)
    elseif old then
      redis.call('PERSIST', key)
    end
    written = written + 1
  end
end
return written
"""
MAX_ENTITIES_PER_CALL = 1000
"""A script call's keys go through Lua's ``unpack``, whose stack is bounded."""


@dataclass(frozen=True)
class Partitioned:
    """A lazy Dask frame and the rows of each of its partitions, in order."""

    frame: Any
    lengths: list[int]


def _row_group(uri: str, group: int, columns: list[str] | None) -> pd.DataFrame:
    """One row group of a Parquet file, read where the task runs."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as handle:
        return pq.ParquetFile(handle).read_row_group(group, columns=columns).to_pandas()


def _empty(schema: Any, columns: list[str] | None) -> pd.DataFrame:
    table = schema.empty_table()
    return (table.select(columns) if columns else table).to_pandas()


def online_key(namespace: str, feature_set_id: str, entity_id: object) -> bytes:
    """The Redis key of one entity's hash in one feature set."""
    return f"{key_prefix(namespace, feature_set_id)}{entity_id}".encode()


def key_prefix(namespace: str, feature_set_id: str) -> str:
    """What every entity key of a feature set starts with."""
    return f"{namespace}:fs:{feature_set_id}:"


def online_schema_key(namespace: str, feature_set_id: str) -> bytes:
    """The Redis key of a feature set's row schema (feature names and kinds)."""
    return f"{namespace}:fsmeta:{feature_set_id}".encode()


def completed_sets_key(namespace: str) -> str:
    """The sorted set of completed feature sets, scored by completion time (epoch s)."""
    return f"{namespace}:fssets"


def online_complete_key(namespace: str, feature_set_id: str) -> bytes:
    """The Redis key that marks a feature set's online rows complete (it holds their count)."""
    return f"{namespace}:fsdone:{feature_set_id}".encode()


def latest_rows(
    frame: pd.DataFrame, entity_column: str, timestamp_column: str | None
) -> pd.DataFrame:
    """The last row of each entity: latest by ``timestamp_column``, else by position."""
    if frame[entity_column].is_unique:
        return frame
    ordered = (
        frame if timestamp_column is None else frame.sort_values(timestamp_column, kind="stable")
    )
    return ordered.drop_duplicates(entity_column, keep="last")


class OnlineFeatureStore(ABC):
    """The latest feature values per entity, for serving."""

    @abstractmethod
    def write_batch(
        self,
        feature_set_id: str,
        frame: pd.DataFrame,
        entity_column: str,
        *,
        timestamp_column: str | None = None,
        event_time: datetime | None = None,
        ttl_s: int | None = None,
    ) -> int:
        """Write each entity's row (every column but the entity and timestamp ones).

        The event time comes from ``timestamp_column``, else ``event_time``, else now; a
        row older than the stored one is skipped, an equal one overwrites. Of an entity
        that appears more than once, only the latest row (by time, then position) counts.
        Returns how many rows were written.
        """

    @abstractmethod
    def read(
        self, feature_set_id: str, entity_ids: Sequence[Any], features: Sequence[str] | None = None
    ) -> list[dict[str, Any] | None]:
        """The features of each entity, in order; None for an entity with no row."""

    @abstractmethod
    def mark_complete(self, feature_set_id: str, rows: int) -> None:
        """Record that every entity of the feature set has been written (``rows`` of them)."""

    @abstractmethod
    def is_complete(self, feature_set_id: str) -> bool:
        """Whether the feature set was marked complete."""

    def wait_complete(self, feature_set_id: str, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Whether the feature set is (or becomes) complete within ``timeout_s``.

        Polls ``is_complete``: the writer is another service, with nothing to wait on."""
        deadline = time.monotonic() + timeout_s
        while not self.is_complete(feature_set_id):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def materialize(
        self,
        feature_set_id: str,
        frame: pd.DataFrame,
        entity_column: str,
        timestamp_column: str | None = None,
        *,
        ttl_s: int | None = None,
    ) -> int:
        """Write the latest row of each entity of ``frame``; returns the rows written."""
        latest = latest_rows(frame, entity_column, timestamp_column)
        return self.write_batch(
            feature_set_id, latest, entity_column, timestamp_column=timestamp_column, ttl_s=ttl_s
        )

    def read_frame(
        self, feature_set_id: str, entity_ids: Sequence[Any], features: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """``read`` as a DataFrame indexed by entity id; an unknown entity is a row of NaN."""
        rows = self.read(feature_set_id, entity_ids, features)
        columns = list(features) if features else next((list(r) for r in rows if r), [])
        index = pd.Index(list(entity_ids), name="entity_id")
        return pd.DataFrame([r or {} for r in rows], index=index, columns=columns)


class RedisOnlineStore(OnlineFeatureStore):
    """The online feature store in Redis: one hash per (feature set, entity).

    The client must return bytes (``decode_responses=False``). ``default_ttl_s`` applies
    when a write names no TTL (0: keys never expire). ``entities_per_call`` bounds how long
    one script call holds the server (about 0.2 ms for 64 entities); a pipeline carries
    ``entities_per_pipeline`` entities, and ``write_concurrency`` pipelines are in flight
    at once on their own connections, so the client encodes the next one while Redis runs
    the last (entities are de-duplicated first, so the order of pipelines cannot matter).
    On Redis Cluster set ``entities_per_call=1``: a script call may only touch keys of one
    slot.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        namespace: str = "conveyor",
        default_ttl_s: int = 0,
        *,
        entities_per_call: int = 64,
        entities_per_pipeline: int = 4096,
        write_concurrency: int = 2,
    ):
        if redis_client.get_encoder().decode_responses:
            raise InvalidInput("RedisOnlineStore needs a Redis client with decode_responses=False")
        if not 1 <= entities_per_call <= MAX_ENTITIES_PER_CALL:
            raise InvalidInput(f"entities_per_call must be 1 to {MAX_ENTITIES_PER_CALL}, "
                               f"not {entities_per_call}")
        self._redis = redis_client
        self._namespace = namespace
        self._default_ttl_s = default_ttl_s
        self._per_call = entities_per_call
        self._per_pipeline = entities_per_pipeline
        self._concurrency = max(1, write_concurrency)
        self._write_script = redis_client.register_script(_WRITE_LUA)
        self._schemas: dict[str, RowSchema] = {}

    def write_batch(
        self,
        feature_set_id: str,
        frame: pd.DataFrame,
        entity_column: str,
        *,
        timestamp_column: str | None = None,
        event_time: datetime | None = None,
        ttl_s: int | None = None,
    ) -> int:
        """See ``OnlineFeatureStore.write_batch``; ``ttl_s`` None means the default TTL."""
        check_id("feature set id", feature_set_id)
        features = _feature_columns(frame, entity_column, timestamp_column)
        if frame.empty:
            return 0
        frame = latest_rows(frame, entity_column, timestamp_column)
        schema, rows = encode_rows(frame, features)
        keys = self._keys(feature_set_id, frame[entity_column])
        stamps = timestamps_us(frame, timestamp_column, event_time)
        times = stamps if timestamp_column else stamps[0]  # one time for every row
        self._schemas[feature_set_id] = schema
        ttl = self._default_ttl_s if ttl_s is None else ttl_s
        schema_set = ("SET", online_schema_key(self._namespace, feature_set_id), schema.to_json())
        return self._send(schema_set, self._script_calls(keys, rows, times, ttl))

    def read(
        self, feature_set_id: str, entity_ids: Sequence[Any], features: Sequence[str] | None = None
    ) -> list[dict[str, Any] | None]:
        """See ``OnlineFeatureStore.read``: one round trip for any number of entities."""
        schema, rows = self._fetch(feature_set_id, entity_ids)
        if features is not None:
            schema.check(features, feature_set_id)
        try:
            return _decode_all(schema, rows, features)
        except ValueError:
            # Rows no longer match the cached schema: the set was rewritten. Read afresh.
            self._schemas.pop(feature_set_id, None)
            return _decode_all(*self._fetch(feature_set_id, entity_ids), features)

    def mark_complete(self, feature_set_id: str, rows: int) -> None:
        """See ``OnlineFeatureStore.mark_complete``: a key beside the schema, no TTL, and
        the set listed by completion time (``online_retention`` prunes superseded sets)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(online_complete_key(self._namespace, feature_set_id), rows)
        pipe.zadd(completed_sets_key(self._namespace), {feature_set_id: time.time()}, nx=True)
        pipe.execute()

    def is_complete(self, feature_set_id: str) -> bool:
        """See ``OnlineFeatureStore.is_complete``."""
        return bool(self._redis.exists(online_complete_key(self._namespace, feature_set_id)))

    def _fetch(self, feature_set_id: str, entity_ids: Sequence[Any]) -> tuple[RowSchema, list[Any]]:
        prefix = key_prefix(self._namespace, feature_set_id)
        schema = self._schemas.get(feature_set_id)
        if schema is not None and len(entity_ids) == 1:  # a Score: no pipeline to build
            return schema, [self._redis.hget(f"{prefix}{entity_ids[0]}", FIELD_ROW)]
        pipe = self._redis.pipeline(transaction=False)
        if schema is None:
            pipe.get(online_schema_key(self._namespace, feature_set_id))
        for entity in entity_ids:
            pipe.hget(f"{prefix}{entity}", FIELD_ROW)
        replies = pipe.execute()
        if schema is None:
            schema = self._remember(feature_set_id, replies.pop(0))
        return schema, replies

    def _remember(self, feature_set_id: str, raw: bytes | None) -> RowSchema:
        if raw is None:
            raise NotFound("online feature set", feature_set_id)
        schema = self._schemas[feature_set_id] = RowSchema.from_json(raw)
        return schema

    def _keys(self, feature_set_id: str, entities: pd.Series) -> list[str]:
        if entities.isna().any():
            raise InvalidInput(f"entity column {entities.name} has missing values")
        prefix = key_prefix(self._namespace, feature_set_id)
        return [prefix + entity for entity in entities.astype(str).tolist()]

    def _script_calls(
        self, keys: list[str], rows: list[bytes], times: list[bytes] | bytes, ttl: int
    ) -> list[Command]:
        """One script call per ``entities_per_call`` keys: the keys, the TTL, their times
        (or the one time of all) and their rows, each newline-joined into one argument."""
        calls = []
        for first in range(0, len(keys), self._per_call):
            last = min(first + self._per_call, len(keys))
            chunk_times = times if isinstance(times, bytes) else b"\n".join(times[first:last])
            calls.append(("EVALSHA", self._write_script.sha, last - first, *keys[first:last],
                          ttl, chunk_times, b"\n".join(rows[first:last])))
        return calls

    def _send(self, schema_set: Command, calls: list[Command]) -> int:
        """Run the script calls, a pipeline at a time; the first one also sets the schema."""
        per_pipeline = max(1, self._per_pipeline // self._per_call)
        batches = [calls[i : i + per_pipeline] for i in range(0, len(calls), per_pipeline)]
        # The first pipeline alone: the schema is in place before other rows can be read.
        written = sum(self._execute([schema_set, *batches[0]])[1:])
        return written + sum(self._execute_all(batches[1:]))

    def _execute_all(self, batches: list[list[Command]]) -> Iterator[int]:
        if self._concurrency == 1 or len(batches) < 2:
            yield from (sum(self._execute(batch)) for batch in batches)
            return
        with ThreadPoolExecutor(self._concurrency) as pool:
            yield from (sum(replies) for replies in pool.map(self._execute, batches))

    def _execute(self, commands: list[Command]) -> list[Any]:
        try:
            return self._pipeline(commands).execute()
        except NoScriptError:
            # The server has not seen the script yet (or flushed it): load it, run again.
            # Safe: a row written again with its own event time is an idempotent overwrite.
            self._redis.script_load(_WRITE_LUA)
            return self._pipeline(commands).execute()

    def _pipeline(self, commands: list[Command]) -> Pipeline:
        # Non-transactional: no MULTI/EXEC; each script call is atomic on its own.
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe


def _decode_all(
    schema: RowSchema, rows: list[Any], features: Sequence[str] | None
) -> list[dict[str, Any] | None]:
    return [None if raw is None else schema.decode(raw, features) for raw in rows]


def _feature_columns(
    frame: pd.DataFrame, entity_column: str, timestamp_column: str | None
) -> list[str]:
    for name in (entity_column, timestamp_column):
        if name is not None and name not in frame.columns:
            raise InvalidInput(f"frame has no column {name!r}")
    return [str(c) for c in frame.columns if c not in (entity_column, timestamp_column)]


ONLINE_FILE = "online.parquet"
"""Beside a feature set's Parquet: each entity's latest values, for the online store."""


class FeatureSetRecord(BaseModel):
    """What the offline store knows of a feature set; written last, it marks it complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature_set_id: str
    rows: int = Field(ge=0)
    columns: dict[str, str] = Field(description="Column name to pandas dtype, in order.")
    created_at: AwareDatetime
    metadata: dict[str, Any] = Field(default_factory=dict, description="The writer's own.")


class OfflineFeatureStore(RootedStore):
    """Feature sets as Parquet plus a metadata JSON, one folder per feature set id.

    A feature set id is derived from its content, so writing an id again rewrites the
    same data (atomically); callers skip the work with ``exists``.
    """

    def write(
        self, feature_set_id: str, frame: pd.DataFrame, metadata: dict[str, Any],
        online: pd.DataFrame | None = None,
    ) -> FeatureSetRecord:
        """Store a feature set's frame and metadata; returns the record. ``online``, each
        entity's latest values, is kept beside them for the online store to materialise
        (``read_online``). The record is what marks the set complete, so it comes last."""
        folder = f"features/{check_id('feature set id', feature_set_id)}"
        with self._root.atomic_open(f"{folder}/features.parquet") as handle:
            # Numbers and ids: dictionary pages would overflow and fall back (wasted work).
            frame.to_parquet(handle, use_dictionary=False, compression="lz4")
        columns = {str(c): str(t) for c, t in frame.dtypes.items()}
        return self.finish_parts(feature_set_id, len(frame), columns, metadata, online)

    def start_parts(self, feature_set_id: str) -> None:
        """Before a partitioned write (a Dask cluster's workers each write parts): nothing
        of an earlier attempt stays in the set's folder."""
        self._root.remove_tree(f"features/{check_id('feature set id', feature_set_id)}")

    def write_part(self, feature_set_id: str, number: int, frame: pd.DataFrame, *,
                   online: bool = False) -> None:
        """Write part ``number`` of a partitioned feature set (``features.parquet/`` is then
        a folder; the parts in name order are the rows in order), or with ``online`` of its
        online rows (``online.parquet/``: each entity in one part only)."""
        name = ONLINE_FILE if online else "features.parquet"
        folder = f"features/{check_id('feature set id', feature_set_id)}/{name}"
        with self._root.atomic_open(f"{folder}/part-{number:05d}.parquet") as handle:
            frame.to_parquet(handle, use_dictionary=False, compression="lz4")

    def finish_parts(
        self, feature_set_id: str, rows: int, columns: dict[str, str], metadata: dict[str, Any],
        online: pd.DataFrame | None = None,
    ) -> FeatureSetRecord:
        """Complete a feature set whose frame is written: its online rows, then the record
        (which marks it complete, so it comes last)."""
        folder = f"features/{check_id('feature set id', feature_set_id)}"
        if online is not None:
            with self._root.atomic_open(f"{folder}/{ONLINE_FILE}") as handle:
                online.to_parquet(handle, use_dictionary=False, compression="lz4")
        record = FeatureSetRecord(feature_set_id=feature_set_id, rows=rows,
                                  created_at=utc_now(), columns=columns, metadata=metadata)
        self._root.write_bytes(f"{folder}/metadata.json", record.model_dump_json(indent=2).encode())
        return record

    def read(self, feature_set_id: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The feature set's frame (all columns, or the named ones)."""
        self.metadata(feature_set_id)
        parts = list(self._frames(f"features/{feature_set_id}/features.parquet", columns))
        frame = pd.concat(parts) if len(parts) > 1 else parts[0]
        whole = pd.RangeIndex(len(frame))
        return frame.set_axis(whole) if frame.index.equals(whole) else frame  # as one file

    def _frames(self, path: str, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        """A Parquet file, or each part of a partitioned one (a folder) in order."""
        wanted = list(columns) if columns else None
        for part in self._part_paths(path):
            with self._root.open(part) as handle:
                yield pd.read_parquet(handle, columns=wanted)

    def read_dask(self, feature_set_id: str, columns: Sequence[str] | None = None) -> Partitioned:
        """The feature set's frame as a lazy Dask frame, one partition per Parquet row
        group (of the file, or of each part in order), with each partition's rows from
        the footers, for work on a cluster (its workers must see the data root). Built
        from the row groups rather than ``dd.read_parquet``, whose optimiser may fuse
        partitions differently in two graphs of the same frame."""
        import dask
        import dask.dataframe as dd  # only the Dask path imports Dask
        import pyarrow.parquet as pq

        self.metadata(feature_set_id)
        wanted = list(columns) if columns else None
        parts, lengths, meta = [], [], None
        for path in self._part_paths(f"features/{feature_set_id}/features.parquet"):
            with self._root.open(path) as handle:
                footer = pq.ParquetFile(handle)
                meta = meta if meta is not None else _empty(footer.schema_arrow, wanted)
                for group in range(footer.num_row_groups):
                    lengths.append(footer.metadata.row_group(group).num_rows)
                    parts.append(dask.delayed(_row_group)(self._root.uri(path), group, wanted))
        frame = dd.from_delayed(parts, meta=meta, verify_meta=False)
        return Partitioned(frame, lengths)

    def _part_paths(self, path: str) -> list[str]:
        if self._root.fs.isdir(self._root.path(path)):
            return self._root.glob(f"{path}/part-*.parquet")
        return [path]

    def has_online(self, feature_set_id: str) -> bool:
        """Whether the set keeps its entities' latest values for the online store."""
        return self._root.exists(f"features/{check_id('feature set id', feature_set_id)}/"
                                 f"{ONLINE_FILE}")

    def read_online(self, feature_set_id: str) -> pd.DataFrame:
        """The entities' latest values written with the set, or ``NotFound`` (none kept)."""
        parts = list(self.iter_online(feature_set_id))
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]

    def iter_online(self, feature_set_id: str) -> Iterator[pd.DataFrame]:
        """``read_online`` a part at a time (one part unless a cluster wrote them): memory
        bounded by a part, each entity in one part."""
        self.metadata(feature_set_id)
        if not self.has_online(feature_set_id):
            raise NotFound("online rows of feature set", feature_set_id)
        return self._frames(f"features/{feature_set_id}/{ONLINE_FILE}")

    def metadata(self, feature_set_id: str) -> FeatureSetRecord:
        """The feature set's record, or ``NotFound``."""
        if not self.exists(feature_set_id):
            raise NotFound("feature set", feature_set_id)
        raw = self._root.read_bytes(f"features/{feature_set_id}/metadata.json")
        return FeatureSetRecord.model_validate_json(raw)

    def exists(self, feature_set_id: str) -> bool:
        """Whether a complete feature set with this id is stored."""
        check_id("feature set id", feature_set_id)
        return self._root.exists(f"features/{feature_set_id}/metadata.json")

    def list(self) -> builtins.list[FeatureSetRecord]:
        """Every complete feature set's record, oldest first."""
        records = [
            FeatureSetRecord.model_validate_json(self._root.read_bytes(path))
            for path in self._root.glob("features/*/metadata.json")
        ]
        return sorted(records, key=lambda r: (r.created_at, r.feature_set_id))
