"""Dataset contracts: coercion of each type, reject or quarantine, and what errors say."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from ingestion.contract import (
    MAX_REPORTED_ROWS,
    ColumnType,
    ContractChecker,
    ContractViolation,
    DatasetContract,
    read_typed,
    typed_chunks,
)


def check_one(kind: ColumnType, values: list[object]) -> tuple[pd.Series, ContractChecker]:
    contract = DatasetContract(columns={"v": kind}, bad_rows="quarantine", max_bad_share=1.0)
    checker = ContractChecker(contract, "values.csv")
    typed = checker.check(pd.DataFrame({"v": values}), offset=0)
    return typed["v"], checker


def bad_rows(checker: ContractChecker) -> list[int]:
    return [bad.row for bad in checker.bad_rows]


def test_int_accepts_whole_numbers_and_refuses_fractions_and_words() -> None:
    typed, checker = check_one("int", ["1", "2.0", "-3", None, "2.5", "x"])
    assert str(typed.dtype) == "Int64"
    assert typed.iloc[:3].tolist() == [1, 2, -3]
    assert pd.isna(typed.iloc[3])  # missing is allowed, not mistyped
    assert bad_rows(checker) == [4, 5]
    assert [str(b) for b in checker.bad_rows] == ["row 4: v='2.5' is not int",
                                                  "row 5: v='x' is not int"]


def test_float_accepts_numbers_in_any_notation() -> None:
    typed, checker = check_one("float", ["1.5", "1e3", "-2", None, "abc"])
    assert typed.dtype == "float64"
    assert typed.iloc[:3].tolist() == [1.5, 1000.0, -2.0]
    assert bad_rows(checker) == [4]  # missing is allowed, 'abc' is not a number


def test_bool_accepts_the_usual_spellings() -> None:
    typed, checker = check_one("bool", ["true", "False", "1", "0", "yes", "NO", "maybe"])
    assert str(typed.dtype) == "boolean"
    assert typed.iloc[:6].tolist() == [True, False, True, False, True, False]
    assert [str(b) for b in checker.bad_rows] == ["row 6: v='maybe' is not bool"]


def test_datetime_is_parsed_to_utc_in_mixed_formats() -> None:
    typed, checker = check_one(
        "datetime", ["2026-01-01", "2026-01-01T03:00:00Z", "2026-01-01 04:00:00+01:00", "soon"])
    assert str(typed.dtype) == "datetime64[ns, UTC]"
    assert typed.iloc[1] == pd.Timestamp("2026-01-01T03:00:00Z")
    assert typed.iloc[2] == pd.Timestamp("2026-01-01T03:00:00Z")  # converted to UTC
    assert bad_rows(checker) == [3]


@pytest.mark.parametrize(("kind", "dtype"), [("string", "string"), ("category", "category")])
def test_string_and_category_take_anything(kind: ColumnType, dtype: str) -> None:
    typed, checker = check_one(kind, ["a", 1, 2.5, None])
    assert str(typed.dtype) == dtype
    assert checker.bad_rows == [] and checker.quarantined == 0


def frame(amounts: list[object]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"a{i}" for i in range(len(amounts))], "amount": amounts})


def contract(**options: Any) -> DatasetContract:
    return DatasetContract(columns={"id": "string", "amount": "float"}, **options)


def test_reject_refuses_the_batch_naming_the_column_and_first_rows() -> None:
    checker = ContractChecker(contract(), "tx.csv")
    checker.check(frame(["1", "two", "3", "four"]), offset=0)

    with pytest.raises(ContractViolation) as caught:
        checker.finish()
    assert str(caught.value) == (
        "tx.csv breaks the dataset contract: 2 of 4 row(s) with mistyped values in "
        "['amount']; first: row 1: amount='two' is not float, row 3: amount='four' is not float"
    )
    assert caught.value.source == "tx.csv" and len(caught.value.problems) == 1


def test_quarantine_sets_bad_rows_aside_within_the_allowed_share() -> None:
    checker = ContractChecker(contract(bad_rows="quarantine", max_bad_share=0.25), "tx.csv")
    typed = checker.check(frame(["1", "2", "x", "4"]), offset=0)

    assert checker.finish() == 1
    assert typed["id"].tolist() == ["a0", "a1", "a3"]
    assert typed["amount"].tolist() == [1.0, 2.0, 4.0]


def test_quarantine_refuses_the_batch_above_the_allowed_share() -> None:
    checker = ContractChecker(contract(bad_rows="quarantine", max_bad_share=0.25), "tx.csv")
    checker.check(frame(["1", "x", "y", "4"]), offset=0)
    with pytest.raises(ContractViolation, match=r"2 of 4 row\(s\) with mistyped values"):
        checker.finish()


def test_missing_columns_are_named_with_what_was_found() -> None:
    checker = ContractChecker(
        DatasetContract(columns={"id": "string", "amount": "float", "type": "category"}),
        "tx.csv")
    with pytest.raises(ContractViolation) as caught:
        checker.check(pd.DataFrame({"id": ["a"], "other": [1]}), offset=0)
    assert caught.value.problems == ["missing column(s) ['amount', 'type'] (found: id)"]
    assert str(caught.value).startswith("tx.csv breaks the dataset contract: ")


def test_row_numbers_count_across_chunks() -> None:
    checker = ContractChecker(contract(bad_rows="quarantine", max_bad_share=0.5), "tx.csv")
    chunks = [frame(["1", "2", "3"]), frame(["4", "oops", "6"]), frame(["7", "8", "nine"])]

    typed = list(typed_chunks(chunks, checker))

    assert [str(b) for b in checker.bad_rows] == [
        "row 4: amount='oops' is not float", "row 8: amount='nine' is not float"]
    assert [part["amount"].tolist() for part in typed] == [[1.0, 2.0, 3.0], [4.0, 6.0], [7.0, 8.0]]
    assert checker.finish() == 2 and checker.rows == 9


def test_only_the_first_offending_rows_are_reported_but_all_are_counted() -> None:
    checker = ContractChecker(contract(), "tx.csv")
    list(typed_chunks([frame(["x"] * 4), frame(["y"] * 4)], checker))

    assert [b.row for b in checker.bad_rows] == list(range(MAX_REPORTED_ROWS))
    with pytest.raises(ContractViolation, match=r"8 of 8 row\(s\)"):
        checker.finish()


def test_a_file_without_rows_is_refused() -> None:
    checker = ContractChecker(contract(), "empty.csv")
    checker.check(frame([]), offset=0)
    with pytest.raises(ContractViolation) as caught:
        checker.finish()
    assert str(caught.value) == "empty.csv breaks the dataset contract: the file has no rows"


def test_read_typed_returns_the_whole_batch_typed() -> None:
    typed = read_typed([frame(["1", "2"]), frame(["3"])], contract(), "tx.csv")
    assert typed["amount"].tolist() == [1.0, 2.0, 3.0]
    assert typed.index.tolist() == [0, 1, 2]
    with pytest.raises(ContractViolation, match="row 2: amount='z'"):
        read_typed([frame(["1", "2"]), frame(["z"])], contract(), "tx.csv")


def test_roles_must_be_contract_columns() -> None:
    with pytest.raises(ValidationError, match="label 'isFraud' is not one of the contract's"):
        DatasetContract(columns={"amount": "float"}, label="isFraud")
