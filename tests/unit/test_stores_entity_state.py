"""The entity state's semantics on the in-memory store, and its exact key and line bytes.

``tests/integration/test_entity_state_redis.py`` runs the same operations through the Lua
script on the real Redis and checks both stores agree."""

from __future__ import annotations

import math

import pytest

from common.errors import InvalidInput
from common.stores.entity_state import (
    Applied,
    Entry,
    MemoryEntityState,
    Retention,
    check_record_id,
    decode_entries,
    encode_entry,
    prune_entries,
    state_key,
)

S = 1_000_000  # a second in microseconds
KEEP_3 = Retention(max_count=3, tolerance_us=10 * S, ttl_s=60)


def entry(t: int, rid: str, value: float = 1.0) -> Entry:
    return Entry(t * S, rid, (value,))


def test_keys_and_lines_have_pinned_bytes_and_values_read_back_exactly() -> None:
    assert state_key("ns", "fs1", "C42") == b"ns:st:fs1:C42"
    line = encode_entry(Entry(1_700_000_000_000_001, "r-1", (0.1 + 0.2, math.nan, 1e300)))
    assert line == b"1700000000000001 r-1 [0.30000000000000004,null,1e+300]"
    [back] = decode_entries(line)
    assert back.time_us == 1_700_000_000_000_001 and back.values[0] == 0.1 + 0.2
    assert math.isnan(back.values[1]) and back.values[2] == 1e300


def test_record_ids_must_be_one_word() -> None:
    assert check_record_id("tx-42") == "tx-42"
    for bad in ("", "two words", "line\nbreak"):
        with pytest.raises(InvalidInput, match="record id"):
            check_record_id(bad)


def test_entries_are_kept_in_time_order_ties_in_arrival_order_duplicates_skipped() -> None:
    state = MemoryEntityState()
    first = state.apply("fs", {"C1": [entry(5, "a"), entry(3, "b"), entry(5, "c")]}, KEEP_3)
    again = state.apply("fs", {"C1": [entry(5, "a"), entry(4, "d")]}, KEEP_3)
    assert first == Applied(applied=3) and again == Applied(applied=1, duplicates=1)
    assert [e.record_id for e in state.read("fs", ["C1"])[0] or []] == ["b", "d", "a", "c"]
    assert state.read("fs", ["C2"]) == [None]


def test_a_record_later_than_the_tolerance_is_refused_and_named() -> None:
    state = MemoryEntityState()
    state.apply("fs", {"C1": [entry(100, "new")]}, KEEP_3)
    done = state.apply("fs", {"C1": [entry(95, "ok"), entry(80, "late")]}, KEEP_3)
    assert done == Applied(applied=1, late=1, late_records=("late",))
    assert state.apply("fs", {"C1": [entry(1, "old")]}, KEEP_3, late_tolerance_us=-1).applied == 1


def test_pruning_keeps_the_tolerance_the_last_n_before_it_and_the_time_window() -> None:
    held = [entry(t, f"r{t}") for t in range(0, 100, 5)]  # 0, 5, ..., 95
    counts = prune_entries(held, Retention(max_count=3, tolerance_us=10 * S))
    assert [e.time_us // S for e in counts] == [70, 75, 80, 85, 90, 95]  # 3 before 85
    spans = prune_entries(held, Retention(max_span_us=30 * S, tolerance_us=10 * S))
    assert [e.time_us // S for e in spans] == [55, 60, 65, 70, 75, 80, 85, 90, 95]
    both = prune_entries(held, Retention(max_count=8, max_span_us=10 * S, tolerance_us=0))
    assert len(both) == 9  # the 8 before 95, and 95 itself


def test_state_expires_after_its_ttl_and_each_write_renews_it() -> None:
    now = [0.0]
    state = MemoryEntityState(clock=lambda: now[0])
    state.apply("fs", {"C1": [entry(1, "a")]}, KEEP_3)
    now[0] = 59.0
    state.apply("fs", {"C1": [entry(2, "b")]}, KEEP_3)
    now[0] = 100.0
    assert [e.record_id for e in state.read("fs", ["C1"])[0] or []] == ["a", "b"]
    now[0] = 120.0
    assert state.read("fs", ["C1"]) == [None]
