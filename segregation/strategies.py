"""Split strategies: which row positions of a frame go to train and which to test.

A strategy is any callable ``(frame, ratio, seed) -> (train_positions, test_positions)``
returning integer row positions, as ``frame.iloc`` takes them (the habit of scikit-learn's
splitters). The built-in ones are named; a custom one is injected as a callable or as a
``"package.module:function"`` path, resolved with importlib. Example::

    train, test = resolve("sequential")(frame, 0.8, 0)    # first 80 % of rows, in order
    by_customer = resolve("my_project.splits:by_customer")  # InvalidInput if it cannot load

A custom strategy may leave rows out of both parts (a gap between a time-ordered train and
test part, say); the parts must still be disjoint, non-empty and inside the frame.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from common.errors import InvalidInput

Positions = np.ndarray
Strategy = Callable[[pd.DataFrame, float, int], tuple[Any, Any]]


def train_rows(rows: int, ratio: float) -> int:
    """How many rows go to train: ``ratio`` of them, rounded to the nearest row."""
    cut = math.floor(ratio * rows + 0.5)
    if 0 < cut < rows:
        return cut
    empty = "train" if cut == 0 else "test"
    raise InvalidInput(f"ratio {ratio:g} of {rows} rows leaves the {empty} part empty")


def sequential_split(frame: pd.DataFrame, ratio: float, seed: int) -> tuple[Positions, Positions]:
    """The first ``ratio`` of rows for train and the rest for test, in order; no randomness."""
    positions = np.arange(len(frame))
    cut = train_rows(len(frame), ratio)
    return positions[:cut], positions[cut:]


def random_split(frame: pd.DataFrame, ratio: float, seed: int) -> tuple[Positions, Positions]:
    """A seeded random ``ratio`` of rows for train, the rest for test, each in frame order."""
    order = np.random.default_rng(seed).permutation(len(frame))
    cut = train_rows(len(frame), ratio)
    return np.sort(order[:cut]), np.sort(order[cut:])


STRATEGIES: dict[str, Strategy] = {"sequential": sequential_split, "random": random_split}
"""The built-in strategies by the name a config uses."""


def resolve(strategy: str | Strategy) -> Strategy:
    """The strategy a name, a ``"module:function"`` path or a callable stands for."""
    if callable(strategy):
        return strategy
    if strategy in STRATEGIES:
        return STRATEGIES[strategy]
    if "." in strategy or ":" in strategy:
        return load(strategy)
    known = ", ".join(sorted(STRATEGIES))
    raise InvalidInput(
        f"unknown split strategy {strategy!r}: use one of {known}, "
        "a callable or a 'package.module:function' path"
    )


def load(path: str) -> Strategy:
    """Import a custom strategy from ``"package.module:function"`` (or a dotted path)."""
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
    # Whatever stops the module from loading, the config naming it is what the user must fix.
    except Exception as exc:
        raise InvalidInput(f"custom split strategy {path!r} cannot be imported: {exc}") from None
    if not callable(target):
        kind = type(target).__name__
        raise InvalidInput(f"custom split strategy {path!r} is not callable (it is a {kind})")
    return target


def describe(strategy: str | Strategy) -> str:
    """A strategy's name for messages."""
    if isinstance(strategy, str):
        return strategy
    return getattr(strategy, "__qualname__", None) or repr(strategy)


def checked(result: Any, rows: int, name: str) -> tuple[Positions, Positions]:
    """A strategy's answer as two disjoint, non-empty arrays of positions inside the frame."""
    try:
        train, test = result
    except (TypeError, ValueError):
        raise InvalidInput(
            f"split strategy {name} must return (train_positions, test_positions), "
            f"got {type(result).__name__}"
        ) from None
    train, test = _part(train, rows, name, "train"), _part(test, rows, name, "test")
    both = np.count_nonzero(_in_part(train, rows)[test])  # test has no repeats: distinct rows
    if both:
        raise InvalidInput(f"split strategy {name} put {both} row(s) in both train and test")
    return train, test


def _part(part: Any, rows: int, name: str, which: str) -> Positions:
    array = np.asarray(part)
    problem = _position_problem(array, rows)
    if problem:
        raise InvalidInput(f"split strategy {name} returned bad {which} positions: {problem}")
    return array.astype(np.intp)


def _position_problem(array: np.ndarray, rows: int) -> str | None:
    if array.ndim != 1:
        return f"expected a 1-D array of positions, got shape {array.shape}"
    if array.size == 0:
        return "the part is empty"
    if not np.issubdtype(array.dtype, np.integer):
        return f"expected integer positions, got {array.dtype}"
    if array.min() < 0 or array.max() >= rows:
        return f"positions must lie in [0, {rows}), got {array.min()}..{array.max()}"
    if np.bincount(array.astype(np.intp), minlength=rows).max() > 1:  # O(rows), no sort
        return "a row appears more than once"
    return None


def _in_part(part: Positions, rows: int) -> np.ndarray:
    """A mask of the frame's rows: True at the part's positions."""
    mask = np.zeros(rows, dtype=bool)
    mask[part] = True
    return mask
