"""``preparation.distributed.read_features_dask``: a stored feature set's rows as a Dask
frame, each row indexed as ``OfflineFeatureStore.read`` indexes it (the row ids batch
scoring writes), whatever the set's layout. Computed with Dask's synchronous scheduler:
no cluster needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.stores import OfflineFeatureStore
from preparation.distributed import plain_strings, read_features_dask

FSID = "0123456789abcdef"


def features(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"amount": np.arange(rows, dtype=np.float64) / 3,
                         "nameOrig": [f"C{i % 7}" for i in range(rows)]})


def rewritten(offline: OfflineFeatureStore, frame: pd.DataFrame, row_group_size: int) -> None:
    """The set stored as one file of several row groups (pandas writes row groups of
    ~1M rows: a set of a few million rows has several)."""
    offline.write(FSID, frame, {})
    path = Path(offline.root) / "features" / FSID / "features.parquet"
    frame.to_parquet(path, use_dictionary=False, compression="lz4",
                     row_group_size=row_group_size)


def read(offline: OfflineFeatureStore, columns: list[str] | None = None) -> pd.DataFrame:
    with plain_strings():  # text as pandas reads it, not Dask's pyarrow strings
        frame = read_features_dask(offline, FSID, columns)
        return frame.compute(scheduler="sync")  # type: ignore[no-any-return]


@pytest.mark.parametrize("columns", [None, ["amount"]])
def test_a_one_file_set_of_several_row_groups_keeps_its_row_ids(
        tmp_path: Path, columns: list[str] | None) -> None:
    offline = OfflineFeatureStore(str(tmp_path))
    rewritten(offline, features(1_000), row_group_size=300)
    stored = read_features_dask(offline, FSID, columns)
    assert stored.npartitions == 4  # a partition per row group
    got = read(offline, columns)
    # Each row group alone would be indexed from 0: row ids 0..299 four times over.
    assert got.index.tolist() == list(range(1_000))
    pd.testing.assert_frame_equal(got, offline.read(FSID, columns), check_index_type=False)


@pytest.mark.parametrize("columns", [None, ["amount"]])
def test_a_set_indexed_by_batch_position_keeps_it(tmp_path: Path,
                                                  columns: list[str] | None) -> None:
    # Rows a filter dropped: the index is stored as a column, which a read of some
    # columns only must still take.
    offline = OfflineFeatureStore(str(tmp_path))
    kept = features(1_000).iloc[lambda f: f.index % 3 != 0]
    rewritten(offline, kept, row_group_size=250)
    got = read(offline, columns)
    assert got.index.tolist() == kept.index.tolist()
    pd.testing.assert_frame_equal(got, offline.read(FSID, columns))


def test_a_range_index_that_does_not_start_at_0_goes_on_across_row_groups(
        tmp_path: Path) -> None:
    offline = OfflineFeatureStore(str(tmp_path))
    rewritten(offline, features(500).set_axis(pd.RangeIndex(1_000, 1_500)), row_group_size=200)
    assert read(offline).index.tolist() == list(range(1_000, 1_500))


def test_a_set_written_as_parts_keeps_each_parts_row_ids(tmp_path: Path) -> None:
    offline = OfflineFeatureStore(str(tmp_path))
    frame = features(900)
    offline.start_parts(FSID)
    for number, start in enumerate(range(0, 900, 300)):
        offline.write_part(FSID, number, frame.iloc[start:start + 300])
    offline.finish_parts(FSID, 900, {}, {})
    got = read(offline, ["amount"])
    assert got.index.tolist() == list(range(900))
    pd.testing.assert_frame_equal(got, offline.read(FSID, ["amount"]))
