"""The online scoring service: the gRPC server beside the usual HTTP probes; hot swap;
served scores reported off the request path; offline batch scoring.

``build`` loads the registry chain (signatures verified, models warmed) and starts the
gRPC server on ``CONVEYOR_GRPC_PORT``; ``ModelReady`` puts a new champion in front
without failing a request; ``ready()`` is true only with a model loaded. Every answer is
handed to a ``ScoreReporter``, which writes it to the score stream and publishes it as
``ScoreServed`` from its own thread. ``BatchScoringRequested`` scores a raw batch or a
feature set on the consumer thread (the gRPC threads keep answering), writes the scores
as Parquet and answers ``ScoringCompleted``. Example::

    conveyor run scoring            # gRPC on :50051, /metrics /healthz /readyz on :9100
    conveyor publish BatchScoringRequested --json '{"batch_id": "9c1e...", "model_version": "v2"}'
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.bus.dispatch import HandlerSpec
from common.bus.rabbitmq import RabbitMQBus
from common.errors import InvalidInput, NotFound
from common.events import BatchScoringRequested, ModelDegraded, ModelReady, ScoringCompleted
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import (
    ModelRegistry,
    ModelStore,
    OnlineScoreStore,
    RedisOnlineStore,
)
from common.stores.entity_state import RedisEntityState
from common.wiring import Stores
from preparation.spec import FeatureSections
from scoring.batch_scoring import BatchScoring, batch_scoring
from scoring.core import CoreSettings, ScoringCore
from scoring.grpc_common import check_listen
from scoring.metrics import ScoringMetrics
from scoring.observing import RecordObserver
from scoring.offline import DEFAULT_CHUNK_ROWS
from scoring.reporting import (
    ReportsDroppedCollector,
    ReportSettings,
    ScoreReporter,
    event_sink,
    stream_sink,
)
from scoring.security import ServerSecurity
from scoring.server import GrpcSettings, ScoringServer
from scoring.workers import WorkerMetrics, WorkerPool, WorkerSlot, available_cpus

log = logging.getLogger(__name__)
REPORT_REDIS_TIMEOUT_S = 5.0
SLOT_INTERVAL_S = 0.2  # how often a worker tells its supervisor whether it is ready


class ScoringSettings(BaseSettings):
    """Settings of the scoring service (prefix ``CONVEYOR_``)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    grpc_host: str = "0.0.0.0"
    """Address the gRPC server listens on (all interfaces: a pod's; 127.0.0.1: this host)."""
    grpc_port: int = 50051
    """Port of the gRPC server (0 picks a free one)."""
    grpc_allow_insecure: bool = False
    """Allow listening beyond loopback without bearer tokens, or tokens without TLS (a
    trusted private network); logged as a warning. Local development allows it too."""
    grpc_threads: int = 32
    """Threads serving gRPC calls."""
    grpc_max_concurrent_rpcs: int = 256
    """Calls in flight beyond which gRPC answers RESOURCE_EXHAUSTED."""
    grpc_max_connection_age_s: float = 0.0
    """Close client connections this old (with a grace for their calls), so long-lived
    channels rebalance over workers and replicas; 0 keeps them (clients that open
    several channels spread their load by themselves)."""
    scoring_workers: int = 0
    """Worker processes sharing the gRPC port (each its own GIL, models and batchers);
    0 means one per CPU this container may use (affinity, cgroup quota). With port 0 the
    service is one instance."""
    scoring_deadline_s: float = CoreSettings.deadline_s
    """Deadline of a call that brings none; a client's own deadline is kept."""
    scoring_max_deadline_s: float = CoreSettings.max_deadline_s
    """The longest deadline a client may bring; a longer one is cut to this."""
    scoring_latency_budget_s: float = CoreSettings.latency_budget_s
    """p99 latency budget of a link; past it, its circuit opens."""
    scoring_chain_depth: int = CoreSettings.chain_depth
    """Versions kept deployed (champion, previous, older); older ones are retired."""
    scoring_freeze_gc: bool = True
    """Keep the loaded models out of full garbage collections (``CoreSettings.freeze_gc``):
    a full collection walking them stalls every call for ~0.1 s."""
    scoring_redis_timeout_s: float = 0.1
    """Connect and read timeout of the online feature reads: a dead Redis fails fast."""
    score_report_buffer_size: int = ReportSettings.buffer_size
    """Served scores held for reporting; when full (broker or Redis down) the oldest go."""
    score_report_flush_interval_s: float = ReportSettings.flush_interval_s
    """Longest wait before served scores go to the score stream and ScoreServed events."""
    score_report_flush_size: int = ReportSettings.flush_size
    """Served scores that trigger a flush at once; the most per ScoreServed event."""
    batch_scoring_chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Rows transformed and predicted at a time by offline batch scoring."""
    scoring_batch: bool = True
    """Handle BatchScoringRequested here too; false where the batch-scoring service does
    (``conveyor run batch-scoring``: the Kubernetes batch-scoring Deployment)."""
    grpc_auth_tokens: str = ""
    """Accepted bearer tokens, comma-separated; none (and no file): no authentication."""
    grpc_auth_tokens_file: str = ""
    """A file of accepted bearer tokens, one per line (a mounted Secret), added to those."""
    grpc_tls_cert: str = ""
    """PEM certificate (chain) of the gRPC server; with the key, the server speaks TLS."""
    grpc_tls_key: str = ""
    """PEM private key of that certificate."""
    grpc_tls_client_ca: str = ""
    """PEM CA of client certificates: clients must present one it signed (mutual TLS)."""
    scoring_inject_delay_ms: float = 0.0
    """Fault injection for demos and drills, off at 0: every predict call of the version
    ``SCORING_INJECT_DELAY_VERSION`` first sleeps this many milliseconds (a slow model)."""
    scoring_inject_delay_version: str = ""
    """The version ``SCORING_INJECT_DELAY_MS`` slows."""

    def core(self) -> CoreSettings:
        """The scoring core's part of the settings."""
        return CoreSettings(deadline_s=self.scoring_deadline_s,
                            max_deadline_s=self.scoring_max_deadline_s,
                            latency_budget_s=self.scoring_latency_budget_s,
                            chain_depth=self.scoring_chain_depth,
                            inject_delay_s=self.scoring_inject_delay_ms / 1e3,
                            inject_delay_version=self.scoring_inject_delay_version,
                            freeze_gc=self.scoring_freeze_gc)

    def security(self) -> ServerSecurity:
        """The token list and TLS material; a file that cannot be read fails, naming it."""
        return ServerSecurity.from_settings(
            tokens=self.grpc_auth_tokens, tokens_file=self.grpc_auth_tokens_file,
            cert_file=self.grpc_tls_cert, key_file=self.grpc_tls_key,
            client_ca_file=self.grpc_tls_client_ca)


