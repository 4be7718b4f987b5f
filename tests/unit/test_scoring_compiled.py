"""Compiled tree predictors: Treelite answers only where it gives scikit-learn's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression

from scoring.compiled import (
    CompiledTrees,
    _gtil_predictor,
    check_rows,
    compiled_or_same,
    split_points,
)


def data(classes: int = 2, missing: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(2_000, 6))
    y = (X[:, 0] + X[:, 1] * X[:, 2] > 0).astype(int) if classes == 2 else rng.integers(
        0, classes, len(X))
    if missing:
        X[rng.random(X.shape) < 0.05] = np.nan
    return X, y


def test_a_binary_hist_gradient_boosting_model_is_compiled_with_its_own_probabilities():
    X, y = data()
    estimator = HistGradientBoostingClassifier(max_iter=30).fit(X, y)
    model = compiled_or_same(estimator)

    assert isinstance(model, CompiledTrees)
    np.testing.assert_allclose(model.predict_proba(X), estimator.predict_proba(X),
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(model.predict(X), estimator.predict(X))
    assert list(model.classes_) == list(estimator.classes_)


def test_check_rows_sit_on_every_split_and_include_missing_values():
    X, y = data()
    estimator = HistGradientBoostingClassifier(max_iter=5).fit(X, y)
    splits = split_points(estimator)
    rows = check_rows(splits)

    assert rows.shape == (512, 6) and np.isnan(rows).any(axis=0).all()
    on_split = [np.isin(rows[:, j], splits[j]).any() for j in range(6)]
    assert all(on_split)


FLOAT32_TREES = [RandomForestClassifier(n_estimators=10, random_state=0),
                 GradientBoostingClassifier(n_estimators=10, random_state=0),
                 ExtraTreesClassifier(n_estimators=10, random_state=0)]


@pytest.mark.parametrize("estimator", FLOAT32_TREES, ids=lambda e: type(e).__name__)
def test_trees_that_compare_float32_values_are_compiled_on_float32_values(estimator):
    X, y = data(missing=not isinstance(estimator, GradientBoostingClassifier))
    estimator.fit(X, y)
    model = compiled_or_same(estimator)

    assert isinstance(model, CompiledTrees) and model.float32_inputs
    np.testing.assert_allclose(model.predict_proba(X), estimator.predict_proba(X),
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(model.predict(X), estimator.predict(X))


@pytest.mark.parametrize("value", [1e308, np.inf])
def test_a_float32_compiled_model_refuses_what_its_estimator_refuses(value: float) -> None:
    X, y = data(missing=False)
    estimator = GradientBoostingClassifier(n_estimators=5, random_state=0).fit(X, y)
    model = compiled_or_same(estimator)
    row = X[:1].copy()
    row[0, 3] = value
    for predictor in (estimator, model):
        with pytest.raises(ValueError, match="Input X contains infinity or a value too large"):
            predictor.predict_proba(row)
    row[0, 3] = np.nan  # GradientBoosting takes no missing value
    for predictor in (estimator, model):
        with pytest.raises(ValueError, match="Input X contains NaN"):
            predictor.predict_proba(row)


def test_an_estimator_treelite_answers_differently_stays_in_scikit_learn(caplog):
    X, y = data(classes=3)
    estimator = HistGradientBoostingClassifier(max_iter=10)  # float32 softmax

    with caplog.at_level("INFO", logger="scoring.compiled"):
        assert compiled_or_same(estimator.fit(X, y)) is estimator
    assert "HistGradientBoostingClassifier stays in scikit-learn: Treelite differs by" in (
        caplog.text)


def test_a_model_without_trees_is_left_as_it_is():
    X, y = data(missing=False)
    estimator = LogisticRegression().fit(X, y)
    assert compiled_or_same(estimator) is estimator


@pytest.mark.parametrize("rows", [1, 7, 500])
def test_the_direct_gtil_call_gives_treelites_own_answers(rows: int) -> None:
    from treelite import gtil

    X, y = data()
    model = compiled_or_same(HistGradientBoostingClassifier(max_iter=30).fit(X, y)).model
    predict = _gtil_predictor(model)
    matrix = X[:rows]
    np.testing.assert_array_equal(predict(matrix), gtil.predict(model, matrix, nthread=1))
    narrow = X[:rows, :4]  # fewer features than the model's: Treelite pads them as missing
    np.testing.assert_array_equal(predict(narrow), gtil.predict(model, narrow, nthread=1))
