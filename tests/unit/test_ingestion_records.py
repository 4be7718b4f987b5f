"""Streamed records against their dataset's contract: refused one by one, by field."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.errors import InvalidInput
from common.events import MAX_RECORDS_PER_EVENT
from ingestion.contract import DatasetContract
from ingestion.records import check_records, read_records_file, record_id_of, records_events

CONTRACT = DatasetContract(
    columns={"account": "string", "amount": "float", "n": "int", "kind": "category",
             "at": "datetime", "flag": "bool", "label": "int"},
    entity_key="account", timestamp="at", label="label")
GOOD = {"account": "C1", "amount": "12.5", "n": 3.0, "kind": "TRANSFER",
        "at": "2024-01-01T10:00:00", "flag": "yes", "extra": [1, 2]}


def test_a_valid_record_is_typed_as_the_batch_path_types_it() -> None:
    checked = check_records([GOOD], CONTRACT)
    assert checked.refused == [] and checked.indices == [0]
    [record] = checked.records
    assert record["amount"] == 12.5 and record["n"] == 3 and type(record["n"]) is int
    assert record["at"] == datetime(2024, 1, 1, 10, tzinfo=UTC) and record["flag"] is True
    assert record["label"] is None and record["extra"] == [1, 2]  # the label may come later


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"amount": "a lot"}, "amount", "amount='a lot' is not float"),
    ({"n": 2.5}, "n", "is not int (expected a whole number)"),
    ({"amount": True}, "amount", "got a boolean"),
    ({"at": "yesterday"}, "at", "expected an ISO 8601 timestamp"),
    ({"account": None}, "account", "account is required"),
    ({"at": None}, "at", "at is required"),
    ({"flag": "maybe"}, "flag", "expected true or false"),
    ({"amount": float("inf")}, "amount", "finite"),
])
def test_a_bad_record_is_refused_naming_the_field_and_the_others_go_on(
        change: dict, field: str, words: str) -> None:
    checked = check_records([GOOD, {**GOOD, **change}, {**GOOD, "amount": 1}], CONTRACT)
    assert checked.indices == [0, 2]
    [problem] = checked.refused
    assert (problem.index, problem.field) == (1, field) and words in problem.reason


def test_a_record_that_is_not_an_object_is_refused() -> None:
    [problem] = check_records([["C1", 2]], CONTRACT).refused  # type: ignore[list-item]
    assert problem.field is None and "JSON object" in problem.reason


def test_a_record_id_ignores_the_label_and_extra_fields_and_follows_the_values() -> None:
    typed = check_records([GOOD, {**GOOD, "label": 1, "extra": None}, {**GOOD, "amount": 13}],
                          CONTRACT).records
    ids = [record_id_of(r, CONTRACT) for r in typed]
    assert ids[0] == ids[1] != ids[2] and len(ids[0]) == 24
    keyed = CONTRACT.model_copy(update={"record_id": "account"})
    assert record_id_of(typed[0], keyed) == "C1"


def test_records_become_events_of_bounded_size(tmp_path: Path) -> None:
    events = records_events("paysim", [GOOD] * 1_201, batch_size=500)
    assert [len(e.records) for e in events] == [500, 500, 201]
    with pytest.raises(ValueError, match="batch_size"):
        records_events("paysim", [GOOD], batch_size=MAX_RECORDS_PER_EVENT + 1)


def test_records_files_are_read_as_jsonl_or_csv(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text('{"account": "C1", "amount": 1.5}\n\n{"account": "C2"}\n')
    (tmp_path / "r.csv").write_text("account,amount\nC1,1.5\nC2,\n")
    assert read_records_file(tmp_path / "r.jsonl") == [{"account": "C1", "amount": 1.5},
                                                        {"account": "C2"}]
    assert read_records_file(tmp_path / "r.csv") == [{"account": "C1", "amount": "1.5"},
                                                      {"account": "C2", "amount": None}]
    (tmp_path / "r.txt").write_text("")
    with pytest.raises(InvalidInput, match="jsonl or .csv"):
        read_records_file(tmp_path / "r.txt")
