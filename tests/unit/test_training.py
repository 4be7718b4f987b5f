"""Training core: candidate grids, estimator lookup, and training in worker processes.

The toy estimators of ``tests.fixtures.models`` run in real forkserver workers: one that
raises, one that blocks on a FIFO nobody writes to (for the timeout), one that fails
transiently and counts its attempts in files (for the retries).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression

from common.errors import InvalidInput
from tests.fixtures.models import FailingClassifier, attempts
from tests.fixtures.warm import warm_training_workers
from training.config import Candidate, CandidateSpec, TrainingConfig, expand, resolve_estimator
from training.failures import Failure
from training.trainer import TrainingResult, model_id_for, train_candidates

warm_training_workers()

LOGREG = {"name": "logreg", "estimator": "LogisticRegression", "params": {"max_iter": 200}}


def toy(name: str, estimator: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "estimator": f"tests.fixtures.models.{estimator}", "params": params}


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"])
    y = pd.Series((X["a"] + 0.5 * X["b"] > 0).astype(int), name="label")
    return X, y


def training(*candidates: dict[str, Any], **options: Any) -> TrainingConfig:
    return TrainingConfig.model_validate({"candidates": list(candidates), **options})


def train(data: tuple[pd.DataFrame, pd.Series], *candidates: dict[str, Any],
          **options: Any) -> TrainingResult:
    config = training(*candidates, **options)
    return train_candidates(config, *data, feature_set_id="fs1", batch_ids=["b1"])


# -- config ----------------------------------------------------------------------------


def test_a_grid_expands_to_one_candidate_per_combination() -> None:
    config = training({
        "name": "logreg", "estimator": "LogisticRegression",
        "params": {"max_iter": 100, "C": 5.0},
        "grid": {"C": [0.1, 1.0], "class_weight": [None, "balanced"]},
    }, LOGREG | {"name": "plain"})

    candidates = expand(config)

    assert [c.name for c in candidates] == [
        "logreg[C=0.1][class_weight=None]", "logreg[C=0.1][class_weight=balanced]",
        "logreg[C=1.0][class_weight=None]", "logreg[C=1.0][class_weight=balanced]", "plain"]
    assert candidates[3].params == {"max_iter": 100, "C": 1.0, "class_weight": "balanced"}
    assert candidates[4].params == {"max_iter": 200}


def test_a_grid_is_kept_small() -> None:
    with pytest.raises(ValidationError, match="grid has 20 combinations; at most 16"):
        CandidateSpec(name="big", estimator="LogisticRegression",
                      grid={"C": [1, 2, 3, 4, 5], "tol": [1, 2, 3, 4]})


def test_candidate_names_are_unique() -> None:
    with pytest.raises(ValidationError, match=r"repeated: \['logreg'\]"):
        training(LOGREG, LOGREG)


def test_resolve_estimator_by_name_or_dotted_path() -> None:
    assert resolve_estimator("LogisticRegression") is LogisticRegression
    assert resolve_estimator("sklearn.linear_model.LogisticRegression") is LogisticRegression
    assert resolve_estimator("tests.fixtures.models.FailingClassifier") is FailingClassifier


@pytest.mark.parametrize(("path", "message"), [
    ("LogisticRegresion", "candidate 'c1': estimator 'LogisticRegresion' is not a "
                          "scikit-learn estimator name; use a class name like"),
    ("no_such_package.Model", "candidate 'c1': cannot import 'no_such_package.Model' "
                              "(No module named 'no_such_package')"),
    ("sklearn.linear_model.Nope", "candidate 'c1': cannot import 'sklearn.linear_model.Nope'"),
    ("json.dumps", "candidate 'c1': 'json.dumps' is not an estimator class"),
])
def test_resolve_estimator_errors_name_the_candidate(path: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        resolve_estimator(path, "c1")
    assert str(caught.value).startswith(message)


def test_an_unknown_estimator_is_refused_when_the_config_loads() -> None:
    with pytest.raises(ValidationError, match="candidate 'x': estimator 'NoSuchClassifier'"):
        training({"name": "x", "estimator": "NoSuchClassifier"})


# -- model ids -------------------------------------------------------------------------


def test_model_ids_are_derived_from_the_candidate_and_the_feature_set() -> None:
    candidate = Candidate(name="m", estimator="LogisticRegression", params={"C": 1.0, "tol": 1})
    same = Candidate(name="m", estimator="LogisticRegression", params={"tol": 1, "C": 1.0})
    other_params = Candidate(name="m", estimator="LogisticRegression", params={"C": 2.0, "tol": 1})

    model_id = model_id_for(candidate, "fs1")
    assert len(model_id) == 16 and int(model_id, 16) >= 0
    assert model_id == model_id_for(same, "fs1")  # parameter order does not matter
    assert model_id != model_id_for(other_params, "fs1")
    assert model_id != model_id_for(candidate, "fs2")
    assert model_id != model_id_for(candidate.model_copy(update={"name": "n"}), "fs1")


def test_trained_models_carry_their_id_and_metadata(data: tuple[pd.DataFrame, pd.Series]) -> None:
    result = train(data, LOGREG)

    [trained] = result.trained
    [candidate] = expand(training(LOGREG))
    assert trained.model_id == model_id_for(candidate, "fs1")
    meta = trained.metadata
    assert meta["model_id"] == trained.model_id and meta["name"] == "logreg"
    assert meta["algorithm"] == "sklearn.linear_model._logistic.LogisticRegression"
    assert (meta["feature_set_id"], meta["batch_ids"]) == ("fs1", ["b1"])
    assert meta["features"] == ["a", "b", "c"] and meta["training_rows"] == 200
    assert sum(meta["class_balance"].values()) == pytest.approx(1.0)
    assert meta["params"]["max_iter"] == 200 and meta["status"] == "candidate"
    assert trained.model.predict(data[0]).shape == (200,)


# -- training in worker processes ------------------------------------------------------


def test_a_failing_candidate_does_not_sink_the_others(
    data: tuple[pd.DataFrame, pd.Series]
) -> None:
    result = train(data, toy("boom", "FailingClassifier"), LOGREG)

    assert [t.name for t in result.trained] == ["logreg"]
    assert result.failures == [Failure("boom", "ValueError: toy estimator refuses to fit")]


def test_a_candidate_past_its_timeout_is_stopped(
    data: tuple[pd.DataFrame, pd.Series], tmp_path: Path
) -> None:
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)

    result = train(data, toy("stuck", "BlockingClassifier", fifo=str(fifo)), LOGREG,
                   timeout_s=1.0)

    assert result.failures == [Failure("stuck", "timed out after 1s")]
    assert [t.name for t in result.trained] == ["logreg"]


def test_a_transient_failure_is_retried_in_a_new_attempt(
    data: tuple[pd.DataFrame, pd.Series], tmp_path: Path
) -> None:
    flaky = toy("flaky", "FlakyClassifier", attempts_dir=str(tmp_path), failures=1)

    result = train(data, flaky, retries=1)

    assert result.failures == []
    assert [t.name for t in result.trained] == ["flaky"]
    assert attempts(tmp_path) == 2


def test_a_transient_failure_without_retries_left_is_reported(
    data: tuple[pd.DataFrame, pd.Series], tmp_path: Path
) -> None:
    flaky = toy("flaky", "FlakyClassifier", attempts_dir=str(tmp_path), failures=2)

    result = train(data, flaky, LOGREG, retries=1)

    assert result.failures == [Failure("flaky", "OSError: transient failure on attempt 2")]
    assert [t.name for t in result.trained] == ["logreg"]
    assert attempts(tmp_path) == 2


def test_a_candidate_error_is_not_retried(
    data: tuple[pd.DataFrame, pd.Series], tmp_path: Path
) -> None:
    failing = toy("bad", "FailingClassifier", message="bad params", attempts_dir=str(tmp_path))
    result = train(data, failing, retries=3)
    assert result.failures == [Failure("bad", "ValueError: bad params")]
    assert attempts(tmp_path) == 1  # only transient failures (OSError, a lost worker) retry


def test_training_features_must_exist(data: tuple[pd.DataFrame, pd.Series]) -> None:
    with pytest.raises(InvalidInput, match=r"training features not in the feature set: \['z'\]"):
        train(data, LOGREG, features=["a", "z"])
