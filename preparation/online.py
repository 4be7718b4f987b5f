"""The online transform of a fitted feature set, compiled into plain row functions.

``FittedFeatureSet.transform_online`` through the pandas steps costs ~10 ms a call, most of
it DataFrame and scikit-learn bookkeeping, whatever the number of rows; scoring sends one
row. ``compile_online`` turns each fitted step into its row form, a function over a list of
``{column: value}`` dicts, from the step's fitted parameters. Each step kind's
registration (``preparation.registry``) names its row form, one of the ``*_row_form``
functions below:

==================  ==================================================================
kind                row form
==================  ==================================================================
impute              a missing value becomes the imputer's fitted fill value
one_hot             ``{column}_{category}`` = 1.0 for the value's category, else 0.0
scale               ``(x - mean_) / scale_`` (standard), ``x * scale_ + min_`` (minmax)
log                 ``log1p(x)``
ratio, difference   ``a / b`` (``fill`` where ``b`` is 0), ``sum(a) - sum(b)``
date_parts          the UTC calendar parts of the timestamp
entity_aggregate    the aggregates the row carries (the online store's); none: no past
filter              nothing (online rows are never filtered)
drop, select_k_best the columns dropped, or not selected, are removed
==================  ==================================================================

The pandas path stays the reference. A step without a row form (its kind's registration
declares none) makes the plan slow: every call takes the pandas path. A call whose rows hold
anything the row forms do not model exactly (a value of another type, a missing category,
a negative log input, two rows of one entity whose aggregates need each other, ...) takes
it too, so it gets the pandas answer, errors included. Parity (same columns, same values)
is tested in ``tests/unit/test_preparation_online.py``. Example::

    plan = compile_online(fitted)                       # cached per fitted feature set
    plan.matrix([record], fitted.feature_names)         # float64 array (rows, features)
    online_matrix(fitted, [record], names)              # same; pandas when plan says no
    fitted.transform_online([record])                   # uses fast_frame for a few rows
"""

from __future__ import annotations

import math
import numbers
import operator
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import reduce
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import (
    is_bool_dtype,
    is_datetime64_any_dtype,
    is_float_dtype,
    is_numeric_dtype,
)
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, OneHotEncoder, StandardScaler

from preparation.aggregates import EntityAggregate
from preparation.conform import conform
from preparation.transformers import (
    DateParts,
    Difference,
    DropColumns,
    KBestColumns,
    OnColumns,
    Ratio,
    RowFilter,
    log1p_non_negative,
)

FAST_ROWS = 64
"""``transform_online`` takes the row path for at most this many records."""
Row = dict[str, Any]
RowStep = Callable[[list[Row]], None]
"""A step's row form: changes the rows in place, or raises ``NoFastForm``."""
NAN = float("nan")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?"
                  r"(Z|[+-]\d{2}:\d{2})?)?")


class NoFastForm(Exception):
    """These rows hold something the row forms do not model exactly: use the pandas path."""


