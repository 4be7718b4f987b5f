"""StreamPlan against the offline transform, on the in-memory entity state.

The reference is the offline transform (``FittedFeatureSet.run_until`` up to the last
aggregate step): before each record is applied, the aggregates a read at its time gives
must equal the offline values of its row.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pandas as pd
import pytest

from common.stores.entity_state import Entry, MemoryEntityState, Retention
from ingestion.records import check_records
from preparation import build_pipeline
from preparation.streaming import NotStreamable, StreamPlan, timestamp_us
from tests.fixtures.pipeline import parsed, paysim_config
from tests.fixtures.streaming import as_records, stream_frame

CONFIG = parsed(paysim_config())
CONTRACT = CONFIG.datasets["paysim"]
FSID = "fs1"


def fitted_on(frame: pd.DataFrame, steps: list[dict[str, Any]] | None = None) -> Any:
    spec = CONFIG.features.model_dump()
    if steps is not None:
        spec["steps"] = steps
    return build_pipeline(spec).fit(frame, batch_ids=["b1"])


def offline_aggregates(fitted: Any, plan: StreamPlan, frame: pd.DataFrame) -> pd.DataFrame:
    last = max(w for w, (_, s) in enumerate(fitted.pipeline.steps)
               if type(s).__name__ == "EntityAggregate")
    return fitted.run_until(fitted.conform(frame), last + 1)[plan.aggregate_columns]


def stream_and_compare(plan: StreamPlan, frame: pd.DataFrame, expected: pd.DataFrame,
                       order: list[int]) -> int:
    """Apply the records in ``order``, reading each one's aggregates just before it."""
    state, records = MemoryEntityState(), as_records(frame)
    checked = check_records(records, CONTRACT)
    assert not checked.refused
    mismatches = 0
    for i in order:
        record = checked.records[i]
        held = state.read(FSID, [record["nameOrig"]])[0] or []
        got = plan.aggregates_at(held, timestamp_us(record["timestamp"]))
        want = expected.iloc[i]
        mismatches += sum(not np.isclose(got[c], want[c], rtol=1e-9, atol=1e-9, equal_nan=True)
                          for c in plan.aggregate_columns)
        state.apply(FSID, plan.record_entries([record], [checked.ids[i]]), plan.retention)
    return mismatches


def test_streamed_aggregates_equal_the_offline_ones_before_every_record() -> None:
    frame = stream_frame(3_000, accounts=60)
    fitted = fitted_on(frame)
    plan = StreamPlan(fitted)
    expected = offline_aggregates(fitted, plan, frame)
    assert plan.aggregate_columns == ["nameOrig_amount_count_24h", "nameOrig_amount_sum_24h",
                                      "nameOrig_amount_count_last5", "nameOrig_amount_mean_last5"]
    assert expected["nameOrig_amount_count_24h"].max() >= 2  # entities do have a past
    assert stream_and_compare(plan, frame, expected, list(range(len(frame)))) == 0


def test_an_aggregate_of_a_transformed_column_streams_through_the_steps_before_it() -> None:
    frame = stream_frame(1_500, accounts=40)
    steps = [{"kind": "log", "params": {"columns": ["amount"]}},
             {"kind": "entity_aggregate",
              "params": {"column": "amount", "window": 3, "stats": ["sum", "mean"]}},
             {"kind": "drop", "params": {"columns": ["nameDest", "type", "step"]}}]
    fitted = fitted_on(frame, steps)
    plan = StreamPlan(fitted)
    assert plan.slots[0].stop == 1  # the value is read after the log step
    expected = offline_aggregates(fitted, plan, frame)
    assert stream_and_compare(plan, frame, expected, list(range(len(frame)))) == 0
    # The compiled row forms and the pandas steps give the same entries.
    checked = check_records(as_records(frame.iloc[:50]), CONTRACT)
    rows = plan.record_entries(checked.records, checked.ids)
    assert rows == plan.record_entries(pd.DataFrame(checked.records), checked.ids)
    assert next(iter(rows.values()))[0].values[0] == pytest.approx(
        np.log1p(frame["amount"].iloc[0]), rel=1e-15)


