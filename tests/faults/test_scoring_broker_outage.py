"""A broker outage seen by scoring alone: it stays ready, keeps answering, and the served
scores it buffered are delivered once the broker is back.

The scoring service (built and run as ``conveyor run scoring`` runs it, in-process)
reaches RabbitMQ through a ``TcpProxy`` the test cuts and restores; the broker keeps
running for everyone else, including the stand-in monitoring consumer that collects the
ScoreServed events.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.events import ScoreServed
from common.settings import Settings
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring.server import field_value
from scoring.service import ScoringService
from tests.fixtures.scoring_service import ServiceWorld, scoring_settings, service_world
from tests.fixtures.tcp_proxy import TcpProxy
from tests.support.harness import BusNamespace, running_consumer, running_services, wait_until

pytestmark = pytest.mark.faults


@pytest.fixture
def proxy(services_up: None) -> Iterator[TcpProxy]:
    url = urlparse(Settings().amqp_url)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 5672) as running:
        yield running


@pytest.fixture
def direct(tmp_path: Path, services_up: None) -> Iterator[BusNamespace]:
    """The test's namespace on the broker itself (the stand-in monitoring uses it)."""
    ns = BusNamespace(scoring_settings(tmp_path, reconnect_max_delay_s=0.5))
    ns.declare("monitoring", ["ScoreServed"])
    yield ns
    ns.close()


@pytest.fixture
def proxied(direct: BusNamespace, proxy: TcpProxy,
            monkeypatch: pytest.MonkeyPatch) -> BusNamespace:
    """The same namespace reached through the proxy: what the scoring service uses."""
    monkeypatch.setenv("CONVEYOR_GRPC_PORT", "0")
    monkeypatch.setenv("CONVEYOR_SCORE_REPORT_FLUSH_INTERVAL_S", "0.1")
    url = proxy.url(direct.settings.amqp_url)
    return BusNamespace(direct.settings.model_copy(update={"amqp_url": url}))


@pytest.fixture
def world(tmp_path: Path, direct: BusNamespace) -> ServiceWorld:
    return service_world(tmp_path, direct.settings)


def score(stub: pb_grpc.ScoringStub, world: ServiceWorld, request_id: str, i: int
          ) -> pb.ScoreResponse:
    row = world.typed.iloc[i]
    fields = {k: field_value(v) for k, v in world.fields(row).items()}
    return stub.Score(pb.ScoreRequest(entity_id=row["nameOrig"], request_id=request_id,
                                      fields=fields), timeout=10)


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_broker_outage_leaves_scoring_ready_and_answering_and_reports_follow(
        direct: BusNamespace, proxied: BusNamespace, proxy: TcpProxy,
        world: ServiceWorld) -> None:
    served: list[ScoreServed] = []
    watch = direct.dispatcher("monitoring", {"ScoreServed": served.append})

    def reported() -> set[str]:
        return {s.request_id for event in served for s in event.scores}

    with running_consumer(direct.bus(), watch), \
            running_services(proxied, ["scoring"]) as running:
        runner = running["scoring"].runner
        service = runner.service
        assert isinstance(service, ScoringService)
        with grpc.insecure_channel(f"127.0.0.1:{service.server.port}") as channel:
            stub, health = pb_grpc.ScoringStub(channel), health_pb2_grpc.HealthStub(channel)
            score(stub, world, "before", 0)
            wait_until(lambda: "before" in reported(), 30)

            proxy.cut()
            wait_until(lambda: not runner.connected.is_set(), 30,
                       message="the service's consumer losing the broker")
            during = [score(stub, world, f"during-{i}", i) for i in range(10)]
            assert readyz(runner.http.port) == 200
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert not {f"during-{i}" for i in range(10)} & reported()

            proxy.restore()
            wait_until(lambda: {f"during-{i}" for i in range(10)} <= reported(), 60,
                       message="the buffered reports delivered")
            wait_until(runner.connected.is_set, 60, message="the consumer back")
    assert all(reply.model_version == "v2" for reply in during)
    assert service.reporter is not None and service.reporter.dropped == 0
