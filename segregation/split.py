"""The split API: one call gives training its part and evaluation the complementary one.

Pure: pandas in, pandas out, no broker and no stores. The same inputs always give the same
rows, so training and evaluation each call ``split`` with the same frame and settings and
use their own side of it. Example::

    parts = split(features, "random", ratio=0.8, seed=7, label="is_fraud")
    model.fit(parts.X_train, parts.y_train)             # training
    score = model.score(parts.X_test, parts.y_test)     # evaluation, the same call's test part
    parts.warnings                                      # uneven-split warnings, also emitted

Strategies: ``"sequential"`` (first ``ratio`` of rows, time order kept), ``"random"``
(seeded), either with ``shuffle=True`` (rows shuffled within each part, seeded), or a custom
callable ``(frame, ratio, seed) -> (train_positions, test_positions)`` given directly or as
a ``"package.module:function"`` path.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import pandas as pd

from common.errors import InvalidInput
from segregation.checks import SplitWarning, emit, uneven
from segregation.strategies import Positions, Strategy, checked, describe, resolve


@dataclass(frozen=True, eq=False)
class Split:
    """The train and test parts of a frame, and, with a label, features and labels apart."""

    train: pd.DataFrame
    test: pd.DataFrame
    label: str | None = None
    warnings: list[SplitWarning] = field(default_factory=list)

    @cached_property
    def X_train(self) -> pd.DataFrame:
        """The train part without the label column."""
        return self.train.drop(columns=self._label())

    @cached_property
    def y_train(self) -> pd.Series:
        """The train part's labels."""
        return self.train[self._label()]

    @cached_property
    def X_test(self) -> pd.DataFrame:
        """The test part without the label column."""
        return self.test.drop(columns=self._label())

    @cached_property
    def y_test(self) -> pd.Series:
        """The test part's labels."""
        return self.test[self._label()]

    def _label(self) -> str:
        if self.label is None:
            raise InvalidInput("this split has no label: call split() with label= and with_labels")
        return self.label


def split(
    features: pd.DataFrame,
    strategy: str | Strategy = "random",
    ratio: float = 0.8,
    seed: int = 0,
    *,
    shuffle: bool = False,
    with_labels: bool = True,
    label: str | None = None,
    min_part_rows: int = 30,
    imbalance_factor: float = 2.0,
) -> Split:
    """Split ``features`` into disjoint train and test parts; same inputs, same rows.

    With ``with_labels`` and a ``label`` the result also has ``X_``/``y_`` parts and the class
    balance is checked; ``with_labels=False`` ignores the label. Uneven splits are returned
    in ``.warnings`` and emitted as ``SplitWarning``; bad arguments raise ``InvalidInput``.
    A part that is one run of rows (sequential, unshuffled) is a slice of ``features``
    without a copy, as ``features.iloc[a:b]`` is: copy it before writing into it.
    """
    label = label if with_labels else None
    _check_arguments(features, ratio, seed, label)
    train, test = _positions(features, strategy, ratio, seed)
    if shuffle:
        train, test = shuffle_within(train, test, seed)
    parts = Split(_rows(features, train), _rows(features, test), label)
    found = uneven(
        parts.train, parts.test, ratio=ratio, label=label,
        min_part_rows=min_part_rows, imbalance_factor=imbalance_factor,
    )
    emit(found)
    return replace(parts, warnings=found)


def _rows(features: pd.DataFrame, positions: Positions) -> pd.DataFrame:
    """The rows at ``positions``; one ascending run (a sequential split) is an ``iloc``
    slice, which pandas makes without copying the rows (a view: copy a part before
    writing into it), else a take."""
    run = len(positions) > 0 and bool((np.diff(positions) == 1).all())
    return features.iloc[positions[0]:positions[-1] + 1] if run else features.iloc[positions]


def shuffle_within(train: Positions, test: Positions, seed: int) -> tuple[Positions, Positions]:
    """Each part's rows in a seeded random order; which rows are in which part is unchanged."""
    # A stream of its own, so shuffling never depends on how the strategy used the seed.
    rng = np.random.default_rng([seed, 1])
    return rng.permutation(train), rng.permutation(test)


def _positions(
    features: pd.DataFrame, strategy: str | Strategy, ratio: float, seed: int
) -> tuple[Positions, Positions]:
    chosen = resolve(strategy)
    return checked(chosen(features, ratio, seed), len(features), describe(strategy))


def _check_arguments(features: pd.DataFrame, ratio: float, seed: int, label: str | None) -> None:
    if not isinstance(features, pd.DataFrame):
        raise InvalidInput(f"split needs a pandas DataFrame, got {type(features).__name__}")
    if len(features) < 2:
        raise InvalidInput(f"cannot split {len(features)} row(s): need at least 2")
    _check_ratio(ratio)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}")
    if label is not None and label not in features.columns:
        raise InvalidInput(f"label {label!r} is not a column: {list(features.columns)}")


def _check_ratio(ratio: float) -> None:
    number = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool)
    if not (number and math.isfinite(ratio) and 0 < ratio < 1):
        raise InvalidInput(f"ratio must be strictly between 0 and 1, got {ratio!r}")
