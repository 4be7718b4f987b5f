"""Streamed entity aggregates: a fitted feature set's aggregates, kept from records one by one.

A ``StreamPlan`` says what of each record a fitted feature set's entity aggregates need
(its *entries*: the event time, a record id, and the value of each aggregated column as
the aggregate step sees it) and computes the aggregates a new row at time t gets from an
entity's entries, exactly as the offline transform computes them for a row at t:

- a time window ``w`` (``"24h"``) counts the entries timed in ``[t - w, t)``;
- a last-N window counts the N latest entries timed at or before t (ties included: a new
  row comes after the rows of its own time, as it does offline);
- ``count`` and ``sum`` skip missing values, ``mean`` is ``sum / count`` (NaN on none).

The entries live in an ``EntityStateStore`` (``common.stores.entity_state``), bounded by
the plan's ``retention``: the widest windows plus the tolerance for late records. Batch
materialisation (``batch_entries``) and the stream (``record_entries``) make entries the
same way, so a batch followed by later records gives what the whole history streamed
gives. Example::

    plan = StreamPlan(fitted, tolerance_s=300)
    entries = plan.record_entries(typed_records, record_ids)   # {entity: [Entry, ...]}
    state.apply(fitted.feature_set_id, entries, plan.retention)
    held = state.read(fitted.feature_set_id, ["C1"])[0] or []
    plan.aggregates_at(held, at_us)     # {"nameOrig_amount_sum_24h": 1250.0, ...}
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from common.errors import InvalidInput
from common.stores.entity_state import STATE_SEPARATOR, Entry, Retention, check_record_id
from preparation.aggregates import EntityAggregate
from preparation.online import NoFastForm, compile_online
from preparation.pipeline import FittedFeatureSet
from preparation.transformers import to_utc

DAY_S = 86_400


class NotStreamable(InvalidInput):
    """The feature set has no entity aggregates to keep, or keeps them in a way the
    stream cannot follow exactly."""


@dataclass(frozen=True)
class Window:
    """One entity-aggregate step: its column's slot in the entries and its window."""

    slot: int
    window: int | str
    stats: tuple[str, ...]
    names: tuple[str, ...]
    span_us: int | None = None
    """A time window's length in microseconds (None: a last-N window); parsed once."""

    @classmethod
    def of(cls, slot: int, step: EntityAggregate) -> Window:
        span = None if isinstance(step.window, int) else int(
            pd.Timedelta(step.window).value // 1_000)
        return cls(slot, step.window, tuple(step.stats), tuple(step.output_names()), span)


@dataclass(frozen=True)
class Slot:
    """A value each entry carries: ``column`` as the pipeline holds it before ``stop``."""

    stop: int
    column: str


class StreamPlan:
    """What a fitted feature set's entity aggregates need from each record, and how to
    read them back at any time. ``tolerance_s`` is how late a record may arrive;
    ``count_ttl_s`` how long an idle entity's last-N history is kept (time windows
    bound themselves)."""

    def __init__(self, fitted: FittedFeatureSet, *, tolerance_s: float = 300.0,
                 count_ttl_s: int = 90 * DAY_S) -> None:
        self.fitted = fitted
        self.slots, self.windows = _plan(fitted)
        self.entity_key: str = str(fitted.entity_key)  # _plan refuses a set without one
        self.timestamp = fitted.timestamp
        self.retention = _retention(self.windows, tolerance_s, count_ttl_s)

    @property
    def feature_set_id(self) -> str:
        return self.fitted.feature_set_id

    @property
    def aggregate_columns(self) -> list[str]:
        """Every aggregate column the plan computes, in step order."""
        return [name for window in self.windows for name in window.names]

    def batch_entries(self, frame: pd.DataFrame, record_ids: Sequence[str]) -> pd.DataFrame:
        """The retained entries of a whole batch (rows typed as at fit), one row per entry:
        entity, ``time_us``, ``record_id`` and a ``v{slot}`` column per slot; each entity's
        entries in order, only those the retention keeps after the batch's last row."""
        entries = self._entry_frame(frame, record_ids, "offline")
        codes = pd.factorize(entries[self.entity_key])[0]
        times = entries["time_us"].to_numpy(dtype=np.int64)
        order = np.lexsort((times, codes))  # stable: ties keep the batch's order
        kept = _retained(codes[order], times[order], self.retention)
        return entries.iloc[order[kept]]

    def batch_states(self, frame: pd.DataFrame,
                     record_ids: Sequence[str]) -> tuple[list[str], list[bytes]]:
        """``batch_entries`` as the entity state stores them: the entities (in order of
        their first entry) and each one's entries as ``encode_entry`` lines, newline-joined
        (what ``RedisEntityState.write_batch_states`` takes)."""
        entries = self.batch_entries(frame, record_ids)
        return encode_states(entries, self.entity_key, len(self.slots))

    def record_entries(self, records: Sequence[Mapping[str, Any]] | pd.DataFrame,
                       record_ids: Sequence[str]) -> dict[str, list[Entry]]:
        """Streamed records (typed, in arrival order) as entries, by entity. Records whose
        aggregated columns are read as they come (no step before them) take a plain
        Python path; others run the pandas steps before their aggregates."""
        if not isinstance(records, pd.DataFrame):
            direct = self._direct_entries(records, record_ids)
            if direct is not None:
                return direct
        frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
        entries = self._entry_frame(frame, record_ids, "online")
        return group_entries(entries, self.entity_key, len(self.slots))

    def _direct_entries(self, records: Sequence[Mapping[str, Any]],
                        record_ids: Sequence[str]) -> dict[str, list[Entry]] | None:
        """The entries through the steps' compiled row forms (``preparation.online``);
        None where those do not model the records exactly (the pandas path decides)."""
        try:
            values = self._slot_values(records)
        except NoFastForm:
            return None
        grouped: dict[str, list[Entry]] = defaultdict(list)
        for record, record_id, row in zip(records, record_ids, values, strict=True):
            entity = record.get(self.entity_key)
            at = self._record_time_us(record)
            if entity is None or at is None:
                continue  # as offline: a row without a key or a time counts nowhere
            grouped[str(entity)].append(Entry(at, check_record_id(record_id), row))
        return dict(grouped)

    def _slot_values(self, records: Sequence[Mapping[str, Any]]) -> list[tuple[float, ...]]:
        """Per record, each slot's column after the row forms of the steps before it."""
        if all(slot.stop == 0 for slot in self.slots):
            columns = [s.column for s in self.slots]
            return [tuple([math.nan if v is None else float(v) for v in map(r.get, columns)])
                    for r in records]
        online = compile_online(self.fitted)
        if online.steps is None:
            raise NoFastForm
        rows = online._conformed(records)
        values: list[list[float]] = [[] for _ in records]
        done = 0
        for slot in sorted(self.slots, key=lambda s: s.stop):
            for step in online.steps[done:slot.stop]:
                step(rows)
            done = slot.stop
            for held, row in zip(values, rows, strict=True):
                held.append(_float(row.get(slot.column)))
        order = sorted(range(len(self.slots)), key=lambda i: self.slots[i].stop)
        return [tuple(held[order.index(i)] for i in range(len(self.slots))) for held in values]

    def _record_time_us(self, record: Mapping[str, Any]) -> int | None:
        if self.timestamp is None:
            return time.time_ns() // 1_000
        return timestamp_us(record.get(self.timestamp))

    def read_at(self, entries: Sequence[Entry],
                at_us: int) -> tuple[dict[str, float], dict[str, float | None]]:
        """The aggregate columns of a new row at ``at_us`` given its entity's entries, and
        per column the age then of the newest entry it counts, in seconds (None: its
        window is empty); each window's entries chosen once for both."""
        values: dict[str, float] = {}
        ages: dict[str, float | None] = {}
        for window in self.windows:
            chosen = _in_window(entries, window, at_us)
            present = [v for v in (e.values[window.slot] for e in chosen) if not math.isnan(v)]
            values.update(_stats(window, present))
            age = (at_us - chosen[-1].time_us) / 1e6 if chosen else None
            ages.update(dict.fromkeys(window.names, age))
        return values, ages

    def aggregates_at(self, entries: Sequence[Entry], at_us: int) -> dict[str, float]:
        """``read_at``'s aggregate columns."""
        return self.read_at(entries, at_us)[0]

    def ages_s(self, entries: Sequence[Entry], at_us: int) -> dict[str, float | None]:
        """``read_at``'s ages."""
        return self.read_at(entries, at_us)[1]

    def _entry_frame(self, frame: pd.DataFrame, record_ids: Sequence[str],
                     mode: str) -> pd.DataFrame:
        if len(record_ids) != len(frame):
            raise InvalidInput(f"{len(record_ids)} record ids for {len(frame)} rows")
        frame = frame.reset_index(drop=True)
        needed = [self.entity_key, *([self.timestamp] if self.timestamp else []),
                  *{slot.column for slot in self.slots}]
        direct = all(slot.stop == 0 for slot in self.slots) and set(needed) <= set(frame)
        # Values read as they are: only the columns the entries need are converted, as
        # the fit-time conversion converts them (numbers as float64, times to UTC).
        conformed = frame if direct else self.fitted.conform(frame)
        out = pd.DataFrame({self.entity_key: conformed[self.entity_key],
                            "time_us": self._times_us(conformed),
                            "record_id": list(record_ids)})
        for index, slot in enumerate(self.slots):
            out[f"v{index}"] = _numbers(conformed[slot.column]) if direct else _column_at(
                self.fitted, conformed, slot, mode)
        missing = out[self.entity_key].isna() | out["time_us"].isna()
        return out[~missing.to_numpy()]  # offline, rows without a key or time count nowhere

    def _times_us(self, frame: pd.DataFrame) -> pd.Series:
        if self.timestamp is None:  # no event time: arrival order is the order
            start = pd.Timestamp.now(tz="UTC").value // 1_000
            return pd.Series(np.arange(start, start + len(frame)), index=frame.index)
        times = to_utc(frame[self.timestamp])
        return pd.Series(times.astype("int64") // 1_000, index=frame.index).where(times.notna())


def encode_states(entries: pd.DataFrame, entity_key: str,
                  slots: int) -> tuple[list[str], list[bytes]]:
    """Entries sorted by entity (``batch_entries``) as each entity's encoded state: the
    ``encode_entry`` lines built column-wise (numpy's shortest round-trip float text,
    ``null`` for a missing value), newline-joined per entity."""
    if entries.empty:
        return [], []
    ids = entries["record_id"].tolist()
    for record_id in set(ids):
        check_record_id(record_id)
    line = np.char.add(entries["time_us"].to_numpy(dtype=np.int64).astype("S20"), b" ")
    line = np.char.add(np.char.add(line, np.array(ids, dtype="S")), b" [")
    for slot in range(slots):
        values = entries[f"v{slot}"].to_numpy(dtype=np.float64)
        text = np.where(np.isnan(values), b"null", values.astype("S32"))
        line = np.char.add(np.char.add(line, text), b"," if slot < slots - 1 else b"]")
    codes = pd.factorize(entries[entity_key])[0]
    last_of_entity = np.r_[codes[1:] != codes[:-1], True]
    ends = np.where(last_of_entity, STATE_SEPARATOR, b"\n")
    states = b"".join(np.char.add(line, ends).tolist())[:-1].split(STATE_SEPARATOR)
    entities = entries[entity_key].astype(str).to_numpy()[
        np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])].tolist()
    return entities, states


