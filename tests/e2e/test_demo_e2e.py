"""``conveyor demo`` end to end, its monitoring steps included, on the real services.

Runs the whole demo (``run_demo``, what ``make demo`` runs) in a namespace and data root of
its own, with a small data set and the fast candidates: it starts the seven services as
local processes on the real RabbitMQ and Redis, runs the pipeline twice (a fresh
registry), then normal traffic with outcomes, drifted traffic (monitoring emits
DriftDetected and RetrainRequested, training and evaluation run again) and a champion
slowed by the fault-injection setting (monitoring emits ModelDegraded, the scoring
service demotes it, the registry reverts). The test checks the story the demo tells
against the registry, the event log and the queues, not its timings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.demo import run_demo
from app.local import PIPELINE_SERVICES, free_port
from common.bus.rabbitmq import RabbitMQBus
from common.eventlog import EventLog
from common.events import Event
from common.settings import Settings
from common.stores import ModelRegistry
from tests.fixtures.pipeline import paysim_config, write_config
from tests.support.harness import delete_namespace, isolated_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def demo_settings(tmp_path: Path, services_up: None,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The environment the demo and the services it starts read: this test's namespace,
    data root, pipeline (fast candidates; any challenger within the latency budget is
    accepted, so the second run always gives a previous version) and a free gRPC port."""
    config = paysim_config(evaluation={"max_regression": 1.0})
    settings = isolated_settings(data_root=str(tmp_path / "data"), pipeline_config=str(
        write_config(tmp_path / "pipeline.yaml", config)))
    env = {"CONVEYOR_NAMESPACE": settings.namespace, "CONVEYOR_DATA_ROOT": settings.data_root,
           "CONVEYOR_PIPELINE_CONFIG": settings.pipeline_config,
           "CONVEYOR_GRPC_PORT": str(free_port()),
           # The slowed champion answers in ~150 ms; a budget of 125 ms keeps a busy
           # machine's slowest normal answers from degrading it before the slow step.
           "CONVEYOR_MONITORING_LATENCY_BUDGET_MS": "125"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # the demo writes var/demo/ here
    yield Settings()
    delete_namespace(settings, PIPELINE_SERVICES)


@pytest.mark.timeout(600)
def test_the_demo_shows_drift_retraining_and_a_slowed_champion_reverted(
        demo_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    settings = demo_settings
    code = run_demo(settings, rows=30_000, seed=7, timeout=300)
    out = capsys.readouterr().out
    Path("demo.out").write_text(out)  # kept in the test's tmp_path, for a failure's reader
    bus = RabbitMQBus(settings, name="demo-test")
    try:
        dead = {name: bus.queue_depths(name)["dead"] for name in PIPELINE_SERVICES}
    finally:
        bus.close()

    assert code == 0, out
    events = recorded(settings)
    kinds = recorded_kinds(settings)  # outcomes and records: in the stream, no body kept
    assert kinds.count("CandidatesTrained") == 3, out  # two pipeline runs and the retraining
    assert kinds.count("OutcomeObserved") == 200, out
    # Drift: an alert on the champion v2, and the retraining it asked for, gated as usual.
    [retrain] = of(events, "RetrainRequested")
    [drift] = [e for e in of(events, "DriftDetected") if e.correlation_id == retrain.correlation_id]
    assert (drift.model_version, drift.level, retrain.model_version) == ("v2", "alert", "v2")
    assert max(drift.psi.values()) >= 0.2
    gated = [e for e in events if e.correlation_id == retrain.correlation_id
             and e.event_type in ("ModelReady", "ModelRejected")]
    assert len(gated) == 1, out
    assert "DriftDetected" in out and "RetrainRequested" in out and "live accuracy" in out
    # The slowed champion: fallbacks, the degradation, the demotion and the revert.
    [degraded] = of(events, "ModelDegraded")
    assert (degraded.model_version, degraded.reason) == ("v2", "latency")
    assert degraded.observed > degraded.expected == 0.125
    assert "next answer by v1 (fallback True): champion v2 skipped: demoted (latency" in out
    registry = ModelRegistry(settings.data_root, "fraud")
    assert registry.champion().version == "v1"
    last = registry.history()[-1]
    assert (last.action, last.from_version, last.to_version) == ("demote", "v2", "v1")
    # The online path: each transaction of the new account scored before it is counted.
    assert "the online path" in out and "amount_count_24h 0.00" in out, out
    assert "amount_count_24h 5.00" in out  # the sixth, two hours after the fifth
    assert kinds.count("RecordsObserved") >= 1 and "RecordsRefused" not in kinds
    # The status view and the dashboards, every service stopped cleanly, nothing lost.
    assert "degraded: latency" in out and "deploy/grafana/dashboards/" in out
    assert out.count("stopped on SIGTERM (exit status 0)") == len(PIPELINE_SERVICES)
    # Only the demo's deliberately invalid event is dead-lettered (ingestion and the log).
    assert {name: count for name, count in dead.items() if count} == {
        "ingestion": 1, "eventlog": 1}


def recorded(settings: Settings) -> list[Event]:
    """Every event the event log recorded in the namespace, oldest first."""
    log = EventLog(redis.Redis.from_url(settings.redis_url), settings.namespace)
    events = [log.get(entry["event_id"]) for entry in log.recent(100_000)]
    return [event for event in events if event is not None]


def recorded_kinds(settings: Settings) -> list[str]:
    """The type of every event the event log's stream holds, each event once."""
    log = EventLog(redis.Redis.from_url(settings.redis_url), settings.namespace)
    kinds = {entry["event_id"]: entry["event_type"] for entry in log.recent(100_000)}
    return list(kinds.values())


def of(events: list[Event], event_type: str) -> list[Any]:
    return [event for event in events if event.event_type == event_type]
