"""A seeded, class-stratified sample of a training set that is too large to train on whole.

``CONVEYOR_TRAIN_MAX_ROWS`` caps the rows a candidate trains on (unset: no cap). Past it,
each class keeps its share of the rows (largest remainders decide the last rows, and every
class present keeps at least one), and within a class the rows are a seeded draw, kept in
their original order. The same rows are chosen from a pandas frame and from a Dask frame
of the same rows, whatever its partitions: the draw is made on each class's ordinals
(the n-th row of that class), not on partitions. Example::

    plan = sample_plan(y.value_counts(), max_rows=1_000_000, seed=0)
    X_s, y_s = take_sample(X, y, plan)       # pandas
    plan.metadata()                          # what the model's metadata records
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainingSettings(BaseSettings):
    """How much of a training set the training service trains on (prefix ``CONVEYOR_``)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    train_max_rows: int | None = Field(default=None, ge=2)
    """Rows a candidate trains on at most: a larger training set is sampled (seeded, class
    by class) to this size, recorded in each model's metadata. Unset: every row."""
    train_sample_seed: int = Field(default=0, ge=0)
    """Seed of that sample."""


@dataclass(frozen=True)
class SamplePlan:
    """How many rows of each class to keep, and which (ordinals within the class)."""

    available: int
    seed: int
    counts: dict[Any, int]
    """Rows of each class in the whole training set."""
    chosen: dict[Any, np.ndarray]
    """Per class, the sorted ordinals (0 = its first row) of the rows kept."""

    @property
    def rows(self) -> int:
        """Rows in the sample."""
        return int(sum(len(c) for c in self.chosen.values()))

    def metadata(self) -> dict[str, Any]:
        """What a model trained on the sample records: where its rows came from."""
        return {
            "method": "class-stratified", "seed": self.seed,
            "rows_available": self.available, "rows": self.rows,
            "class_rows_available": {str(k): int(v) for k, v in self.counts.items()},
            "class_rows": {str(k): len(v) for k, v in self.chosen.items()},
        }


def needs_sample(rows: int, max_rows: int | None) -> bool:
    """Whether a training set of ``rows`` rows is over the cap."""
    return max_rows is not None and rows > max_rows


def sample_plan(class_counts: pd.Series, max_rows: int, seed: int) -> SamplePlan:
    """The rows to keep of a training set whose classes have ``class_counts`` rows."""
    counts = {k: int(v) for k, v in sorted(class_counts.items(), key=lambda kv: str(kv[0]))
              if int(v) > 0}
    quotas = _quotas(counts, max_rows)
    rng = np.random.default_rng(seed)
    chosen = {k: np.sort(rng.choice(counts[k], size=quotas[k], replace=False))
              for k in counts}  # one draw per class, classes in a fixed order
    return SamplePlan(sum(counts.values()), seed, counts, chosen)


def _quotas(counts: dict[Any, int], max_rows: int) -> dict[Any, int]:
    """Each class's share of ``max_rows`` (at least one row each, largest remainders last)."""
    total = sum(counts.values())
    exact = {k: max_rows * n / total for k, n in counts.items()}
    quotas = {k: min(counts[k], max(1, int(v))) for k, v in exact.items()}
    by_remainder = sorted(counts, key=lambda k: (-(exact[k] - int(exact[k])), str(k)))
    while sum(quotas.values()) < max_rows:
        grew = False
        for k in by_remainder:
            if sum(quotas.values()) < max_rows and quotas[k] < counts[k]:
                quotas[k] += 1
                grew = True
        if not grew:
            break
    return quotas


def take_sample(X: pd.DataFrame, y: pd.Series, plan: SamplePlan) -> tuple[pd.DataFrame, pd.Series]:
    """The planned rows of (X, y), in their original order."""
    keep = positions_in(y.to_numpy(), plan, {k: 0 for k in plan.counts})
    return X.iloc[keep], y.iloc[keep]


def positions_in(labels: np.ndarray, plan: SamplePlan, seen: dict[Any, int]) -> np.ndarray:
    """Positions in ``labels`` (one partition) of the planned rows; ``seen`` holds how many
    rows of each class came before this partition."""
    keep = []
    for label, ordinals in plan.chosen.items():
        where = np.flatnonzero(labels == label)
        first = np.searchsorted(ordinals, seen[label])
        last = np.searchsorted(ordinals, seen[label] + len(where))
        keep.append(where[ordinals[first:last] - seen[label]])
    return np.sort(np.concatenate(keep)) if keep else np.array([], dtype=np.int64)


def class_counts_by_partition(labels: Any, client: Any) -> list[dict[Any, int]]:
    """Rows of each class in each partition of a Dask series (only the counts come back)."""
    import dask

    return list(client.compute([dask.delayed(_counts)(part) for part in labels.to_delayed()],
                               sync=True))


def _counts(labels: pd.Series) -> dict[Any, int]:
    return {k: int(v) for k, v in labels.value_counts().items()}


def take_sample_partitioned(frame: Any, label: str, plan: SamplePlan,
                            per_partition: list[dict[Any, int]]) -> Any:
    """The planned rows of a Dask frame (lazy), each partition keeping its own, so that the
    rows are those ``take_sample`` keeps of the same rows in one pandas frame."""
    import dask
    import dask.dataframe as dd

    seen = {k: 0 for k in plan.counts}
    parts = []
    for part, counts in zip(frame.to_delayed(), per_partition, strict=True):
        parts.append(dask.delayed(_take)(part, label, plan, dict(seen)))
        for k, n in counts.items():
            seen[k] = seen.get(k, 0) + n
    return dd.from_delayed(parts, meta=frame._meta, verify_meta=False)


def _take(part: pd.DataFrame, label: str, plan: SamplePlan, seen: dict[Any, int]) -> pd.DataFrame:
    return part.iloc[positions_in(part[label].to_numpy(), plan, seen)]