def _numbers(values: pd.Series) -> np.ndarray:
    """A column as float64, as the fit-time conversion reads a numeric column."""
    return pd.to_numeric(values).to_numpy(dtype=np.float64)


def group_entries(entries: pd.DataFrame, entity_key: str,
                  slots: int) -> dict[str, list[Entry]]:
    """An entry frame (``batch_entries``) as entries by entity, in frame order."""
    grouped: dict[str, list[Entry]] = defaultdict(list)
    values = entries[[f"v{i}" for i in range(slots)]].to_numpy(dtype=np.float64)
    rows = zip(entries[entity_key].astype(str).tolist(), entries["time_us"].tolist(),
               entries["record_id"].tolist(), values.tolist(), strict=True)
    for entity, time_us, record_id, row in rows:
        grouped[entity].append(Entry(int(time_us), check_record_id(record_id), tuple(row)))
    return dict(grouped)


def _plan(fitted: FittedFeatureSet) -> tuple[list[Slot], list[Window]]:
    """The slots the entries carry and the windows read from them, in step order."""
    if fitted.entity_key is None:
        raise NotStreamable(f"feature set {fitted.feature_set_id} has no entity key")
    slots: list[Slot] = []
    windows: list[Window] = []
    produced: set[str] = set()
    stop = 0  # steps before the first non-aggregate step leave the columns as read
    for index, (_, step) in enumerate(fitted.pipeline.steps):
        if not isinstance(step, EntityAggregate):
            stop = index + 1
            continue
        if step.column in produced:
            raise NotStreamable(f"step {index} aggregates {step.column!r}, an aggregate "
                                "column: the stream keeps raw values only")
        slot = Slot(stop, step.column)
        if slot not in slots:
            slots.append(slot)
        windows.append(Window.of(slots.index(slot), step))
        produced.update(step.output_names())
    if not windows:
        raise NotStreamable(f"feature set {fitted.feature_set_id} has no entity aggregates")
    return slots, windows