class ScoringService(Service):
    """Serves scores over gRPC; swaps in each new champion on ModelReady; scores batches.

    Every instance (every worker of every replica) hears ModelReady and ModelDegraded on
    a queue of its own (``broadcast``) and reconciles with the registry, the source of
    truth, each time that queue is attached; BatchScoringRequested stays one shared
    queue (one instance scores a batch). Readiness is a warmed model, not the broker.
    """

    name = "scoring"
    prefetch = 1  # a batch run is long: the next event waits in the queue, not here
    broadcast = frozenset({"ModelReady", "ModelDegraded"})
    ready_needs_broker = False

    def __init__(
        self, core: ScoringCore, server: ScoringServer, *,
        reporter: ScoreReporter | None = None, batch: BatchScoring | None = None,
        observer: RecordObserver | None = None,
    ) -> None:
        self.core, self.server, self.reporter, self.batch = core, server, reporter, batch
        self.observer = observer
        self._swap = threading.Lock()  # handlers and reconciles run on different threads

    @handles(ModelReady)
    def on_model_ready(self, event: ModelReady) -> None:
        """Load, verify and warm the new version, then put it in front (hot swap); an
        event whose model id is not the registry's for its version is refused."""
        registered = self.core.registry.model_id_of(event.version)  # ModelNotFound: retried
        if registered != event.model_id:
            raise InvalidInput(f"ModelReady names model {event.model_id} for version "
                               f"{event.version}, the registry {registered}: not loaded")
        with self._swap:
            chain = self.core.on_model_ready(event)
            self.server.update_health()
        log.info("serving chain %s after ModelReady %s (correlation %s)",
                 chain, event.event_id, event.correlation_id)

    @handles(ModelDegraded)
    def on_model_degraded(self, event: ModelDegraded) -> None:
        """Revert a degraded version: the previous one serves (answers say fallback). The
        registry reverts once however many instances ask (``ModelRegistry.revert``)."""
        reason = f"{event.reason} {event.observed:.4g} against {event.expected:.4g}"
        with self._swap:
            chain = self.core.demote(event.model_version, reason)
        log.warning("model %s demoted (%s); serving chain %s (event %s, correlation %s)",
                    event.model_version, reason, chain, event.event_id, event.correlation_id)

    def reconcile(self) -> None:
        """Serve the registry's chain: what a ModelReady or a revert missed while this
        instance had no queue is caught up (at start and after each reconnect)."""
        with self._swap:
            chain = self.core.load_chain()
            self.server.update_health()
        log.info("reconciled with the registry: serving chain %s", chain)

    def handler_specs(self) -> dict[str, HandlerSpec]:
        """Its handlers; built without batch scoring, it leaves BatchScoringRequested to
        the batch-scoring service (its queue is not bound to that event)."""
        specs = super().handler_specs()
        if self.batch is None:
            specs.pop("BatchScoringRequested", None)
        return specs

    @handles(BatchScoringRequested, expected=(NotFound,))
    def on_batch_scoring_requested(self, event: BatchScoringRequested) -> ScoringCompleted:
        """Score a raw batch or a feature set offline; the scores go to the score store."""
        if self.batch is None:
            raise InvalidInput("this scoring service was built without batch scoring")
        return self.batch.completed(event, self.name)

    def ready(self) -> bool:
        """Ready only with a model loaded and warmed up."""
        return self.core.ready

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The server's conveyor_scoring_* metrics and conveyor_scoring_reports_dropped_total."""
        self.server.metrics.register(registry)
        if self.reporter is not None:
            registry.register(ReportsDroppedCollector(self.reporter))

    def close(self) -> None:
        """Stop the gRPC server, flush the score reports, then stop the batchers."""
        self.server.stop()
        if self.reporter is not None:
            self.reporter.close()
        if self.observer is not None:
            self.observer.close()
        if self.batch is not None:
            self.batch.close()
        self.core.close()


