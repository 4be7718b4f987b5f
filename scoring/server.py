"""The gRPC edge of scoring: thin servicers over ``ScoringCore``, health and reflection.

One server carries ``conveyor.scoring.v1.Scoring``, the Open Inference Protocol's
``inference.GRPCInferenceService`` (scoring/oip.py), the standard health service and
reflection. The servicers only convert messages; ``grpc_errors`` (scoring/grpc_common.py)
is the one table that maps ``common.errors.Status`` to ``grpc.StatusCode``. Overload is
bounded twice: the thread pool and ``maximum_concurrent_rpcs`` (gRPC answers
RESOURCE_EXHAUSTED beyond it), and the micro-batchers' queues. ``metrics``
(scoring/metrics.py) are recorded by an interceptor and the servicers; ``security``
(scoring/security.py) adds TLS and bearer tokens. Example::

    server = ScoringServer(core, GrpcSettings(port=0)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    ScoringStub(channel).Score(ScoreRequest(entity_id="C-42", fields={...}), timeout=0.05)
    server.stop()
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import InvalidInput
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring import oip
from scoring.core import ScoreQuery, ScoreResult, ScoringCore
from scoring.grpc_common import (
    MAX_FIELDS,
    MAX_ROWS,
    MAX_TEXT_CHARS,
    check_count,
    check_length,
    grpc_errors,
    remaining_deadline,
)
from scoring.inputs import FieldValue
from scoring.metrics import MetricsInterceptor, ScoringMetrics
from scoring.router import ModelHealth
from scoring.security import ServerSecurity

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scoring"].full_name


@dataclass(frozen=True)
class GrpcSettings:
    """Where the server listens and how much it takes at once."""

    host: str = "0.0.0.0"
    port: int = 50051
    """0 picks a free port (tests)."""
    threads: int = 32
    max_concurrent_rpcs: int = 256
    max_message_bytes: int = 4 * 1024 * 1024
    reuse_port: bool = False
    """Share the port with other processes (``grpc.so_reuseport``): the scoring workers;
    the kernel spreads new connections over them."""
    max_connection_age_s: float = 0.0
    """Send clients away from connections this old (0: never), with as long again for
    their calls in flight, so long-lived channels rebalance over workers."""


class ScoringServicer(pb_grpc.ScoringServicer):
    """conveyor.scoring.v1.Scoring: converts messages and calls the core."""

    def __init__(self, core: ScoringCore, metrics: ScoringMetrics | None = None) -> None:
        self.core, self.metrics = core, metrics or ScoringMetrics()

    @grpc_errors
    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        result = self.core.score(to_query(request), remaining_deadline(self.core, context))
        self.metrics.observe_score(result)
        return to_response(result)

    @grpc_errors
    def ScoreBatch(
        self, request: pb.ScoreBatchRequest, context: grpc.ServicerContext
    ) -> pb.ScoreBatchResponse:
        check_count("ScoreBatch rows", len(request.rows), MAX_ROWS)
        queries = [to_query(row) for row in request.rows]
        results = self.core.score_many(queries, remaining_deadline(self.core, context))
        if not context.is_active():  # the client cancelled or gave up: nobody to answer
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
        for result in results:
            self.metrics.observe_score(result)
        return pb.ScoreBatchResponse(responses=[to_response(r) for r in results])

    @grpc_errors
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        models = [to_deployed(model) for model in self.core.health()]
        return pb.ListModelsResponse(name=self.core.router.name, models=models)


def to_query(request: pb.ScoreRequest) -> ScoreQuery:
    """A ``ScoreQuery`` from a ``ScoreRequest``; a field without a value, and an id, name
    or text over its length limit (``scoring.grpc_common``), are refused, named."""
    if not request.entity_id:
        raise InvalidInput("entity_id is missing")
    check_count("fields", len(request.fields), MAX_FIELDS)
    fields = {check_length("field name", name): _value(name, value)
              for name, value in request.fields.items()}
    return ScoreQuery(check_length("entity_id", request.entity_id), fields,
                      check_length("model_version", request.model_version) or None,
                      check_length("request_id", request.request_id), observe=request.observe)


def to_response(result: ScoreResult) -> pb.ScoreResponse:
    """The ``ScoreResponse`` of a ``ScoreResult``."""
    return pb.ScoreResponse(
        score=result.score, label=result.label, probabilities=result.probabilities,
        model_version=result.version, fallback=result.fallback,
        fallback_reason=result.fallback_reason or "", latency_ms=result.latency_ms,
        request_id=result.request_id, degraded=result.degraded,
        feature_age_ms=None if result.feature_age_s is None else result.feature_age_s * 1e3,
        feature_ages_ms={name: age * 1e3 for name, age in result.feature_ages_s.items()},
    )


def to_deployed(model: ModelHealth) -> pb.DeployedModel:
    """One ``ListModels`` entry."""
    latency = model.latency
    return pb.DeployedModel(
        version=model.version, model_id=model.model_id, alias=model.alias or "",
        circuit=model.circuit.value, circuit_reason=model.circuit_reason or "",
        latency_count=latency.count, latency_p50_ms=_ms(latency.p50_s),
        latency_p99_ms=_ms(latency.p99_s),
    )


def field_value(value: FieldValue) -> pb.FieldValue:
    """A ``FieldValue`` message from a Python value (clients, the CLI)."""
    if isinstance(value, bool):
        return pb.FieldValue(flag=value)
    if isinstance(value, int):
        return pb.FieldValue(integer=value)
    if isinstance(value, float):
        return pb.FieldValue(number=value)
    return pb.FieldValue(text=str(value))


class ScoringServer:
    """The gRPC server: scoring, the inference protocol, health (SERVING once a model is
    ready) and reflection; TLS and bearer tokens when ``security`` says so."""

    def __init__(
        self, core: ScoringCore, settings: GrpcSettings | None = None, *,
        metrics: ScoringMetrics | None = None, security: ServerSecurity | None = None,
    ) -> None:
        self.core, self.settings = core, settings or GrpcSettings()
        self.metrics, self.security = metrics or ScoringMetrics(), security or ServerSecurity()
        self.health = health.HealthServicer()
        self.services = (SERVICE_NAME, oip.SERVICE_NAME)
        interceptors = [MetricsInterceptor(self.metrics, self.services),
                        *self.security.interceptors()]
        self._server = _grpc_server(self.settings, interceptors)
        pb_grpc.add_ScoringServicer_to_server(ScoringServicer(core, self.metrics), self._server)
        oip.pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            oip.InferenceServicer(core, self.metrics), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)
        self.port = self._listen()

    def _listen(self) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = self.security.credentials()
        if credentials is None:
            return self._server.add_insecure_port(address)
        return self._server.add_secure_port(address, credentials)

    def start(self) -> ScoringServer:
        """Start serving; health follows the core's readiness."""
        self._server.start()
        self.update_health()
        return self

    def update_health(self) -> None:
        """SERVING when at least one model is loaded and warmed up, else NOT_SERVING."""
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if self.core.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            self.health.set(name, status)
        self.metrics.known_versions((m.version, m.alias) for m in self.core.health())

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop taking calls; calls in flight get ``grace_s`` to finish."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()


def _grpc_server(settings: GrpcSettings, interceptors: list[grpc.ServerInterceptor]
                 ) -> grpc.Server:
    size = settings.max_message_bytes
    options = [("grpc.max_receive_message_length", size),
               ("grpc.max_send_message_length", size),
               ("grpc.so_reuseport", int(settings.reuse_port))]
    if settings.max_connection_age_s > 0:
        age_ms = round(settings.max_connection_age_s * 1e3)
        options += [("grpc.max_connection_age_ms", age_ms),
                    ("grpc.max_connection_age_grace_ms", age_ms)]
    return grpc.server(
        ThreadPoolExecutor(settings.threads, thread_name_prefix="grpc"),
        interceptors=interceptors, options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )


def _value(name: str, value: pb.FieldValue) -> FieldValue:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidInput(f"field '{name}' has no value")
    result: FieldValue = getattr(value, kind)
    if kind == "text":
        check_length(f"field '{name}'", value.text, MAX_TEXT_CHARS)
    return result


def _ms(seconds: float) -> float:
    return 0.0 if seconds != seconds else seconds * 1e3  # NaN (no samples) shows as 0
