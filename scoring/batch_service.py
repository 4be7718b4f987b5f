"""Offline batch scoring as a service of its own: ``conveyor run batch-scoring``.

The online scoring service handles ``BatchScoringRequested`` too, unless
``CONVEYOR_SCORING_BATCH=false``; on Kubernetes the batch-scoring Deployment runs this
service and the scoring Deployment sets that, so a large batch takes its own pod's memory
and CPU, never those of the pods answering Score calls. Nothing is loaded at start: each
request loads (and verifies) the version it names. With ``CONVEYOR_COMPUTE`` set to a
Dask target the batch is scored partition by partition on that cluster, the scores
written as parts by its workers (the cluster opened at the first request). Example::

    CONVEYOR_SCORING_BATCH=false conveyor run scoring
    conveyor run batch-scoring
"""

from __future__ import annotations

from common.errors import NotFound
from common.events import BatchScoringRequested, ScoringCompleted
from common.runtime import Service, handles
from common.settings import Settings
from common.wiring import Stores
from preparation.spec import FeatureSections
from scoring.batch_scoring import BatchScoring, batch_scoring
from scoring.service import ScoringSettings


class BatchScoringService(Service):
    """Scores raw batches and feature sets offline; the scores go to the score store."""

    name = "batch-scoring"
    prefetch = 1  # a run is long: the next request waits in the queue, not here

    def __init__(self, batch: BatchScoring) -> None:
        self.batch = batch

    @handles(BatchScoringRequested, expected=(NotFound,))
    def on_batch_scoring_requested(self, event: BatchScoringRequested) -> ScoringCompleted:
        """Score the event's raw batch or feature set with the version it names."""
        return self.batch.completed(event, self.name)

    def close(self) -> None:
        """Let go of the cluster, if a run opened one."""
        self.batch.close()


def build(settings: Settings, config: FeatureSections) -> BatchScoringService:
    """The batch-scoring service on the settings' stores and pipeline config."""
    stores = Stores.from_settings(settings)
    return BatchScoringService(batch_scoring(
        stores, stores.registry(settings, config.name), settings.data_root, config.datasets,
        ScoringSettings().batch_scoring_chunk_rows))
