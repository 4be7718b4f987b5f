"""Partitioned raw batches (the Dask path's layout): one Parquet part per chunk, read back
as the single-file layout reads, and as pieces (parts, or a file's row groups) in row
order, each indexed by its batch positions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from app.config import load_pipeline_config
from common.datasets import paysim
from common.stores import RawBatchStore
from ingestion.contract import ContractTyping, read_batch

CONTRACT = load_pipeline_config(Path(__file__).parents[2] / "config" / "pipeline.yaml"
                                ).datasets["paysim"]


@pytest.fixture
def source(tmp_path: Path) -> str:
    path = tmp_path / "tx.csv"
    paysim(2_500, seed=3).to_csv(path, index=False)
    return str(path)


def stored(root: Path, source: str, partitioned: bool) -> tuple[RawBatchStore, str]:
    store = RawBatchStore(str(root), chunk_rows=1_000)
    batch = store.put("paysim", source, typing=ContractTyping(CONTRACT), partitioned=partitioned)
    return store, batch.batch_id


def test_a_partitioned_batch_reads_as_the_one_file_does(tmp_path: Path, source: str) -> None:
    one, one_id = stored(tmp_path / "one", source, partitioned=False)
    parts, parts_id = stored(tmp_path / "parts", source, partitioned=True)
    assert parts_id == one_id
    manifest = parts.manifest(parts_id)
    assert manifest.partitioned and manifest.paths["parquet"].endswith("/parts")
    assert manifest.typed_by == one.manifest(one_id).typed_by
    pd.testing.assert_frame_equal(read_batch(parts, parts_id, CONTRACT),
                                  read_batch(one, one_id, CONTRACT))
    assert sum(len(f) for f in parts.iter_frames(parts_id, rows=700)) == 2_500


@pytest.mark.parametrize("partitioned", [True, False])
def test_pieces_cover_the_batch_in_order(tmp_path: Path, source: str,
                                         partitioned: bool) -> None:
    store, batch_id = stored(tmp_path, source, partitioned)
    pieces = store.pieces(batch_id)
    assert [(p.rows, p.first_row) for p in pieces] == [(1000, 0), (1000, 1000), (500, 2000)]
    assert all((p.row_group is None) == partitioned for p in pieces)
    whole = store.read_frame(batch_id)
    for piece in pieces:
        part = store.read_piece(piece)
        assert list(part.index) == list(range(piece.first_row, piece.first_row + piece.rows))
        pd.testing.assert_frame_equal(
            part.astype({"type": "string"}),
            whole.iloc[piece.first_row:piece.first_row + piece.rows].astype({"type": "string"}))


def test_a_second_put_keeps_the_stored_layout(tmp_path: Path, source: str) -> None:
    store, batch_id = stored(tmp_path, source, partitioned=False)
    again = store.put("paysim", source, typing=ContractTyping(CONTRACT), partitioned=True)
    assert (again.batch_id, again.partitioned) == (batch_id, False)


def test_a_restarted_conversion_leaves_no_part_of_the_earlier_attempt(tmp_path: Path) -> None:
    # The third chunk turns an int column into text: the conversion starts over wider,
    # and the parts of the first attempt are gone.
    path = tmp_path / "drift.csv"
    pd.DataFrame({"a": [1] * 2_000 + ["x"] * 500}).to_csv(path, index=False)
    store = RawBatchStore(str(tmp_path / "root"), chunk_rows=1_000)
    batch = store.put("d", str(path), partitioned=True)
    assert batch.columns == {"a": "string"}
    assert len(store.pieces(batch.batch_id)) == 3
    assert store.read_frame(batch.batch_id)["a"].tolist() == ["1"] * 2_000 + ["x"] * 500
