"""Which models scoring predicts on plain arrays, and which on DataFrames (``_frame_input``).

A model fitted on a DataFrame (every model Conveyor trains) answers a plain array in the
learnt column order as it answers the DataFrame, without the DataFrame's ~0.45 ms a call;
scoring gives it arrays only once it has checked that, bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from scoring.core import _frame_input
from tests.fixtures.scoring import memory_world

NAMES = ["a", "b", "c", "d"]


def training() -> tuple[pd.DataFrame, pd.Series]:
    X = pd.DataFrame(np.random.default_rng(7).normal(size=(300, len(NAMES))), columns=NAMES)
    return X, (X["a"] - X["c"] > 0).astype(int)


def test_a_model_fitted_on_a_frame_in_the_served_order_gets_arrays_without_a_warning() -> None:
    X, y = training()
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    assert _frame_input(model, NAMES) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under ours, which _frame_input put first
        from scoring.core import _silence_unnamed_array_warning
        _silence_unnamed_array_warning()
        as_arrays = model.predict_proba(X.to_numpy())
    assert np.array_equal(as_arrays, model.predict_proba(X))


def test_a_model_fitted_on_a_frame_in_another_order_keeps_frames() -> None:
    X, y = training()
    model = LogisticRegression().fit(X, y)
    assert _frame_input(model, list(reversed(NAMES))) is True


def test_a_model_fitted_on_an_array_gets_arrays() -> None:
    X, y = training()
    assert _frame_input(LogisticRegression().fit(X.to_numpy(), y), NAMES) is False


def test_a_model_that_selects_columns_by_name_keeps_frames() -> None:
    X, y = training()
    by_name = ColumnTransformer([("scaled", StandardScaler(), ["a", "c"])])
    model = make_pipeline(by_name, LogisticRegression()).fit(X, y)
    assert _frame_input(model, NAMES) is True  # an array has no columns "a" and "c"


def test_a_model_that_answers_arrays_otherwise_keeps_frames() -> None:
    def reverse_frames(data: pd.DataFrame | np.ndarray) -> pd.DataFrame | np.ndarray:
        return data.iloc[:, ::-1] if isinstance(data, pd.DataFrame) else data

    X, y = training()
    model = make_pipeline(FunctionTransformer(reverse_frames), LogisticRegression()).fit(X, y)
    assert _frame_input(model, NAMES) is True


@pytest.mark.parametrize(("warmup_calls", "frames"), [(3, False), (0, True)])
def test_the_check_is_part_of_the_warm_up(tmp_path: Path, warmup_calls: int,
                                          frames: bool) -> None:
    world = memory_world(tmp_path)  # its models are fitted on DataFrames
    core = world.core(warmup_calls=warmup_calls)
    try:
        core.load_chain()
        assert core.loaded().frame_input is frames  # no call at all: not checked, frames
        assert hasattr(core.loaded().estimator, "feature_names_in_")
    finally:
        core.close()
