"""Entity aggregates: exact values, strictly past rows, and the online pass-through."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from common.errors import InvalidInput
from preparation.aggregates import (
    EntityAggregate,
    aggregate_name,
    past_aggregates,
    past_and_latest_aggregates,
)

NAN = np.nan


def history() -> pd.DataFrame:
    """Entity a at 00:00, 01:00, 01:00 (a tie), next day 02:00; b at 00:00 and 03:00."""
    return pd.DataFrame({
        "k": ["a", "b", "a", "a", "b", "a", None],
        "v": [1.0, 10.0, 2.0, 4.0, 20.0, 8.0, 5.0],
        "t": pd.to_datetime(["2026-01-01T00:00Z", "2026-01-01T00:00Z", "2026-01-01T01:00Z",
                             "2026-01-01T01:00Z", "2026-01-01T03:00Z", "2026-01-02T02:00Z",
                             "2026-01-01T00:00Z"]),
        "fraud": [0, 0, 0, 1, 0, 1, 0],
    }, index=[10, 11, 12, 13, 14, 15, 16])


def aggregates(frame: pd.DataFrame, window: int | str) -> pd.DataFrame:
    return past_aggregates(frame, key="k", column="v", window=window, timestamp="t")


def expected(window: str, count: list, total: list, mean: list) -> pd.DataFrame:
    return pd.DataFrame({f"k_v_count_{window}": count, f"k_v_sum_{window}": total,
                         f"k_v_mean_{window}": mean}, index=[10, 11, 12, 13, 14, 15, 16])


def test_names_say_key_column_stat_and_window() -> None:
    assert aggregate_name("nameOrig", "amount", "mean", 5) == "nameOrig_amount_mean_last5"
    assert aggregate_name("nameOrig", "amount", "sum", "24h") == "nameOrig_amount_sum_24h"


def test_a_row_count_window_uses_the_previous_rows_of_the_entity() -> None:
    assert_frame_equal(aggregates(history(), 2), expected(
        "last2",
        count=[0.0, 0.0, 1.0, 2.0, 1.0, 2.0, 0.0],
        total=[0.0, 0.0, 1.0, 3.0, 10.0, 6.0, 0.0],
        mean=[NAN, NAN, 1.0, 1.5, 10.0, 3.0, NAN],
    ))


def test_a_time_window_uses_earlier_instants_only() -> None:
    # Rows 12 and 13 tie at 01:00: neither is the other's past. Row 15 comes 25 h after
    # them, outside [t - 24h, t).
    assert_frame_equal(aggregates(history(), "24h"), expected(
        "24h",
        count=[0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
        total=[0.0, 0.0, 1.0, 1.0, 10.0, 0.0, 0.0],
        mean=[NAN, NAN, 1.0, 1.0, 10.0, NAN, NAN],
    ))


def test_the_window_start_is_inclusive() -> None:
    frame = history()
    frame.loc[15, "t"] = pd.Timestamp("2026-01-02T01:00Z")  # exactly 24 h after 01:00

    out = aggregates(frame, "24h")

    assert out.loc[15].tolist() == [2.0, 6.0, 3.0]


def test_no_future_row_and_not_the_row_itself_leak_into_its_value() -> None:
    before = aggregates(history(), 3)
    changed = history()
    changed.loc[15, ["v", "fraud"]] = [1000.0, 0]  # the last row of a: nobody's past
    changed.loc[13, "v"] = 500.0  # row 13's own value: only its successors may see it

    after = aggregates(changed, 3)

    assert_frame_equal(after.drop(index=15), before.drop(index=15))
    assert after.loc[15, "k_v_sum_last3"] == 1.0 + 2.0 + 500.0
    assert before.loc[13, "k_v_sum_last3"] == 3.0  # leakage of itself would make it 7


def test_the_frame_order_does_not_matter_when_there_is_a_timestamp() -> None:
    shuffled = history().sample(frac=1.0, random_state=3)
    assert list(shuffled.index) != list(history().index)

    assert_frame_equal(aggregates(shuffled, "24h").sort_index(), aggregates(history(), "24h"))


def test_without_a_timestamp_the_frame_order_is_time() -> None:
    out = past_aggregates(history().iloc[::-1], key="k", column="v", window=1,
                          stats=("sum",))

    assert out.index.tolist() == [16, 15, 14, 13, 12, 11, 10]
    assert out["k_v_sum_last1"].tolist() == [0.0, 0.0, 0.0, 8.0, 4.0, 20.0, 2.0]


def test_missing_values_are_skipped_and_missing_keys_have_no_past() -> None:
    frame = history()
    frame.loc[12, "v"] = NAN

    out = aggregates(frame, 5)

    assert out.loc[13].tolist() == [1.0, 1.0, 1.0]
    assert out.loc[16].tolist()[:2] == [0.0, 0.0]
    assert np.isnan(out.loc[16, "k_v_mean_last5"])


def test_entity_aggregate_adds_its_columns() -> None:
    step = EntityAggregate("k", "v", 2, ("count", "mean"), "t").fit(history())

    out = step.transform(history())

    assert step.output_names() == ["k_v_count_last2", "k_v_mean_last2"]
    assert list(out.columns) == ["k", "v", "t", "fraud", *step.output_names()]
    assert out["k_v_mean_last2"].loc[15] == 3.0


def test_online_precomputed_columns_are_used_as_they_are() -> None:
    step = EntityAggregate("k", "v", 2, ("count", "mean"), "t").fit(history())
    served = pd.DataFrame({"k": ["a"], "v": [1.0], "t": ["2026-01-03T00:00Z"],
                           "k_v_count_last2": [7.0], "k_v_mean_last2": [2.5]})

    assert_frame_equal(step.transform_online(served), served)
    with pytest.raises(InvalidInput, match=r"not \['k_v_mean_last2'\]"):
        step.transform_online(served.drop(columns=["k_v_mean_last2"]))


def test_online_without_precomputed_columns_computes_from_the_rows_given() -> None:
    step = EntityAggregate("k", "v", 2, ("count",), "t").fit(history())

    out = step.transform_online(history().drop(columns="fraud"))

    assert out["k_v_count_last2"].tolist() == [0.0, 0.0, 1.0, 2.0, 1.0, 2.0, 0.0]


def test_the_aggregated_column_must_be_numeric() -> None:
    with pytest.raises(InvalidInput, match=r"columns \['k'\] are not numeric"):
        EntityAggregate("v", "k", 2).fit(history())


# -- the latest values: what a new row of each entity would get ----------------------------


def with_gaps() -> pd.DataFrame:
    """history() plus a missing value, a row without a time and an entity with no timed row."""
    extra = pd.DataFrame({"k": ["a", "c", "b"], "v": [NAN, 7.0, 3.0],
                          "t": pd.to_datetime(["2026-01-01T05:00Z", None, "2026-01-01T01:00Z"]),
                          "fraud": [0, 0, 0]}, index=[17, 18, 19])
    return pd.concat([history(), extra])


@pytest.mark.parametrize("window", [1, 2, 5, "1h", "3h", "24h"])
@pytest.mark.parametrize("at", ["2026-01-01T01:00Z", "2026-01-01T04:00Z", "2026-01-03T00:00Z"])
def test_latest_values_are_those_of_a_new_row_of_each_entity_at_that_time(window, at) -> None:
    frame, when = with_gaps(), pd.Timestamp(at)
    past, latest = past_and_latest_aggregates(frame, key="k", column="v", window=window,
                                              timestamp="t", at=when)

    assert_frame_equal(past, aggregates(frame, window))  # the rows' own values: unchanged
    # The same new rows added to the frame (after the rows with their time, as ties keep
    # the frame's order) get exactly these values from the plain computation.
    probes = pd.DataFrame({"k": latest.index, "v": NAN, "t": when}, index=range(100, 103))
    computed = aggregates(pd.concat([frame, probes]), window).loc[probes.index]
    assert_frame_equal(latest, computed.set_axis(latest.index), check_exact=True)
    assert latest.index.tolist() == ["a", "b", "c"]  # in order of first appearance


def test_latest_values_without_a_timestamp_follow_every_row() -> None:
    frame = with_gaps().drop(columns="t")
    _, latest = past_and_latest_aggregates(frame, key="k", column="v", window=2)
    assert latest.loc["a"].tolist() == [1.0, 8.0, 8.0]  # the last two: 8 and a missing value
    assert latest.loc["c"].tolist() == [1.0, 7.0, 7.0]
