"""Conforming input frames to a fitted feature set's fit-time columns and dtypes.

The fitted pipeline (``preparation.pipeline``) and its row plan (``preparation.online``)
both start from the same conversions, so they live here, below both. Example::

    conform(pd.DataFrame({"amount": ["12.5"]}), {"amount": "float64", "step": "int64"})
    # amount as float64 12.5, and a missing "step" column added (NaN)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from pandas.api.types import is_datetime64_any_dtype, is_float_dtype, is_numeric_dtype

from common.errors import InvalidInput
from preparation.transformers import to_utc


def conform(frame: pd.DataFrame, dtypes: Mapping[str, str]) -> pd.DataFrame:
    """Add the fit-time input columns ``frame`` lacks, and convert to the fit-time dtypes."""
    missing = [c for c in dtypes if c not in frame.columns]
    frame = frame.reindex(columns=[*frame.columns, *missing])
    return frame.assign(**{c: _coerce(frame[c], dtype) for c, dtype in dtypes.items()})


def _coerce(values: pd.Series, dtype_name: str) -> pd.Series:
    dtype = pd.api.types.pandas_dtype(dtype_name)
    if values.dtype == dtype:
        return values
    if is_datetime64_any_dtype(dtype):
        tz = getattr(dtype, "tz", None)
        utc = to_utc(values)
        return utc.dt.tz_convert(tz) if tz else utc.dt.tz_localize(None)
    if is_numeric_dtype(dtype):
        return _numbers(values, dtype)
    return values


def _numbers(values: pd.Series, dtype: Any) -> pd.Series:
    try:
        numbers = pd.to_numeric(values)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"column '{values.name}' holds values that are not numbers") from err
    return numbers.astype(dtype) if is_float_dtype(dtype) else numbers
