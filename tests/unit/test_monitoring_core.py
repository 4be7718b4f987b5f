"""The pure monitoring core: per-version figures, drift every N scores, latency breaches."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from common.events import ServedScore
from common.reference import classes_from, references_from
from monitoring.core import (
    LATENCY_BUCKETS_MS,
    CoreConfig,
    Counters,
    DriftFinding,
    LatencyFinding,
    ModelInfo,
    MonitoringCore,
    Ring,
    summary,
)
from tests.fixtures.monitoring import MonitoredModels, monitored_models, served

CONFIG = CoreConfig(drift_every=500, drift_window=1_000, drift_min_scores=300,
                    latency_min_scores=50, latency_budget_ms=100.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> MonitoredModels:
    return monitored_models(Path(tmp_path_factory.mktemp("monitored")))


def info_of(world: MonitoredModels):  # type: ignore[no-untyped-def]
    def describe(version: str) -> ModelInfo:
        metadata = world.models.metadata(f"m-{version}").metadata
        return ModelInfo(version, f"m-{version}", None, references_from(metadata),
                         metadata["metrics"], classes_from(metadata), "toy")
    return describe


def test_counters_keep_min_avg_max_and_a_histogram() -> None:
    counters = Counters()
    counters.add(np.array([0.5, 3.0, 40.0, 9_000.0]), fallbacks=1)
    counters.add(np.array([2.0]), fallbacks=0)
    assert (counters.served, counters.fallbacks) == (5, 1)
    assert (counters.latency_min_ms, counters.latency_max_ms) == (0.5, 9_000.0)
    assert counters.latency_avg_ms == pytest.approx(9_045.5 / 5)
    assert sum(counters.histogram) == 5 and len(counters.histogram) == len(LATENCY_BUCKETS_MS) + 1
    assert counters.histogram[0] == 1 and counters.histogram[1] == 1  # <= 1 ms, <= 2 ms
    assert counters.histogram[-1] == 1  # past the last bound


def test_the_ring_keeps_the_latest_rows() -> None:
    ring = Ring(3, 1)
    ring.extend(np.array([[1.0], [2.0]]))
    ring.extend(np.array([[3.0], [4.0]]))
    assert len(ring) == 3 and sorted(ring.values()[:, 0]) == [2.0, 3.0, 4.0]
    ring.extend(np.arange(10.0)[:, None])
    assert sorted(ring.values()[:, 0]) == [7.0, 8.0, 9.0]


def test_drift_is_measured_every_n_scores_of_a_version(world: MonitoredModels) -> None:
    core = MonitoringCore(CONFIG, info_of(world))
    scores = served(world, "v2", world.traffic(1_200, seed=3))
    findings = [f for i in range(0, 1_200, 100) for f in core.observe(scores[i:i + 100])]
    drift = [f for f in findings if isinstance(f, DriftFinding)]
    assert [f.served for f in drift] == [500, 1_000]
    assert all(f.report.level == "none" for f in drift)
    assert set(drift[-1].report.inputs) == {"a", "b", "c", "__prediction__"}
    assert core.stats("v2").served == 1_200


def test_a_shifted_input_is_an_alert_naming_it(world: MonitoredModels) -> None:
    core = MonitoringCore(CONFIG, info_of(world))
    [finding] = core.observe(served(world, "v2", world.traffic(500, seed=4, shift={"c": 5.0})))
    assert isinstance(finding, DriftFinding) and finding.report.level == "alert"
    assert finding.report.inputs["c"].level == "alert"
    assert finding.report.inputs["a"].level == "none"


def test_scores_without_features_measure_only_the_predictions(world: MonitoredModels) -> None:
    core = MonitoringCore(CONFIG, info_of(world))
    bare = [s.model_copy(update={"features": {}})
            for s in served(world, "v2", world.traffic(500, seed=5))]
    [finding] = core.observe(bare)
    assert isinstance(finding, DriftFinding)
    assert set(finding.report.inputs) == {"__prediction__"}


def test_versions_are_kept_apart_and_one_without_reference_has_no_drift(
        world: MonitoredModels) -> None:
    core = MonitoringCore(CONFIG, lambda v: ModelInfo(v) if v == "v9" else info_of(world)(v))
    scores = served(world, "v1", world.traffic(600, seed=6))
    strangers = [s.model_copy(update={"model_version": "v9"}) for s in scores]
    findings = core.observe(scores + strangers)
    assert [type(f) for f in findings] == [DriftFinding]
    assert core.stats("v1").served == core.stats("v9").served == 600
    assert sorted(core.versions()) == ["v1", "v9"]


def test_a_p99_over_budget_is_a_latency_finding_fallbacks_aside(world: MonitoredModels) -> None:
    core = MonitoringCore(CONFIG, info_of(world))
    rows = world.traffic(60, seed=7)
    assert core.observe(served(world, "v1", rows, latency_ms=400.0, fallback=True)) == []
    [finding] = core.observe(served(world, "v1", rows, latency_ms=250.0))
    assert finding == LatencyFinding("v1", "p99_ms", pytest.approx(250.0), 100.0)
    figures = summary(core.stats("v1"))
    assert figures["fallback_share"] == 0.5 and figures["latency_max_ms"] == 400.0
    assert figures["latency_p50_ms"] == pytest.approx(250.0)


def at(scores: list[ServedScore], second: float) -> list[ServedScore]:
    """The scores as served ``second`` seconds after a fixed start."""
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=second)
    return [score.model_copy(update={"served_at": when}) for score in scores]


def test_slowness_is_a_finding_only_once_it_has_lasted(world: MonitoredModels) -> None:
    core = MonitoringCore(replace(CONFIG, latency_sustain_s=60.0, latency_window=100),
                          info_of(world))
    rows = world.traffic(60, seed=7)
    slow, fast = served(world, "v1", rows, latency_ms=250.0), served(world, "v1", rows)
    assert core.observe(at(slow, 0)) == []  # over budget since 0 s
    assert core.observe(at(slow, 59)) == []
    assert core.observe(at(fast * 2, 60)) == []  # the window all fast again: the clock resets
    assert core.observe(at(slow * 2, 70)) == []
    assert core.observe(at(slow, 129)) == []
    [finding] = core.observe(at(slow, 130))  # over budget from 70 s to 130 s
    assert finding == LatencyFinding("v1", "p99_ms", pytest.approx(250.0), 100.0)


def test_totals_are_restored_at_first_sight(world: MonitoredModels) -> None:
    before = Counters(served=1_000, fallbacks=10, latency_sum_ms=2_000.0, latency_min_ms=1.0,
                      latency_max_ms=9.0)
    core = MonitoringCore(CONFIG, info_of(world), restore=lambda v: before)
    core.observe([ServedScore(request_id="r", entity_id="e", model_version="v2", score=0.5,
                              latency_ms=3.0)])
    stats = core.stats("v2")
    assert (stats.served, stats.counters.fallbacks) == (1_001, 10)
    assert stats.counters.latency_avg_ms == pytest.approx(2_003.0 / 1_001)
    assert math.isnan(summary(MonitoringCore(CONFIG, ModelInfo).stats("v5"))["latency_p99_ms"])


def test_a_model_of_one_input_and_partial_features_are_read_in_order() -> None:
    from monitoring.drift import reference_of

    rng = np.random.default_rng(0)
    one = ModelInfo("v1", references={"a": reference_of(rng.normal(size=1_000))})
    core = MonitoringCore(CONFIG, lambda v: one)
    core.observe([ServedScore(request_id="r", entity_id="e", model_version="v1", score=0.25,
                              latency_ms=1.0, features={"a": 3.0, "zz": 9.0})])
    np.testing.assert_array_equal(core.stats("v1").window.values(), [[3.0, 0.25]])
    two = ModelInfo("v2", references={n: reference_of(rng.normal(size=100)) for n in "ab"})
    core = MonitoringCore(CONFIG, lambda v: two)
    core.observe([ServedScore(request_id="r", entity_id="e", model_version="v2", score=0.5,
                              latency_ms=1.0, features={"b": 2.0})])
    np.testing.assert_array_equal(core.stats("v2").window.values(), [[np.nan, 2.0, 0.5]])


def test_a_champion_whose_requests_go_to_fallbacks_is_too_slow(world: MonitoredModels) -> None:
    core = MonitoringCore(CONFIG, info_of(world))
    rows = world.traffic(30, seed=8)
    own = served(world, "v2", rows, latency_ms=5.0)
    assert core.observe(own, champion="v2") == []
    fallbacks = served(world, "v1", world.traffic(40, seed=9), latency_ms=130.0, fallback=True)
    [finding] = core.observe(fallbacks, champion="v2")
    assert finding == LatencyFinding("v2", "fallback_share", pytest.approx(40 / 70), 0.5)
    assert core.stats("v2").served == 30  # the fallbacks were answered by v1
    canary = served(world, "v1", rows)  # another version's answers that were not fallbacks
    core.observe(canary, champion="v2")
    assert len(core.stats("v2").missed) == 70