def fail_fast_redis(url: str, timeout_s: float) -> redis.Redis:
    """A client whose calls fail within about ``2 * timeout_s`` when Redis is down or hung.

    redis-py's default retries back off for seconds within the call; here one immediate
    retry on a fresh connection, so a connection left broken by a Redis restart costs no
    request, and a Redis that stays down fails fast. The service recovers by itself.
    """
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1))


def build(settings: Settings, config: FeatureSections) -> Service:
    """The scoring service: one instance in this process, or, with several workers and
    a fixed port, a supervisor of that many forked instances sharing the port (port 0,
    the tests' free port, cannot be shared: one instance)."""
    own = ScoringSettings()
    # first: a bad or unsafe security setting fails before anything starts
    problem = check_listen(own.grpc_host, own.security(),
                           allowed=own.grpc_allow_insecure or settings.local_dev)
    if problem:
        log.warning("insecure gRPC listen allowed (CONVEYOR_GRPC_ALLOW_INSECURE or "
                    "CONVEYOR_LOCAL_DEV): %s", problem)
    workers = own.scoring_workers or available_cpus()
    if workers <= 1 or own.grpc_port == 0:
        return build_instance(settings, config, own)
    return build_supervisor(settings, config, own, workers)


def build_instance(
    settings: Settings, config: FeatureSections, own: ScoringSettings, *,
    reuse_port: bool = False,
    models: ModelStore | None = None, pipelines: ModelStore | None = None,
) -> ScoringService:
    """One scoring instance, its chain loaded, its reporter and gRPC server started;
    ``reuse_port`` shares the port with the other workers; ``models`` and ``pipelines``
    replace the settings' stores (a worker's, preloaded before the fork)."""
    security = own.security()
    metrics = ScoringMetrics()
    stores = Stores.from_settings(settings)
    registry = stores.registry(settings, config.name)
    client = fail_fast_redis(settings.redis_url, own.scoring_redis_timeout_s)
    reporter = _reporter(settings, own)
    observer = _observer(settings, config)
    core = ScoringCore(
        models or stores.models, pipelines or stores.feature_pipelines, registry,
        RedisOnlineStore(client, settings.namespace, settings.online_ttl_s),
        replace(own.core(), max_feature_age_s=settings.max_feature_age_s),
        on_served=reporter.report, on_inferred=reporter.report_inferred,
        on_batch=metrics.observe_batch,
        state=RedisEntityState(client, settings.namespace) if settings.stream_state else None,
        on_observed=observer.observe,
    )
    observer.start()
    core.load_chain()
    batch = batch_scoring(stores, registry, settings.data_root, config.datasets,
                          own.batch_scoring_chunk_rows) if own.scoring_batch else None
    grpc_settings = GrpcSettings(host=own.grpc_host, port=own.grpc_port,
                                 threads=own.grpc_threads,
                                 max_concurrent_rpcs=own.grpc_max_concurrent_rpcs,
                                 reuse_port=reuse_port,
                                 max_connection_age_s=own.grpc_max_connection_age_s)
    server = ScoringServer(core, grpc_settings, metrics=metrics, security=security).start()
    return ScoringService(core, server, reporter=reporter.start(), batch=batch,
                          observer=observer)


class ScoringSupervisor(Service):
    """The parent of the scoring workers: no handlers of its own (each worker consumes),
    ready while a worker is, its /metrics the workers' (all of them) under a ``worker``
    label."""

    name = "scoring"
    ready_needs_broker = False
    exports_bus_metrics = False  # the workers' are re-exposed, labelled by worker

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def ready(self) -> bool:
        """Ready while at least one live worker has a warmed model."""
        return self.pool.ready()

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The workers' metrics, labelled by worker."""
        registry.register(WorkerMetrics(self.pool))

    def close(self) -> None:
        """Stop the workers (each finishes its calls in flight and flushes its reports)."""
        self.pool.stop()


