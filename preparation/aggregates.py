"""Per-entity aggregates over past rows: count, sum and mean of a column per entity.

No leakage: a row's value comes from its entity's rows strictly before it, never from the
row itself (so never from its label) nor from any later row. Windows:

- an int ``n``: the entity's previous ``n`` rows in timestamp order (ties keep the
  frame's order; without a timestamp, the frame's order is the time order);
- a duration such as ``"24h"`` or ``"7d"``: the entity's rows timed in ``[t - window, t)``,
  so rows at the same instant as the current row are never counted as past.

An empty window gives count and sum 0 and mean NaN (impute it in a later step). Missing
values of the column are skipped. Columns are named ``{key}_{column}_{stat}_{span}``, span
``last5`` or ``24h``.

Vectorised without a Python loop per row or per entity: rows are sorted by entity and
time, each row's window becomes a range ``[lo, hi)`` of positions (``merge_asof`` finds
time bounds), and sums and counts are differences of per-entity prefix sums. pandas'
groupby-rolling gives the same numbers but costs about 0.25 s per statistic per 5,000
entities, which PaySim-sized data (millions of accounts) cannot afford.

Example::

    past_aggregates(frame, key="nameOrig", column="amount", window="24h",
                    stats=("count", "sum"), timestamp="timestamp")
    # -> columns nameOrig_amount_count_24h, nameOrig_amount_sum_24h, indexed like frame
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

from common.errors import InvalidInput
from preparation.transformers import FrameStep, require_columns, require_numeric, to_utc

Stat = Literal["count", "sum", "mean"]
STATS: tuple[str, ...] = get_args(Stat)
_ZERO_WHEN_EMPTY = ("count", "sum")
_KEY, _AT, _VALUE = "__entity__", "__at__", "__value__"  # columns of the sorted slim frame


def aggregate_name(key: str, column: str, stat: str, window: int | str) -> str:
    """The output column of one statistic, e.g. ``nameOrig_amount_mean_last5``."""
    span = f"last{window}" if isinstance(window, int) else str(window)
    return f"{key}_{column}_{stat}_{span}"


def past_aggregates(frame: pd.DataFrame, *, key: str, column: str, window: int | str,
                    stats: Sequence[str] = STATS,
                    timestamp: str | None = None) -> pd.DataFrame:
    """One column per stat, indexed like ``frame``, from each entity's strictly past rows."""
    return _aggregates(frame, key, column, window, stats, timestamp, probe_at=None)[0]


