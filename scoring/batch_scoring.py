"""Offline batch scoring's runs: what a BatchScoringRequested reads, scores and writes.

``BatchScoring`` is shared by the two services that handle the event (the scoring service,
unless ``CONVEYOR_SCORING_BATCH=false``, and the batch-scoring service): it resolves the
version the event names, loads and verifies the model and its fitted feature set, and
scores the event's feature set or raw batch (``scoring.offline``) in this process or on a
Dask cluster, writing the scores once per run (the run id comes from the request's
content, so a redelivered request reuses the run). Example::

    batch = batch_scoring(Stores.from_settings(settings), registry, settings.data_root,
                          config.datasets)     # the compute setting from the environment
    completed = batch.completed(event, producer="batch-scoring")  # a ScoringCompleted
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from common.compute import Compute, ComputeSettings, compute_settings, open_compute
from common.errors import InvalidInput
from common.events import BatchScoringRequested, ScoringCompleted
from common.stores import (
    BatchScoreStore,
    ModelRegistry,
    ModelStore,
    OfflineFeatureStore,
    RawBatch,
    RawBatchStore,
)
from common.wiring import Stores
from ingestion.contract import DatasetContract, read_typed
from scoring.offline import (
    DEFAULT_CHUNK_ROWS,
    BatchModel,
    Progress,
    score_features,
    score_features_on_cluster,
    score_raw,
    score_raw_on_cluster,
)

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


@dataclass(eq=False)
class BatchScoring:
    """What offline batch scoring reads and writes: models, raw batches, feature sets.

    Where it scores follows ``compute`` (``CONVEYOR_COMPUTE``): with pandas in this
    process, ``chunk_rows`` at a time, into one Parquet file (``local``); or partition by
    partition on a Dask cluster, whose workers write the scores as parts
    (``scoring.offline.score_raw_on_cluster``, ``score_features_on_cluster``). The cluster
    is opened at the first run that needs it (a scoring worker that never scores a batch
    starts none) and let go by ``close``. A raw batch the cluster cannot read (not typed
    by its contract as stored) is scored in this process, logged.
    """

    registry: ModelRegistry
    models: ModelStore
    pipelines: ModelStore
    raw: RawBatchStore
    offline: OfflineFeatureStore
    scores: BatchScoreStore
    datasets: Mapping[str, DatasetContract]
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    compute: ComputeSettings = field(default_factory=lambda: ComputeSettings(compute="local"))
    _cluster: Compute | None = field(default=None, init=False, repr=False)
    _opening: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def run(self, event: BatchScoringRequested) -> tuple[str, str, int]:
        """Score the event's input; (version, uri, rows). A run already written is reused."""
        version, model_id = self.resolve(event.model_version)
        run_id = batch_run_id(model_id, event)
        if not self.scores.exists(run_id):
            model = self.load(version, model_id)
            client = self._client()
            if client is None or not self._on_cluster(client, model, event, run_id):
                self.scores.write(run_id, self.score(model, event, run_id))
        return version, self.scores.uri(run_id), self.scores.rows(run_id)

    def completed(self, event: BatchScoringRequested, producer: str) -> ScoringCompleted:
        """Score the event's input (``run``) and say so: the ScoringCompleted to publish."""
        version, uri, rows = self.run(event)
        log.info("batch scores of version %s: %d rows at %s (event %s, correlation %s)",
                 version, rows, uri, event.event_id, event.correlation_id)
        return event.caused(ScoringCompleted, producer=producer, model_version=version,
                            uri=uri, rows=rows)

    def close(self) -> None:
        """Let go of the cluster, if a run opened one."""
        with self._opening:
            cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()

    def resolve(self, version: str | None) -> tuple[str, str]:
        """(version, model id) of a version or alias; None means the champion."""
        if version in (None, "champion"):
            entry = self.registry.champion()
            return entry.version, entry.model_id
        if version == "previous":
            entry = self.registry.previous()
            return entry.version, entry.model_id
        return version, self.registry.model_id_of(version)  # ModelNotFound names it

    def load(self, version: str, model_id: str) -> BatchModel:
        """The model and its fitted feature set, both signature-verified."""
        metadata = self.models.metadata(model_id).metadata
        fitted = self.pipelines.load(metadata["feature_set_id"])
        names = list(metadata.get("features") or fitted.feature_names)
        return BatchModel(version, self.models.load(model_id), fitted, names)

    def score(self, model: BatchModel, event: BatchScoringRequested, run_id: str) -> pd.DataFrame:
        """The scores of the event's feature set, or else of its raw batch (in process)."""
        progress = _progress_log(event, run_id, "chunk")
        if event.feature_set_id:
            frame = self.offline.read(event.feature_set_id,
                                      self._feature_columns(model, event.feature_set_id))
            return score_features(model, frame, chunk_rows=self.chunk_rows, progress=progress)
        assert event.batch_id is not None  # the event requires one of the two
        frame = self._raw_batch(model, event.batch_id)
        return score_raw(model, frame, chunk_rows=self.chunk_rows, progress=progress)

    def _client(self) -> Client | None:
        """The cluster's client (opened now if not yet), or None on the ``local`` path."""
        if self.compute.mode == "local":
            return None
        with self._opening:
            if self._cluster is None:
                self._cluster = open_compute(self.compute)
            return self._cluster.client

    def _on_cluster(self, client: Client, model: BatchModel, event: BatchScoringRequested,
                    run_id: str) -> bool:
        """Score on the cluster, the workers writing the parts; False: not there (a raw
        batch the cluster cannot read), for the caller to score in process."""
        from preparation.distributed import (
            NotDistributable,
            plain_strings,
            read_batch_dask,
            read_features_dask,
        )

        progress = _progress_log(event, run_id, "part")
        with plain_strings():
            if event.feature_set_id:
                frame = read_features_dask(self.offline, event.feature_set_id,
                                           self._feature_columns(model, event.feature_set_id))
                score_features_on_cluster(client, model, frame, self.scores, run_id,
                                          progress=progress)
                return True
            assert event.batch_id is not None  # the event requires one of the two
            contract = self.datasets[self._raw_manifest(model, event.batch_id).dataset]
            try:
                frame = read_batch_dask(client, self.raw, event.batch_id, contract)
            except NotDistributable as reason:
                log.info("batch scoring run %s in this process: %s (event %s, correlation "
                         "%s)", run_id, reason, event.event_id, event.correlation_id)
                return False
            score_raw_on_cluster(client, model, frame, self.scores, run_id, progress=progress)
        return True

    def _feature_columns(self, model: BatchModel, feature_set_id: str) -> list[str]:
        """The columns of the model's own feature set scoring reads (``InvalidInput`` for
        another model's set, ``NotFound`` for an unknown one)."""
        self.offline.metadata(feature_set_id)  # NotFound names it
        if feature_set_id != model.feature_set_id:
            raise InvalidInput(
                f"model version {model.version} was trained on feature set "
                f"{model.feature_set_id}, not {feature_set_id}: score a raw batch instead")
        key = model.features.entity_key
        return [*model.feature_names, *([key] if key else [])]

    def _raw_manifest(self, model: BatchModel, batch_id: str) -> RawBatch:
        """The batch's manifest, if it is the single input of the model's features."""
        batch = self.raw.manifest(batch_id)  # NotFound names it
        spec = model.features.spec
        if spec.join is not None or batch.dataset not in spec.inputs:
            raise InvalidInput(
                f"raw batch {batch_id} (dataset {batch.dataset}) is not the single input of "
                f"model version {model.version}'s features (inputs {', '.join(spec.inputs)})")
        return batch

    def _raw_batch(self, model: BatchModel, batch_id: str) -> pd.DataFrame:
        batch = self._raw_manifest(model, batch_id)
        return read_typed(self.raw.iter_frames(batch_id), self.datasets[batch.dataset],
                          batch.source_uri)


def batch_scoring(stores: Stores, registry: ModelRegistry, data_root: str,
                  datasets: Mapping[str, DatasetContract],
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> BatchScoring:
    """A service's BatchScoring: its stores and registry, scores under ``data_root``, and
    ``CONVEYOR_COMPUTE`` from the environment."""
    return BatchScoring(registry, stores.models, stores.feature_pipelines, stores.raw,
                        stores.offline, BatchScoreStore(data_root), datasets, chunk_rows,
                        compute_settings())


def _progress_log(event: BatchScoringRequested, run_id: str, unit: str) -> Progress:
    def progress(done: int, count: int, rows: int) -> None:
        log.info("batch scoring run %s: %s %d of %d done, %d rows (event %s, correlation %s)",
                 run_id, unit, done, count, rows, event.event_id, event.correlation_id)
    return progress


def batch_run_id(model_id: str, event: BatchScoringRequested) -> str:
    """The run id of a request, from its content: the same request writes the same file."""
    content = {"model_id": model_id, "feature_set_id": event.feature_set_id,
               "batch_id": event.batch_id}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return f"batch-{digest[:16]}"
