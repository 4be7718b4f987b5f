"""Preparation Service: RawDataExtracted → fitted feature set → FeaturesGenerated.

For the pipeline whose features read the batch's dataset it waits until every input
dataset has a batch, joins them, fits the feature pipeline on the training part of the
split (so evaluation rows never shape it), transforms every row, writes the offline
feature set, stores the fitted pipeline signed, and materialises each entity's latest
values into the Redis online store. The feature set id is a hash of the spec and the
input batch ids, so a redelivered event finds its work done and only re-announces it.

FeaturesGenerated promises that both stores hold the feature set: the offline record
(written last, so it marks the set complete) and every entity's latest values online,
which scoring reads as soon as a model of this set is promoted. So the online writes are
waited for before the record and the event; they run on a thread of their own (Redis on
its core) while this one runs the transform's later steps, saves the fitted pipeline and
writes the offline data. Publishing the event first would leave a window where a promoted
model meets an incomplete online store, and a crash inside it would never be repaired.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pandas as pd

from common.config import PipelineConfig, load_pipeline_config
from common.events import FeaturesGenerated, RawDataExtracted
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import ModelStore, OfflineFeatureStore, OnlineFeatureStore, RawBatchStore
from common.wiring import Stores
from ingestion.contract import read_batch
from preparation import FittedFeatureSet, build_pipeline, feature_set_id, join_inputs
from preparation.join import missing_inputs

log = logging.getLogger(__name__)


def joined_frame(
    raw_store: RawBatchStore, config: PipelineConfig, batches: dict[str, str]
) -> pd.DataFrame:
    """The input rows of a feature set: each batch typed by its contract, then joined."""
    frames = {dataset: _typed(raw_store, config, batch_id) for dataset, batch_id in batches.items()}
    if config.features.join is None:
        return frames[config.features.inputs[0]]
    return join_inputs(frames, config.features)


def _typed(raw_store: RawBatchStore, config: PipelineConfig, batch_id: str) -> pd.DataFrame:
    contract = config.datasets[raw_store.manifest(batch_id).dataset]
    return read_batch(raw_store, batch_id, contract)


class PreparationService(Service):
    """Turns raw batches into versioned feature sets, offline and online."""

    name = "preparation"
    concurrency = 2  # batches of different datasets go side by side
    prefetch = 1  # long handlers: leave waiting events to the other consumers

    def __init__(
        self,
        config: PipelineConfig,
        raw_store: RawBatchStore,
        offline: OfflineFeatureStore,
        online: OnlineFeatureStore,
        pipelines: ModelStore,
    ) -> None:
        self.config, self.raw_store, self.offline = config, raw_store, offline
        self.online, self.pipelines = online, pipelines

    @handles(RawDataExtracted)
    def on_raw_data_extracted(self, event: RawDataExtracted) -> FeaturesGenerated | None:
        """Build the feature set the batch completes, or wait for the other inputs."""
        if not self.config.reads(event.dataset):
            log.info("dataset %s feeds no feature set; nothing to do", event.dataset)
            return None
        batches = self._input_batches(event)
        missing = missing_inputs(self.config.features, batches)
        if missing:
            log.info("waiting for batches of %s before joining", missing)
            return None
        fsid = feature_set_id(self.config.features, batches.values())
        if not self.offline.exists(fsid):
            self._prepare(fsid, batches)
        return self._announce(event, fsid, batches)

    def _input_batches(self, event: RawDataExtracted) -> dict[str, str]:
        """The batch of each input: this event's for its dataset, the latest accepted one
        for the others."""
        latest = {b.dataset: b.batch_id for b in self.raw_store.list(accepted_only=True)}
        batches = {d: latest[d] for d in self.config.features.inputs if d in latest}
        return {**batches, event.dataset: event.batch_id}

    def _prepare(self, fsid: str, batches: dict[str, str]) -> None:
        frame = joined_frame(self.raw_store, self.config, batches)
        label = self.config.features.label
        train = self.config.split.apply(frame, label).train
        fitted = build_pipeline(self.config.features).fit(train, batches.values())
        with ThreadPoolExecutor(1, thread_name_prefix="online-writes") as pool:
            # Redis runs the online writes on its own core while this one runs the steps
            # after the aggregates, saves the pipeline and writes the offline data.
            features, online = self._transform_and_materialise(fitted, frame, pool)
            self.pipelines.save(fsid, fitted, {"kind": "feature_pipeline", "batch_ids": batches})
            # Last, as before: the offline record marks the feature set complete, so it is
            # written only once the online writes are done.
            self.offline.write(fsid, features, self._metadata(fitted, batches, len(train)),
                               before_record=lambda: [written.result() for written in online])
        log.info("feature set %s: %d rows, %d features", fsid, len(features),
                 len(fitted.feature_names))

    def _transform_and_materialise(
        self, fitted: FittedFeatureSet, frame: pd.DataFrame, writer: Executor
    ) -> tuple[pd.DataFrame, list[Future[int]]]:
        """The offline features, and the online writes of each entity's latest values (its
        aggregates, or its latest features) handed to ``writer`` as soon as they are known."""
        key, timestamp = fitted.entity_key, fitted.spec.timestamp
        if key is None:
            return fitted.transform(frame), []
        writes: list[Future[int]] = []
        if fitted.aggregate_columns:
            def write(latest: pd.DataFrame) -> None:
                writes.append(writer.submit(
                    self.online.write_batch, fitted.feature_set_id, latest.reset_index(), key))

            features, _ = fitted.transform_and_latest(frame, on_latest=write)
            return features, writes
        features = fitted.transform(frame)
        online = features.drop(columns=[c for c in [fitted.label] if c])
        writes.append(writer.submit(
            self.online.materialize, fitted.feature_set_id, online, key, timestamp))
        return features, writes

    def _metadata(self, fitted: FittedFeatureSet, batches: dict[str, str], fit_rows: int) -> dict:
        return {
            "name": self.config.features.name, "pipeline": self.config.name,
            "batch_ids": batches, "features": list(fitted.feature_names),
            "label": fitted.label, "entity_key": fitted.entity_key,
            "timestamp": fitted.spec.timestamp, "fitted_on_rows": fit_rows,
            "spec": self.config.features.model_dump(mode="json"),
        }

    def _announce(
        self, event: RawDataExtracted, fsid: str, batches: dict[str, str]
    ) -> FeaturesGenerated:
        record = self.offline.metadata(fsid)
        return event.caused(
            FeaturesGenerated, producer=self.name, feature_set_id=fsid,
            datasets=sorted(batches), batch_ids=sorted(batches.values()), rows=record.rows,
            features=record.metadata["features"], label=record.metadata["label"],
            entity_key=record.metadata["entity_key"],
        )


def build(settings: Settings) -> PreparationService:
    """The preparation service for the settings."""
    stores = Stores.from_settings(settings)
    config = load_pipeline_config(settings.pipeline_config)
    return PreparationService(
        config, stores.raw, stores.offline, stores.online, stores.feature_pipelines
    )
