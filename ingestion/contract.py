"""Dataset contracts: the columns and types a source must have, checked chunk by chunk.

A batch that breaks its contract is refused with an error naming the columns and the
first offending rows; with ``bad_rows: quarantine`` the bad rows are set aside and
counted instead.

``ContractTyping`` runs the same checks while the raw store writes a batch, so the stored
Parquet holds the typed rows and nothing reads the batch again to check or type it.

Example::

    contract = DatasetContract(columns={"amount": "float", "type": "string"}, label="isFraud")
    checker = ContractChecker(contract)
    clean = [checker.check(chunk, offset) for offset, chunk in chunks]
    checker.finish()          # raises ContractViolation for a refused batch
    store.put("paysim", "tx.csv", typing=ContractTyping(contract, "tx.csv"))
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import InvalidInput
from common.stores import KeepAsRead, RawBatch, RawBatchStore

ColumnType = Literal["int", "float", "string", "bool", "datetime", "category"]
MAX_REPORTED_ROWS = 5


class DatasetContract(BaseModel):
    """What a dataset's source files must look like."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: dict[str, ColumnType] = Field(min_length=1)
    """Required columns and their types; extra columns are kept as they are."""
    format: Literal["csv", "parquet", "jsonl"] | None = None
    """File format; inferred from the file name when absent."""
    label: str | None = None
    """The label column, if the dataset has one."""
    entity_key: str | None = None
    """The column identifying an entity (online features are keyed by it)."""
    timestamp: str | None = None
    """The event-time column."""
    record_id: str | None = None
    """The column holding each record's unique id (streamed records are deduplicated by
    it); none: a record's id is a hash of its values."""
    bad_rows: Literal["reject", "quarantine"] = "reject"
    """Refuse a batch with bad rows, or set them aside and count them."""
    max_bad_share: float = Field(default=0.1, ge=0, le=1)
    """With quarantine: above this share of bad rows the batch is refused anyway."""

    @model_validator(mode="after")
    def _roles_are_columns(self) -> DatasetContract:
        for role in ("label", "entity_key", "timestamp", "record_id"):
            name = getattr(self, role)
            if name is not None and name not in self.columns:
                raise ValueError(f"{role} {name!r} is not one of the contract's columns")
        return self