def past_and_latest_aggregates(
    frame: pd.DataFrame, *, key: str, column: str, window: int | str,
    stats: Sequence[str] = STATS, timestamp: str | None = None, at: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``past_aggregates`` of ``frame`` and, per entity of ``frame`` (in order of first
    appearance, indexed by entity), the values a new row would get: one after every row
    of ``frame``, at ``at`` (a UTC timestamp; required with a ``timestamp`` column).

    One sort for both: each entity's new row ("probe") would sit at the end of the entity's
    rows in the sorted order (after those at or before ``at``), so its window comes from
    the same prefix sums, without sorting the probes in.
    """
    return _aggregates(frame, key, column, window, stats, timestamp, probe_at=at,
                       probes=True)


def _aggregates(frame: pd.DataFrame, key: str, column: str, window: int | str,
                stats: Sequence[str], timestamp: str | None, probe_at: pd.Timestamp | None,
                probes: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    ordered, entities = _entity_time_order(frame, key, column, timestamp)
    at = _AT if timestamp else None
    lo, hi = _bounds(ordered, _KEY, window, at)
    prefix = _Prefix(ordered[_KEY], ordered[_VALUE])
    total, count = prefix.sums[hi] - prefix.sums[lo], prefix.counts[hi] - prefix.counts[lo]
    names = [aggregate_name(key, column, stat, window) for stat in stats]
    empty = {n: 0.0 for n, s in zip(names, stats, strict=True) if s in _ZERO_WHEN_EMPTY}
    values = _stat_frame(names, stats, total, count, ordered.index)
    past = values.reindex(pd.RangeIndex(len(frame))).fillna(empty).set_axis(frame.index)
    if probes and not (timestamp and pd.isna(probe_at)):
        total, count = _probe_windows(ordered, prefix, len(entities), window, timestamp,
                                      probe_at)
        latest = _stat_frame(names, stats, total, count, pd.RangeIndex(len(entities)))
    else:  # no probes (or no time to put them at): every window is empty
        latest = _stat_frame(names, stats, np.zeros(len(entities)), np.zeros(len(entities)),
                             pd.RangeIndex(len(entities)))
    return past, latest.fillna(empty).set_axis(pd.Index(entities, name=key))


def _stat_frame(names: list[str], stats: Sequence[str], total: np.ndarray, count: np.ndarray,
                index: pd.Index) -> pd.DataFrame:
    found = {"count": count, "sum": total, "mean": _mean(total, count)}
    return pd.DataFrame({n: found[s] for n, s in zip(names, stats, strict=True)},
                        index=index, dtype=float)


def _probe_windows(ordered: pd.DataFrame, prefix: _Prefix, entities: int, window: int | str,
                   timestamp: str | None, at: pd.Timestamp | None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per entity code, the sum and count of the values in the window of a new row at
    ``at``: the row it would be in ``ordered``, after the entity's rows timed at or before
    ``at`` (ties keep the frame's order, so it comes after them) and before later ones."""
    codes = ordered[_KEY].to_numpy()
    sizes = np.bincount(codes, minlength=entities)  # codes are sorted: one run each
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if timestamp is None:
        hi = ends
        lo = np.maximum(starts, hi - int(window))  # time windows need a timestamp
    else:
        times, when = ordered[_AT].to_numpy(), _naive_utc(at)
        if isinstance(window, str):  # the rows timed in [at - window, at)
            since = when - pd.Timedelta(window).to_timedelta64()
            hi = ends - _rows_per_entity(codes, times >= when, entities)
            lo = ends - _rows_per_entity(codes, times >= since, entities)
        else:  # the previous rows, ties included
            hi = ends - _rows_per_entity(codes, times > when, entities)
            lo = np.maximum(starts, hi - window)
    hi_sums, hi_counts = prefix.at(hi, starts, ends)
    lo_sums, lo_counts = prefix.at(lo, starts, ends)
    return hi_sums - lo_sums, hi_counts - lo_counts


def _rows_per_entity(codes: np.ndarray, chosen: np.ndarray, entities: int) -> np.ndarray:
    return np.bincount(codes[chosen], minlength=entities)


def _naive_utc(at: Any) -> np.datetime64:
    when = pd.Timestamp(at)
    when = when.tz_convert("UTC").tz_localize(None) if when.tzinfo else when
    return when.to_datetime64()


def _entity_time_order(frame: pd.DataFrame, key: str, column: str, timestamp: str | None,
                       ) -> tuple[pd.DataFrame, Any]:
    """The rows with a key (and a time), as entity codes, times and values only, sorted so
    that entities become contiguous runs of rows, each in time order (ties: frame order),
    indexed by position in ``frame``; and the entities in order of first appearance.

    Only the three columns the aggregate reads are carried, and the key as integer codes
    (equal keys, equal codes): sorting, grouping and ``merge_asof`` on a million string
    keys, with every other column copied along, were most of the step's time.
    """
    by = [key, timestamp] if timestamp else [key]
    present = frame[by].notna().all(axis=1).to_numpy()
    codes, entities = pd.factorize(frame[key])
    everything = bool(present.all())
    slim: dict[str, Any] = {_KEY: codes[present],
                            _VALUE: frame[column].array[present]}
    if timestamp:
        times = frame[timestamp] if everything else frame[timestamp][present]
        slim[_AT] = to_utc(times).dt.tz_localize(None).array
    ordered = pd.DataFrame(slim, index=np.flatnonzero(present))
    order = [_KEY, _AT] if timestamp else [_KEY]
    return ordered.sort_values(order, kind="stable"), entities


def _bounds(ordered: pd.DataFrame, key: str, window: int | str,
            timestamp: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the positions ``[lo, hi)`` in ``ordered`` of its past rows in the window."""
    if isinstance(window, str):
        assert timestamp is not None  # the registry refuses time windows without one
        return _time_bounds(ordered, key, pd.Timedelta(window), timestamp)
    here = np.arange(len(ordered))
    first = here - ordered.groupby(key, sort=False).cumcount().to_numpy()
    return np.maximum(first, here - window), here


def _time_bounds(ordered: pd.DataFrame, key: str, window: pd.Timedelta,
                 timestamp: str) -> tuple[np.ndarray, np.ndarray]:
    rows = pd.DataFrame({"key": ordered[key].to_numpy(), "at": ordered[timestamp].to_numpy(),
                         "pos": np.arange(len(ordered))}).sort_values("at", kind="stable")
    return _first_since(rows, rows["at"] - window), _first_since(rows, rows["at"])


def _first_since(rows: pd.DataFrame, since: pd.Series) -> np.ndarray:
    """Per row, the position of its entity's first row timed at or after ``since``."""
    asked = pd.DataFrame({"key": rows["key"], "at": since, "row": rows["pos"]})
    found = pd.merge_asof(asked, rows, on="at", by="key", direction="forward")
    first = np.empty(len(rows), dtype=np.int64)
    first[found["row"].to_numpy()] = found["pos"].to_numpy()  # a row always finds itself
    return first


class _Prefix:
    """Per row of the sorted rows, the sum and count of the non-missing values of its
    entity's earlier rows (``sums``, ``counts``); ``at`` also reads past an entity's end."""

    def __init__(self, keys: pd.Series, values: pd.Series) -> None:
        numbers = values.to_numpy(dtype=float)
        present = ~np.isnan(numbers)
        parts = pd.DataFrame({"sum": np.where(present, numbers, 0.0), "count": present * 1.0})
        groups = keys.to_numpy()
        running = parts.groupby(groups, sort=False).cumsum()
        before = running.groupby(groups, sort=False).shift(1, fill_value=0.0)
        self.sums, self.counts = before["sum"].to_numpy(), before["count"].to_numpy()
        self._through = running["sum"].to_numpy(), running["count"].to_numpy()

    def at(self, positions: np.ndarray, starts: np.ndarray,
           ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per entity (rows ``[start, end)``), the sum and count before ``position``, which
        may be ``end``: then every row of the entity counts (0 for an entity without)."""
        inside = positions < ends
        after_last = ~inside & (ends > starts)
        sums, counts = np.zeros(len(positions)), np.zeros(len(positions))
        sums[inside], counts[inside] = self.sums[positions[inside]], self.counts[positions[inside]]
        last = ends[after_last] - 1
        sums[after_last], counts[after_last] = self._through[0][last], self._through[1][last]
        return sums, counts


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    return np.divide(total, count, out=np.full(len(total), np.nan), where=count > 0)


class EntityAggregate(FrameStep):
    """Add ``past_aggregates`` columns for ``column`` per ``key`` entity.

    Online, when a frame already carries all of this step's columns (read from the online
    store), they are used as they are; otherwise they are computed from the frame itself,
    which then must hold the entity's history as earlier rows.
    """

    def __init__(self, key: str, column: str, window: int | str,
                 stats: Sequence[str] = ("count", "sum", "mean"),
                 timestamp: str | None = None):
        self.key, self.column, self.window = key, column, window
        self.stats, self.timestamp = stats, timestamp

    def output_names(self) -> list[str]:
        """The columns this step adds, in ``stats`` order."""
        return [aggregate_name(self.key, self.column, s, self.window) for s in self.stats]

    def _reads(self) -> list[str]:
        return [self.key, self.column, *([self.timestamp] if self.timestamp else [])]

    def _learn(self, X: pd.DataFrame) -> None:
        require_numeric(X[[self.column]], "entity_aggregate needs numbers")

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        values = past_aggregates(X, key=self.key, column=self.column, window=self.window,
                                 stats=self.stats, timestamp=self.timestamp)
        return X.assign(**{c: values[c] for c in values.columns})

    def transform_and_latest(self, X: pd.DataFrame,
                             at: pd.Timestamp | None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``transform(X)``, and per entity the values a new row at ``at`` would get."""
        check_is_fitted(self)
        require_columns(X, self._needs())
        values, latest = past_and_latest_aggregates(
            X, key=self.key, column=self.column, window=self.window, stats=self.stats,
            timestamp=self.timestamp, at=at)
        return X.assign(**{c: values[c] for c in values.columns}), latest

    def transform_online(self, X: pd.DataFrame) -> pd.DataFrame:
        check_is_fitted(self)
        present = [c for c in self.output_names() if c in X.columns]
        if len(present) == len(self.output_names()):
            return X
        if present:
            missing = sorted(set(self.output_names()) - set(present))
            raise InvalidInput(f"rows carry some aggregates but not {missing}")
        return self.transform(X)
