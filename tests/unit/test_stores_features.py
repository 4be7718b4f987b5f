"""Feature store parts that need no Redis: key bytes, row encoding, offline store."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from common.errors import InvalidInput, NotFound
from common.stores._codec import RowSchema, encode_column, encode_rows, kind_of, timestamps_us
from common.stores.features import (
    FIELD_ROW,
    FIELD_TS,
    OfflineFeatureStore,
    latest_rows,
    online_key,
    online_schema_key,
)
from common.stores.scores import FIELD_SCORE, score_stream_key


def test_key_bytes_are_pinned():
    assert online_key("conveyor", "fs1", "C42") == b"conveyor:fs:fs1:C42"
    assert online_key("test-1a2b", "3f9e", 42) == b"test-1a2b:fs:3f9e:42"
    assert online_schema_key("conveyor", "fs1") == b"conveyor:fsmeta:fs1"
    assert score_stream_key("conveyor") == b"conveyor:scores"
    assert (FIELD_TS, FIELD_ROW, FIELD_SCORE) == ("_ts", "_v", b"s")


def test_stored_row_is_a_plain_json_array_in_schema_order():
    frame = pd.DataFrame({"amount": [12.5], "count": [3], "kind": ["CASH_OUT"]})
    schema, rows = encode_rows(frame, ["amount", "count", "kind"])
    assert rows == [b'[12.5,3,"CASH_OUT"]']
    assert schema.to_json() == (
        b'{"features":["amount","count","kind"],"kinds":["float","int","str"]}'
    )


def mixed_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "f": [0.1 + 0.2, 1e-300, -0.0, np.nan, 1.0],
            "i": np.array([0, -7, 2**62, 5, 1], dtype="int64"),
            "b": [True, False, True, False, True],
            "s": ["a", "", 'quote " and , comma', None, "ü"],
            "n": pd.array([1, None, 3, 4, None], dtype="Int64"),
            "t": pd.to_datetime(
                ["2024-01-01T10:00:00Z", None, "2024-02-29T23:59:59.5Z", None, None],
                format="ISO8601",
            ),
            "o": [{"k": 1}, [1, 2], None, "x", 3],
        }
    )


def test_values_decode_back_to_their_python_types():
    frame = mixed_frame()
    schema, rows = encode_rows(frame, list(frame.columns))
    decoded = [RowSchema.from_json(schema.to_json()).decode(row) for row in rows]
    assert decoded[0]["f"] == 0.1 + 0.2 and type(decoded[0]["f"]) is float
    assert decoded[4]["f"] == 1.0 and type(decoded[4]["f"]) is float
    assert decoded[1]["f"] == 1e-300 and math.copysign(1, decoded[2]["f"]) == -1
    assert decoded[3]["f"] is None
    assert [r["i"] for r in decoded] == [0, -7, 2**62, 5, 1]
    assert all(type(r["i"]) is int for r in decoded)
    assert [r["b"] for r in decoded] == [True, False, True, False, True]
    assert [r["s"] for r in decoded] == ["a", "", 'quote " and , comma', None, "ü"]
    assert [r["n"] for r in decoded] == [1, None, 3, 4, None]
    assert decoded[0]["t"] == pd.Timestamp("2024-01-01T10:00:00Z") and decoded[1]["t"] is None
    assert decoded[2]["t"] == pd.Timestamp("2024-02-29T23:59:59.5Z")
    assert [r["o"] for r in decoded] == [{"k": 1}, [1, 2], None, "x", 3]


def test_kinds_of_columns():
    frame = mixed_frame()
    kinds = [kind_of(frame[c]) for c in frame.columns]
    assert kinds == ["float", "int", "bool", "str", "int", "datetime", "json"]


@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "int32", "bool"])
def test_block_path_matches_the_column_path(dtype):
    values = np.random.default_rng(3).normal(size=(40, 5)) * 1000
    frame = pd.DataFrame(values).astype(dtype).rename(columns=str)
    features = list(frame.columns)
    _, rows = encode_rows(frame, features)
    columns = [encode_column(frame[c], kind_of(frame[c]), c) for c in features]
    assert rows == [b"[" + b",".join(v) + b"]" for v in zip(*columns, strict=True)]
    decoded = [orjson.loads(row) for row in rows]
    assert decoded == frame.to_numpy().tolist() or dtype == "float32"


def test_float32_values_decode_to_the_nearest_float():
    frame = pd.DataFrame({"x": np.array([0.1, 3.25], dtype="float32")})
    schema, rows = encode_rows(frame, ["x"])
    assert [schema.decode(r)["x"] for r in rows] == [0.1, 3.25]


def test_infinity_is_stored_as_null_with_a_warning(caplog):
    frame = pd.DataFrame({"ratio": [1.5, np.inf, -np.inf], "other": [1.0, 2.0, 3.0]})
    with caplog.at_level(logging.WARNING):
        schema, rows = encode_rows(frame, ["ratio", "other"])
    assert [schema.decode(r)["ratio"] for r in rows] == [1.5, None, None]
    assert "ratio" in caplog.text and "other" not in caplog.text


def test_decode_picks_features():
    schema, rows = encode_rows(pd.DataFrame({"a": [1.0], "b": [2], "c": ["z"]}), ["a", "b", "c"])
    assert schema.decode(rows[0], ["c", "a"]) == {"c": "z", "a": 1.0}
    with pytest.raises(InvalidInput, match="'d'"):
        schema.check(["a", "d"], "fs1")


def test_a_frame_with_no_feature_encodes_empty_rows():
    schema, rows = encode_rows(pd.DataFrame({"id": [1, 2]}), [])
    assert rows == [b"[]", b"[]"] and schema.decode(rows[0]) == {}


def test_timestamps_in_epoch_microseconds():
    frame = pd.DataFrame(
        {
            "aware": pd.to_datetime(
                ["1970-01-01T00:00:01.000002Z", "2024-01-01T00:00:00Z"], format="ISO8601"
            ),
            "naive": pd.to_datetime(
                ["1970-01-01T00:00:01.000002", "2024-01-01T00:00:00"], format="ISO8601"
            ),
            "seconds": [1.000002, 1704067200.0],
        }
    )
    expected = [b"1000002", b"1704067200000000"]
    assert timestamps_us(frame, "aware", None) == expected
    assert timestamps_us(frame, "naive", None) == expected
    assert timestamps_us(frame, "seconds", None) == expected
    when = datetime(2024, 1, 1, tzinfo=UTC)
    assert timestamps_us(frame, None, when) == [b"1704067200000000"] * 2


def test_missing_timestamps_are_refused():
    frame = pd.DataFrame({"at": pd.to_datetime(["2024-01-01", None])})
    with pytest.raises(InvalidInput, match="at"):
        timestamps_us(frame, "at", None)


def test_latest_rows_keeps_the_newest_row_of_each_entity():
    frame = pd.DataFrame(
        {
            "entity": ["a", "b", "a", "c", "b"],
            "at": pd.to_datetime(
                ["2024-01-03", "2024-01-01", "2024-01-02", "2024-01-01", "2024-01-05"]
            ),
            "x": [1, 2, 3, 4, 5],
        }
    )
    latest = latest_rows(frame, "entity", "at").set_index("entity")["x"].to_dict()
    assert latest == {"a": 1, "b": 5, "c": 4}
    by_position = latest_rows(frame, "entity", None).set_index("entity")["x"].to_dict()
    assert by_position == {"a": 3, "b": 5, "c": 4}


@pytest.fixture
def offline(tmp_path: Path) -> OfflineFeatureStore:
    return OfflineFeatureStore(str(tmp_path))


def test_offline_round_trip(offline):
    frame = pd.DataFrame({"entity": ["a", "b"], "x": [1.5, 2.5], "k": [1, 2]})
    record = offline.write("fs1", frame, {"spec": "abc", "batch_ids": ["b1"]})
    assert offline.exists("fs1")
    pd.testing.assert_frame_equal(offline.read("fs1"), frame)
    pd.testing.assert_frame_equal(offline.read("fs1", columns=["x"]), frame[["x"]])
    assert offline.metadata("fs1") == record
    assert record.rows == 2 and record.columns == {"entity": "object", "x": "float64", "k": "int64"}
    assert record.metadata == {"spec": "abc", "batch_ids": ["b1"]}


def test_offline_keeps_a_meaningful_index(offline):
    frame = pd.DataFrame({"x": [1.0, 2.0]}, index=pd.Index(["a", "b"], name="entity"))
    offline.write("fs2", frame, {})
    pd.testing.assert_frame_equal(offline.read("fs2"), frame)


def test_offline_missing_feature_set_is_not_found(offline):
    assert not offline.exists("nope")
    with pytest.raises(NotFound, match="nope"):
        offline.read("nope")
    with pytest.raises(NotFound, match="nope"):
        offline.metadata("nope")


def test_offline_refuses_ids_that_are_not_one_path_segment(offline):
    with pytest.raises(InvalidInput, match="feature set id"):
        offline.write("../escape", pd.DataFrame({"x": [1]}), {})


def test_offline_keeps_the_online_rows_beside_the_set(offline):
    frame = pd.DataFrame({"entity": ["a", "b", "a"], "x": [1.0, 2.0, 3.0]})
    latest = pd.DataFrame({"entity": ["a", "b"], "x_sum": [4.0, 2.0]})
    offline.write("fs3", frame, {}, online=latest)
    offline.write("fs4", frame, {})

    assert offline.has_online("fs3") and not offline.has_online("fs4")
    pd.testing.assert_frame_equal(offline.read_online("fs3"), latest)
    with pytest.raises(NotFound, match="online rows of feature set fs4"):
        offline.read_online("fs4")
