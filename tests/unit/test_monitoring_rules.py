"""Monitoring's decision rules, pure: which findings become which events, under which
claim and cooldown (no Redis, no broker; the service only claims and emits)."""

from __future__ import annotations

from typing import Literal

import pytest

from common.events import DriftDetected, ModelDegraded, RetrainRequested
from common.reference import PREDICTION
from monitoring.core import (
    Cooldowns,
    DecisionRules,
    DriftFinding,
    LatencyFinding,
    drift_reason,
    report_due,
)
from monitoring.drift import DriftReport, InputDrift
from monitoring.quality import QualityRule

COOLDOWNS = Cooldowns(drift_s=60, retrain_s=600, degraded_s=900)
RULES = DecisionRules(COOLDOWNS, QualityRule("accuracy", margin=0.05, min_outcomes=100))
Level = Literal["none", "warn", "alert"]


def report(**psi_levels: tuple[float, Level]) -> DriftReport:
    return DriftReport({name: InputDrift(psi, 0.0, 1.0, 500, level)
                        for name, (psi, level) in psi_levels.items()})


def drift(level: Level, version: str = "v3") -> DriftFinding:
    psi = {"none": 0.01, "warn": 0.15, "alert": 0.4}[level]
    return DriftFinding(version, report(amount=(psi, level), step=(0.02, "none")), 1_000)


def test_no_drift_decides_nothing() -> None:
    assert RULES.on_finding(drift("none")) == []


def test_a_drift_warning_is_one_drift_detected_per_version_and_level() -> None:
    [decision] = RULES.on_finding(drift("warn"), dataset="paysim")
    assert (decision.claim, decision.cooldown_s, decision.event) == (
        "v3:drift:warn", 60, DriftDetected)
    assert decision.fields == {"model_version": "v3", "level": "warn",
                               "psi": {"amount": 0.15, "step": 0.02}}


def test_a_drift_alert_also_asks_to_retrain_once_whatever_the_version() -> None:
    detected, retrain = RULES.on_finding(drift("alert"), dataset="paysim")
    assert (detected.claim, detected.fields["level"]) == ("v3:drift:alert", "alert")
    assert (retrain.claim, retrain.cooldown_s, retrain.event) == (
        "retrain", 600, RetrainRequested)
    assert retrain.fields == {"reason": "drift alert on model v3: amount (PSI 0.40), "
                                        "step (PSI 0.02)",
                              "dataset": "paysim", "model_version": "v3"}


def test_the_retrain_reason_names_the_three_worst_inputs_and_the_predictions() -> None:
    levels: dict[str, tuple[float, Level]] = {
        "a": (0.3, "alert"), "b": (0.1, "warn"), "c": (0.5, "alert"), "d": (0.05, "none"),
        PREDICTION: (0.25, "alert")}
    found = report(**levels)
    assert drift_reason("v1", found) == (
        "drift alert on model v1: c (PSI 0.50), a (PSI 0.30), predictions (PSI 0.25)")


def test_a_slow_p99_degrades_the_version_in_seconds() -> None:
    [decision] = RULES.on_finding(LatencyFinding("v2", "p99_ms", 250.0, 100.0))
    assert (decision.claim, decision.cooldown_s, decision.event) == (
        "v2:degraded:latency", 900, ModelDegraded)
    assert decision.fields == {"model_version": "v2", "reason": "latency",
                               "observed": pytest.approx(0.25), "expected": pytest.approx(0.1)}


def test_a_high_fallback_share_degrades_the_champion_as_a_share() -> None:
    [decision] = RULES.on_finding(LatencyFinding("v2", "fallback_share", 0.8, 0.5))
    assert decision.fields["observed"] == 0.8 and decision.fields["expected"] == 0.5


def test_lost_quality_degrades_once_enough_outcomes_show_it() -> None:
    expected = {"accuracy": 0.97}
    assert RULES.on_quality("v1", {"accuracy": 0.80}, expected, outcomes=99) == []
    assert RULES.on_quality("v1", {"accuracy": 0.93}, expected, outcomes=500) == []
    [decision] = RULES.on_quality("v1", {"accuracy": 0.80}, expected, outcomes=100)
    assert (decision.claim, decision.cooldown_s) == ("v1:degraded:accuracy", 900)
    assert decision.fields == {"model_version": "v1", "reason": "accuracy",
                               "observed": 0.80, "expected": 0.97}


def test_quality_without_an_evaluation_figure_decides_nothing() -> None:
    assert RULES.on_quality("v1", {"accuracy": 0.1}, {}, outcomes=1_000) == []


def test_decisions_are_kept_as_long_as_the_longest_cooldown() -> None:
    assert COOLDOWNS.decisions_kept_s == 900
    assert Cooldowns(retrain_s=7_200, degraded_s=60).decisions_kept_s == 7_200


def test_a_report_is_due_first_on_a_new_level_and_after_the_interval() -> None:
    warn = drift("warn")
    assert report_due(warn, None, now=0.0, every_s=60.0)
    assert not report_due(warn, (100.0, "warn"), now=130.0, every_s=60.0)
    assert report_due(warn, (100.0, "none"), now=130.0, every_s=60.0)
    assert report_due(warn, (100.0, "warn"), now=160.0, every_s=60.0)
    assert not report_due(DriftFinding("v3", DriftReport({}), 10), None, now=0.0, every_s=0.0)
