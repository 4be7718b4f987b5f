"""Served scores reported off the request path, through the real service, RabbitMQ and Redis.

Score and ModelInfer calls go through real stubs to the service ``scoring.service.build``
makes; a consumer of ScoreServed stands in for monitoring, and the score stream is read back
from Redis. Each reported row of features must reproduce its score through the estimator.
"""

from __future__ import annotations

import grpc
import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from common.events import ScoreServed, ServedScore
from common.stores import OnlineScoreStore
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as ipb
from protos.inference import grpc_service_pb2_grpc as ipb_grpc
from scoring.oip import field_tensors
from scoring.server import field_value
from scoring.service import ScoringService
from tests.fixtures.scoring_service import (
    ServiceWorld,
    namespace_fixture,
    world_fixture,
)
from tests.support.harness import BusNamespace, running_consumer, running_services, wait_until

pytestmark = pytest.mark.integration
CALLS = 12


ns = namespace_fixture(CONVEYOR_GRPC_PORT="0",
                       CONVEYOR_SCORE_REPORT_FLUSH_SIZE="5")  # several events
world = world_fixture()


def score_calls(world: ServiceWorld, target: str) -> list[pb.ScoreResponse]:
    rows = world.typed.iloc[:CALLS]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        return [stub.Score(pb.ScoreRequest(
            entity_id=row["nameOrig"], request_id=f"req-{i}",
            model_version="v1" if i == 3 else "",
            fields={k: field_value(v) for k, v in world.fields(row).items()}), timeout=5)
            for i, (_, row) in enumerate(rows.iterrows())]


def reproduces(world: ServiceWorld, served: ServedScore) -> float:
    """The score the estimator gives the reported features."""
    names = list(world.fitted.feature_names)
    assert list(served.features) == names
    row = pd.DataFrame([[served.features[n] for n in names]], columns=names)
    return float(world.estimators[served.model_version].predict_proba(row)[0, 1])


def test_score_calls_are_published_as_score_served_and_kept_in_the_stream(
        ns: BusNamespace, world: ServiceWorld) -> None:
    events: list[ScoreServed] = []
    watch = ns.dispatcher("monitoring", {"ScoreServed": events.append})
    with running_consumer(ns.bus(), watch), running_services(ns, ["scoring"]) as running:
        service = running["scoring"].runner.service
        assert isinstance(service, ScoringService)
        replies = score_calls(world, f"127.0.0.1:{service.server.port}")
        wait_until(lambda: sum(len(e.scores) for e in events) >= CALLS, timeout=30)
        registry = CollectorRegistry()
        service.register_metrics(registry)
        dropped = registry.get_sample_value("conveyor_scoring_reports_dropped_total")
    served = {s.request_id: s for e in events for s in e.scores}
    assert sorted(served) == sorted(f"req-{i}" for i in range(CALLS))
    assert max(len(e.scores) for e in events) <= 5
    for i, reply in enumerate(replies):
        report = served[f"req-{i}"]
        assert (report.model_version, report.score, report.label, report.fallback) == (
            reply.model_version, reply.score, reply.label, reply.fallback)
        assert report.entity_id == world.typed["nameOrig"].iloc[i]
        assert report.latency_ms == pytest.approx(reply.latency_ms)
        assert reproduces(world, report) == pytest.approx(report.score, rel=1e-9, abs=1e-12)
    assert served["req-3"].model_version == "v1"
    assert {e.producer for e in events} == {"scoring"}
    stream = OnlineScoreStore(ns.redis, ns.namespace).recent(100)
    assert sorted(s.request_id for s in stream) == sorted(served)
    assert {s.request_id: (s.score, s.features) for s in stream} == {
        k: (s.score, {}) for k, s in served.items()}  # features go to monitoring only
    assert dropped == 0


def test_model_infer_rows_are_reported_as_served_scores_named_by_the_call(
        ns: BusNamespace, world: ServiceWorld) -> None:
    rows = world.typed.iloc[:3]
    records = [world.fields(row) for _, row in rows.iterrows()]
    events: list[ScoreServed] = []
    watch = ns.dispatcher("monitoring", {"ScoreServed": events.append})
    with running_consumer(ns.bus(), watch), running_services(ns, ["scoring"]) as running:
        service = running["scoring"].runner.service
        assert isinstance(service, ScoringService)
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            stub = ipb_grpc.GRPCInferenceServiceStub(channel)
            reply = stub.ModelInfer(
                ipb.ModelInferRequest(model_name=service.core.router.name, id="infer-1",
                                      inputs=field_tensors(records)), timeout=5)
            unnamed = stub.ModelInfer(  # no id: the one made up comes back and is reported
                ipb.ModelInferRequest(model_name=service.core.router.name,
                                      inputs=field_tensors(records[:1])), timeout=5)
        wait_until(lambda: sum(len(e.scores) for e in events) >= 4, timeout=30)
    served = {s.request_id: s for e in events for s in e.scores}
    assert unnamed.id and sorted(served) == sorted(
        ["infer-1/0", "infer-1/1", "infer-1/2", unnamed.id])
    out = {o.name: o for o in reply.outputs}["predict_proba"]
    answered = np.asarray(out.contents.fp64_contents).reshape(list(out.shape))
    for row in range(3):
        report = served[f"infer-1/{row}"]
        assert (report.entity_id, report.model_version) == ("", reply.model_version)
        assert report.score == pytest.approx(answered[row, -1], rel=1e-12)
        assert reproduces(world, report) == pytest.approx(report.score, rel=1e-9, abs=1e-12)
