"""Online ingestion: streamed records checked against their dataset's contract, one by one.

A batch is refused or quarantined as a whole (``ingestion.contract``); a stream goes on:
each record that breaks the contract is refused with the field named, and the others are
applied. A record needs its entity key and event time; every other contract column may
be missing or null (the label usually is: it is not known yet), but a value present must
have the column's type. Values come back typed as the batch path types them (numbers as
int or float, timestamps as aware UTC datetimes, text as str), so the stream and the
batch feed the same transform.

Each record gets an id that its duplicates share: the contract's ``record_id`` column, or
else a hash of its contract columns (the label left out, since it may come later).
Example::

    checked = check_records(event.records, contract)
    checked.records      # the valid records, typed, in order
    checked.ids          # their ids
    checked.refused      # [RecordProblem(index=3, field="amount", reason="...")]
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from common.errors import InvalidInput
from common.events import MAX_RECORDS_PER_EVENT, RecordProblem, RecordsObserved
from ingestion.contract import DatasetContract

MAX_ID_LENGTH = 200
_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


class BadValue(ValueError):
    """A value that is not of its column's type."""


@dataclass
class CheckedRecords:
    """The outcome of checking a list of records."""

    records: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    """Each valid record's position in the input."""
    refused: list[RecordProblem] = field(default_factory=list)


def check_records(records: Sequence[Mapping[str, Any]],
                  contract: DatasetContract) -> CheckedRecords:
    """The valid records typed, with their ids; the others refused, naming the field."""
    out = CheckedRecords()
    plan = _Plan.of(contract)
    for index, record in enumerate(records):
        try:
            typed = plan.typed(record)
            record_id = plan.record_id(typed)
        except _Refused as refused:
            out.refused.append(RecordProblem(index=index, field=refused.field,
                                             reason=refused.reason))
            continue
        out.records.append(typed)
        out.ids.append(record_id)
        out.indices.append(index)
    return out


class _Refused(Exception):
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


class _Plan:
    """A contract's checks, prepared once per contract: the required columns, each
    column's converter, and the columns a record's id hashes."""

    _cache: dict[int, _Plan] = {}

    def __init__(self, contract: DatasetContract) -> None:
        self.contract = contract
        self.required = [n for n in (contract.entity_key, contract.timestamp,
                                     contract.record_id) if n is not None]
        self.columns = [(name, kind, _CONVERTERS.get(kind, convert))
                        for name, kind in contract.columns.items()]
        self.hashed = sorted(c for c in contract.columns if c != contract.label)

    @classmethod
    def of(cls, contract: DatasetContract) -> _Plan:
        plan = cls._cache.get(id(contract))
        if plan is None or plan.contract is not contract:
            plan = cls._cache[id(contract)] = cls(contract)
        return plan

    def typed(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise _Refused(None, f"a record must be a JSON object, not {type(record).__name__}")
        for name in self.required:
            if _missing(record.get(name)):
                raise _Refused(name, f"{name} is required in a streamed record")
        typed = dict(record)
        for name, kind, convert_one in self.columns:
            value = record.get(name)
            if type(value) is float and kind == "float" and value - value == 0:
                continue  # already what it must be (the common case: no call)
            if value is None or value != value:  # missing, or NaN
                typed[name] = None
                continue
            try:
                typed[name] = convert_one(value, kind)
            except BadValue as exc:
                raise _Refused(name, f"{name}={value!r} is not {kind} ({exc})") from None
        return typed

    def record_id(self, record: Mapping[str, Any]) -> str:
        id_column = self.contract.record_id
        if id_column is not None:
            value = str(record[id_column])
            if len(value) > MAX_ID_LENGTH or any(c.isspace() for c in value):
                raise _Refused(id_column, f"{id_column}={value[:40]!r} must be at most "
                               f"{MAX_ID_LENGTH} characters without white space")
            return value
        hashed = orjson.dumps([record.get(c) for c in self.hashed])  # datetimes as RFC 3339
        return hashlib.blake2b(hashed, digest_size=12).hexdigest()


def typed_record(record: Mapping[str, Any], contract: DatasetContract) -> dict[str, Any]:
    """The record with each contract column typed (extra fields kept as they are)."""
    return _Plan.of(contract).typed(record)


def record_id_of(record: Mapping[str, Any], contract: DatasetContract) -> str:
    """The record's id: its ``record_id`` column, else a hash of its contract columns."""
    return _Plan.of(contract).record_id(record)


def convert(value: Any, kind: str) -> Any:
    """``value`` as the column type ``kind`` holds it, else ``BadValue``."""
    if kind in ("string", "category"):
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
        raise BadValue("expected text")
    if kind == "datetime":
        return _timestamp(value)
    if kind == "bool":
        return _bool(value)
    number = _number(value)
    if kind == "int":
        if not float(number).is_integer():
            raise BadValue("expected a whole number")
        return int(number)
    return float(number)


def _float(value: Any, kind: str) -> float:
    if type(value) is float:  # the common case, first
        if value - value != 0:  # infinity (NaN was taken as missing)
            raise BadValue("expected a finite number")
        return value
    return float(_number(value))


def _text(value: Any, kind: str) -> str:
    if type(value) is str:
        return value
    return convert(value, kind)  # type: ignore[no-any-return]


_CONVERTERS = {"float": _float, "string": _text, "category": _text}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float | int:
    if isinstance(value, bool):
        raise BadValue("expected a number, got a boolean")
    if isinstance(value, int | float):
        number: float | int = value
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise BadValue("expected a number") from None
    else:
        raise BadValue("expected a number")
    if isinstance(number, float) and not math.isfinite(number):
        raise BadValue("expected a finite number")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    found = _BOOLS.get(str(value).lower())
    if found is None:
        raise BadValue("expected true or false")
    return found


def _timestamp(value: Any) -> datetime:
    """An ISO 8601 text (no zone: UTC) or epoch seconds, as an aware UTC datetime."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadValue("expected an ISO 8601 timestamp") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        parsed = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, datetime):
        parsed = value
    else:
        raise BadValue("expected an ISO 8601 timestamp")
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def records_events(dataset: str, records: Sequence[Mapping[str, Any]], *,
                   batch_size: int = 500, producer: str = "api") -> list[RecordsObserved]:
    """``records`` as RecordsObserved events of at most ``batch_size`` records each, in
    order (the Python API of the online path: publish them with ``bus.publish_many``)."""
    if not 1 <= batch_size <= MAX_RECORDS_PER_EVENT:
        raise ValueError(f"batch_size must be 1 to {MAX_RECORDS_PER_EVENT}, not {batch_size}")
    return [RecordsObserved(dataset=dataset, records=[dict(r) for r in records[i:i + batch_size]],
                            producer=producer)
            for i in range(0, len(records), batch_size)]


def read_records_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines (``.jsonl``) or CSV (``.csv``) file, in file order; CSV
    values stay text (the contract types them), empty cells become null."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open("rb") as handle:
            return [orjson.loads(line) for line in handle if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return [{k: (v if v != "" else None) for k, v in row.items()}
                    for row in csv.DictReader(handle)]
    raise InvalidInput(f"{path}: records are read from .jsonl or .csv files")
