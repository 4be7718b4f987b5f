"""Faults of online scoring, through a real gRPC server and a real stub.

- Redis unreachable (a ``redis-server`` of the test's own, killed, frozen, restarted):
  requests carrying every field are answered, marked degraded; the others fail fast with
  UNAVAILABLE, not at their deadline; the service recovers by itself.
- Overload: a full model queue answers RESOURCE_EXHAUSTED at once, and the server keeps
  answering. Client deadlines: the fallback link answers, or DEADLINE_EXCEEDED.
- No model loaded: UNAVAILABLE and health NOT_SERVING.
- Hot swap: versions beyond the chain depth are retired once their requests in flight
  have finished: batcher stopped, memory released.

A slow model is a ``GatedClassifier``: its predict waits at a FIFO the test holds, so
"slow" lasts exactly as long as the test needs, with no sleeping.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.services import build_service
from common.events import ModelReady
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring.core import CoreSettings, ScoringCore
from scoring.server import GrpcSettings, ScoringServer, field_value
from scoring.service import ScoringService
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.scoring_service import (
    GatedClassifier,
    ServiceWorld,
    gate_is_waiting,
    namespace_fixture,
    scoring_settings,
    service_world,
    world_fixture,
)
from tests.support.harness import BusNamespace, wait_until

pytestmark = pytest.mark.faults
ENTITY_ROW = 11  # a row whose entity has a past in the online store


def release(gate: Path) -> None:
    """Let a predict waiting at the gate go on, if one is."""
    held = gate_is_waiting(gate)
    if held is not None:
        os.close(held)


@contextlib.contextmanager
def gate_kept_open(gate: Path) -> Iterator[None]:
    """Release every predict that comes to the gate, until the block ends."""
    done = threading.Event()

    def keep_releasing() -> None:
        while not done.is_set():
            release(gate)
            done.wait(0.01)

    thread = threading.Thread(target=keep_releasing, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)


def score_request(world: ServiceWorld, version: str = "", **extra: Any) -> pb.ScoreRequest:
    row = world.typed.iloc[ENTITY_ROW]
    fields = {**world.fields(row), **extra}
    return pb.ScoreRequest(entity_id=row["nameOrig"], model_version=version,
                           fields={k: field_value(v) for k, v in fields.items()})


def failure(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def add_gated(world: ServiceWorld, gate: Path, model_id: str = "m-gated") -> str:
    """Register and promote a champion whose predict waits at the gate; its version."""
    os.mkfifo(gate)
    gated = GatedClassifier(world.estimators["v2"], str(gate))
    world.stores.models.save(model_id, gated, world.stores.models.metadata("m-v2").metadata)
    return world.stores.registry(world.settings, "fraud").promote(model_id)


# -- Redis unreachable -------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_ns(
    tmp_path: Path, redis_server: RedisServer, services_up: None,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[BusNamespace]:
    monkeypatch.setenv("CONVEYOR_GRPC_PORT", "0")
    monkeypatch.setenv("CONVEYOR_SCORING_DEADLINE_S", "5")  # a busy machine is not the fault
    ns = BusNamespace(scoring_settings(tmp_path, redis_url=redis_server.url))
    ns.declare("monitoring", ["ScoreServed"])  # the service's reports have somewhere to go
    yield ns
    redis_server.thaw()
    if redis_server.process is None:
        redis_server.start()
    ns.close()


@pytest.fixture
def redis_world(tmp_path: Path, redis_ns: BusNamespace) -> ServiceWorld:
    return service_world(tmp_path, redis_ns.settings)


@pytest.fixture
def service(redis_world: ServiceWorld) -> Iterator[ScoringService]:
    # the real wiring, as `conveyor run scoring` builds it: fail-fast Redis client included
    built = build_service("scoring", redis_world.settings)
    assert isinstance(built, ScoringService)
    yield built
    built.close()


@pytest.fixture
def stub(service: ScoringService) -> Iterator[pb_grpc.ScoringStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
        yield pb_grpc.ScoringStub(channel)


def carried_aggregates(world: ServiceWorld) -> dict[str, float]:
    """The online store's values for the request's entity, to carry in the request."""
    entity = world.typed["nameOrig"].iloc[ENTITY_ROW]
    [row] = world.stores.online.read(world.fitted.feature_set_id, [entity])
    assert row is not None
    return {c: float(row[c]) for c in world.fitted.aggregate_columns}


def unavailable_message(world: ServiceWorld) -> str:
    missing = ", ".join(world.fitted.aggregate_columns)
    return (f"online features of feature set {world.fitted.feature_set_id} are unavailable "
            f"and the request does not carry {missing}")


def rematerialise(world: ServiceWorld) -> None:
    """Write the online rows again, as preparation does, into a Redis that lost them."""
    world.stores.online.write_batch(
        world.fitted.feature_set_id, world.fitted.latest_aggregates(world.typed).reset_index(),
        "nameOrig")


def test_a_dead_redis_degrades_or_fails_fast_and_scoring_recovers_by_itself(
        redis_world: ServiceWorld, redis_server: RedisServer, stub: Any) -> None:
    world = redis_world
    carried = carried_aggregates(world)
    before = stub.Score(score_request(world), timeout=5)
    assert not before.degraded
    assert stub.Score(score_request(world, **carried), timeout=5).score == pytest.approx(
        before.score, rel=1e-12)

    redis_server.stop()
    for _ in range(3):  # every call, not just the first after the connection broke
        degraded = stub.Score(score_request(world, **carried), timeout=5)
        assert degraded.degraded and degraded.model_version == before.model_version
        assert degraded.score == pytest.approx(before.score, rel=1e-12)
        assert failure(lambda: stub.Score(score_request(world), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE, unavailable_message(world))

    redis_server.start()  # empty, as a Redis without persistence comes back
    rematerialise(world)
    after = stub.Score(score_request(world), timeout=5)
    assert (after.degraded, after.score) == (False, pytest.approx(before.score, rel=1e-12))


def test_a_hung_redis_fails_fast_instead_of_at_the_deadline(
        redis_world: ServiceWorld, redis_server: RedisServer, stub: Any) -> None:
    world = redis_world
    carried = carried_aggregates(world)
    before = stub.Score(score_request(world), timeout=5)
    redis_server.freeze()
    # The client allows 5 s, the server's deadline is 5 s: without a socket timeout the
    # read would hang until DEADLINE_EXCEEDED.
    assert failure(lambda: stub.Score(score_request(world), timeout=5)) == (
        grpc.StatusCode.UNAVAILABLE, unavailable_message(world))
    assert stub.Score(score_request(world, **carried), timeout=5).degraded
    redis_server.thaw()
    after = stub.Score(score_request(world), timeout=5)
    assert (after.degraded, after.score) == (False, pytest.approx(before.score, rel=1e-12))


# -- overload, deadlines, no model, retirement (the shared Redis) -----------------------


ns = namespace_fixture()
world = world_fixture()


@contextlib.contextmanager
def serving(world: ServiceWorld, gate: Path | None = None,
            **settings: Any) -> Iterator[tuple[ScoringCore, Any]]:
    """A core over the world's stores and a real server; a stub to call it."""
    stores = world.stores
    core = ScoringCore(stores.models, stores.feature_pipelines,
                       stores.registry(world.settings, "fraud"), stores.online,
                       CoreSettings(warmup_calls=0, **settings))
    core.load_chain()
    server = ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield core, pb_grpc.ScoringStub(channel)
    finally:
        with gate_kept_open(gate) if gate else contextlib.nullcontext():
            server.stop(0)
            core.close()  # waits for each batcher's predict in hand


