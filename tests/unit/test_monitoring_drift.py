"""Drift against a training reference: PSI bins, KS test, levels, and the reference itself."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from common.reference import (
    input_references,
    model_reference,
    reference_rows,
    references_from,
)
from monitoring.drift import (
    PREDICTION,
    DriftThresholds,
    Reference,
    cut_points,
    drift_of,
    drift_report,
    ks,
    proportions,
    psi,
    reference_of,
)

RNG = np.random.default_rng(42)
THRESHOLDS = DriftThresholds()


def normal(mean: float = 0.0, sd: float = 1.0, n: int = 5_000, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, sd, n)


def test_continuous_reference_has_ten_bins_of_a_tenth_each() -> None:
    ref = reference_of(normal(n=20_000))
    assert len(ref.cuts) == 9 and len(ref.proportions) == 10
    np.testing.assert_allclose(ref.proportions, 0.1, atol=0.002)
    assert len(ref.sample) == 2_000 and np.all(np.diff(ref.sample) >= 0)


def test_the_same_distribution_does_not_drift() -> None:
    ref = reference_of(normal(seed=1, n=20_000))
    result = drift_of(ref, normal(seed=2), THRESHOLDS)
    assert result.psi < 0.02 and result.level == "none"
    assert result.live_count == 5_000
    assert len(result.shares) == 10 and sum(result.shares) == pytest.approx(1.0)


@pytest.mark.parametrize(("shift", "level"), [(0.35, "warn"), (1.0, "alert")])
def test_a_shifted_distribution_drifts(shift: float, level: str) -> None:
    ref = reference_of(normal(seed=1, n=20_000))
    result = drift_of(ref, normal(mean=shift, seed=2), THRESHOLDS)
    assert result.level == level, result
    assert result.ks_pvalue < 0.01


def test_psi_matches_its_formula_on_known_shares() -> None:
    ref = Reference(np.array([0.5]), np.array([0.5, 0.5]), np.array([0.0, 1.0]))
    live = np.array([0.0] * 80 + [1.0] * 20)
    expected = (0.8 - 0.5) * np.log(0.8 / 0.5) + (0.2 - 0.5) * np.log(0.2 / 0.5)
    assert psi(ref, live) == pytest.approx(expected)


def test_an_empty_bin_costs_a_finite_amount() -> None:
    ref = reference_of(np.zeros(1_000))
    value = psi(ref, np.full(500, 3.0))
    assert np.isfinite(value) and value > THRESHOLDS.psi_alert


def test_a_constant_input_shifted_either_way_drifts() -> None:
    ref = reference_of(np.full(1_000, 7.0))
    assert psi(ref, np.full(100, 7.0)) == pytest.approx(0.0)
    assert psi(ref, np.full(100, 6.0)) > THRESHOLDS.psi_alert
    assert psi(ref, np.full(100, 8.0)) > THRESHOLDS.psi_alert


def test_a_discrete_input_gets_a_bin_per_value() -> None:
    values = np.random.default_rng(0).choice([0.0, 1.0], size=10_000, p=[0.7, 0.3])
    cuts = cut_points(values)
    np.testing.assert_array_equal(cuts[1:], [0.0, 1.0])
    ref = reference_of(values)
    np.testing.assert_allclose(ref.proportions, [0.0, 0.7, 0.3, 0.0], atol=0.02)
    flipped = np.random.default_rng(1).choice([0.0, 1.0], size=2_000, p=[0.3, 0.7])
    assert drift_of(ref, flipped, THRESHOLDS).level == "alert"
    same = np.random.default_rng(2).choice([0.0, 1.0], size=2_000, p=[0.7, 0.3])
    assert drift_of(ref, same, THRESHOLDS).level == "none"


def test_values_on_a_cut_fall_in_the_lower_bin() -> None:
    np.testing.assert_array_equal(proportions(np.array([1.0, 2.0]), np.array([1.0, 2.0, 2.5])),
                                  [1 / 3, 1 / 3, 1 / 3])


def test_non_finite_live_values_are_ignored() -> None:
    ref = reference_of(normal(n=10_000))
    live = np.concatenate([normal(seed=3, n=2_000), [np.nan, np.inf]])
    assert drift_of(ref, live, THRESHOLDS).live_count == 2_000


def test_ks_is_scipys_two_sample_test_with_its_asymptotic_p_value() -> None:
    from scipy.stats import ks_2samp

    ref = reference_of(normal(n=3_000))
    live = normal(mean=0.5, seed=9, n=800)
    exact = ks_2samp(ref.sample, live, method="exact")
    statistic, pvalue = ks(ref, live)
    assert statistic == pytest.approx(exact.statistic)
    assert pvalue == pytest.approx(exact.pvalue, abs=1e-3)
    assert ks(ref, np.array([])) == (0.0, 1.0)


def test_a_large_but_tiny_ks_difference_is_no_drift() -> None:
    """Significant (p < 0.01) but small: the statistic must pass its threshold too."""
    ref = reference_of(normal(n=50_000), sample_size=50_000)
    result = drift_of(ref, normal(mean=0.05, seed=4, n=50_000), THRESHOLDS)
    assert result.ks_pvalue < 0.01 and result.level == "none"


def test_the_report_takes_the_worst_level_and_skips_unreported_inputs() -> None:
    refs = {"a": reference_of(normal(n=10_000)), "b": reference_of(normal(n=10_000, seed=5))}
    live = {"a": normal(seed=6), "b": normal(mean=2.0, seed=7), "c": normal(seed=8),
            PREDICTION: np.full(100, np.nan)}
    report = drift_report(refs, live, THRESHOLDS, min_values=50)
    assert set(report.inputs) == {"a", "b"}
    assert report.level == "alert" and report.psi["b"] > report.psi["a"]
    assert drift_report(refs, {}, THRESHOLDS).level == "none"


def test_thresholds_are_configurable() -> None:
    ref = reference_of(normal(n=20_000))
    live = normal(mean=0.35, seed=2)
    assert drift_of(ref, live, DriftThresholds(psi_warn=0.5, psi_alert=0.9, ks_warn=0.5,
                                               ks_alert=0.9)).level == "none"
    assert drift_of(ref, live, DriftThresholds(psi_warn=0.01, psi_alert=0.05)).level == "alert"


def test_a_reference_survives_json_and_bins_the_same() -> None:
    values = np.random.default_rng(3).lognormal(size=5_000)
    ref = reference_of(values)
    back = Reference.from_json(json.loads(json.dumps(ref.to_json())))
    np.testing.assert_array_equal(back.cuts, ref.cuts)
    live = np.random.default_rng(4).lognormal(mean=0.4, size=1_000)
    assert psi(back, live) == psi(ref, live) and ks(back, live) == ks(ref, live)


def test_a_model_reference_covers_inputs_predictions_and_classes() -> None:
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"a": rng.normal(size=30_000), "b": rng.integers(0, 2, 30_000),
                      "c": np.ones(30_000)})
    y = (X["a"] > 0).astype(int)
    model = LogisticRegression().fit(X, y)
    rows = reference_rows(X)
    assert len(rows) == 20_000 and reference_rows(X).index.equals(rows.index)  # seeded
    stored = model_reference(model, rows, input_references(rows))
    refs = references_from(json.loads(json.dumps({"reference": stored})))
    assert set(refs) == {"a", "b", "c", PREDICTION} and stored["classes"] == ["0", "1"]
    live = model.predict_proba(X.iloc[:5_000])[:, 1]
    assert drift_of(refs[PREDICTION], live, THRESHOLDS).level == "none"
    assert references_from({}) == {}
