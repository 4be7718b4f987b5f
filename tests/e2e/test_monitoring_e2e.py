"""The self-healing loop end to end, on the real RabbitMQ and Redis.

Drift: ScoreServed traffic whose one input is shifted makes the running monitoring
service emit DriftDetected and RetrainRequested; the same amount of unshifted traffic of
another version makes it emit nothing. Degradation: the running scoring service answers
real Score calls through a real stub, reports them (ScoreServed) to the running
monitoring service, outcomes that contradict its answers arrive (one through
``conveyor publish outcome``), monitoring emits ModelDegraded, and the scoring service
demotes the champion: the next Score is answered by the previous version, marked fallback,
and the registry records the revert.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from click.testing import CliRunner

from app.cli import main
from common.events import (
    DriftDetected,
    Event,
    ModelDegraded,
    RetrainRequested,
    ScoreServed,
)
from common.reference import input_references, model_reference, reference_rows
from monitoring.outcomes import report_outcome
from monitoring.state import MonitoringState
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring.server import field_value
from scoring.service import ScoringService
from tests.fixtures.monitoring import batches, monitored_models, served
from tests.fixtures.pipeline import paysim_config, pipeline_namespace
from tests.fixtures.scoring_service import ServiceWorld, scoring_settings, service_world
from tests.support.harness import BusNamespace, running_consumer, running_services, wait_until

pytestmark = pytest.mark.e2e
EMITTED = ("DriftDetected", "RetrainRequested", "ModelDegraded")


class Seen:
    """An observer queue bound to what monitoring emits; keeps every event it gets."""

    def __init__(self, ns: BusNamespace) -> None:
        self.events: list[Event] = []
        self.dispatcher = ns.dispatcher("watch", dict.fromkeys(EMITTED, self.events.append))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def live_view(ns: BusNamespace) -> MonitoringState:
    return MonitoringState(redis.Redis.from_url(ns.settings.redis_url), ns.namespace)


# -- drift -------------------------------------------------------------------------------


@pytest.fixture
def drift_ns(tmp_path: Path, services_up: None) -> Iterator[BusNamespace]:
    namespace = pipeline_namespace(tmp_path, paysim_config())
    yield namespace
    namespace.close()


def test_shifted_traffic_yields_drift_and_retraining_and_unshifted_none(
        drift_ns: BusNamespace, tmp_path: Path) -> None:
    ns = drift_ns
    key = ns.settings.model_signing_key.get_secret_value().encode()
    world = monitored_models(tmp_path, key=key)  # v1 and v2 with references, in ns's data
    steady = served(world, "v1", world.traffic(2_000, seed=21), prefix="steady")
    shifted = served(world, "v2", world.traffic(2_000, seed=22, shift={"a": 2.0}),
                     prefix="shifted")
    seen = Seen(ns)
    state = live_view(ns)

    with running_consumer(ns.bus(), seen.dispatcher), running_services(ns, ["monitoring"]):
        ns.bus().publish_many([ScoreServed(scores=b, producer="e2e") for b in batches(steady)])
        ns.bus().publish_many([ScoreServed(scores=b, producer="e2e") for b in batches(shifted)])
        wait_until(lambda: seen.of(RetrainRequested), timeout=60, message="RetrainRequested")
        wait_until(lambda: state.live("v2").get("served") == 2_000, timeout=30,
                   message="every shifted score accounted")
        dead = ns.depths("monitoring")["dead"]

    assert dead == 0
    [drift] = seen.of(DriftDetected)
    [retrain] = seen.of(RetrainRequested)
    assert (drift.model_version, drift.level) == ("v2", "alert") and drift.psi["a"] >= 0.2
    assert (retrain.model_version, retrain.dataset) == ("v2", "toy")
    assert retrain.causation_id == drift.causation_id  # both decided on one measurement
    steady_view = state.live("v1")
    assert steady_view["served"] == 2_000 and steady_view["drift_level"] == "none"
    assert max(d["psi"] for d in steady_view["drift"].values()) < 0.1


# -- degradation ---------------------------------------------------------------------------


@pytest.fixture
def heal_ns(tmp_path: Path, services_up: None,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[BusNamespace]:
    monkeypatch.setenv("CONVEYOR_GRPC_PORT", "0")
    monkeypatch.setenv("CONVEYOR_SCORE_REPORT_FLUSH_INTERVAL_S", "0.05")
    namespace = BusNamespace(scoring_settings(tmp_path))
    yield namespace
    namespace.close()


def with_reference(world: ServiceWorld, version: str) -> float:
    """Give a version's model the reference and evaluation figures training and evaluation
    would have stored; returns its accuracy."""
    features = world.fitted.transform(world.typed)
    X, y = features[list(world.fitted.feature_names)], features["isFraud"]
    model = world.estimators[version]
    rows = reference_rows(X)
    accuracy = float((model.predict(X) == y).mean())
    world.stores.models.update_metadata(
        f"m-{version}", reference=model_reference(model, rows, input_references(rows)),
        metrics={"accuracy": accuracy}, datasets=["transactions"])
    return accuracy


def score(stub: pb_grpc.ScoringStub, world: ServiceWorld, position: int) -> Any:
    row = world.typed.iloc[position]
    fields = {k: field_value(v) for k, v in world.fields(row).items()}
    return stub.Score(pb.ScoreRequest(entity_id=row["nameOrig"], fields=fields), timeout=10)


def test_contradicting_outcomes_make_scoring_demote_the_champion(
        heal_ns: BusNamespace, tmp_path: Path) -> None:
    ns = heal_ns
    world = service_world(tmp_path, ns.settings)
    expected = with_reference(world, "v2")
    seen = Seen(ns)
    state = live_view(ns)

    with running_consumer(ns.bus(), seen.dispatcher), \
            running_services(ns, ["scoring", "monitoring"]) as running:
        scoring = running["scoring"].runner.service
        assert isinstance(scoring, ScoringService)
        with grpc.insecure_channel(f"127.0.0.1:{scoring.server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            replies = [score(stub, world, i % len(world.typed)) for i in range(150)]
            assert {(r.model_version, r.fallback) for r in replies} == {("v2", False)}
            wait_until(lambda: state.live("v2").get("served", 0) >= 150, timeout=30,
                       message="monitoring accounted the scores")

            first, rest = replies[0], replies[1:]
            cli = CliRunner().invoke(main, [
                "publish", "outcome", "--entity", "any", "--request-id", first.request_id,
                "--outcome", flipped(first.label)], env=settings_env(ns))
            assert cli.exit_code == 0, cli.output
            for reply in rest:
                report_outcome(ns.bus(), "any", flipped(reply.label), reply.request_id)

            wait_until(lambda: seen.of(ModelDegraded), timeout=60, message="ModelDegraded")
            wait_until(lambda: "v2" in scoring.core.router.demoted(), timeout=30,
                       message="scoring demoted v2")
            after = score(stub, world, 3)
            wait_until(lambda: state.live("v2").get("outcomes") == len(replies), timeout=30,
                       message="every outcome joined")
        dead = {name: ns.depths(name)["dead"] for name in ("scoring", "monitoring")}

    assert dead == {"scoring": 0, "monitoring": 0}
    [degraded] = seen.of(ModelDegraded)
    assert (degraded.model_version, degraded.reason) == ("v2", "accuracy")
    assert degraded.expected == pytest.approx(expected) and degraded.observed < expected - 0.05
    assert (after.model_version, after.fallback) == ("v1", True)
    assert "v2 skipped: demoted (accuracy" in after.fallback_reason
    registry = world.stores.registry(ns.settings, "fraud")
    assert registry.champion().version == "v1"
    last = registry.history()[-1]
    assert (last.action, last.from_version, last.to_version) == ("demote", "v2", "v1")
    assert state.unmatched() == 0
    status = CliRunner().invoke(main, ["status"], env=settings_env(ns))
    [line] = [row for row in status.output.splitlines() if row.startswith("v2 ")]
    assert line.split()[1] == str(len(replies)) and "degraded: accuracy" in line


def flipped(label: str) -> str:
    """The other class of a binary fraud label."""
    return "0" if label == "1" else "1"


def settings_env(ns: BusNamespace) -> dict[str, str]:
    """The environment a CLI invocation needs to reach this test's namespace."""
    return {**os.environ, "CONVEYOR_NAMESPACE": ns.namespace,
            "CONVEYOR_AMQP_URL": ns.settings.amqp_url}