def _retention(windows: list[Window], tolerance_s: float, count_ttl_s: int) -> Retention:
    counts = [w.window for w in windows if isinstance(w.window, int)]
    spans = [s for s in (w.span_us for w in windows) if s is not None]
    tolerance_us = int(tolerance_s * 1e6)
    span_ttl = math.ceil((max(spans) + tolerance_us) / 1e6) if spans else 0
    return Retention(max_count=max(counts, default=0),
                     max_span_us=max(spans) if spans else None, tolerance_us=tolerance_us,
                     ttl_s=max(span_ttl, count_ttl_s if counts else 0))


def _column_at(fitted: FittedFeatureSet, frame: pd.DataFrame, slot: Slot,
               mode: str) -> np.ndarray:
    """``slot.column`` as the aggregate step reads it: after the steps before ``stop``."""
    if slot.stop:
        ran = fitted.run_until(frame, slot.stop, "offline" if mode == "offline" else "online")
        frame = ran.reindex(frame.index)  # rows a filter dropped count nowhere: NaN
    return pd.to_numeric(frame[slot.column], errors="coerce").to_numpy(dtype=np.float64)


def _retained(codes: np.ndarray, times: np.ndarray, retention: Retention) -> np.ndarray:
    """Which entries ``prune_entries`` would keep, given entity codes and times sorted by
    entity, then time."""
    if not len(codes):
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    sizes = np.diff(np.r_[starts, len(codes)])
    cut = np.repeat(np.maximum.reduceat(times, starts), sizes) - retention.tolerance_us
    before = times < cut
    # Among the entity's entries before the cut, the rank counted from its newest.
    running = np.cumsum(before)
    through_entity = np.repeat(running[np.r_[starts[1:], len(codes)] - 1], sizes)
    rank_from_end = through_entity - running + 1
    keep = ~before | (rank_from_end <= retention.max_count)
    if retention.max_span_us is not None:
        keep |= times >= cut - retention.max_span_us
    return keep


def _in_window(entries: Sequence[Entry], window: Window, at_us: int) -> Sequence[Entry]:
    span = window.span_us
    if span is None:
        upto = [e for e in entries if e.time_us <= at_us]
        return upto[-int(window.window):] if window.window else []
    return [e for e in entries if at_us - span <= e.time_us < at_us]


def _stats(window: Window, values: list[float]) -> dict[str, float]:
    total, count = float(sum(values)), float(len(values))
    found = {"count": count, "sum": total, "mean": total / count if count else math.nan}
    return {name: found[stat] for name, stat in zip(window.names, window.stats, strict=True)}


def last_record_us(entries: Sequence[Entry], at_us: int) -> int | None:
    """When the entity's latest record at or before ``at_us`` happened (None: none)."""
    times = [e.time_us for e in entries if e.time_us <= at_us]
    return max(times) if times else None


def timestamp_us(value: Any) -> int | None:
    """A timestamp (aware or UTC datetime, pandas Timestamp, ISO 8601 text) as epoch
    microseconds; None when missing."""
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, datetime) and not isinstance(value, pd.Timestamp):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
        delta = aware - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
    return int(stamp.value // 1_000)


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
