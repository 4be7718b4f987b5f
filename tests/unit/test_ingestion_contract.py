"""Dataset contracts: coercion of each type, reject or quarantine, and what errors say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from common.stores import RawBatchStore
from ingestion.contract import (
    MAX_REPORTED_ROWS,
    ColumnType,
    ContractChecker,
    ContractTyping,
    ContractViolation,
    DatasetContract,
    read_batch,
    read_typed,
    typed_chunks,
    typing_id,
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


# -- typing while the raw store writes the batch ------------------------------------------


def write_rows(path: Path, amounts: list[str]) -> Path:
    path.write_text("id,amount\n" + "".join(f"a{i},{a}\n" for i, a in enumerate(amounts)))
    return path


def test_contract_typing_types_the_stored_batch_so_it_is_read_as_stored(tmp_path: Path) -> None:
    store = RawBatchStore(str(tmp_path / "root"), chunk_rows=2)
    source = write_rows(tmp_path / "tx.csv", ["1", "2", "3", "4", "5"])
    batch = store.put("tx", str(source), typing=ContractTyping(contract(), str(source)))
    assert batch.typed_by == typing_id(contract())
    expected = read_typed([pd.read_csv(source)], contract(), str(source))
    pd.testing.assert_frame_equal(read_batch(store, batch.batch_id, contract()), expected)
    assert str(expected["id"].dtype) == "string" and expected["amount"].dtype == "float64"


def test_contract_typing_sets_bad_rows_aside_under_quarantine(tmp_path: Path) -> None:
    store = RawBatchStore(str(tmp_path / "root"), chunk_rows=2)
    source = write_rows(tmp_path / "tx.csv", ["1", "x", "3", "4", "5"])
    quarantine = contract(bad_rows="quarantine", max_bad_share=0.25)
    batch = store.put("tx", str(source), typing=ContractTyping(quarantine, str(source)))
    assert (batch.rows, batch.rows_set_aside) == (4, 1)
    assert read_batch(store, batch.batch_id, quarantine)["amount"].tolist() == [1.0, 3, 4, 5]


@pytest.mark.parametrize(("amounts", "options"), [
    (["1", "2", "3", "x", "5"], {}),                                                # reject
    (["1", "x", "y", "4", "5"], {"bad_rows": "quarantine", "max_bad_share": 0.25}),  # too many
    ([], {}),                                                                     # no rows
], ids=["a bad row", "too many set aside", "no rows"])
def test_a_batch_the_contract_refuses_is_stored_as_read(
    tmp_path: Path, amounts: list[str], options: dict[str, Any]
) -> None:
    store = RawBatchStore(str(tmp_path / "root"), chunk_rows=2)
    source = write_rows(tmp_path / "tx.csv", amounts)
    batch = store.put("tx", str(source), typing=ContractTyping(contract(**options), str(source)))
    assert batch.typed_by is None and batch.rows == len(amounts)
    pd.testing.assert_frame_equal(store.read_frame(batch.batch_id), pd.read_csv(source))


def test_a_batch_without_a_contract_column_is_stored_as_read(tmp_path: Path) -> None:
    store = RawBatchStore(str(tmp_path / "root"))
    source = tmp_path / "tx.csv"
    source.write_text("id,other\na,1\n")
    batch = store.put("tx", str(source), typing=ContractTyping(contract(), str(source)))
    assert batch.typed_by is None


def test_a_batch_typed_under_another_contract_is_typed_again_on_read(tmp_path: Path) -> None:
    store = RawBatchStore(str(tmp_path / "root"))
    source = write_rows(tmp_path / "tx.csv", ["1", "2", "x"])
    loose = DatasetContract(columns={"id": "string", "amount": "string"})
    batch = store.put("tx", str(source), typing=ContractTyping(loose, str(source)))
    assert batch.typed_by == typing_id(loose) != typing_id(contract())
    with pytest.raises(ContractViolation, match="row 2: amount='x' is not float"):
        read_batch(store, batch.batch_id, contract())


def test_the_typing_id_follows_what_changes_the_typed_rows() -> None:
    assert typing_id(contract()) == typing_id(contract(label="amount", entity_key="id"))
    assert typing_id(contract()) != typing_id(contract(bad_rows="quarantine"))
    assert typing_id(contract()) != typing_id(
        DatasetContract(columns={"id": "string", "amount": "int"}))


def test_read_batch_sorts_categories_merged_from_chunks(tmp_path: Path) -> None:
    store = RawBatchStore(str(tmp_path / "root"), chunk_rows=2)
    source = tmp_path / "kinds.csv"
    source.write_text("kind\nPAYMENT\nPAYMENT\nCASH_IN\nTRANSFER\n")
    kinds = DatasetContract(columns={"kind": "category"})
    batch = store.put("k", str(source), typing=ContractTyping(kinds, str(source)))
    typed = read_batch(store, batch.batch_id, kinds)["kind"]
    assert typed.cat.categories.tolist() == ["CASH_IN", "PAYMENT", "TRANSFER"]
    assert typed.tolist() == ["PAYMENT", "PAYMENT", "CASH_IN", "TRANSFER"]
