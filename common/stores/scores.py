"""Score store: online scores in a bounded Redis stream, batch scores as Parquet.

``OnlineScoreStore`` appends each ``ServedScore`` as one stream entry (field ``s``, the
score's JSON without its input features and unset fields: the features go to monitoring
in ScoreServed, and they made an entry ~730 bytes instead of ~250) to
``score_stream_key(namespace)``, many per pipeline, trimmed with
``XADD MAXLEN ~`` so the stream stays near ``maxlen`` entries at little cost (pass
``approximate=False`` for an exact bound). ``BatchScoreStore`` keeps one Parquet file per
scoring run under ``scores/<run_id>/`` in the data root. Example::

    online = OnlineScoreStore(redis.Redis.from_url(settings.redis_url), settings.namespace,
                              maxlen=settings.score_stream_maxlen)
    online.append_many([ServedScore(request_id="r1", entity_id="C1", model_version="v3",
                                    score=0.93, latency_ms=0.8)])
    online.recent(100)                  # the last 100 scores, oldest first

    batch = BatchScoreStore(settings.data_root)
    uri = batch.write("run-42", scores_frame)
    batch.read("run-42")
    batch.rows("run-42"), batch.uri("run-42")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import pandas as pd
import pyarrow.parquet as pq
import redis

from common.errors import InvalidInput, NotFound
from common.events import ServedScore
from common.stores._fs import RootedStore, check_id

FIELD_SCORE = b"s"
"""Stream entry field holding the score's JSON."""
STREAM_EXCLUDES = {"features"}
"""What a score in the stream leaves out: ``recent`` gives it back with no features."""


def score_stream_key(namespace: str) -> bytes:
    """The Redis key of the online score stream."""
    return f"{namespace}:scores".encode()


class OnlineScoreStore:
    """Recent online scores in a Redis stream bounded to about ``maxlen`` entries."""

    def __init__(
        self,
        redis_client: redis.Redis,
        namespace: str = "conveyor",
        maxlen: int = 100_000,
        *,
        approximate: bool = True,
    ):
        if maxlen < 1:
            raise InvalidInput(f"score stream maxlen must be at least 1, not {maxlen}")
        self._redis = redis_client
        self._key = score_stream_key(namespace)
        self._maxlen = maxlen
        self._approximate = approximate

    def append_many(self, scores: Sequence[ServedScore]) -> list[bytes]:
        """Append scores (without their features) in one round trip; returns their stream
        entry ids."""
        if not scores:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for score in scores:
            fields: dict[Any, Any] = {FIELD_SCORE: score.model_dump_json(
                exclude=STREAM_EXCLUDES, exclude_none=True)}
            pipe.xadd(self._key, fields, maxlen=self._maxlen, approximate=self._approximate)
        return [_as_bytes(entry) for entry in pipe.execute()]

    def recent(self, n: int) -> list[ServedScore]:
        """The last ``n`` scores, oldest first (``features`` empty)."""
        entries = cast(list[Any], self._redis.xrevrange(self._key, count=n) if n > 0 else [])
        return [_score(fields) for _, fields in reversed(entries)]

    def length(self) -> int:
        """How many scores the stream holds now."""
        return int(cast(int, self._redis.xlen(self._key)))


def _score(fields: dict[bytes | str, bytes | str]) -> ServedScore:
    raw = fields.get(FIELD_SCORE) or fields[FIELD_SCORE.decode()]  # either client mode
    return ServedScore.model_validate_json(raw)


def _as_bytes(entry: bytes | str) -> bytes:
    return entry if isinstance(entry, bytes) else entry.encode()


class BatchScoreStore(RootedStore):
    """Batch scores as one Parquet file per run under a data root, or (a run scored on a
    Dask cluster) as a folder of parts in row order, each written by the worker that
    scored it, completed by ``parts.json`` (written last: without it the run is not
    stored)."""

    def start_parts(self, run_id: str) -> None:
        """Before a partitioned write: nothing of an earlier attempt of the run stays."""
        self._root.remove_tree(f"scores/{check_id('run id', run_id)}")

    def write_part(self, run_id: str, number: int, frame: pd.DataFrame) -> None:
        """Write part ``number`` of a run's scores (atomically)."""
        with self._root.atomic_open(_part(check_id("run id", run_id), number)) as handle:
            frame.to_parquet(handle)

    def finish_parts(self, run_id: str, rows: int, parts: int) -> str:
        """Complete a run written as parts; returns the parts folder's URL."""
        folder = _parts(check_id("run id", run_id))
        self._root.write_bytes(f"{folder}.json", json.dumps({"rows": rows, "parts": parts})
                               .encode())
        return self._root.uri(folder)

    def write(self, run_id: str, frame: pd.DataFrame) -> str:
        """Store a run's scores (atomically); returns the file's URL."""
        path = _scores(check_id("run id", run_id))
        with self._root.atomic_open(path) as handle:
            frame.to_parquet(handle)
        return self._root.uri(path)

    def read(self, run_id: str) -> pd.DataFrame:
        """A run's scores, or ``NotFound``."""
        if not self.exists(run_id):
            raise NotFound("batch scores of run", run_id)
        if not self._partitioned(run_id):
            with self._root.open(_scores(run_id)) as handle:
                return pd.read_parquet(handle)
        frames = []
        for number in range(self._parts_record(run_id)["parts"]):
            with self._root.open(_part(run_id, number)) as handle:
                frames.append(pd.read_parquet(handle))
        return pd.concat(frames, ignore_index=True)

    def exists(self, run_id: str) -> bool:
        """Whether scores of this run are stored (all of them)."""
        return self._root.exists(_scores(check_id("run id", run_id))) or self._partitioned(
            run_id)

    def rows(self, run_id: str) -> int:
        """How many rows a run's scores hold (from the Parquet footer), or ``NotFound``."""
        if not self.exists(run_id):
            raise NotFound("batch scores of run", run_id)
        if self._partitioned(run_id):
            return int(self._parts_record(run_id)["rows"])
        with self._root.open(_scores(run_id)) as handle:
            return int(pq.ParquetFile(handle).metadata.num_rows)

    def uri(self, run_id: str) -> str:
        """The URL of a run's scores file, or of its parts' folder (written or not)."""
        if self._partitioned(run_id):
            return self._root.uri(_parts(run_id))
        return self._root.uri(_scores(check_id("run id", run_id)))

    def _partitioned(self, run_id: str) -> bool:
        return self._root.exists(f"{_parts(check_id('run id', run_id))}.json")

    def _parts_record(self, run_id: str) -> dict[str, int]:
        return cast(dict[str, int], self._root.read_json(f"{_parts(run_id)}.json"))


def _scores(run_id: str) -> str:
    return f"scores/{run_id}/scores.parquet"


def _parts(run_id: str) -> str:
    return f"scores/{run_id}/parts"


def _part(run_id: str, number: int) -> str:
    return f"{_parts(run_id)}/part-{number:05d}.parquet"
