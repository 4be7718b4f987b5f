"""Checks for uneven splits: legal, but likely to mislead training or evaluation.

Each check returns ``SplitWarning`` objects (a ``UserWarning`` subclass, as scikit-learn
reports problems that should not stop a run) whose ``kind`` says which check fired and whose
message names the class or part and the numbers. Example::

    found = uneven(train, test, ratio=0.8, label="is_fraud", min_part_rows=30)
    [w.kind for w in found]   # e.g. ["missing_class"]
"""

from __future__ import annotations

import warnings
from typing import Literal

import pandas as pd
from sklearn.utils.multiclass import type_of_target

WarningKind = Literal["missing_class", "rare_class", "small_part", "extreme_ratio"]

EXTREME_RATIO = (0.5, 0.95)
"""Train ratios outside this closed range leave one part too small to trust."""

CLASS_CHECK_LIMIT = 50
"""Labels with more distinct values are treated as numbers, not classes: an integer
regression target would otherwise raise one warning per value."""


class SplitWarning(UserWarning):
    """A split that is legal but uneven; ``kind`` says which check fired."""

    def __init__(self, kind: WarningKind, message: str):
        super().__init__(message)
        self.kind = kind


def uneven(
    train: pd.DataFrame,
    test: pd.DataFrame,
    *,
    ratio: float,
    label: str | None = None,
    min_part_rows: int = 30,
    imbalance_factor: float = 2.0,
) -> list[SplitWarning]:
    """Every warning the split deserves: ratio, part sizes and, with a label, class balance."""
    sizes = {"train": len(train), "test": len(test)}
    found = extreme_ratio(ratio) + small_parts(sizes, min_part_rows)
    if label is not None and is_classes(pd.concat([train[label], test[label]])):
        found += class_balance(train[label], test[label], imbalance_factor)
    return found


def emit(found: list[SplitWarning], stacklevel: int = 3) -> None:
    """Issue each warning through ``warnings``, pointing at the caller of the split by default."""
    for warning in found:
        warnings.warn(warning, stacklevel=stacklevel)


def extreme_ratio(ratio: float) -> list[SplitWarning]:
    """A warning when the train ratio falls outside ``EXTREME_RATIO``."""
    low, high = EXTREME_RATIO
    if low <= ratio <= high:
        return []
    message = (
        f"ratio {ratio:g} is extreme (outside {low:g}..{high:g}): train gets {ratio:.0%} "
        f"of the rows and test {1 - ratio:.0%}"
    )
    return [SplitWarning("extreme_ratio", message)]


def small_parts(sizes: dict[str, int], minimum: int) -> list[SplitWarning]:
    """A warning for each part with fewer rows than ``minimum``."""
    return [
        SplitWarning("small_part", f"{part} part has {rows} rows, below the minimum of {minimum}")
        for part, rows in sizes.items()
        if rows < minimum
    ]


def is_classes(labels: pd.Series) -> bool:
    """Whether a label column holds classes (binary or multiclass), not numbers to regress."""
    labels = labels.dropna()
    if labels.empty or labels.nunique() > CLASS_CHECK_LIMIT:
        return False
    return type_of_target(labels.to_numpy()) in ("binary", "multiclass")


def class_balance(y_train: pd.Series, y_test: pd.Series, factor: float) -> list[SplitWarning]:
    """Warnings for classes missing from a part or far rarer in one part than in the other."""
    counts = pd.DataFrame({"train": y_train.value_counts(), "test": y_test.value_counts()})
    counts = counts.fillna(0).astype(int)
    sizes = {"train": len(y_train), "test": len(y_test)}
    found = (_class_warning(cls, row.to_dict(), sizes, factor) for cls, row in counts.iterrows())
    return [warning for warning in found if warning is not None]


def _class_warning(
    cls: object, counts: dict[str, int], sizes: dict[str, int], factor: float
) -> SplitWarning | None:
    missing = [part for part, count in counts.items() if count == 0]
    if missing:
        absent = missing[0]
        present = "train" if absent == "test" else "test"
        message = f"class {_name(cls)} has {counts[present]} rows in {present} and none in {absent}"
        return SplitWarning("missing_class", message)
    return _rare_class(cls, counts, sizes, factor)


def _rare_class(
    cls: object, counts: dict[str, int], sizes: dict[str, int], factor: float
) -> SplitWarning | None:
    shares = {part: counts[part] / sizes[part] for part in counts}
    rare, common = sorted(shares, key=shares.__getitem__)
    times = shares[common] / shares[rare]
    if times <= factor:
        return None
    where = {part: f"{shares[part]:.2%}, {counts[part]} of {sizes[part]} rows" for part in shares}
    message = (
        f"class {_name(cls)} is {times:.1f}x rarer in {rare} ({where[rare]}) than in {common} "
        f"({where[common]}), beyond the allowed factor {factor:g}"
    )
    return SplitWarning("rare_class", message)


def _name(cls: object) -> str:
    # repr quotes string classes; str keeps numpy integers from printing as np.int64(1)
    return repr(cls) if isinstance(cls, str) else str(cls)
