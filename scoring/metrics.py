"""Prometheus metrics of the scoring service, recorded at its gRPC edge.

``ScoringMetrics`` holds the metrics, unregistered until ``register(registry)`` adds them
to the registry ``/metrics`` serves (``ScoringService.register_metrics``), so a test can
read them from a registry of its own. ``MetricsInterceptor`` counts every call of the
Scoring and inference services by method and gRPC status; the servicers record each
answer (``observe_score``, ``observe_inference``); the micro-batchers report each predict
call's rows (``observe_batch``, the core's ``on_batch`` hook). Example::

    metrics = ScoringMetrics()
    core = ScoringCore(..., on_batch=metrics.observe_batch)
    server = ScoringServer(core, settings, metrics=metrics)
    metrics.register(registry)
    registry.get_sample_value("conveyor_scoring_requests_total",
                              {"method": "Score", "code": "OK"})

Counts are per row answered (a ``ModelInfer`` of 8 rows is 8 answers); latency is per
answer as the core measured it (one ``ModelInfer`` call is one latency sample). Calls
refused by gRPC itself before any handler runs (a message over the size limit, beyond
``maximum_concurrent_rpcs``) are not counted here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from scoring.core import InferResult, ScoreResult
from scoring.router import FallbackKind

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
METHODS = ("Score", "ScoreBatch", "ListModels", "ServerLive", "ServerReady", "ModelReady",
           "ServerMetadata", "ModelMetadata", "ModelInfer")
"""Methods of conveyor.scoring.v1.Scoring and inference.GRPCInferenceService."""
CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
         "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "INTERNAL")
"""Codes whose series exist from the start for the scoring methods."""
SCORING_METHODS = ("Score", "ScoreBatch", "ModelInfer")
LINKS = ("champion", "previous", "older", "canary", "named")


class ScoringMetrics:
    """The ``conveyor_scoring_*`` metrics (names fixed by the project's metric contract)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "conveyor_scoring_requests", "gRPC calls by method and status code",
            ["method", "code"], registry=None)
        self.rpc_duration = Histogram(
            "conveyor_scoring_rpc_duration_seconds", "Server time of a gRPC call",
            ["method"], buckets=LATENCY_BUCKETS, registry=None)
        self.answers = Counter(
            "conveyor_scoring_answers", "Rows answered, by version and its link",
            ["model_version", "link"], registry=None)
        self.latency = Histogram(
            "conveyor_scoring_latency_seconds", "Core latency of an answer",
            ["model_version", "link"], buckets=LATENCY_BUCKETS, registry=None)
        self.fallbacks = Counter(
            "conveyor_scoring_fallbacks", "Rows answered by a fallback, by answering version",
            ["model_version", "reason"], registry=None)
        self.batch_size = Histogram(
            "conveyor_scoring_batch_size", "Rows per predict call of a model",
            ["model_version"], buckets=BATCH_BUCKETS, registry=None)
        self.degraded = Counter(
            "conveyor_scoring_degraded", "Rows answered without the online store's features",
            registry=None)
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}
        """Each labelled series once looked up (``labels`` validates and locks per call)."""
        self._precreate_calls()

    def register(self, registry: CollectorRegistry) -> None:
        """Add every metric to ``registry`` (the one ``/metrics`` serves)."""
        for metric in (self.requests, self.rpc_duration, self.answers, self.latency,
                       self.fallbacks, self.batch_size, self.degraded):
            registry.register(metric)

    def known_versions(self, roles: Iterable[tuple[str, str | None]]) -> None:
        """Create the series of deployed versions (version, alias) so they start at 0."""
        for version, alias in roles:
            self.batch_size.labels(version)
            for reason in FallbackKind:
                self.fallbacks.labels(version, reason.value)
            role = "older" if alias and alias.startswith("older") else alias  # "older #1"
            for link in (role, "named"):
                if link in LINKS:
                    self.answers.labels(version, link)
                    self.latency.labels(version, link)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished call."""
        self._labelled(self.requests, method, code).inc()
        self._labelled(self.rpc_duration, method).observe(seconds)

    def observe_score(self, result: ScoreResult) -> None:
        """One ``Score`` answer (or one row of ``ScoreBatch``)."""
        self._answered(result.version, result.role, 1, result.latency_ms,
                       result.fallback_kind if result.fallback else None)
        if result.degraded:
            self.degraded.inc()

    def observe_inference(self, result: InferResult) -> None:
        """One ``ModelInfer`` answer of ``len(result.probabilities)`` rows."""
        self._answered(result.version, result.role, len(result.probabilities),
                       result.latency_ms, result.fallback_kind if result.fallback else None)

    def observe_batch(self, version: str, rows: int) -> None:
        """One predict call of a model (the core's ``on_batch`` hook)."""
        self._labelled(self.batch_size, version).observe(rows)

    def _answered(self, version: str, role: str, rows: int, latency_ms: float,
                  fallback: FallbackKind | None) -> None:
        link = role or "champion"
        self._labelled(self.answers, version, link).inc(rows)
        self._labelled(self.latency, version, link).observe(latency_ms / 1e3)
        if fallback is not None:
            self._labelled(self.fallbacks, version, fallback.value).inc(rows)

    def _labelled(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(*labels)
        return series

    def _precreate_calls(self) -> None:
        for method in METHODS:
            self.rpc_duration.labels(method)
            for code in CODES if method in SCORING_METHODS else ("OK",):
                self.requests.labels(method, code)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times the unary calls of the given services, by method and status."""

    def __init__(self, metrics: ScoringMetrics, services: Iterable[str]) -> None:
        self.metrics = metrics
        self.prefixes = tuple(f"/{service}/" for service in services)
        self._timed_handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        """Per method path, the last handler seen and its timed wrapper: the servicer's
        handler is the same object call after call, so it is wrapped once."""

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or handler.unary_unary is None or not path.startswith(self.prefixes):
            return handler
        known = self._timed_handlers.get(path)
        if known is not None and known[0] is handler:
            return known[1]
        timed = grpc.unary_unary_rpc_method_handler(
            self._timed(path.rsplit("/", 1)[-1], handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._timed_handlers[path] = (handler, timed)
        return timed

    def _timed(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]
               ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def timed(request: Any, context: grpc.ServicerContext) -> Any:
            began, failed = time.perf_counter(), True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                self.metrics.observe_rpc(method, _code_name(context, failed),
                                         time.perf_counter() - began)
        return timed


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    """The call's status: the one the handler set (abort), else OK, or UNKNOWN if it raised."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if failed else "OK"
