"""The scoring service's Prometheus metrics after real calls: a real in-process server, a
real stub, the real Redis, the metrics read from a registry of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from prometheus_client import CollectorRegistry

from common.stores import RedisOnlineStore
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as v2pb
from protos.inference import grpc_service_pb2_grpc as v2pb_grpc
from scoring.core import CoreSettings, ScoringCore
from scoring.inputs import InputSchema
from scoring.metrics import ScoringMetrics
from scoring.oip import field_tensors
from scoring.security import ServerSecurity
from scoring.server import GrpcSettings, ScoringServer, field_value
from scoring.service import ScoringService
from tests.fixtures.models import SlowClassifier
from tests.fixtures.scoring import ScoringWorld, fields_of

pytestmark = pytest.mark.integration


@pytest.fixture
def metrics() -> ScoringMetrics:
    return ScoringMetrics()


@pytest.fixture
def registry(metrics: ScoringMetrics) -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics.register(registry)
    return registry


def make_core(world: ScoringWorld, metrics: ScoringMetrics, online: Any = None,
              **settings: Any) -> ScoringCore:
    return ScoringCore(world.models, world.pipelines, world.registry, online or world.online,
                       CoreSettings(**settings), on_batch=metrics.observe_batch)


@pytest.fixture
def slow_champion_core(world: ScoringWorld, metrics: ScoringMetrics) -> Iterator[ScoringCore]:
    """v3 (a model that sleeps 2 s) in front of v2 and v1, with a 0.3 s deadline."""
    world.add_model(SlowClassifier(world.estimators["v2"], delay_s=2.0), "m-slow")
    core = make_core(world, metrics, deadline_s=0.3, latency_budget_s=5.0, warmup_calls=0)
    core.load_chain()
    yield core
    core.close()


def serve(core: ScoringCore, metrics: ScoringMetrics,
          security: ServerSecurity | None = None) -> ScoringServer:
    return ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0), metrics=metrics,
                         security=security).start()


@pytest.fixture
def channel(slow_champion_core: ScoringCore, metrics: ScoringMetrics
            ) -> Iterator[grpc.Channel]:
    server = serve(slow_champion_core, metrics)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    server.stop(0)


def fields(world: ScoringWorld, position: int) -> dict[str, Any]:
    return fields_of(world.frame.iloc[position], InputSchema.of(world.fitted))


def score_request(world: ScoringWorld, position: int = 3, version: str = "",
                  **changes: Any) -> pb.ScoreRequest:
    values = {**fields(world, position), **changes}
    return pb.ScoreRequest(entity_id=str(world.frame.iloc[position]["nameOrig"]),
                           model_version=version,
                           fields={k: field_value(v) for k, v in values.items()})


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_calls_answers_fallbacks_and_batches_are_counted(
        world: ScoringWorld, channel: grpc.Channel, registry: CollectorRegistry) -> None:
    score = pb_grpc.ScoringStub(channel).Score
    infer = v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    fallback = score(score_request(world), timeout=5)
    assert (fallback.model_version, fallback.fallback) == ("v2", True)
    for _ in range(2):
        assert score(score_request(world, version="v2"), timeout=5).model_version == "v2"
    with pytest.raises(grpc.RpcError):
        score(score_request(world, amount=float("nan")), timeout=5)
    v1_rows_before = value(registry, "conveyor_scoring_batch_size_sum", model_version="v1")
    rows = [fields(world, p) for p in range(3)]
    reply = infer(v2pb.ModelInferRequest(model_name="fraud", model_version="v1",
                                         inputs=field_tensors(rows)), timeout=5)
    assert reply.model_version == "v1"
    with pytest.raises(grpc.RpcError):
        infer(v2pb.ModelInferRequest(model_name="fraud", model_version="v9",
                                     inputs=field_tensors(rows)), timeout=5)

    requests = "conveyor_scoring_requests_total"
    assert value(registry, requests, method="Score", code="OK") == 3
    assert value(registry, requests, method="Score", code="INVALID_ARGUMENT") == 1
    assert value(registry, requests, method="ModelInfer", code="OK") == 1
    assert value(registry, requests, method="ModelInfer", code="NOT_FOUND") == 1
    assert value(registry, requests, method="ScoreBatch", code="OK") == 0
    assert value(registry, "conveyor_scoring_rpc_duration_seconds_count", method="Score") == 4

    answers = "conveyor_scoring_answers_total"
    assert value(registry, answers, model_version="v2", link="previous") == 1
    assert value(registry, answers, model_version="v2", link="named") == 2
    assert value(registry, answers, model_version="v1", link="named") == 3
    assert value(registry, answers, model_version="v1", link="older") == 0  # pre-created
    assert value(registry, answers, model_version="v3", link="champion") == 0
    assert value(registry, "conveyor_scoring_latency_seconds_count",
                 model_version="v2", link="previous") == 1

    fallbacks = "conveyor_scoring_fallbacks_total"
    assert value(registry, fallbacks, model_version="v2", reason="deadline") == 1
    assert value(registry, fallbacks, model_version="v2", reason="circuit_open") == 0
    assert value(registry, fallbacks, model_version="v2", reason="error") == 0
    assert value(registry, fallbacks, model_version="v1", reason="deadline") == 0

    v1_rows = value(registry, "conveyor_scoring_batch_size_sum", model_version="v1")
    assert v1_rows is not None and v1_rows_before is not None
    assert v1_rows - v1_rows_before == 3  # the three ModelInfer rows, in one or more calls
    assert value(registry, "conveyor_scoring_degraded_total") == 0


def test_an_answer_without_redis_is_counted_degraded(
        world: ScoringWorld, metrics: ScoringMetrics, registry: CollectorRegistry) -> None:
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    core = make_core(world, metrics, RedisOnlineStore(unreachable, "nowhere"), deadline_s=2.0)
    core.load_chain()
    server = serve(core, metrics)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            aggregates = {c: 1.0 for c in world.fitted.aggregate_columns}
            reply = pb_grpc.ScoringStub(channel).Score(
                score_request(world, **aggregates), timeout=5)
    finally:
        server.stop(0)
        core.close()
    assert reply.degraded
    assert value(registry, "conveyor_scoring_degraded_total") == 1


def test_refused_tokens_are_counted_unauthenticated(
        world: ScoringWorld, metrics: ScoringMetrics, registry: CollectorRegistry) -> None:
    core = make_core(world, metrics, deadline_s=2.0)
    core.load_chain()
    server = serve(core, metrics, ServerSecurity(tokens=("t0ken",)))
    try:
        with (grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
              pytest.raises(grpc.RpcError)):
            pb_grpc.ScoringStub(channel).Score(score_request(world), timeout=5)
    finally:
        server.stop(0)
        core.close()
    assert value(registry, "conveyor_scoring_requests_total",
                 method="Score", code="UNAUTHENTICATED") == 1


def test_the_service_registers_every_scoring_metric(
        world: ScoringWorld, metrics: ScoringMetrics) -> None:
    core = make_core(world, metrics)
    core.load_chain()
    server = ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0), metrics=metrics)
    registry = CollectorRegistry()
    try:
        ScoringService(core, server).register_metrics(registry)
        server.update_health()  # creates the deployed versions' series
    finally:
        server.stop(0)
        core.close()
    names = {sample.name for family in registry.collect() for sample in family.samples}
    assert {"conveyor_scoring_requests_total", "conveyor_scoring_rpc_duration_seconds_bucket",
            "conveyor_scoring_answers_total", "conveyor_scoring_latency_seconds_bucket",
            "conveyor_scoring_fallbacks_total", "conveyor_scoring_batch_size_bucket",
            "conveyor_scoring_degraded_total"} <= names
    assert registry.get_sample_value("conveyor_scoring_answers_total",
                                     {"model_version": "v2", "link": "champion"}) == 0
