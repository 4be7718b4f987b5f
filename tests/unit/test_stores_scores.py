"""Batch score store: one Parquet file per scoring run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common.errors import InvalidInput, NotFound
from common.stores.scores import BatchScoreStore


@pytest.fixture
def store(tmp_path: Path) -> BatchScoreStore:
    return BatchScoreStore(str(tmp_path))


def scores() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "entity_id": ["C1", "C2", "C3"],
            "score": [0.93, 0.12, 0.5],
            "label": ["fraud", "ok", None],
            "model_version": ["v3"] * 3,
        }
    )


def test_batch_scores_round_trip(store, tmp_path):
    uri = store.write("run-42", scores())
    assert uri == f"file://{tmp_path}/scores/run-42/scores.parquet"
    assert store.exists("run-42")
    pd.testing.assert_frame_equal(store.read("run-42"), scores())


def test_writing_a_run_again_replaces_it(store):
    store.write("run-1", scores())
    store.write("run-1", scores().head(1))
    assert len(store.read("run-1")) == 1


def test_missing_run_is_not_found(store):
    assert not store.exists("run-x")
    with pytest.raises(NotFound, match="run-x"):
        store.read("run-x")


def test_run_id_must_be_one_path_segment(store):
    with pytest.raises(InvalidInput, match="run id"):
        store.write("a/b", scores())
