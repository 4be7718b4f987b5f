"""The offline batch scoring core: chunks by entity, the same scores as one pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.errors import InvalidInput
from preparation import build_pipeline
from scoring.offline import BatchModel, entity_chunks, score_features, score_raw
from tests.fixtures.scoring import SPEC, history


@pytest.fixture(scope="module")
def model() -> BatchModel:
    frame = history(400, seed=2)
    fitted = build_pipeline(SPEC).fit(frame, batch_ids=["b1"])
    X = fitted.transform(frame)[list(fitted.feature_names)]
    estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    estimator.fit(X, frame["isFraud"])
    return BatchModel("v7", estimator, fitted, list(fitted.feature_names))


def one_pass(model: BatchModel, frame: pd.DataFrame) -> np.ndarray:
    features = model.features.transform(frame)[list(model.feature_names)]
    return model.estimator.predict_proba(features)[:, 1]


def test_chunks_keep_every_entity_whole_and_every_row_once() -> None:
    frame = history(300, seed=4)
    chunks = list(entity_chunks(frame, "nameOrig", 50))
    assert len(chunks) == 6
    assert sorted(i for chunk in chunks for i in chunk.index) == list(frame.index)
    owners = [set(chunk["nameOrig"]) for chunk in chunks]
    assert all(a.isdisjoint(b) for i, a in enumerate(owners) for b in owners[i + 1:])


def test_raw_rows_scored_in_chunks_equal_one_pass(model: BatchModel) -> None:
    frame = history(500, seed=9)
    progress: list[tuple[int, int, int]] = []
    scores = score_raw(model, frame, chunk_rows=64,
                       progress=lambda *step: progress.append(step))
    assert scores["row_id"].tolist() == list(frame.index)
    assert scores["entity_id"].tolist() == frame["nameOrig"].tolist()
    np.testing.assert_allclose(scores["score"], one_pass(model, frame), rtol=1e-12, atol=1e-15)
    assert scores["score"].tolist() == scores["probability_1"].tolist()
    assert (scores["label"] == np.where(scores["probability_1"] > 0.5, "1", "0")).all()
    assert set(scores["model_version"]) == {"v7"}
    assert [p[0] for p in progress] == list(range(1, 9)) and progress[-1][1:] == (8, 500)


def test_a_feature_set_is_predicted_as_it_is(model: BatchModel) -> None:
    frame = history(200, seed=3)
    features = model.features.transform(frame)
    scores = score_features(model, features, chunk_rows=30)
    np.testing.assert_allclose(scores["score"], one_pass(model, frame), rtol=1e-12, atol=1e-15)


def test_a_feature_set_without_the_model_features_is_refused(model: BatchModel) -> None:
    features = model.features.transform(history(50, seed=3)).drop(columns=["amount"])
    with pytest.raises(InvalidInput, match="lacks features of model version v7: amount"):
        score_features(model, features)


def test_an_empty_batch_gives_an_empty_frame(model: BatchModel) -> None:
    scores = score_raw(model, history(10).iloc[:0])
    assert scores.empty and "score" in scores.columns
