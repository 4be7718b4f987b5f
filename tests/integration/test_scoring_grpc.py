"""The scoring service over gRPC: a real in-process server, a real stub, the real Redis."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.events import ModelReady
from common.stores import ModelRegistry
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring.core import ScoringCore
from scoring.inputs import InputSchema
from scoring.server import GrpcSettings, ScoringServer, field_value
from scoring.service import ScoringService
from tests.fixtures.models import SlowClassifier
from tests.fixtures.scoring import (
    ScoringWorld,
    fields_of,
    loaded_core,
    slow_champion_channel,
    status_of,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.ScoringStub:
    return pb_grpc.ScoringStub(channel)


def request(world: ScoringWorld, position: int = 3, **changes: Any) -> pb.ScoreRequest:
    row = world.frame.iloc[position]
    fields = {**fields_of(row, InputSchema.of(world.fitted)), **changes}
    return pb.ScoreRequest(entity_id=row["nameOrig"],
                           fields={k: field_value(v) for k, v in fields.items()})


def test_score_is_answered_by_the_champion(world: ScoringWorld, stub: Any) -> None:
    reply = stub.Score(request(world), timeout=5)
    assert (reply.model_version, reply.fallback, reply.degraded) == ("v2", False, False)
    assert reply.score == pytest.approx(reply.probabilities["1"])
    assert sum(reply.probabilities.values()) == pytest.approx(1.0)
    assert reply.label in {"0", "1"} and reply.latency_ms > 0 and reply.request_id


def test_a_named_version_or_alias_answers(world: ScoringWorld, stub: Any) -> None:
    for version, expected in (("v1", "v1"), ("v2", "v2"), ("previous", "v1")):
        req = request(world)
        req.model_version = version
        assert stub.Score(req, timeout=5).model_version == expected


def test_an_unknown_version_is_not_found(world: ScoringWorld, stub: Any) -> None:
    req = request(world)
    req.model_version = "v9"
    assert status_of(lambda: stub.Score(req, timeout=5)) == (
        grpc.StatusCode.NOT_FOUND, "model fraud with version v9 not found")


@pytest.mark.parametrize(("changes", "drop", "message"), [
    ({}, "amount", "field 'amount' is missing"),
    ({"amount": float("nan")}, None, "field 'amount' must be finite, got nan"),
    ({"amount": float("inf")}, None, "field 'amount' must be finite, got inf"),
    ({"amount": "lots"}, None, "field 'amount' must be a number, got str 'lots'"),
    ({"type": 3}, None, "field 'type' must be a text, got int 3"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(
        world: ScoringWorld, stub: Any, changes: dict, drop: str | None, message: str) -> None:
    req = request(world, **changes)
    if drop:
        del req.fields[drop]
    assert status_of(lambda: stub.Score(req, timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT, message)


def test_an_empty_field_and_a_missing_entity_are_invalid(world: ScoringWorld, stub: Any) -> None:
    req = request(world)
    req.fields["amount"].Clear()
    assert status_of(lambda: stub.Score(req, timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "field 'amount' has no value")
    assert status_of(lambda: stub.Score(pb.ScoreRequest(), timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "entity_id is missing")


def test_an_oversized_message_is_refused(world: ScoringWorld, core: ScoringCore) -> None:
    server = ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0,
                                              max_message_bytes=1024)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.ScoringStub(channel)
            big = request(world, note="x" * 4096)
            code, _ = status_of(lambda: stub.Score(big, timeout=5))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Score(request(world), timeout=5).model_version == "v2"
    finally:
        server.stop(0)


def test_score_batch_answers_every_row_in_order(world: ScoringWorld, stub: Any) -> None:
    rows = [request(world, position) for position in range(5, 15)]
    rows[3].model_version = "v1"
    replies = stub.ScoreBatch(pb.ScoreBatchRequest(rows=rows), timeout=10).responses
    assert [r.model_version for r in replies] == ["v2"] * 3 + ["v1"] + ["v2"] * 6


def test_list_models_shows_versions_and_aliases(world: ScoringWorld, stub: Any) -> None:
    stub.Score(request(world), timeout=5)
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=5)
    models = {m.version: m for m in reply.models}
    assert reply.name == "fraud"
    assert (models["v2"].alias, models["v1"].alias) == ("champion", "previous")
    assert models["v2"].circuit == "closed" and models["v2"].latency_count >= 1


def test_online_scores_equal_offline_transform_and_predict(
        world: ScoringWorld, stub: Any) -> None:
    """A new transaction of each entity: offline over history + row, online via Redis."""
    schema = InputSchema.of(world.fitted)
    latest = world.frame["timestamp"].max()
    entities = sorted(world.frame["nameOrig"].unique())[:8]
    new = world.frame.iloc[:len(entities)].assign(
        nameOrig=entities, timestamp=[latest + pd.Timedelta(hours=i + 1)
                                      for i in range(len(entities))])
    offline = world.fitted.transform(pd.concat([world.frame, new], ignore_index=True))
    features = offline.iloc[-len(entities):][list(world.fitted.feature_names)]
    expected = world.estimators["v2"].predict_proba(features)[:, 1]
    got = [stub.Score(pb.ScoreRequest(entity_id=row["nameOrig"], fields={
        k: field_value(v) for k, v in fields_of(row, schema).items()}), timeout=5).score
        for _, row in new.iterrows()]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_health_is_serving_with_a_model_and_not_without(
        world: ScoringWorld, channel: grpc.Channel, tmp_path: Path) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(check(service=""), timeout=5).status == serving
    scoring = check(service="conveyor.scoring.v1.Scoring")
    assert health.Check(scoring, timeout=5).status == serving
    registry = ModelRegistry(str(tmp_path / "empty"), "fraud")
    empty = ScoringCore(world.models, world.pipelines, registry, world.online)
    assert empty.load_chain() == []
    server = ScoringServer(empty, GrpcSettings(host="127.0.0.1", port=0)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as other:
            status = health_pb2_grpc.HealthStub(other).Check(check(service=""), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            code, message = status_of(lambda: pb_grpc.ScoringStub(other).Score(
                request(world), timeout=5))
            assert (code, message) == (grpc.StatusCode.UNAVAILABLE,
                                       "model fraud has no deployed version to serve")
    finally:
        server.stop(0)
        empty.close()


def test_a_slow_champion_is_answered_by_previous_within_the_deadline(
        world: ScoringWorld) -> None:
    with slow_champion_channel(world) as channel:
        reply = pb_grpc.ScoringStub(channel).Score(request(world), timeout=1.0)
    assert (reply.model_version, reply.fallback) == ("v2", True)
    assert "v3 passed its deadline" in reply.fallback_reason
    assert reply.latency_ms < 300


@pytest.mark.parametrize(("timeout", "max_deadline_s", "answered"), [
    (3.0, 10.0, True),    # the client's 3 s are kept, though longer than the 0.1 s default
    (3.0, 0.2, False),    # cut to the longest deadline the server allows
    (None, 10.0, False),  # no client deadline: the 0.1 s default
])
def test_a_clients_own_deadline_is_kept_up_to_the_servers_longest(
        world: ScoringWorld, timeout: float | None, max_deadline_s: float,
        answered: bool) -> None:
    world.add_model(SlowClassifier(world.estimators["v2"], delay_s=0.4), "m-slow")
    with loaded_core(world, deadline_s=0.1, max_deadline_s=max_deadline_s, chain_depth=1,
                     latency_budget_s=5.0, warmup_calls=0) as core:
        server = ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0)).start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.ScoringStub(channel)
                if answered:
                    reply = stub.Score(request(world), timeout=timeout)
                    assert (reply.model_version, reply.fallback) == ("v3", False)
                else:
                    code, _ = status_of(lambda: stub.Score(request(world), timeout=timeout))
                    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            server.stop(0)


def test_hot_swap_under_load_fails_no_call(
        world: ScoringWorld, core: ScoringCore, server: ScoringServer, stub: Any) -> None:
    estimator = world.estimators["v1"]
    world.models.save("m-v3", estimator, world.models.metadata("m-v1").metadata)
    world.registry.register("m-v3")
    version = world.registry.promote("m-v3")
    swapped = False

    def call(position: int) -> str:
        return str(stub.Score(request(world, position % 50), timeout=10).model_version)

    with ThreadPoolExecutor(8) as pool:
        before = [pool.submit(call, i) for i in range(200)]
        core.on_model_ready(ModelReady(producer="test", model_id="m-v3", version=version))
        swapped = True
        after = [pool.submit(call, i) for i in range(100)]
        answered = [f.result() for f in before + after]  # raises if any call failed
    assert swapped and version == "v3"
    assert set(answered[-100:]) == {"v3"}
    assert set(answered[:200]) <= {"v2", "v3"}


def test_the_service_is_ready_and_serving_only_once_a_model_arrives(
        world: ScoringWorld, tmp_path: Path) -> None:
    registry = ModelRegistry(str(tmp_path / "later"), "fraud")
    core = ScoringCore(world.models, world.pipelines, registry, world.online)
    service = ScoringService(core, ScoringServer(core, GrpcSettings("127.0.0.1", 0)).start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert not service.ready()
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert health.Check(check, timeout=5).status == not_serving
            registry.register("m-v2")
            version = registry.promote("m-v2")
            service.on_model_ready(ModelReady(producer="test", model_id="m-v2", version=version))
            assert service.ready()
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            reply = pb_grpc.ScoringStub(channel).Score(request(world), timeout=5)
            assert reply.model_version == version
    finally:
        service.close()


def test_the_score_command_prints_the_answer(world: ScoringWorld, server: ScoringServer) -> None:
    from click.testing import CliRunner

    from app.cli import main

    row = world.frame.iloc[3]
    fields = fields_of(row, InputSchema.of(world.fitted))
    args = ["score", "--entity", str(row["nameOrig"]), "--target", f"127.0.0.1:{server.port}"]
    for name, value in fields.items():
        args += ["--field", f"{name}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["model_version"] == world.registry.champion().version
    assert 0.0 <= answer.get("score", 0.0) <= 1.0


def test_the_score_command_names_an_unknown_version(
        world: ScoringWorld, server: ScoringServer) -> None:
    from click.testing import CliRunner

    from app.cli import main

    result = CliRunner().invoke(main, ["score", "--entity", "C1", "--model-version", "v9",
                                       "--target", f"127.0.0.1:{server.port}"])
    assert result.exit_code == 1
    assert "NOT_FOUND: model fraud with version v9 not found" in result.output
