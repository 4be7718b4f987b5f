"""The split of a Dask frame: the same rows in each part as ``split`` gives for pandas.

The built-in strategies choose rows by position only, so the positions are computed once
from the frame's length (as for a pandas frame of that length) and each partition keeps
its own; only the partitions' lengths are needed up front (a feature set's come from its
Parquet footers). A custom strategy
may read the frame's contents, and shuffling reorders a whole part; neither is done on a
Dask frame (``InvalidInput``). Example::

    stored = offline.read_dask(feature_set_id)            # a dask frame and its lengths
    parts = split_partitioned(stored.frame, config, stored.lengths)
    X_test, y_test = parts.test[features], parts.test[label]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from common.errors import InvalidInput
from segregation.config import SplitConfig
from segregation.strategies import STRATEGIES, checked

if TYPE_CHECKING:
    import dask.dataframe as dd
    from distributed import Client


@dataclass(frozen=True)
class PartitionedSplit:
    """The train and test parts of a Dask frame, each a Dask frame."""

    train: dd.DataFrame
    test: dd.DataFrame


def split_partitioned(frame: dd.DataFrame, config: SplitConfig,
                      lengths: Sequence[int] | Client) -> PartitionedSplit:
    """``config``'s split of ``frame``, whose partitions hold ``lengths`` rows (or, given
    a client, counted on its cluster first): lazy, each partition keeping its own rows of
    each part."""
    if not isinstance(lengths, Sequence):
        lengths = partition_lengths(frame, lengths)
    if config.strategy not in STRATEGIES or config.shuffle:
        raise InvalidInput(
            f"split strategy {config.strategy!r}{' with shuffle' if config.shuffle else ''} "
            f"is not supported on a Dask frame; use one of {sorted(STRATEGIES)} without shuffle")
    rows = int(sum(lengths))
    if rows < 2:
        raise InvalidInput(f"cannot split {rows} row(s): need at least 2")
    index_only = pd.DataFrame(index=pd.RangeIndex(rows))
    train, test = checked(STRATEGIES[config.strategy](index_only, config.ratio, config.seed),
                          rows, config.strategy)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return PartitionedSplit(_keep(frame, train, offsets), _keep(frame, test, offsets))


def partition_lengths(frame: dd.DataFrame, client: Client) -> list[int]:
    """Rows in each partition of ``frame``, counted on the cluster (reads every partition:
    where the lengths are known, from Parquet footers, pass those)."""
    import dask

    return [int(n) for n in client.compute([dask.delayed(len)(part)
                                            for part in frame.to_delayed()], sync=True)]


def _keep(frame: dd.DataFrame, positions: np.ndarray, offsets: np.ndarray) -> dd.DataFrame:
    """The rows at sorted global ``positions``, each partition taking its own."""
    import dask
    import dask.dataframe as dd

    parts = []
    for number, part in enumerate(frame.to_delayed()):
        start, stop = np.searchsorted(positions, offsets[number:number + 2])
        parts.append(dask.delayed(_rows)(part, _compact(positions[start:stop] - offsets[number])))
    return dd.from_delayed(parts, meta=frame._meta, verify_meta=False)


def _compact(local: np.ndarray) -> Any:
    """One run of positions as a slice (a sequential split ships two numbers, not an array)."""
    if len(local) == 0 or local[-1] - local[0] + 1 == len(local):
        return slice(int(local[0]), int(local[-1]) + 1) if len(local) else slice(0, 0)
    return local


def _rows(part: pd.DataFrame, where: Any) -> pd.DataFrame:
    return part.iloc[where]
