"""Preparation Service: RawDataExtracted → fitted feature set → FeaturesGenerated.

For the pipeline whose features read the batch's dataset it waits until every input
dataset has a batch, joins them, fits the feature pipeline on the training part of the
split (so evaluation rows never shape it), transforms every row, stores the fitted
pipeline signed and writes the offline feature set, with each entity's latest values
beside it. The feature set id is a hash of the spec and the input batch ids, so a
redelivered event finds its work done and only re-announces it.

FeaturesGenerated promises the offline feature set (its record, written last, marks it
complete): training starts at once. The service consumes its own FeaturesGenerated too
and materialises the kept latest values into the Redis online store, then marks the set
complete there; so Redis takes the writes while the candidates train, not while the
transform runs. Evaluation waits for that mark before it promotes a model of the set,
so a promoted model never meets an incomplete online store. The event is acknowledged
only after the mark: a crash in between redelivers it and the writes, idempotent (last
write wins, equal times overwrite), run again.
"""

from __future__ import annotations

import logging

import pandas as pd

from common.config import PipelineConfig, load_pipeline_config
from common.errors import NotFound
from common.events import FeaturesGenerated, RawDataExtracted
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import ModelStore, OfflineFeatureStore, OnlineFeatureStore, RawBatchStore
from common.stores.features import latest_rows
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

    @handles(FeaturesGenerated)
    def on_features_generated(self, event: FeaturesGenerated) -> None:
        """Materialise the feature set's latest values per entity into the online store.

        Runs while training trains (evaluation waits for it before promoting); a set this
        service did not write, or one already marked complete, is left alone."""
        fsid = event.feature_set_id
        if event.entity_key is None or self.online.is_complete(fsid):
            return
        try:
            latest = self.offline.read_online(fsid)
        except NotFound:
            log.info("feature set %s keeps no online rows; nothing to materialise", fsid)
            return
        timestamp = self.offline.metadata(fsid).metadata.get("online_timestamp")
        written = self.online.write_batch(fsid, latest, event.entity_key,
                                          timestamp_column=timestamp)
        self.online.mark_complete(fsid, len(latest))
        log.info("feature set %s: %d entities online (%d rows written)", fsid, len(latest),
                 written)

    def _prepare(self, fsid: str, batches: dict[str, str]) -> None:
        frame = joined_frame(self.raw_store, self.config, batches)
        label = self.config.features.label
        train = self.config.split.apply(frame, label).train
        fitted = build_pipeline(self.config.features).fit(train, batches.values())
        features, online, timestamp = self._transform(fitted, frame)
        self.pipelines.save(fsid, fitted, {"kind": "feature_pipeline", "batch_ids": batches})
        metadata = {**self._metadata(fitted, batches, len(train)), "online_timestamp": timestamp}
        self.offline.write(fsid, features, metadata, online=online)
        log.info("feature set %s: %d rows, %d features", fsid, len(features),
                 len(fitted.feature_names))

    @staticmethod
    def _transform(
        fitted: FittedFeatureSet, frame: pd.DataFrame
    ) -> tuple[pd.DataFrame, pd.DataFrame | None, str | None]:
        """The offline features, each entity's latest values for the online store (its
        aggregates, or its latest features; None without an entity key) and the column
        that times those values (None: the time of writing)."""
        key, timestamp = fitted.entity_key, fitted.spec.timestamp
        if key is None:
            return fitted.transform(frame), None, None
        if fitted.aggregate_columns:
            features, latest = fitted.transform_and_latest(frame)
            return features, latest.reset_index(), None
        features = fitted.transform(frame)
        online = features.drop(columns=[c for c in [fitted.label] if c])
        return features, latest_rows(online, key, timestamp), timestamp

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
