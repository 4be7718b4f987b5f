"""The monitoring service on the in-process bus (its live view in the real Redis).

Each test gets its own Redis namespace and data root; ScoreServed and OutcomeObserved go
through the same Dispatcher as on RabbitMQ, and the events monitoring emits are kept by
an observer queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from common.bus.idempotency import MemoryProcessedEvents
from common.bus.memory import InMemoryBus
from common.events import (
    DriftDetected,
    Event,
    ModelDegraded,
    OutcomeObserved,
    RetrainRequested,
    ScoreServed,
    ServedScore,
)
from common.runtime import ServiceRunner
from common.settings import Settings
from monitoring.reports import Reports
from monitoring.service import ModelCatalogue, MonitoringService, MonitoringSettings
from monitoring.state import MonitoringState
from tests.fixtures.monitoring import MonitoredModels, batches, monitored_models, served
from tests.support.harness import delete_redis_keys, isolated_settings

EMITTED = ["DriftDetected", "RetrainRequested", "ModelDegraded"]
FAST = {"monitoring_drift_every": 500, "monitoring_drift_window": 1_000,
        "monitoring_drift_min_scores": 300, "monitoring_quality_min_outcomes": 50,
        "monitoring_latency_min_scores": 50}


@pytest.fixture
def settings(services_up: None) -> Iterator[Settings]:
    settings = isolated_settings()
    yield settings
    delete_redis_keys(settings)


@pytest.fixture
def world(tmp_path: Path) -> MonitoredModels:
    return monitored_models(tmp_path)


@dataclass
class Monitor:
    """The service, its state and metrics, on an in-process bus."""

    service: MonitoringService
    state: MonitoringState
    bus: InMemoryBus
    metrics: CollectorRegistry

    def run(self, *events: Event) -> list[Event]:
        """Publish events, handle them; what monitoring emitted."""
        before = len(self.bus.published)
        for event in events:
            self.bus.publish(event)
        self.bus.run_until_idle()
        assert not any(self.bus.dlq.values()), {s: [d.error for d in dl]
                                                for s, dl in self.bus.dlq.items()}
        return [e for e in self.bus.published[before:] if e.event_type in EMITTED]

    def serve(self, scores: list[ServedScore]) -> list[Event]:
        """ScoreServed events of 100 scores each."""
        return self.run(*(ScoreServed(scores=b, producer="test") for b in batches(scores)))

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.get_sample_value(name, labels)


def monitor(world: MonitoredModels, settings: Settings, **overrides: Any) -> Monitor:
    own = MonitoringSettings(**{**FAST, **overrides})
    client = redis.Redis.from_url(settings.redis_url)
    state = MonitoringState(client, settings.namespace, served_ttl_s=3_600,
                            outcome_window=own.monitoring_outcome_window)
    service = MonitoringService(ModelCatalogue(world.models, world.registry), state, own,
                                Reports(str(world.root / "data")))
    bus, metrics = InMemoryBus(), CollectorRegistry()
    bus.declare("observer", EMITTED)
    runner = ServiceRunner(service, bus, settings, processed=MemoryProcessedEvents(),
                           registry=metrics)
    bus.register(runner.dispatcher())
    return Monitor(service, state, bus, metrics)


def of_type(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def payload(event: Event) -> dict[str, Any]:
    return event.model_dump(exclude={"event_id", "occurred_at"})


def test_unshifted_traffic_raises_nothing_and_is_reported(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings, monitoring_report_every_s=0)
    assert m.serve(served(world, "v2", world.traffic(2_000, seed=3))) == []
    live = m.state.live("v2")
    assert live["served"] == 2_000 and live["drift_level"] == "none"
    assert live["model_id"] == "m-v2" and live["deployed_at"]
    assert live["latency_min_ms"] == live["latency_max_ms"] == 2.0
    reports = Reports(str(world.root / "data")).read("v2")
    assert sorted(reports["served"].unique()) == [500, 1_000, 1_500, 2_000]
    assert set(reports["input"]) == {"a", "b", "c", "__prediction__"}
    assert (reports["psi"] < 0.1).all() and (reports["level"] == "none").all()
    shares = live["drift"]["a"]
    assert sum(shares["live_shares"]) == pytest.approx(1.0)
    assert len(shares["live_shares"]) == len(shares["reference_shares"]) == 10


def test_reports_are_written_once_a_minute_and_when_the_level_changes(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings)
    m.serve(served(world, "v2", world.traffic(1_000, seed=14)))
    m.serve(served(world, "v2", world.traffic(1_000, seed=15, shift={"a": 2.0}), start=1_000))
    reports = Reports(str(world.root / "data")).read("v2")
    written = reports.drop_duplicates("served")
    assert written["served"].tolist() == [500, 1_500]
    assert written["model_level"].tolist() == ["none", "alert"]


def test_a_shifted_feature_is_detected_and_retraining_asked_once(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings)
    emitted = m.serve(served(world, "v2", world.traffic(2_000, seed=4, shift={"a": 2.0})))
    [drift] = of_type(emitted, DriftDetected)
    [retrain] = of_type(emitted, RetrainRequested)
    assert (drift.model_version, drift.level) == ("v2", "alert")
    assert drift.psi["a"] >= 0.2 and drift.psi["b"] < 0.1
    assert (retrain.model_version, retrain.dataset) == ("v2", "toy")
    assert "a (PSI" in retrain.reason
    assert m.state.live("v2")["drift_level"] == "alert"
    assert m.sample("conveyor_feature_drift_psi", model_version="v2", feature="a") >= 0.2
    assert m.sample("conveyor_drift_detected_total", model_version="v2", level="alert") == 1
    assert m.sample("conveyor_drift_detected_total", model_version="v2", level="warn") == 0
    assert m.serve(served(world, "v2", world.traffic(1_000, seed=5, shift={"a": 2.0}))) == []


def test_contradicting_outcomes_degrade_the_model_once(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings)
    scores = served(world, "v2", world.traffic(200, seed=6))
    m.serve(scores)
    agree = [OutcomeObserved(entity_id=s.entity_id, request_id=s.request_id,
                             outcome=float(s.label or 0), producer="app") for s in scores[:60]]
    assert m.run(*agree) == []
    flip = [OutcomeObserved(entity_id=s.entity_id, request_id=s.request_id,
                            outcome=1 - float(s.label or 0), producer="app") for s in scores[60:]]
    [degraded] = of_type(m.run(*flip), ModelDegraded)
    expected = world.models.metadata("m-v2").metadata["metrics"]["accuracy"]
    assert (degraded.model_version, degraded.reason) == ("v2", "accuracy")
    assert degraded.expected == pytest.approx(expected)
    assert degraded.observed < expected - 0.05
    live = m.state.live("v2")
    assert live["outcomes"] == 200 and live["quality"]["accuracy"] == pytest.approx(60 / 200)
    assert sum(live["confusion"].values()) == 200
    assert sum(n for pair, n in live["confusion"].items() if pair in ("0->0", "1->1")) == 60
    assert m.sample("conveyor_model_quality", model_version="v2", metric="accuracy") == \
        pytest.approx(0.3)
    assert m.sample("conveyor_model_degraded_total", model_version="v2", reason="accuracy") == 1


def test_an_outcome_without_request_id_judges_the_entitys_latest_score(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings)
    rows = world.traffic(10, seed=7)
    m.serve(served(world, "v1", rows, prefix="old"))
    m.serve(served(world, "v2", rows, prefix="new"))
    m.run(OutcomeObserved(entity_id="E3", outcome="1", producer="app"))
    assert m.state.live("v2")["outcomes"] == 1 and "outcomes" not in m.state.live("v1")


def test_an_outcome_of_an_unknown_request_is_counted_not_dead_lettered(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings)
    assert m.run(OutcomeObserved(entity_id="E1", request_id="nope", outcome=1.0,
                                 producer="app")) == []
    assert m.state.unmatched() == 1
    assert m.sample("conveyor_outcomes_total", result="unmatched") == 1


def test_slow_answers_degrade_by_latency(world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings, monitoring_latency_budget_ms=100.0,
                monitoring_latency_sustain_s=0.0)  # core test: sustained slowness
    rows = world.traffic(100, seed=8)
    # v1 answering for the champion v2 (slowly, as fallbacks do): v2 is too slow, not v1
    [champion] = m.serve(served(world, "v1", rows, latency_ms=900.0, fallback=True))
    assert isinstance(champion, ModelDegraded)
    assert (champion.model_version, champion.reason, champion.observed, champion.expected) == (
        "v2", "latency", 1.0, 0.5)
    [own] = of_type(m.serve(served(world, "v1", rows, latency_ms=300.0)), ModelDegraded)
    assert (own.model_version, own.reason, own.observed, own.expected) == (
        "v1", "latency", pytest.approx(0.3), pytest.approx(0.1))
    assert m.state.live("v1")["fallback_share"] == 0.5
    assert m.serve(served(world, "v1", rows, latency_ms=300.0)) == []  # once per cooldown


def test_a_redelivered_batch_re_emits_its_decisions_and_counts_once(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings, monitoring_drift_every=100, monitoring_drift_min_scores=500)
    shifted = served(world, "v2", world.traffic(500, seed=9, shift={"a": 2.0}))
    for batch in batches(shifted[:400]):
        m.service.on_score_served(ScoreServed(scores=batch, producer="test"))
    event = ScoreServed(scores=shifted[400:], producer="test")
    first = m.service.on_score_served(event)
    assert [e.event_type for e in first] == ["DriftDetected", "RetrainRequested"]
    again = m.service.on_score_served(event)
    restarted = monitor(world, settings, monitoring_drift_every=100,
                        monitoring_drift_min_scores=500)
    after_restart = restarted.service.on_score_served(event)
    assert [payload(e) for e in again] == [payload(e) for e in after_restart] == [
        payload(e) for e in first]
    assert m.state.live("v2")["served"] == 500


def test_a_restarted_service_carries_on_counting(
        world: MonitoredModels, settings: Settings) -> None:
    monitor(world, settings).serve(served(world, "v2", world.traffic(300, seed=10)))
    m = monitor(world, settings)
    m.serve(served(world, "v2", world.traffic(200, seed=11), start=300))
    assert m.state.live("v2")["served"] == 500


def test_metrics_name_the_champion_and_exist_before_any_event(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings)
    assert m.sample("conveyor_model_champion", model_version="v2") == 1
    assert m.sample("conveyor_model_champion", model_version="v1") == 0
    accuracy = world.models.metadata("m-v1").metadata["metrics"]["accuracy"]
    assert m.sample("conveyor_model_quality_expected", model_version="v1",
                    metric="accuracy") == pytest.approx(accuracy)
    assert m.sample("conveyor_model_degraded_total", model_version="v2", reason="latency") == 0
    m.serve(served(world, "v2", world.traffic(150, seed=12), latency_ms=7.0))
    assert m.sample("conveyor_model_served_total", model_version="v2") == 150
    assert m.sample("conveyor_model_serving_latency_seconds_count", model_version="v2") == 150
    assert m.sample("conveyor_model_serving_latency_seconds_bucket", model_version="v2",
                    le="0.005") == 0
    world.registry.revert("v2", reason="test")
    assert m.sample("conveyor_model_champion", model_version="v1") == 1


def test_metrics_carry_the_thresholds_the_alert_rules_compare_with(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings, monitoring_psi_alert=0.35, monitoring_quality_metric="f1",
                monitoring_quality_margin=0.08)
    assert m.sample("conveyor_monitoring_psi_alert") == 0.35
    assert m.sample("conveyor_monitoring_quality_margin", metric="f1") == 0.08
    assert m.sample("conveyor_monitoring_quality_margin", metric="accuracy") is None


def test_scores_of_an_unregistered_version_are_counted_without_drift(
        world: MonitoredModels, settings: Settings) -> None:
    m = monitor(world, settings)
    scores = [s.model_copy(update={"model_version": "v7"})
              for s in served(world, "v2", world.traffic(600, seed=13, shift={"a": 3.0}))]
    assert m.serve(scores) == []
    assert m.state.live("v7")["served"] == 600 and "drift_level" not in m.state.live("v7")
