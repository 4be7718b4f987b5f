"""What a score request must carry for one feature set, and turning it into model input.

``InputSchema`` is read from a ``FittedFeatureSet``: the raw fields its steps need (its
fit-time inputs, less the label, the entity key and the columns it drops), their kinds,
and the aggregate columns the online store holds per entity. ``check`` refuses a request
with a message naming the field::

    schema = InputSchema.of(fitted)
    schema.check({"amount": 9.5, "type": "TRANSFER", ...})   # InvalidInput names the field
    record = schema.record("C-42", fields, online_row)        # one row for transform_online
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_numeric_dtype

from common.errors import InvalidInput

FieldValue = float | int | str | bool
KINDS = {"number": (int, float), "text": (str,), "flag": (bool,), "time": (str, int, float)}


class InvalidField(InvalidInput):
    """One field of a score request is missing, not finite, or of the wrong kind."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"field '{name}' {problem}")


@dataclass(frozen=True)
class InputSchema:
    """The fields a feature set needs from a request, by kind; and its online columns."""

    kinds: Mapping[str, str]
    entity_key: str | None
    aggregate_columns: tuple[str, ...]

    @classmethod
    def of(cls, fitted: Any) -> InputSchema:
        """The schema of a ``preparation.FittedFeatureSet``."""
        skipped = {fitted.label, fitted.entity_key, *_dropped(fitted)}
        kinds = {name: _kind(dtype) for name, dtype in fitted.input_dtypes.items()
                 if name not in skipped}
        return cls(kinds, fitted.entity_key, tuple(fitted.aggregate_columns))

    def check(self, fields: Mapping[str, FieldValue]) -> None:
        """Raise ``InvalidField`` for the first missing, non-finite or mistyped field."""
        for name in sorted(self.kinds):
            if name not in fields:
                raise InvalidField(name, "is missing")
        for name in sorted(fields):
            _check_value(name, fields[name], self.kinds.get(name))

    def carries_aggregates(self, fields: Mapping[str, FieldValue]) -> bool:
        """Whether the request itself carries every online (aggregate) column."""
        return all(column in fields for column in self.aggregate_columns)

    def record(
        self, entity_id: str, fields: Mapping[str, FieldValue], online: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """One raw row: online columns, overridden by the request's fields, and the entity."""
        row: dict[str, Any] = {**(online or {}), **fields}
        if self.entity_key:
            row[self.entity_key] = entity_id
        return row


def _dropped(fitted: Any) -> set[str]:
    steps = getattr(fitted.spec, "steps", [])
    return {c for step in steps if step.kind == "drop" for c in step.params.get("columns", [])}


def _kind(dtype_name: str) -> str:
    dtype = pd.api.types.pandas_dtype(dtype_name)
    if is_bool_dtype(dtype):
        return "flag"
    if is_datetime64_any_dtype(dtype):
        return "time"
    return "number" if is_numeric_dtype(dtype) else "text"


def _check_value(name: str, value: FieldValue, kind: str | None) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidField(name, f"must be finite, got {value}")
    if kind is None:
        return  # an extra field (an aggregate override, or unused): the steps ignore it
    if not isinstance(value, KINDS[kind]) or (kind == "number" and isinstance(value, bool)):
        raise InvalidField(name, f"must be a {kind}, got {type(value).__name__} "
                                 f"{_shown(value)}")


def _shown(value: FieldValue, limit: int = 64) -> str:
    """A value for an error message, cut to ``limit`` characters (the message travels in
    gRPC metadata, whose size a client limits).

    >>> _shown("x" * 100, limit=8)
    "'xxxxxx…"
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