def test_batch_entries_then_the_stream_equal_the_whole_history_streamed() -> None:
    frame = stream_frame(2_000, accounts=50)
    fitted = fitted_on(frame)
    plan = StreamPlan(fitted)
    expected = offline_aggregates(fitted, plan, frame)
    batch, later = frame.iloc[:1_200], list(range(1_200, len(frame)))
    state = MemoryEntityState()
    from preparation.streaming import group_entries
    ids = [f"r{i}" for i in range(len(frame))]
    entries = plan.batch_entries(batch, ids[:1_200])
    state.apply(FSID, group_entries(entries, "nameOrig", 1), plan.retention,
                late_tolerance_us=-1)
    checked = check_records(as_records(frame), CONTRACT)
    mismatches = 0
    for i in later:
        record = checked.records[i]
        held = state.read(FSID, [record["nameOrig"]])[0] or []
        got = plan.aggregates_at(held, timestamp_us(record["timestamp"]))
        mismatches += sum(not np.isclose(got[c], expected.iloc[i][c], rtol=1e-9, atol=1e-9,
                                         equal_nan=True) for c in plan.aggregate_columns)
        state.apply(FSID, plan.record_entries([record], [ids[i]]), plan.retention)
    assert mismatches == 0
    # The batch kept only what the windows need: at most 5 entries before the last 24 h.
    assert len(entries) < len(batch)


def test_records_late_within_the_tolerance_count_and_later_ones_are_refused() -> None:
    frame = stream_frame(600, accounts=10, spread_s=60.0)  # one record a minute
    fitted = fitted_on(frame)
    plan = StreamPlan(fitted, tolerance_s=600)  # ten minutes
    checked = check_records(as_records(frame), CONTRACT)
    order = list(range(len(frame)))
    rng = random.Random(3)
    for start in range(0, len(order), 5):  # shuffled within 5 minutes
        block = order[start:start + 5]
        rng.shuffle(block)
        order[start:start + 5] = block
    state = MemoryEntityState()
    for i in order:
        done = state.apply(FSID, plan.record_entries([checked.records[i]], [checked.ids[i]]),
                           plan.retention)
        assert done.applied == 1
    last = frame["timestamp"].iloc[-1]
    after = timestamp_us(last) + 1
    for entity in frame["nameOrig"].unique():
        rows = frame[(frame["nameOrig"] == entity)]
        held = state.read(FSID, [entity])[0] or []
        got = plan.aggregates_at(held, after)
        day = rows[rows["timestamp"] >= last + pd.Timedelta(1, "us") - pd.Timedelta("24h")]
        assert got["nameOrig_amount_count_24h"] == len(day)
        assert got["nameOrig_amount_sum_24h"] == pytest.approx(day["amount"].sum(), rel=1e-12)
    stale = dict(checked.records[0], timestamp=frame["timestamp"].iloc[0].isoformat())
    entity = stale["nameOrig"]
    refused = state.apply(FSID, plan.record_entries([stale], ["late-one"]), plan.retention)
    assert (refused.applied, refused.late, refused.late_records) == (0, 1, ("late-one",))
    assert "late-one" not in {e.record_id for e in state.read(FSID, [entity])[0] or []}


def test_retention_follows_the_widest_windows_and_the_tolerance() -> None:
    plan = StreamPlan(fitted_on(stream_frame(300, accounts=5)), tolerance_s=60,
                      count_ttl_s=3_600)
    assert plan.retention == Retention(max_count=5, max_span_us=86_400_000_000,
                                       tolerance_us=60_000_000, ttl_s=86_460)


def test_a_feature_set_without_aggregates_or_entity_key_cannot_stream() -> None:
    frame = stream_frame(300, accounts=5)
    steps = [{"kind": "drop", "params": {"columns": ["nameDest", "type", "step"]}}]
    with pytest.raises(NotStreamable, match="no entity aggregates"):
        StreamPlan(fitted_on(frame, steps))


def test_reads_at_a_time_count_only_what_the_windows_hold() -> None:
    plan = StreamPlan(fitted_on(stream_frame(300, accounts=5)))
    hour = 3_600_000_000
    held = [Entry(t * hour, f"r{t}", (float(t),)) for t in range(10)]
    got = plan.aggregates_at(held, 9 * hour)
    # 24 h: every entry strictly before 9 h; last 5: those at or before it (ties included).
    assert got["nameOrig_amount_count_24h"] == 9.0
    assert got["nameOrig_amount_sum_24h"] == float(sum(range(9)))
    assert got["nameOrig_amount_count_last5"] == 5.0
    assert got["nameOrig_amount_mean_last5"] == float(np.mean([5, 6, 7, 8, 9]))
    empty = plan.aggregates_at([], 0)
    assert empty["nameOrig_amount_count_24h"] == 0.0 and np.isnan(
        empty["nameOrig_amount_mean_last5"])
    at_nine = plan.ages_s(held, 9 * hour)  # the 24 h window's newest is 8 h, last 5's is 9 h
    assert (at_nine["nameOrig_amount_sum_24h"], at_nine["nameOrig_amount_mean_last5"]) == (
        3_600.0, 0.0)