class ContractViolation(InvalidInput):
    """A batch broke its dataset's contract."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source, self.problems = source, problems
        super().__init__(f"{source} breaks the dataset contract: " + "; ".join(problems))


@dataclass
class BadRow:
    """One offending row: its number in the file (0-based, header excluded) and why."""

    row: int
    column: str
    value: str
    expected: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.column}={self.value!r} is not {self.expected}"


@dataclass
class ContractChecker:
    """Checks and types a batch chunk by chunk, remembering what was wrong."""

    contract: DatasetContract
    source: str = "source"
    rows: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    quarantined: int = 0
    missing: list[str] = field(default_factory=list)

    def check(self, chunk: pd.DataFrame, offset: int) -> pd.DataFrame:
        """The chunk with contract columns typed; bad rows dropped under quarantine."""
        self.rows += len(chunk)
        self._check_columns(chunk)
        typed, bad = _typed(chunk, self.contract.columns, offset)
        self.bad_rows.extend(bad[: MAX_REPORTED_ROWS - len(self.bad_rows)])
        bad_index = {b.row - offset for b in bad}
        self.quarantined += len(bad_index)
        return typed.drop(index=typed.index[list(bad_index)]) if bad_index else typed

    def _check_columns(self, chunk: pd.DataFrame) -> None:
        missing = [c for c in self.contract.columns if c not in chunk.columns]
        if missing:
            self.missing = missing
            raise self._violation()

    def finish(self) -> int:
        """Raise ``ContractViolation`` if the batch is refused; else the quarantined count."""
        if self.rows == 0:
            raise ContractViolation(self.source, ["the file has no rows"])
        refused = self.contract.bad_rows == "reject" or (
            self.quarantined / self.rows > self.contract.max_bad_share
        )
        if self.quarantined and refused:
            raise self._violation()
        return self.quarantined

    def _violation(self) -> ContractViolation:
        problems = []
        if self.missing:
            found = ", ".join(sorted(set(self.contract.columns) - set(self.missing)))
            problems.append(f"missing column(s) {self.missing} (found: {found or 'none'})")
        if self.quarantined:
            columns = sorted({b.column for b in self.bad_rows})
            problems.append(
                f"{self.quarantined} of {self.rows} row(s) with mistyped values in {columns};"
                " first: " + ", ".join(str(b) for b in self.bad_rows)
            )
        return ContractViolation(self.source, problems)


def _typed(
    chunk: pd.DataFrame, columns: Mapping[str, str], offset: int
) -> tuple[pd.DataFrame, list[BadRow]]:
    typed, bad = chunk.copy(), list[BadRow]()
    for name, kind in columns.items():
        typed[name], failed = _coerce(chunk[name], kind)
        bad.extend(
            BadRow(offset + i, name, str(chunk[name].iloc[i]), kind) for i in failed
        )
    bad.sort(key=lambda b: b.row)
    return typed, bad


def _coerce(values: pd.Series, kind: str) -> tuple[pd.Series, list[int]]:
    """Typed values and the positions that held a value of the wrong type."""
    if kind in ("string", "category"):
        return values.astype("string" if kind == "string" else "category"), []
    converted = _convert(values, kind)
    failed = (converted.isna() & values.notna()).to_numpy().nonzero()[0]
    return converted, failed.tolist()


def _convert(values: pd.Series, kind: str) -> pd.Series:
    if kind == "datetime":
        return pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    if kind == "bool":
        mapped = values.astype("string").str.lower().map(_BOOLS)
        return mapped.astype("boolean")
    numbers = pd.to_numeric(values, errors="coerce")
    if kind == "int":
        whole = numbers.where(numbers.isna() | (numbers % 1 == 0))
        return whole.astype("Int64")
    return numbers.astype("float64")


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def typing_id(contract: DatasetContract) -> str:
    """Names the typing a contract does (its columns, types and bad-row policy): a raw
    batch typed under this name holds exactly what ``read_typed`` would give."""
    canonical = contract.model_dump_json(
        exclude={"format", "label", "entity_key", "timestamp", "record_id"})
    return "contract-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def text_columns(contract: DatasetContract) -> list[str]:
    """The string and category columns, read as text so that their values stay exact."""
    return [name for name, kind in contract.columns.items() if kind in ("string", "category")]


class ContractTyping:
    """Checks and types a batch chunk by chunk while the raw store writes it
    (``RawBatchStore.put(..., typing=...)``). A batch the contract refuses is stored as
    read instead (``KeepAsRead``), and the ingestion service checks it as stored, which names
    the problems as before."""

    def __init__(self, contract: DatasetContract, source: str = "source") -> None:
        self.contract, self.source = contract, source
        self.name = typing_id(contract)
        self.text_columns = text_columns(contract)
        self.checker = ContractChecker(contract, source)

    def start(self) -> None:
        self.checker = ContractChecker(self.contract, self.source)

    def __call__(self, chunk: pd.DataFrame, first_row: int) -> pd.DataFrame:
        try:
            typed = self.checker.check(chunk, first_row)
        except ContractViolation:
            raise KeepAsRead from None  # missing columns
        if self.checker.quarantined and self.contract.bad_rows == "reject":
            raise KeepAsRead  # refused, whatever the other chunks hold
        return typed

    def finish(self) -> int:
        try:
            return self.checker.finish()
        except ContractViolation:
            raise KeepAsRead from None  # no rows, or too many set aside


def typed_chunks(
    chunks: Iterable[pd.DataFrame], checker: ContractChecker
) -> Iterator[pd.DataFrame]:
    """Each chunk checked and typed by ``checker``, row numbers counted across chunks."""
    offset = 0
    for chunk in chunks:
        yield checker.check(chunk.reset_index(drop=True), offset)
        offset += len(chunk)


def read_typed(
    chunks: Iterable[pd.DataFrame], contract: DatasetContract, source: str
) -> pd.DataFrame:
    """The whole batch typed by its contract (bad rows dropped under quarantine)."""
    checker = ContractChecker(contract, source)
    frames = list(typed_chunks(chunks, checker))
    checker.finish()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def batch_frames(
    store: RawBatchStore, batch: RawBatch, contract: DatasetContract, rows: int = 100_000
) -> Iterator[pd.DataFrame]:
    """A stored batch's rows as read, to check or type by ``contract``, ``rows`` at a time:
    the Parquet when it holds them as read, else (typed under another contract, which may
    have set rows aside) the original bytes."""
    if batch.typed_by is None:
        return store.iter_frames(batch.batch_id, rows)
    return store.iter_source_frames(batch.batch_id, rows, text_columns(contract))


def read_batch(store: RawBatchStore, batch_id: str, contract: DatasetContract) -> pd.DataFrame:
    """A stored batch typed by ``contract`` (bad rows dropped under quarantine): read as it
    is when ingestion typed it under this contract as it was stored, else typed now."""
    batch = store.manifest(batch_id)
    if batch.typed_by != typing_id(contract):
        return read_typed(batch_frames(store, batch, contract), contract, batch.source_uri)
    frame = store.read_frame(batch_id)
    for name, kind in contract.columns.items():
        # Chunks' categories are merged in the order first seen; typing the whole column
        # at once would sort them.
        if kind == "category" and not frame[name].cat.categories.is_monotonic_increasing:
            frame[name] = frame[name].cat.reorder_categories(
                sorted(frame[name].cat.categories))
    return frame
