"""scikit-learn transformers on pandas DataFrames: the building blocks of feature steps.

Each follows the estimator API (``__init__`` only stores params, ``fit`` returns self,
learned state ends in ``_``, ``NotFittedError`` before fit). Each takes a DataFrame and
returns one with the same index, passing through every column it does not touch, even
columns it never saw at fit (online rows carry aggregates precomputed by the online store).

Example::

    step = Ratio("amount", "oldbalanceOrg", "amountOverBalance").fit(frame)
    step.transform(frame)["amountOverBalance"]          # 0.0 where oldbalanceOrg == 0

    scaled = OnColumns(StandardScaler(), ["amount"]).fit_transform(frame)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal, Self, get_args

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.feature_selection import SelectKBest, chi2, mutual_info_classif
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.validation import check_is_fitted

from common.errors import InvalidInput

SCORE_FUNCS: dict[str, Callable[..., Any]] = {
    "chi2": chi2,
    "mutual_info": partial(mutual_info_classif, random_state=0),  # seeded: same data, same pick
}
DatePart = Literal["year", "month", "day", "dayofweek", "dayofyear", "hour", "minute",
                   "is_weekend"]
Op = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not in"]
DATE_PARTS: tuple[str, ...] = get_args(DatePart)
OPS: dict[str, Callable[[pd.Series, Any], Any]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge, "in": pd.Series.isin,
    "not in": lambda values, options: ~values.isin(options),
}


def require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    """``InvalidInput`` naming the columns ``frame`` lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InvalidInput(f"missing columns {missing}")


def require_numeric(frame: pd.DataFrame, why: str) -> None:
    """``InvalidInput`` naming the columns of ``frame`` that are not numeric."""
    bad = list(dict.fromkeys(c for c, t in frame.dtypes.items() if not is_numeric_dtype(t)))
    if bad:
        raise InvalidInput(f"columns {bad} are not numeric; {why}")


def to_utc(values: pd.Series) -> pd.Series:
    """Timestamps (datetimes or ISO 8601 strings) as UTC datetimes; ``InvalidInput`` if not."""
    try:
        return pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError) as err:
        raise InvalidInput(
            f"column '{values.name}' holds values that are not timestamps: {err}"
        ) from err


def log1p_non_negative(frame: pd.DataFrame) -> pd.DataFrame:
    """``log(1 + x)`` per column; a negative value is an input error, never a silent NaN."""
    require_numeric(frame, "log needs numbers")
    negative = [c for c in frame.columns if (frame[c] < 0).any()]
    if negative:
        raise InvalidInput(f"log needs non-negative values; columns {negative} have negatives")
    return np.log1p(frame)


def _as_list(columns: str | Sequence[str]) -> list[str]:
    return [columns] if isinstance(columns, str) else list(columns)


class FrameStep(TransformerMixin, BaseEstimator):
    """Base of the DataFrame steps: ``fit`` checks the columns read, ``transform`` applies."""

    def fit(self, X: pd.DataFrame, y: object = None) -> Self:
        require_columns(X, self._reads())
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self._learn(X)
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        check_is_fitted(self)
        require_columns(X, self._needs())
        return self._apply(X)

    def transform_online(self, X: pd.DataFrame) -> pd.DataFrame:
        """Scoring-time transform: the same as ``transform`` unless a step says otherwise."""
        return self.transform(X)

    def _reads(self) -> list[str]:
        return []

    def _needs(self) -> list[str]:
        return self._reads()

    def _learn(self, X: pd.DataFrame) -> None:
        """Most steps learn nothing beyond the columns they saw."""

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError


class OnColumns(FrameStep):
    """Apply a scikit-learn transformer to ``columns``; every other column passes through.

    Not a ``ColumnTransformer``: with ``remainder="passthrough"`` it silently drops columns
    unseen at fit and demands every fit-time column at transform, but online rows lack
    the label and carry precomputed aggregates.
    """

    def __init__(self, estimator: Any, columns: Sequence[str]):
        self.estimator = estimator
        self.columns = columns

    def _reads(self) -> list[str]:
        return list(self.columns)

    def _learn(self, X: pd.DataFrame) -> None:
        estimator = clone(self.estimator).set_output(transform="pandas")
        self.estimator_ = estimator.fit(X[list(self.columns)])

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        out = self.estimator_.transform(X[list(self.columns)])
        gone = [c for c in self.columns if c not in out.columns]
        return X.drop(columns=gone).assign(**{c: out[c] for c in out.columns})


class Ratio(FrameStep):
    """``name = a / b``; where ``b`` is 0 the ratio is ``fill``, never infinite; NaN stays NaN."""

    def __init__(self, a: str, b: str, name: str, fill: float = 0.0):
        self.a, self.b, self.name, self.fill = a, b, name, fill

    def _reads(self) -> list[str]:
        return [self.a, self.b]

    def _learn(self, X: pd.DataFrame) -> None:
        require_numeric(X[self._reads()], "ratio needs numbers")

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        num, den = X[self.a], X[self.b]
        return X.assign(**{self.name: (num / den).where(den != 0, self.fill).where(num.notna())})