class OnlinePlan:
    """A fitted feature set's online transform as row functions; ``steps`` None: none."""

    def __init__(self, fitted: Any, steps: list[RowStep] | None) -> None:
        self.feature_names: tuple[str, ...] = tuple(fitted.feature_names)
        self.carried: tuple[str, ...] = tuple(fitted.carried)
        self.input_dtypes: dict[str, str] = dict(fitted.input_dtypes)
        self.conform = {c: _conformer(dtype) for c, dtype in self.input_dtypes.items()}
        self.times = [c for c, convert in self.conform.items() if convert is _to_time]
        self.steps = steps
        self.int32 = frozenset(_int32_columns(fitted))

    @property
    def fast(self) -> bool:
        """Whether every step has a row form."""
        return self.steps is not None

    def rows(self, records: Sequence[Mapping[str, Any]]) -> list[Row]:
        """The rows after every step (columns by name); ``NoFastForm`` when not modelled."""
        if self.steps is None or not records:
            raise NoFastForm
        rows = self._conformed(records)
        if len(records) > 1:
            for column in self.times:
                _one_awareness([record.get(column) for record in records])
        for step in self.steps:
            step(rows)
        return rows

    def matrix(self, records: Sequence[Mapping[str, Any]],
               names: Sequence[str] | None = None) -> np.ndarray | None:
        """The ``names`` columns (default: the features) as float64, or None (use pandas)."""
        try:
            rows = self.rows(records)
            return np.array([[_final(row, name) for name in names or self.feature_names]
                             for row in rows], dtype=np.float64)
        except NoFastForm:
            return None

    def frame(self, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame | None:
        """What ``transform_online(records)`` gives (features, then carried), or None."""
        try:
            rows = self.rows(records)
            features = pd.DataFrame(
                {name: [_final(row, name) for row in rows] for name in self.feature_names})
        except NoFastForm:
            return None
        if any(dtype.kind == "O" for dtype in features.dtypes):
            return None  # mixed flags and numbers: pandas' own dtype rules apply
        for name in self.int32.intersection(features.columns):
            if features[name].dtype == np.int64:
                features[name] = features[name].astype(np.int32)
        return pd.concat([features, self._carried(records)], axis=1)

    def _conformed(self, records: Sequence[Mapping[str, Any]]) -> list[Row]:
        """Each record with every column any record has, and the fit-time inputs, as
        ``pandas.DataFrame(records)`` and the fit-time dtypes would give them."""
        columns = dict.fromkeys(self.input_dtypes)
        for record in records:
            columns.update(dict.fromkeys(record))
        conform = self.conform
        rows = []
        for record in records:
            row = {}
            for column in columns:
                value = record.get(column, NAN)
                convert = conform.get(column)
                row[column] = value if convert is None else convert(value)
            rows.append(row)
        return rows

    def _carried(self, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        present = {c for record in records for c in record}
        carried = [c for c in self.carried if c in present]
        frame = pd.DataFrame({c: [record.get(c, NAN) for record in records] for c in carried})
        dtypes = {c: self.input_dtypes[c] for c in carried if c in self.input_dtypes}
        return conform(frame, dtypes)[carried]  # the pandas path's own conversions


_PLANS: weakref.WeakKeyDictionary[Any, OnlinePlan] = weakref.WeakKeyDictionary()


def compile_online(fitted: Any) -> OnlinePlan:
    """The row plan of a ``FittedFeatureSet`` (built once, then cached while it lives)."""
    plan = _PLANS.get(fitted)
    if plan is None:
        steps = fitted.row_forms()  # each step kind's own, from the registry
        plan = OnlinePlan(fitted, None if any(s is None for s in steps) else
                          [s for s in steps if s is not None])
        _PLANS[fitted] = plan
    return plan


def fast_frame(fitted: Any, records: Any) -> pd.DataFrame | None:
    """``transform_online(records)`` through the row plan, for up to ``FAST_ROWS`` records
    given as mappings; None when the pandas path must run."""
    if not isinstance(records, Sequence) or not 0 < len(records) <= FAST_ROWS:
        return None  # a DataFrame, an iterator, none or many: the pandas path
    return compile_online(fitted).frame(records)


def online_matrix(fitted: Any, records: Sequence[Mapping[str, Any]],
                  names: Sequence[str]) -> np.ndarray:
    """The ``names`` feature columns of ``records`` as float64: the row plan when it models
    them, else the pandas path (which raises the pandas path's errors)."""
    fast = compile_online(fitted).matrix(records, names)
    if fast is not None:
        return fast
    out = fitted.transform_online(records, fast=False)
    return out[list(names)].to_numpy(dtype=np.float64)


# --- values -------------------------------------------------------------------------


def _number(value: Any) -> Any:
    """An int or float as pandas would hold it in a numeric column; else ``NoFastForm``."""
    kind = type(value)
    if kind is float or kind is int:
        return value
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise NoFastForm
    return value.item() if isinstance(value, np.generic) else value


def _finite(value: Any) -> float:
    """A number for scikit-learn's checked steps: NaN passes, infinity is refused there."""
    number = float(_number(value))
    if math.isinf(number):
        raise NoFastForm
    return number


def _final(row: Row, name: str) -> Any:
    try:
        value = row[name]
    except KeyError:
        raise NoFastForm from None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    return _number(value)


def _get(row: Row, column: str) -> Any:
    try:
        return row[column]
    except KeyError:
        raise NoFastForm from None  # the pandas path names the missing column


def _conformer(dtype_name: str) -> Callable[[Any], Any]:
    """How ``conform.conform`` converts one value of a fit-time column of this dtype."""
    dtype = pd.api.types.pandas_dtype(dtype_name)
    if is_datetime64_any_dtype(dtype):
        return _to_time
    if is_bool_dtype(dtype) or (is_float_dtype(dtype) and dtype != np.float64):
        return _refuse  # flags and float32: pandas' conversions are not modelled
    if is_float_dtype(dtype):
        return _to_float
    if is_numeric_dtype(dtype):
        return _to_number
    return _same


def _same(value: Any) -> Any:
    return value


def _refuse(value: Any) -> Any:
    raise NoFastForm


def _to_float(value: Any) -> float:
    return NAN if value is None else float(_number(value))


def _to_number(value: Any) -> Any:
    return NAN if value is None else _number(value)


def _to_time(value: Any) -> datetime | None:
    """A timestamp as an aware UTC datetime (None: missing), as ``to_utc`` would read it."""
    if value is None or value is pd.NaT or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        if not _ISO.fullmatch(value):
            raise NoFastForm  # pandas decides: another ISO 8601 form, or an error
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise NoFastForm from None
    elif not isinstance(value, datetime):
        raise NoFastForm
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _one_awareness(values: list[Any]) -> None:
    """``NoFastForm`` if a batch's timestamps mix zone-less values with zoned ones: pandas
    then reads the zone-less ones in the zone of a zoned one before them."""
    kinds = {_aware(value) for value in values if not _is_missing(value)}
    if len(kinds) > 1:
        raise NoFastForm


def _aware(value: Any) -> bool | None:
    if isinstance(value, str):
        match = _ISO.fullmatch(value)
        return None if match is None else match.group(1) is not None
    return getattr(value, "tzinfo", None) is not None


def _int32_columns(fitted: Any) -> list[str]:
    """Date-part columns, which pandas holds as int32 when no timestamp is missing."""
    return [f"{step.column}_{part}" for _, step in fitted.pipeline.steps
            if isinstance(step, DateParts) for part in step.parts if part in _INT32_PARTS]


def _int32_parts() -> set[str]:
    probe = pd.Series(pd.to_datetime(["2024-01-01"], utc=True)).dt
    return {part for part in ("year", "month", "day", "dayofweek", "dayofyear", "hour",
                              "minute") if getattr(probe, part).dtype == np.int32}


_INT32_PARTS = _int32_parts()


# --- row forms ------------------------------------------------------------------------


# Each function below is the row form of one step kind, named by that kind's registration
# (``preparation.registry``): it takes the fitted step and gives a ``RowStep``, or None
# when the step holds something the row forms do not model (the plan is then slow).


def identity_row_form(step: Any) -> RowStep | None:
    """The placeholder step of a spec without steps: a plain ``FunctionTransformer``."""
    if type(step) is not FunctionTransformer:
        return None
    plain = step.func is None and not step.validate and step.kw_args is None
    return _nothing if plain else None


def filter_row_form(step: Any) -> RowStep | None:
    """Row filters apply offline only: online rows are never dropped."""
    return _nothing if type(step) is RowFilter else None


def impute_row_form(step: Any) -> RowStep | None:
    imputer = _estimator(step, SimpleImputer)
    return None if imputer is None else _impute(imputer, list(step.columns))


def one_hot_row_form(step: Any) -> RowStep | None:
    encoder = _estimator(step, OneHotEncoder)
    return None if encoder is None else _one_hot(encoder, list(step.columns))


def scale_row_form(step: Any) -> RowStep | None:
    if (scaler := _estimator(step, StandardScaler)) is not None:
        return _standard(scaler, list(step.columns))
    if (scaler := _estimator(step, MinMaxScaler)) is not None:
        return _minmax(scaler, list(step.columns))
    return None


def log_row_form(step: Any) -> RowStep | None:
    function = _estimator(step, FunctionTransformer)
    if function is None or function.func is not log1p_non_negative:
        return None
    return _log(list(step.columns))


def _estimator(step: Any, kind: type) -> Any:
    """The fitted estimator of an ``OnColumns`` step when it is exactly of ``kind``."""
    estimator = step.estimator_ if isinstance(step, OnColumns) else None
    return estimator if type(estimator) is kind else None


def _nothing(rows: list[Row]) -> None:
    """Rows pass unchanged."""


def _impute(imputer: SimpleImputer, columns: list[str]) -> RowStep | None:
    numeric = getattr(imputer, "_fit_dtype", np.dtype(object)).kind in "fiu"  # not strings
    plain = not imputer.add_indicator and _is_nan(imputer.missing_values)
    if not (numeric and plain) or list(imputer.get_feature_names_out()) != columns:
        return None
    # What the imputer puts where a value is missing (keep_empty_features included).
    fills = imputer.transform(pd.DataFrame({c: [NAN] for c in columns})).iloc[0].tolist()
    pairs = list(zip(columns, fills, strict=True))
    keeps_ints = imputer.strategy in ("most_frequent", "constant")  # no float conversion

    def impute(rows: list[Row]) -> None:
        if keeps_ints and all(type(_get(row, c)) is int for row in rows for c in columns):
            return  # integers hold no missing value: the imputer returns them as they are
        for row in rows:
            for column, fill in pairs:
                value = _finite(_get(row, column))
                row[column] = fill if value != value else value

    return impute


def _one_hot(encoder: OneHotEncoder, columns: list[str]) -> RowStep | None:
    if encoder.drop_idx_ is not None or getattr(encoder, "_infrequent_enabled", False):
        return None
    names = list(encoder.get_feature_names_out())
    codes: list[tuple[str, bool, dict[Any, str], list[str]]] = []
    start = 0
    for column, categories in zip(columns, encoder.categories_, strict=True):
        outputs = names[start:start + len(categories)]
        start += len(categories)
        text = categories.dtype == object
        lookup = {c: name for c, name in zip(categories.tolist(), outputs, strict=True)
                  if not _is_missing(c)}
        codes.append((column, text, lookup, outputs))

    def one_hot(rows: list[Row]) -> None:
        for row in rows:
            for column, text, lookup, outputs in codes:
                value = _category(_get(row, column), text)
                hit = lookup.get(value)
                del row[column]
                for name in outputs:
                    row[name] = 1.0 if name == hit else 0.0

    return one_hot


def _category(value: Any, text: bool) -> Any:
    if text and isinstance(value, str):
        return value
    if text or _is_missing(value):
        raise NoFastForm  # a missing value, or numbers among strings: pandas decides
    return _number(value)


def _standard(scaler: StandardScaler, columns: list[str]) -> RowStep:
    means = [0.0] * len(columns) if scaler.mean_ is None else scaler.mean_.tolist()
    scales = [1.0] * len(columns) if scaler.scale_ is None else scaler.scale_.tolist()
    center, divide = scaler.with_mean, scaler.with_std
    parts = list(zip(columns, means, scales, strict=True))

    def standard(rows: list[Row]) -> None:
        for row in rows:
            for column, mean, scale in parts:
                value = _finite(_get(row, column))
                if center:
                    value -= mean
                if divide:
                    value /= scale
                row[column] = value

    return standard


def _minmax(scaler: MinMaxScaler, columns: list[str]) -> RowStep | None:
    if scaler.clip:
        return None
    parts = list(zip(columns, scaler.scale_.tolist(), scaler.min_.tolist(), strict=True))

    def minmax(rows: list[Row]) -> None:
        for row in rows:
            for column, scale, low in parts:
                value = _finite(_get(row, column))
                value *= scale
                value += low
                row[column] = value

    return minmax


def _log(columns: list[str]) -> RowStep:
    def log(rows: list[Row]) -> None:
        for row in rows:
            for column in columns:
                value = _number(_get(row, column))
                if value < 0:
                    raise NoFastForm  # the pandas path refuses it, naming the column
                row[column] = float(np.log1p(value))  # numpy's log1p, as pandas calls it

    return log


def ratio_row_form(step: Any) -> RowStep | None:
    if type(step) is not Ratio:
        return None  # not the kind's own transformer: no row form is known for it
    a, b, name, fill = step.a, step.b, step.name, float(step.fill)

    def ratio(rows: list[Row]) -> None:
        for row in rows:
            num, den = _number(_get(row, a)), _number(_get(row, b))
            if num != num:
                row[name] = NAN
            elif den == 0:
                row[name] = fill
            else:
                row[name] = float(num) / float(den)

    return ratio


def difference_row_form(step: Any) -> RowStep | None:
    if type(step) is not Difference:
        return None  # not the kind's own transformer: no row form is known for it
    a, b, name = _as_list(step.a), _as_list(step.b), step.name

    def total(row: Row, columns: list[str]) -> Any:
        return reduce(operator.add, [_number(_get(row, c)) for c in columns])

    def difference(rows: list[Row]) -> None:
        for row in rows:
            row[name] = total(row, a) - total(row, b)

    return difference


def date_parts_row_form(step: Any) -> RowStep | None:
    if type(step) is not DateParts:
        return None  # not the kind's own transformer: no row form is known for it
    column, parts, keep = step.column, list(step.parts), step.keep
    names = [f"{column}_{part}" for part in parts]

    def date_parts(rows: list[Row]) -> None:
        if len(rows) > 1:
            _one_awareness([row.get(column) for row in rows])
        for row in rows:
            when = _to_time(_get(row, column))
            for part, name in zip(parts, names, strict=True):
                row[name] = NAN if when is None else _part(when, part)
            if not keep:
                del row[column]

    return date_parts


def _part(when: datetime, part: str) -> int:
    if part == "dayofweek":
        return when.weekday()
    if part == "dayofyear":
        return when.timetuple().tm_yday
    if part == "is_weekend":
        return int(when.weekday() >= 5)
    return int(getattr(when, part))


def entity_aggregate_row_form(step: Any) -> RowStep | None:
    if type(step) is not EntityAggregate:
        return None  # not the kind's own transformer: no row form is known for it
    outputs = step.output_names()
    reads = [step.key, step.column, *([step.timestamp] if step.timestamp else [])]
    empty = {name: (0.0 if stat in ("count", "sum") else NAN)
             for name, stat in zip(outputs, step.stats, strict=True)}
    key = step.key

    def aggregate(rows: list[Row]) -> None:
        carried = [name in rows[0] for name in outputs]
        if all(carried):
            return  # the online store's values, used as they are
        if any(carried) or any(c not in rows[0] for c in reads):
            raise NoFastForm  # the pandas path names what is missing
        entities = [row[key] for row in rows if not _is_missing(row[key])]
        if len(set(entities)) != len(entities):
            raise NoFastForm  # rows of one entity are each other's past
        for row in rows:
            row.update(empty)  # no history: an empty window

    return aggregate


def drop_row_form(step: Any) -> RowStep | None:
    if type(step) is not DropColumns:
        return None  # not the kind's own transformer: no row form is known for it
    columns = list(step.columns)

    def drop(rows: list[Row]) -> None:
        for row in rows:
            for column in columns:
                if column not in row:
                    raise NoFastForm
                del row[column]

    return drop


def select_k_best_row_form(step: Any) -> RowStep | None:
    if type(step) is not KBestColumns:
        return None  # not the kind's own transformer: no row form is known for it
    needs = list(step.selected_)
    scored = set(step.feature_names_in_) - {*step.selected_, *step._kept()}

    def k_best(rows: list[Row]) -> None:
        for row in rows:
            if any(column not in row for column in needs):
                raise NoFastForm
            for column in scored.intersection(row):
                del row[column]

    return k_best


def _as_list(columns: str | Sequence[str]) -> list[str]:
    return [columns] if isinstance(columns, str) else list(columns)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NaT or (isinstance(value, float) and value != value)
