"""The online scoring service: the gRPC server beside the usual HTTP probes; hot swap.

``build`` loads the registry chain (signatures verified, models warmed) and starts the
gRPC server on ``CONVEYOR_GRPC_PORT``; ``ModelReady`` puts a new champion in front
without failing a request; ``ready()`` is true only with a model loaded. Example::

    conveyor run scoring            # gRPC on :50051, /metrics /healthz /readyz on :9100
"""

from __future__ import annotations

import logging

from pydantic_settings import BaseSettings, SettingsConfigDict

from common.config import load_pipeline_config
from common.events import ModelReady
from common.runtime import Service, handles
from common.settings import Settings
from common.wiring import Stores
from scoring.core import CoreSettings, ScoringCore
from scoring.server import GrpcSettings, ScoringServer

log = logging.getLogger(__name__)


class ScoringSettings(BaseSettings):
    """Settings of the scoring service (prefix ``CONVEYOR_``)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    grpc_port: int = 50051
    """Port of the gRPC server (0 picks a free one)."""
    grpc_threads: int = 32
    """Threads serving gRPC calls."""
    grpc_max_concurrent_rpcs: int = 256
    """Calls in flight beyond which gRPC answers RESOURCE_EXHAUSTED."""
    scoring_deadline_s: float = CoreSettings.deadline_s
    """Deadline of a call that brings none (a shorter client deadline wins)."""
    scoring_latency_budget_s: float = CoreSettings.latency_budget_s
    """p99 latency budget of a link; past it, its circuit opens."""


class ScoringService(Service):
    """Serves scores over gRPC; swaps in each new champion on ModelReady."""

    name = "scoring"

    def __init__(self, core: ScoringCore, server: ScoringServer) -> None:
        self.core, self.server = core, server

    @handles(ModelReady)
    def on_model_ready(self, event: ModelReady) -> None:
        """Load, verify and warm the new version, then put it in front (hot swap)."""
        chain = self.core.on_model_ready(event)
        self.server.update_health()
        log.info("serving chain %s after ModelReady %s (correlation %s)",
                 chain, event.event_id, event.correlation_id)

    def ready(self) -> bool:
        """Ready only with a model loaded and warmed up."""
        return self.core.ready

    def close(self) -> None:
        """Stop the gRPC server, then the batchers."""
        self.server.stop()
        self.core.close()


def build(settings: Settings) -> ScoringService:
    """The scoring service, its chain loaded and its gRPC server started."""
    own = ScoringSettings()
    stores = Stores.from_settings(settings)
    config = load_pipeline_config(settings.pipeline_config)
    core = ScoringCore(
        stores.models, stores.feature_pipelines, stores.registry(settings, config.name),
        stores.online, CoreSettings(deadline_s=own.scoring_deadline_s,
                                    latency_budget_s=own.scoring_latency_budget_s),
    )
    core.load_chain()
    grpc_settings = GrpcSettings(port=own.grpc_port, threads=own.grpc_threads,
                                 max_concurrent_rpcs=own.grpc_max_concurrent_rpcs)
    return ScoringService(core, ScoringServer(core, grpc_settings).start())