def build_supervisor(settings: Settings, config: FeatureSections, own: ScoringSettings,
                     workers: int) -> ScoringSupervisor:
    """Read the registry chain's models once, then fork ``workers`` instances on the port."""
    stores = Stores.from_settings(settings)
    registry = stores.registry(settings, config.name)
    models, pipelines = preloaded(stores, registry, own.scoring_chain_depth)

    def run_worker(slot: WorkerSlot) -> None:
        run_scoring_worker(settings, config, own, slot, models, pipelines)

    log.info("starting %d scoring workers on port %d", workers, own.grpc_port)
    return ScoringSupervisor(WorkerPool(workers, run_worker).start())


def run_scoring_worker(settings: Settings, config: FeatureSections, own: ScoringSettings,
                       slot: WorkerSlot, models: ModelStore, pipelines: ModelStore) -> None:
    """A worker process: one instance on the shared port, consuming as a service does
    (its metrics and probes on a loopback port of its own, for the supervisor), until
    SIGTERM."""
    from common.runtime import ServiceRunner, redis_processed, stop_on_signals

    service = build_instance(settings, config, own, reuse_port=True, models=models,
                             pipelines=pipelines)
    local = settings.model_copy(update={"http_host": "127.0.0.1", "http_port": 0})
    bus = RabbitMQBus(settings, name=f"scoring-worker-{slot.index}")
    runner = ServiceRunner(service, bus, local, processed=redis_processed(settings))
    stop = threading.Event()
    stop_on_signals(stop)
    threading.Thread(target=_tell_supervisor, args=(runner, slot, stop), daemon=True,
                     name="worker-slot").start()
    runner.run(stop)


def _tell_supervisor(runner: Any, slot: WorkerSlot, stop: threading.Event) -> None:
    """Keep the worker's slot current: ready or not, and its metrics port."""
    while True:
        slot.set_ready(runner.service.ready())
        if runner.http is not None:
            slot.set_metrics_port(runner.http.port)
        if stop.wait(SLOT_INTERVAL_S):
            return


class PreloadedModelStore(ModelStore):
    """A ``ModelStore`` that answers some ids with objects loaded (and verified) before the
    workers were forked, so they start from the same pages; the rest it loads as usual."""

    def __init__(self, store: ModelStore, loaded: dict[str, Any]) -> None:  # noqa: D107
        self.__dict__.update(store.__dict__)  # the same root and keys, without re-reading
        self.loaded = loaded

    def load(self, model_id: str) -> Any:
        if model_id in self.loaded:
            return self.loaded[model_id]
        return super().load(model_id)


def preloaded(stores: Stores, registry: ModelRegistry, depth: int
              ) -> tuple[ModelStore, ModelStore]:
    """The model and feature-set stores with the registry chain's first ``depth`` versions
    (models and their fitted feature sets) already loaded."""
    models: dict[str, Any] = {}
    pipelines: dict[str, Any] = {}
    for entry in registry.chain()[:depth]:
        models[entry.model_id] = stores.models.load(entry.model_id)
        feature_set_id = stores.models.metadata(entry.model_id).metadata["feature_set_id"]
        if feature_set_id not in pipelines:
            pipelines[feature_set_id] = stores.feature_pipelines.load(feature_set_id)
    return (PreloadedModelStore(stores.models, models),
            PreloadedModelStore(stores.feature_pipelines, pipelines))


def _observer(settings: Settings, config: FeatureSections) -> RecordObserver:
    """Score-then-record: observed records published as RecordsObserved of the feature
    set's dataset, on a connection of their own."""
    bus = RabbitMQBus(settings, name=f"{settings.namespace}-scoring-records")
    return RecordObserver(bus.publish_many, dataset=config.features.inputs[0],
                          entity_key=config.features.entity_key or "entity_id",
                          on_close=bus.close)


def _reporter(settings: Settings, own: ScoringSettings) -> ScoreReporter:
    """Served scores to the score stream and as ScoreServed events, on connections of
    their own (off the request path: patient timeouts, a publisher of its own)."""
    bus = RabbitMQBus(settings, name=f"{settings.namespace}-scoring-reports")
    client = fail_fast_redis(settings.redis_url, REPORT_REDIS_TIMEOUT_S)  # retried next cycle
    stream = OnlineScoreStore(client, settings.namespace, settings.score_stream_maxlen)
    report = ReportSettings(buffer_size=own.score_report_buffer_size,
                            flush_interval_s=own.score_report_flush_interval_s,
                            flush_size=own.score_report_flush_size)
    return ScoreReporter([stream_sink(stream), event_sink(bus.publish_many)], report,
                         on_close=bus.close)