class Difference(FrameStep):
    """``name = sum(a) - sum(b)``, where ``a`` and ``b`` are a column or a list of columns."""

    def __init__(self, a: str | Sequence[str], b: str | Sequence[str], name: str):
        self.a, self.b, self.name = a, b, name

    def _reads(self) -> list[str]:
        return [*_as_list(self.a), *_as_list(self.b)]

    def _learn(self, X: pd.DataFrame) -> None:
        require_numeric(X[self._reads()], "difference needs numbers")

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        return X.assign(**{self.name: self._total(X, self.a) - self._total(X, self.b)})

    @staticmethod
    def _total(X: pd.DataFrame, columns: str | Sequence[str]) -> pd.Series:
        return X[_as_list(columns)].sum(axis=1, skipna=False)


class DateParts(FrameStep):
    """``{column}_{part}`` columns (in UTC) from a timestamp column, dropped unless ``keep``."""

    def __init__(self, column: str, parts: Sequence[str] = ("hour", "dayofweek"),
                 keep: bool = False):
        self.column, self.parts, self.keep = column, parts, keep

    def _reads(self) -> list[str]:
        return [self.column]

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        when = to_utc(X[self.column])
        out = X.assign(**{f"{self.column}_{part}": _part(when, part) for part in self.parts})
        return out if self.keep else out.drop(columns=self.column)


def _part(when: pd.Series, part: str) -> pd.Series:
    if part == "is_weekend":
        return (when.dt.dayofweek >= 5).astype(int).where(when.notna())
    return getattr(when.dt, part)


class RowFilter(FrameStep):
    """Keep rows matching ``query`` (``DataFrame.eval`` syntax) or every ``where`` condition.

    Offline only: ``transform_online`` returns every row, since a scoring request is never
    dropped. ``where`` maps a column to ``{op: value}`` with ops ``== != < <= > >= in``
    and ``not in``, e.g. ``{"type": {"in": ["TRANSFER", "CASH_OUT"]}}``.
    """

    def __init__(self, query: str | None = None,
                 where: Mapping[str, Mapping[Op, Any]] | None = None):
        self.query, self.where = query, where

    def _reads(self) -> list[str]:
        return list(self.where or {})

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        return X.loc[self._mask(X)]

    def transform_online(self, X: pd.DataFrame) -> pd.DataFrame:
        check_is_fitted(self)
        return X

    def _mask(self, X: pd.DataFrame) -> Any:
        if self.query is not None:
            return _evaluate(X, self.query)
        tests = [OPS[op](X[column], value)
                 for column, conditions in (self.where or {}).items()
                 for op, value in conditions.items()]
        return np.logical_and.reduce([np.asarray(test, dtype=bool) for test in tests])


def _evaluate(X: pd.DataFrame, query: str) -> pd.Series:
    try:
        mask = X.eval(query)
    except (NameError, SyntaxError, KeyError, ValueError, TypeError) as err:
        raise InvalidInput(f"cannot evaluate query {query!r}: {err}") from err
    if not (isinstance(mask, pd.Series) and is_bool_dtype(mask)):
        raise InvalidInput(f"query {query!r} does not give one boolean per row")
    return mask


class DropColumns(FrameStep):
    """Drop ``columns``; they must exist, so a typo fails at fit."""

    def __init__(self, columns: Sequence[str]):
        self.columns = columns

    def _reads(self) -> list[str]:
        return list(self.columns)

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        return X.drop(columns=list(self.columns))


class KBestColumns(FrameStep):
    """Keep the ``k`` columns that ``SelectKBest`` scores best against ``label``.

    Columns in ``exclude`` (the entity key, timestamp, label) are never scored and always
    pass through. Scores are computed on min-max scaled copies, since ``chi2`` needs
    non-negative inputs; the selected columns keep their unscaled values.
    """

    def __init__(self, k: int | str, score_func: str = "chi2", label: str = "label",
                 exclude: Sequence[str] = ()):
        self.k, self.score_func, self.label, self.exclude = k, score_func, label, exclude

    def _reads(self) -> list[str]:
        return [self.label]

    def _needs(self) -> list[str]:
        return list(self.selected_)

    def _learn(self, X: pd.DataFrame) -> None:
        features = [c for c in X.columns if c not in self._kept()]
        selector = make_pipeline(MinMaxScaler(), SelectKBest(SCORE_FUNCS[self.score_func],
                                                             k=self.k))
        self.selector_ = selector.fit(_scoreable(X[features]), _labels(X[self.label]))
        support = self.selector_[-1].get_support()
        self.selected_ = [c for c, keep in zip(features, support, strict=True) if keep]

    def _apply(self, X: pd.DataFrame) -> pd.DataFrame:
        # Only the columns scored and not chosen go: columns unseen at fit pass through.
        scored = set(self.feature_names_in_) - {*self.selected_, *self._kept()}
        return X.drop(columns=[c for c in X.columns if c in scored])

    def _kept(self) -> set[str]:
        return {*self.exclude, self.label}


def _scoreable(frame: pd.DataFrame) -> pd.DataFrame:
    require_numeric(frame, "one_hot or drop them before select_k_best")
    values = frame.astype(float)
    bad = [c for c in values.columns if not np.isfinite(values[c]).all()]
    if bad:
        raise InvalidInput(f"columns {bad} have missing or infinite values; impute them first")
    return values


def _labels(values: pd.Series) -> pd.Series:
    if values.isna().any():
        raise InvalidInput(f"label '{values.name}' has missing values")
    return values