def test_a_full_model_queue_is_resource_exhausted_and_the_server_keeps_answering(
        world: ServiceWorld, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    version = add_gated(world, gate)
    with serving(world, gate, max_queue=1, max_batch=1, deadline_s=60.0) as (_, stub):
        first = stub.Score.future(score_request(world, version), timeout=60)
        held = wait_until(lambda: gate_is_waiting(gate), timeout=30)  # first is predicting
        second, third = (stub.Score.future(score_request(world, version), timeout=60)
                         for _ in range(2))
        # The queue holds one: of the two, one waits and the other is refused at once.
        refused = wait_until(lambda: next((f for f in (second, third) if f.done()), None),
                             timeout=30)
        waiting = third if refused is second else second
        assert (refused.code(), refused.details()) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"model fraud:{version} is overloaded: its queue of 1 requests is full")
        assert not first.done() and not waiting.done()
        os.close(held)
        wait_until(lambda: release(gate) or (first.done() and waiting.done()), timeout=30)
        assert first.result().model_version == waiting.result().model_version == version
        assert stub.Score(score_request(world, "v2"), timeout=5).model_version == "v2"


def test_a_client_deadline_is_answered_by_the_fallback_or_deadline_exceeded(
        world: ServiceWorld, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    version = add_gated(world, gate)  # a champion that never answers while the gate is shut
    with serving(world, gate, deadline_s=60.0, latency_budget_s=60.0) as (_, stub):
        reply = stub.Score(score_request(world), timeout=1.0)
        assert (reply.model_version, reply.fallback) == ("v2", True)
        assert f"{version} passed its deadline" in reply.fallback_reason
        code, _ = failure(lambda: stub.Score(score_request(world, version), timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # a named version has no fallback


def test_without_a_model_scoring_is_unavailable_and_not_serving(
        tmp_path: Path, services_up: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_GRPC_PORT", "0")
    ns = BusNamespace(scoring_settings(tmp_path))
    service = build_service("scoring", ns.settings)  # an empty registry
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="conveyor.scoring.v1.Scoring"), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not service.ready()
            request = pb.ScoreRequest(entity_id="C1", fields={"amount": field_value(1.0)})
            assert failure(lambda: pb_grpc.ScoringStub(channel).Score(request, timeout=5)) == (
                grpc.StatusCode.UNAVAILABLE, "model fraud has no deployed version to serve")
    finally:
        service.close()
        ns.close()


def test_versions_beyond_the_chain_are_retired_after_their_requests_in_flight(
        world: ServiceWorld, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gated = add_gated(world, gate)
    newer = promote_copy(world, "m-v4")  # chain: v4, v3 (gated); v2, v1 beyond a depth of 2
    with serving(world, gate, chain_depth=2, deadline_s=60.0) as (core, stub):
        assert [m.version for m in core.health()] == [newer, gated]
        in_flight = stub.Score.future(score_request(world, gated), timeout=60)
        held = wait_until(lambda: gate_is_waiting(gate), timeout=30)
        # The core's own record of the model (private): only to see its memory released.
        retired = weakref.ref(core._loaded[gated])
        swap = ModelReady(producer="test", model_id="m-v5", version=promote_copy(world, "m-v5"))
        swapping = threading.Thread(target=core.on_model_ready, args=(swap,))
        swapping.start()
        wait_until(lambda: {m.version for m in core.health()} == {"v5", newer},
                   timeout=30)  # out of the chain and routed to no more...
        assert failure(lambda: stub.Score(score_request(world, gated), timeout=5)) == (
            grpc.StatusCode.NOT_FOUND, f"model fraud with version {gated} not found")
        assert swapping.is_alive() and not in_flight.done()  # ...but not stopped yet
        os.close(held)
        assert in_flight.result().model_version == gated  # the request in flight finished
        swapping.join(30)
        assert not swapping.is_alive()
        assert f"batcher-fraud:{gated}" not in {t.name for t in threading.enumerate()}
        # Nothing holds the retired model any more (once the link thread that ran the
        # request has dropped its work item, which a busy machine may delay a little).
        wait_until(lambda: gc.collect() >= 0 and retired() is None, timeout=30)
        assert stub.Score(score_request(world), timeout=5).model_version == "v5"


def promote_copy(world: ServiceWorld, model_id: str) -> str:
    """Store v1's estimator under a new id and make it the champion; its version."""
    world.stores.models.save(model_id, world.estimators["v1"],
                             world.stores.models.metadata("m-v1").metadata)
    return world.stores.registry(world.settings, "fraud").promote(model_id)
