"""The evaluators library, curves, candidate ranking, the gate and the candidates report."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn import metrics as skm
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression, RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import evaluation.report
from common.errors import InvalidInput
from evaluation import (
    EvaluationConfig,
    Evaluator,
    best_candidate,
    curves,
    evaluate,
    evaluate_candidates,
    gate,
    measure_latency,
    rank_candidates,
    register,
)
from evaluation import metrics as metrics_module
from evaluation.metrics import get_evaluator, higher_is_better, thin
from segregation import split

CLASSIFICATION = [
    "accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc",
    "average_precision", "cohen_kappa", "log_loss", "brier",
]


def logistic():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def parts_of(frame):
    with warnings.catch_warnings():
        # Small test parts on purpose; split warnings are not what these tests are about.
        warnings.simplefilter("ignore")
        return split(frame, "random", ratio=0.7, seed=0, label="target")


class Counting:
    """Wraps a fitted model and counts the calls evaluation makes to it."""

    def __init__(self, model):
        self.model, self.classes_ = model, model.classes_
        self.calls = {"predict": 0, "predict_proba": 0}
        self.rows: list[int] = []

    def predict(self, X):
        self.calls["predict"] += 1
        return self.model.predict(X)

    def predict_proba(self, X):
        self.calls["predict_proba"] += 1
        self.rows.append(len(X))
        return self.model.predict_proba(X)


@pytest.fixture(scope="module")
def cancer():
    parts = parts_of(load_breast_cancer(as_frame=True).frame)
    model = logistic().fit(parts.X_train, parts.y_train)
    return model, parts.X_test, parts.y_test


@pytest.fixture(scope="module")
def wine():
    parts = parts_of(load_wine(as_frame=True).frame)
    return logistic().fit(parts.X_train, parts.y_train), parts.X_test, parts.y_test


@pytest.fixture(scope="module")
def diabetes():
    parts = parts_of(load_diabetes(as_frame=True).frame)
    return LinearRegression().fit(parts.X_train, parts.y_train), parts.X_test, parts.y_test


# --- metrics against scikit-learn -------------------------------------------------------


def binary_expected(name, y, predicted, positive):
    return {
        "accuracy": lambda: skm.accuracy_score(y, predicted),
        "balanced_accuracy": lambda: skm.balanced_accuracy_score(y, predicted),
        "precision": lambda: skm.precision_score(y, predicted),
        "recall": lambda: skm.recall_score(y, predicted),
        "f1": lambda: skm.f1_score(y, predicted),
        "roc_auc": lambda: skm.roc_auc_score(y, positive),
        "average_precision": lambda: skm.average_precision_score(y, positive),
        "cohen_kappa": lambda: skm.cohen_kappa_score(y, predicted),
        "log_loss": lambda: skm.log_loss(y, np.column_stack([1 - positive, positive])),
        "brier": lambda: skm.brier_score_loss(y, positive),
    }[name]()


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_binary_metrics_match_scikit_learn(cancer, name):
    model, X, y = cancer
    positive = model.predict_proba(X)[:, 1]
    expected = binary_expected(name, y, model.predict(X), positive)
    assert evaluate(model, X, y, [name]) == {name: pytest.approx(expected, rel=1e-12)}


def test_binary_metrics_are_not_trivially_perfect(cancer):
    scores = evaluate(*cancer, ["accuracy", "log_loss"])
    assert 0.9 < scores["accuracy"] < 1.0 and scores["log_loss"] > 0.01


def test_the_positive_class_of_string_labels_is_the_greater_one(cancer):
    model, X, y = cancer
    names = np.array(["benign", "malignant"])  # 0 is malignant in the data set; swap on purpose
    text_model = logistic().fit(X, names[1 - y])
    predicted, y_text = text_model.predict(X), names[1 - y]
    scores = evaluate(text_model, X, y_text, ["precision", "roc_auc"])
    assert scores["precision"] == pytest.approx(
        skm.precision_score(y_text, predicted, pos_label="malignant")
    )
    proba = text_model.predict_proba(X)[:, 1]
    assert scores["roc_auc"] == pytest.approx(skm.roc_auc_score(y_text == "malignant", proba))


def test_evaluate_predicts_and_computes_probabilities_once(cancer):
    model, X, y = cancer
    counting = Counting(model)
    scores = evaluate(counting, X, y, CLASSIFICATION)
    assert list(scores) == CLASSIFICATION
    assert all(type(value) is float for value in scores.values())
    assert counting.calls == {"predict": 1, "predict_proba": 1}


def test_label_metrics_do_not_ask_for_probabilities(cancer):
    counting = Counting(cancer[0])
    evaluate(counting, cancer[1], cancer[2], ["accuracy", "f1"])
    assert counting.calls == {"predict": 1, "predict_proba": 0}


def test_multiclass_metrics_match_scikit_learn(wine):
    model, X, y = wine
    predicted, proba = model.predict(X), model.predict_proba(X)
    scores = evaluate(model, X, y, ["accuracy", "f1", "roc_auc", "average_precision"])
    assert scores == {
        "accuracy": pytest.approx(skm.accuracy_score(y, predicted)),
        "f1": pytest.approx(skm.f1_score(y, predicted, average="macro")),
        "roc_auc": pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr")),
        "average_precision": pytest.approx(
            np.mean([skm.average_precision_score(y == k, proba[:, k]) for k in range(3)])
        ),
    }


def test_multiclass_probability_losses(wine):
    model, X, y = wine
    proba, one_hot = model.predict_proba(X), np.eye(3)[np.asarray(y)]
    scores = evaluate(model, X, y, ["log_loss", "brier"])
    assert scores["log_loss"] == pytest.approx(skm.log_loss(y, proba))
    assert scores["brier"] == pytest.approx(0.5 * ((proba - one_hot) ** 2).sum(axis=1).mean())


def test_regression_metrics_match_scikit_learn(diabetes):
    model, X, y = diabetes
    predicted = model.predict(X)
    assert evaluate(model, X, y, ["rmse", "mae", "r2"]) == {
        "rmse": pytest.approx(math.sqrt(skm.mean_squared_error(y, predicted))),
        "mae": pytest.approx(skm.mean_absolute_error(y, predicted)),
        "r2": pytest.approx(skm.r2_score(y, predicted)),
    }


@pytest.mark.parametrize("name", ["log_loss", "brier", "rmse", "mae"])
def test_losses_are_lower_is_better(name):
    assert higher_is_better(name) is False


@pytest.mark.parametrize("name", ["accuracy", "roc_auc", "average_precision", "f1", "r2"])
def test_scores_are_higher_is_better(name):
    assert higher_is_better(name) is True


def test_an_unknown_metric_lists_the_known_names(cancer):
    with pytest.raises(InvalidInput, match=r"unknown metric 'auc' \(known: accuracy, average_prec"):
        evaluate(*cancer, ["accuracy", "auc"])


def test_a_regression_metric_on_a_classifier_is_refused(cancer):
    with pytest.raises(InvalidInput, match="metric rmse is for regression, not a classifier"):
        evaluate(*cancer, ["rmse"])


def test_a_probability_metric_needs_predict_proba(cancer):
    _, X, y = cancer
    ridge = RidgeClassifier().fit(X, y)
    assert evaluate(ridge, X, y, ["accuracy"])["accuracy"] > 0.5
    with pytest.raises(InvalidInput, match="metric roc_auc needs predict_proba"):
        evaluate(ridge, X, y, ["roc_auc"])


def test_roc_auc_with_one_class_in_y_is_nan(cancer):
    model, X, y = cancer
    ones = y[y == 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(evaluate(model, X.loc[ones.index], ones, ["roc_auc"])["roc_auc"])


def test_data_scikit_learn_refuses_is_reported_naming_the_metric(cancer):
    model, X, y = cancer
    with pytest.raises(InvalidInput, match="metric log_loss cannot be computed here"):
        evaluate(model, X, y + 5, ["log_loss"])


def test_a_registered_evaluator_is_usable_by_name(cancer, monkeypatch):
    monkeypatch.setattr(metrics_module, "EVALUATORS", dict(metrics_module.EVALUATORS))
    errors = Evaluator(
        "errors", lambda y, p, classes: float((y != p).sum()), "classification", "predictions",
        higher_is_better=False,
    )
    register(errors)
    model, X, y = cancer
    assert evaluate(model, X, y, ["errors"]) == {"errors": float((model.predict(X) != y).sum())}
    assert best_candidate({"a": {"errors": 3.0}, "b": {"errors": 1.0}}, "errors") == "b"


# --- curves -----------------------------------------------------------------------------


def test_curves_match_scikit_learn_when_short_enough(cancer):
    model, X, y = cancer
    positive = model.predict_proba(X)[:, 1]
    fpr, tpr, _ = skm.roc_curve(y, positive)
    precision, recall, thresholds = skm.precision_recall_curve(y, positive)
    points = curves(model, X, y, max_points=1000)
    assert points["roc"]["fpr"] == fpr.tolist() and points["roc"]["tpr"] == tpr.tolist()
    assert points["pr"]["precision"] == precision.tolist()
    assert points["pr"]["thresholds"] == thresholds.tolist()


def test_curves_are_thinned_keeping_both_ends(cancer):
    points = curves(*cancer, max_points=20)
    roc, pr = points["roc"], points["pr"]
    assert 2 < len(pr["precision"]) <= 20 and len(pr["recall"]) == len(pr["precision"])
    assert len(pr["thresholds"]) == len(pr["precision"]) - 1
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
    assert (pr["recall"][0], pr["recall"][-1], pr["precision"][-1]) == (1, 0, 1)


def test_curves_are_valid_json(cancer):
    points = curves(*cancer)
    assert json.loads(json.dumps(points, allow_nan=False)) == points
    assert points["roc"]["thresholds"][0] > 1  # scikit-learn's infinite first threshold


def test_curves_need_a_binary_classifier(wine, diabetes):
    for model, X, y in (wine, diabetes):
        with pytest.raises(InvalidInput, match="curves need a binary classifier"):
            curves(model, X, y)


def test_thinning_keeps_at_most_the_maximum_with_first_and_last():
    kept = thin(1000, 200)
    assert len(kept) <= 200 and kept[0] == 0 and kept[-1] == 999
    assert thin(5, 200).tolist() == [0, 1, 2, 3, 4]


# --- ranking ----------------------------------------------------------------------------


def test_best_candidate_takes_the_highest_score():
    scores = {"a": {"roc_auc": 0.7}, "b": {"roc_auc": 0.9}, "c": {"roc_auc": 0.8}}
    assert best_candidate(scores, "roc_auc") == "b"
    assert rank_candidates(scores, "roc_auc") == ["b", "c", "a"]


@pytest.mark.parametrize("metric", ["log_loss", "rmse", "brier", "mae"])
def test_best_candidate_takes_the_lowest_loss(metric):
    scores = {"a": {metric: 0.7}, "b": {metric: 0.9}, "c": {metric: 0.8}}
    assert best_candidate(scores, metric) == "a"


def test_ties_go_to_the_lowest_id_whatever_the_order():
    scores = {"m2": {"f1": 0.8}, "m1": {"f1": 0.8}, "m0": {"f1": 0.5}}
    assert best_candidate(scores, "f1") == "m1"
    assert rank_candidates(scores, "f1") == ["m1", "m2", "m0"]


def test_nan_scores_rank_last():
    scores = {"a": {"roc_auc": float("nan")}, "b": {"roc_auc": 0.6}}
    assert rank_candidates(scores, "roc_auc") == ["b", "a"]
    with pytest.raises(InvalidInput, match="no candidate has a roc_auc score"):
        best_candidate({"a": {"roc_auc": float("nan")}}, "roc_auc")


def test_a_candidate_without_the_metric_is_named():
    with pytest.raises(InvalidInput, match="m2 has no roc_auc score"):
        best_candidate({"m1": {"roc_auc": 0.6}, "m2": {"f1": 0.6}}, "roc_auc")


# --- the gate ---------------------------------------------------------------------------

FAST = {"single_p50_ms": 0.5, "single_p99_ms": 1.0, "batch_row_ms": 0.01}


def decide(value, champion=None, latency=FAST, metric="average_precision", **config):
    champion_metrics = None if champion is None else {metric: champion}
    config = EvaluationConfig(metric=metric, **config)
    return gate({metric: value}, champion_metrics, latency, config)


def test_a_good_candidate_is_accepted_without_reasons():
    decision = decide(0.9, champion=0.85, minimum=0.5, latency_budget_single_ms=5.0)
    assert decision.accepted and decision.reasons == []


def test_a_candidate_below_the_minimum_is_rejected():
    decision = decide(0.41, minimum=0.5)
    assert not decision.accepted
    assert decision.reasons == ["average_precision 0.41 below the minimum 0.5"]


def test_a_loss_above_the_maximum_is_rejected():
    assert decide(60.25, metric="rmse", maximum=55).reasons == ["rmse 60.25 above the maximum 55"]
    assert decide(50.0, metric="rmse", maximum=55).accepted


def test_a_regression_from_the_champion_beyond_the_allowance_is_rejected():
    decision = decide(0.80, champion=0.85, max_regression=0.02)
    assert decision.reasons == [
        "average_precision 0.8 regresses 0.05 from the champion's 0.85 (allowed 0.02)"
    ]


def test_a_regression_within_the_allowance_is_accepted_despite_float_rounding():
    assert decide(0.83, champion=0.85, max_regression=0.02).accepted
    assert not decide(0.8299, champion=0.85, max_regression=0.02).accepted


def test_the_default_allows_no_regression_at_all():
    assert not decide(0.849, champion=0.85).accepted
    assert decide(0.85, champion=0.85).accepted


def test_a_higher_loss_than_the_champion_is_a_regression():
    decision = decide(52.0, champion=50.0, metric="rmse", max_regression=1.0)
    assert decision.reasons == ["rmse 52 regresses 2 from the champion's 50 (allowed 1)"]
    assert decide(48.0, champion=50.0, metric="rmse").accepted


def test_single_row_latency_over_the_budget_is_rejected():
    latency = {"single_p50_ms": 3.0, "single_p99_ms": 7.1, "batch_row_ms": 0.01}
    decision = decide(0.9, latency=latency, latency_budget_single_ms=5.0)
    assert decision.reasons == ["single-row latency p99 7.1 ms over the budget 5 ms"]


def test_batch_latency_over_the_budget_is_rejected():
    latency = {"single_p50_ms": 0.5, "single_p99_ms": 1.0, "batch_row_ms": 0.3}
    decision = decide(0.9, latency=latency, latency_budget_batch_row_ms=0.2)
    assert decision.reasons == ["batch latency 0.3 ms per row over the budget 0.2 ms"]


def test_every_failed_check_is_a_reason():
    latency = {"single_p50_ms": 3.0, "single_p99_ms": 7.1, "batch_row_ms": 0.3}
    decision = decide(
        0.41, champion=0.85, latency=latency, minimum=0.5,
        latency_budget_single_ms=5.0, latency_budget_batch_row_ms=0.2,
    )
    assert len(decision.reasons) == 4


def test_a_nan_metric_is_rejected():
    assert decide(float("nan"), champion=0.8).reasons == ["average_precision is not a number"]


def test_without_budgets_latency_is_not_needed():
    assert decide(0.9, latency=None).accepted


def test_budgets_without_a_measured_latency_are_an_error():
    with pytest.raises(InvalidInput, match="no latency was measured"):
        decide(0.9, latency=None, latency_budget_single_ms=5.0)


def test_a_champion_without_the_metric_is_an_error():
    config = EvaluationConfig()
    with pytest.raises(InvalidInput, match="the champion has no average_precision score"):
        gate({"average_precision": 0.9}, {"f1": 0.9}, FAST, config)


def test_a_misspelt_config_key_is_named():
    with pytest.raises(ValidationError, match="minimun\n  Extra inputs are not permitted"):
        EvaluationConfig.model_validate({"minimun": 0.5})


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"metric": "auc"}, "metric\n  Value error, unknown metric 'auc'"),
        ({"report_metrics": ["f1", "auc"]}, "report_metrics\n  Value error, unknown metric"),
        ({"max_regression": -0.1}, "max_regression\n  Input should be greater than or equal"),
        ({"batch_size": 0}, "batch_size\n  Input should be greater than or equal to 1"),
    ],
)
def test_a_bad_config_value_is_named(data, problem):
    with pytest.raises(ValidationError, match=problem):
        EvaluationConfig.model_validate(data)


# --- latency ----------------------------------------------------------------------------


def test_latency_is_positive_and_times_the_probability_call(cancer):
    model, X, _ = cancer
    counting = Counting(model)
    latency = measure_latency(counting, X, batch_size=64, repeats=5)
    assert set(latency) == {"single_p50_ms", "single_p99_ms", "batch_row_ms"}
    assert all(value > 0 for value in latency.values())
    assert latency["single_p99_ms"] >= latency["single_p50_ms"]
    assert counting.rows == [64] + [1] * 5 + [64] * 5


def test_batch_calls_are_timed_apart_from_single_row_calls(cancer):
    model, X, _ = cancer
    counting = Counting(model)
    measure_latency(counting, X, batch_size=64, repeats=6, batch_repeats=2)
    assert counting.rows == [64] + [1] * 6 + [64] * 2
    assert EvaluationConfig().batch_repeats == 20  # a median: fewer than the p99's 100
    assert EvaluationConfig(latency_repeats=5).batch_repeats == 5
    assert EvaluationConfig(latency_batch_repeats=50).batch_repeats == 50


def test_latency_takes_arrays_and_batches_larger_than_the_data(diabetes):
    _, X, y = diabetes
    model = LinearRegression().fit(X.to_numpy(), y)
    latency = measure_latency(model, X.to_numpy()[:10], batch_size=256, repeats=3)
    assert all(value > 0 for value in latency.values())


def test_a_zero_budget_rejects_with_the_measured_latency(cancer):
    model, X, y = cancer
    config = EvaluationConfig(latency_budget_single_ms=0, latency_repeats=3)
    report = evaluate_candidates({"lr": model}, None, X, y, config)
    assert not report.accepted
    assert report.decision.reasons[0].startswith("single-row latency p99 ")
    assert report.decision.reasons[0].endswith(" ms over the budget 0 ms")


# --- evaluate_candidates ----------------------------------------------------------------


def quick(**config):
    return EvaluationConfig(latency_repeats=2, batch_size=16, **config)


@pytest.fixture(scope="module")
def prior(cancer):
    _, X, y = cancer
    return DummyClassifier(strategy="prior").fit(X, y)


def test_the_best_candidate_is_chosen_with_its_curves(cancer, prior):
    model, X, y = cancer
    report = evaluate_candidates({"prior": prior, "lr": model}, None, X, y, quick(minimum=0.5))
    assert report.accepted and report.chosen_id == "lr" and report.ranking == ["lr", "prior"]
    assert report.candidates["lr"] == evaluate(model, X, y, list(report.candidates["lr"]))
    assert list(report.candidates["lr"])[0] == "average_precision"
    assert set(report.candidates["prior"]) == set(CLASSIFICATION)
    assert report.curves == curves(model, X, y)
    assert list(report.decisions) == ["lr"] and report.champion_metrics is None


def test_a_better_champion_rejects_every_candidate(cancer, prior):
    model, X, y = cancer
    report = evaluate_candidates({"prior": prior}, model, X, y, quick())
    assert not report.accepted and report.chosen_id == "prior"
    assert report.champion_metrics == evaluate(model, X, y, list(report.champion_metrics))
    assert report.reasons() == [
        f"prior: average_precision {prior_ap(prior, X, y):.4g} regresses "
        f"{report.champion_metrics['average_precision'] - prior_ap(prior, X, y):.4g} from the "
        f"champion's {report.champion_metrics['average_precision']:.4g} (allowed 0)"
    ]


def prior_ap(prior, X, y):
    return evaluate(prior, X, y, ["average_precision"])["average_precision"]


def test_the_first_candidate_within_budget_is_chosen(cancer, prior, monkeypatch):
    model, X, y = cancer
    slow = {"single_p50_ms": 9.0, "single_p99_ms": 9.0, "batch_row_ms": 0.1}
    monkeypatch.setattr(
        evaluation.report, "measure_latency",
        lambda m, *args: slow if m is model else FAST,
    )
    config = quick(latency_budget_single_ms=5.0)
    report = evaluate_candidates({"lr": model, "prior": prior}, None, X, y, config)
    assert report.chosen_id == "prior" and report.accepted
    assert report.reasons() == ["lr: single-row latency p99 9 ms over the budget 5 ms"]
    assert report.latency == {"lr": slow, "prior": FAST}


def test_regression_candidates_are_ranked_by_a_loss(diabetes):
    model, X, y = diabetes
    mean_only = DummyRegressorLike(float(np.mean(y)))
    config = quick(metric="rmse")
    report = evaluate_candidates({"mean": mean_only, "linear": model}, None, X, y, config)
    assert report.chosen_id == "linear" and report.curves is None
    assert set(report.candidates["linear"]) == {"rmse", "mae", "r2"}


class DummyRegressorLike:
    def __init__(self, value):
        self.value = value

    def predict(self, X):
        return np.full(len(X), self.value)


def test_report_metrics_restrict_what_is_computed(cancer):
    config = quick(metric="roc_auc", report_metrics=["f1", "roc_auc"])
    report = evaluate_candidates({"lr": cancer[0]}, None, cancer[1], cancer[2], config)
    assert list(report.candidates["lr"]) == ["roc_auc", "f1"]


def test_the_report_is_json_ready(cancer, prior):
    model, X, y = cancer
    report = evaluate_candidates({"lr": model}, prior, X, y, quick())
    assert json.loads(report.model_dump_json())["chosen_id"] == "lr"


def test_no_candidates_is_an_error(cancer):
    with pytest.raises(InvalidInput, match="no candidates"):
        evaluate_candidates({}, None, cancer[1], cancer[2], quick())


def test_get_evaluator_describes_each_metric():
    assert get_evaluator("log_loss").needs == "probabilities"
    assert get_evaluator("f1").needs == "predictions"
    assert get_evaluator("r2").task == "regression"
