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
write wins, equal times overwrite), run again. After the mark it registers the set with
the stream and writes its entity state from the batch (``preparation.streaming``), then
marks that ready: scoring reads the latest rows until then, the state after, which
streamed records keep fresh. A redelivery redoes only what is not marked. Last, the
feature sets the serving chain no longer needs have their online keys expire
(``common.stores.online_retention``).

With ``CONVEYOR_COMPUTE`` naming a Dask cluster the fit, the transform and the write of
the offline parts run on the cluster (``preparation.distributed``): the same fitted set
and features; a set it cannot prepare there (joined inputs, a custom or shuffled split, a
batch not typed as stored) is prepared with pandas here, as by default.

``OnlinePreparationService`` (``conveyor run online-preparation``) is the online path:
RecordsObserved, checked record by record, applied to the entity state of every feature
set the stream keeps for the dataset (see its docstring and the README's online path).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import pandas as pd
from prometheus_client import CollectorRegistry, Counter

from common.compute import Compute, open_compute
from common.errors import InvalidInput, NotFound
from common.events import (
    FeaturesGenerated,
    RawDataExtracted,
    RecordProblem,
    RecordsObserved,
    RecordsRefused,
)
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import ModelStore, OfflineFeatureStore, OnlineFeatureStore, RawBatchStore
from common.stores.entity_state import (
    Applied,
    EntityStateStore,
    RedisEntityState,
    RedisStreamTargets,
    StreamTargets,
)
from common.stores.features import latest_rows
from common.stores.models import ModelRegistry
from common.stores.online_retention import OnlineRetention, chain_feature_sets
from common.wiring import Stores
from ingestion.contract import DatasetContract
from ingestion.records import CheckedRecords, check_records
from preparation import FittedFeatureSet, build_pipeline, feature_set_id
from preparation.distributed import (
    NotDistributable,
    batch_states_on_cluster,
    prepare_on_cluster,
)
from preparation.join import joined_frame, missing_inputs
from preparation.spec import FeatureSections, PreparationSections
from preparation.streaming import NotStreamable, StreamPlan

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


class PreparationService(Service):
    """Turns raw batches into versioned feature sets, offline and online."""

    name = "preparation"
    concurrency = 2  # batches of different datasets go side by side
    prefetch = 1  # long handlers: leave waiting events to the other consumers

    def __init__(
        self,
        config: PreparationSections,
        raw_store: RawBatchStore,
        offline: OfflineFeatureStore,
        online: OnlineFeatureStore,
        pipelines: ModelStore,
        *,
        state: EntityStateStore | None = None,
        targets: StreamTargets | None = None,
        tolerance_s: float = 300.0,
        count_ttl_s: int = 90 * 86_400,
        compute: Compute | None = None,
        prune_superseded: Callable[[], list[str]] | None = None,
    ) -> None:
        self.config, self.raw_store, self.offline = config, raw_store, offline
        self.online, self.pipelines = online, pipelines
        self.compute = compute or Compute("local")
        self.prune_superseded = prune_superseded
        self.state, self.targets = state, targets
        self.tolerance_s, self.count_ttl_s = tolerance_s, count_ttl_s

    def close(self) -> None:
        """Let go of the cluster (if any): the last service of the process shuts it down."""
        self.compute.close()

    @handles(RawDataExtracted)
    def on_raw_data_extracted(self, event: RawDataExtracted) -> FeaturesGenerated | None:
        """Build the feature set the batch completes, or wait for the other inputs."""
        if event.dataset not in self.config.features.inputs:
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
        if event.entity_key is None:
            return
        if not self.online.is_complete(fsid):
            self._materialise_rows(fsid, event.entity_key)
        self._materialise_state(fsid)
        self._prune()

    def _prune(self) -> None:
        """Let superseded feature sets' online keys expire (``online_retention``); a
        failure waits for the next set: the one just written is stored either way."""
        if self.prune_superseded is None:
            return
        try:
            pruned = self.prune_superseded()
        except Exception:  # noqa: BLE001 - logged with its traceback, retried next run
            log.exception("pruning superseded feature sets failed")
            return
        if pruned:
            log.info("feature sets %s superseded: their online keys expire", pruned)

    def _materialise_rows(self, fsid: str, entity_key: str) -> None:
        """Each entity's latest values, then the mark evaluation waits for: scoring reads
        them until the set's entity state is ready."""
        try:
            parts = self.offline.iter_online(fsid)  # one part, unless a cluster wrote them
        except NotFound:
            log.info("feature set %s keeps no online rows; nothing to materialise", fsid)
            return
        timestamp = self.offline.metadata(fsid).metadata.get("online_timestamp")
        entities = written = 0
        for latest in parts:  # each entity in one part: a part at a time, memory bounded
            written += self.online.write_batch(fsid, latest, entity_key,
                                               timestamp_column=timestamp)
            entities += len(latest)
        self.online.mark_complete(fsid, entities)
        log.info("feature set %s: %d entities online (%d rows written)", fsid, entities,
                 written)

    def _materialise_state(self, fsid: str) -> None:
        """Write the entity state the stream continues from (``StreamPlan``): each
        entity's retained history of the set's batch, merged with what the stream may
        have written since the set was registered; then the stream keeps the set."""
        if self.state is None or self.targets is None or len(self.config.features.inputs) != 1:
            return  # no online path here, or a joined set (its records come in parts)
        if self.state.is_ready(fsid):
            return
        try:
            plan = StreamPlan(self.pipelines.load(fsid), tolerance_s=self.tolerance_s,
                              count_ttl_s=self.count_ttl_s)
        except NotStreamable:
            return
        dataset = self.config.features.inputs[0]
        self.targets.add(dataset, fsid)  # first: no record after this is missed
        batches = self.offline.metadata(fsid).metadata["batch_ids"]
        entities = 0
        for part, states in self._batch_states(plan, dataset, batches[dataset]):
            self.state.write_batch_states(fsid, part, states, plan.retention)
            entities += len(part)
        self.state.mark_ready(fsid)  # from now on scoring reads the state, not the rows
        log.info("feature set %s: entity state of %d entities online, kept from %s records",
                 fsid, entities, dataset)

    def _batch_states(self, plan: StreamPlan, dataset: str,
                      batch_id: str) -> Iterator[tuple[list[str], list[bytes]]]:
        """The batch's entity states: on the cluster a part at a time, or here at once."""
        contract = self.config.datasets[dataset]
        if self.compute.client is not None:
            try:
                yield from batch_states_on_cluster(self.compute.client, self.raw_store,
                                                   contract, batch_id, plan)
                return
            except NotDistributable as why:
                log.info("entity state of %s built in process: %s", batch_id, why)
        frame = joined_frame(self.raw_store, self.config.datasets, self.config.features,
                             {dataset: batch_id})
        yield plan.batch_states(frame, batch_record_ids(frame, contract, batch_id))

    def _prepare(self, fsid: str, batches: dict[str, str]) -> None:
        if self.compute.client is not None:
            try:
                return self._prepare_on_cluster(fsid, batches, self.compute.client)
            except NotDistributable as why:
                log.info("feature set %s prepared with pandas in process: %s", fsid, why)
        frame = joined_frame(self.raw_store, self.config.datasets, self.config.features, batches)
        label = self.config.features.label
        train = self.config.split.apply(frame, label).train
        fitted = build_pipeline(self.config.features).fit(train, batches.values())
        features, online, timestamp = self._transform(fitted, frame)
        self.pipelines.save(fsid, fitted, {"kind": "feature_pipeline", "batch_ids": batches})
        metadata = {**self._metadata(fitted, batches, len(train)), "online_timestamp": timestamp}
        self.offline.write(fsid, features, metadata, online=online)
        log.info("feature set %s: %d rows, %d features", fsid, len(features),
                 len(fitted.feature_names))

    def _prepare_on_cluster(self, fsid: str, batches: dict[str, str], client: Client) -> None:
        done = prepare_on_cluster(client, self.raw_store, self.offline, self.config, fsid,
                                  batches)
        fitted = done.fitted
        self.pipelines.save(fsid, fitted, {"kind": "feature_pipeline", "batch_ids": batches})
        metadata = {**self._metadata(fitted, batches, done.fit_rows),
                    "online_timestamp": done.online_timestamp}
        self.offline.finish_parts(fsid, done.rows, done.columns, metadata, online=done.online)
        log.info("feature set %s: %d rows, %d features (on the cluster)", fsid, done.rows,
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


def batch_record_ids(frame: pd.DataFrame, contract: DatasetContract, batch_id: str) -> list[str]:
    """Each batch row's record id: the contract's ``record_id`` column, else the batch and
    row (a streamed copy of a batch row is then not recognised as one: give the contract
    a record id where records may be both streamed and batched)."""
    if contract.record_id is not None:
        return frame[contract.record_id].astype(str).tolist()
    return [f"{batch_id[:16]}.{row}" for row in range(len(frame))]


def build(settings: Settings, config: PreparationSections) -> PreparationService:
    """The preparation service for the settings and the pipeline config."""
    stores = Stores.from_settings(settings)
    return PreparationService(
        config, stores.raw, stores.offline, stores.online, stores.feature_pipelines,
        state=RedisEntityState(stores.redis, settings.namespace) if settings.stream_state
        else None,
        targets=RedisStreamTargets(stores.redis, settings.namespace),
        tolerance_s=settings.stream_late_tolerance_s, count_ttl_s=settings.stream_count_ttl_s,
        compute=open_compute(),
        prune_superseded=superseded_pruner(settings, stores, config.name),
    )


def superseded_pruner(settings: Settings, stores: Stores, name: str) -> Callable[[], list[str]]:
    """Prunes the feature sets neither the registry chain's first ``online_keep_versions``
    versions use nor among the ``stream_recent_sets`` completed last."""
    retention = OnlineRetention(stores.redis, settings.namespace,
                                grace_s=settings.online_superseded_ttl_s,
                                keep_recent=settings.stream_recent_sets)
    registry = stores.registry(settings, name)
    return lambda: retention.prune(chain_feature_sets(registry, stores.models,
                                                      settings.online_keep_versions))


class RecordMetrics:
    """Counters of the records the online path applied, skipped or refused, by dataset."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        labels = ["dataset"]
        self.applied = Counter("conveyor_records_applied", "Streamed records applied to the "
                               "online state (once per feature set kept)", labels,
                               registry=registry)
        self.duplicates = Counter("conveyor_records_duplicate", "Streamed records already "
                                  "applied (redelivered or sent twice)", labels,
                                  registry=registry)
        self.refused = Counter("conveyor_records_refused", "Streamed records refused",
                               [*labels, "reason"], registry=registry)

    def count(self, dataset: str, applied: Applied, invalid: int) -> None:
        """Account one event's records."""
        self.applied.labels(dataset).inc(applied.applied)
        self.duplicates.labels(dataset).inc(applied.duplicates)
        self.refused.labels(dataset, "invalid").inc(invalid)
        self.refused.labels(dataset, "late").inc(len(set(applied.late_records)))


class OnlinePreparationService(Service):
    """The online path: streamed records applied to the online entity state of every
    feature set kept from their dataset, so Score reads aggregates up to the last record.

    Each RecordsObserved is checked record by record against its dataset's contract;
    the valid records become entries of every kept feature set (``StreamPlan``) and are
    merged into Redis, one pipeline per feature set, before the event is acknowledged.
    Redelivery changes nothing (records are deduplicated by id); invalid and too-late
    records are named in a RecordsRefused event (the event log keeps it) and counted.
    """

    name = "online-preparation"
    prune_every_s = 30.0

    def __init__(self, config: FeatureSections, pipelines: ModelStore, state: EntityStateStore,
                 targets: StreamTargets, *, registry: ModelRegistry | None = None,
                 models: ModelStore | None = None, tolerance_s: float = 300.0,
                 count_ttl_s: int = 90 * 86_400, recent_sets: int = 3) -> None:
        self.config, self.pipelines, self.state, self.targets = config, pipelines, state, targets
        self.registry, self.models = registry, models
        self.tolerance_s, self.count_ttl_s, self.recent_sets = tolerance_s, count_ttl_s, recent_sets
        self.metrics = RecordMetrics()
        self._plans: dict[str, StreamPlan] = {}
        self._pruned_at = 0.0

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """conveyor_records_{applied,duplicate,refused}_total on the service's /metrics."""
        self.metrics = RecordMetrics(registry)

    @handles(RecordsObserved, expected=(InvalidInput,))
    def on_records_observed(self, event: RecordsObserved) -> RecordsRefused | None:
        """Apply the valid records to every kept feature set; name the others."""
        checked = check_records(event.records, self._contract(event.dataset))
        applied = self._apply(event.dataset, checked)
        late = _late_problems(checked, applied)
        self.metrics.count(event.dataset, applied, len(checked.refused))
        problems = sorted(checked.refused + late, key=lambda p: p.index)
        if not problems:
            return None
        log.warning("event %s (correlation %s): %d of %d record(s) of %s refused; first: %s",
                    event.event_id, event.correlation_id, len(problems), len(event.records),
                    event.dataset, problems[0].reason)
        return event.caused(RecordsRefused, producer=self.name, dataset=event.dataset,
                            problems=problems, applied=len(checked.records) - len(late))

    def plan(self, feature_set_id: str) -> StreamPlan:
        """The stream plan of a kept feature set (its fitted pipeline verified and loaded
        once)."""
        plan = self._plans.get(feature_set_id)
        if plan is None:
            plan = self._plans[feature_set_id] = StreamPlan(
                self.pipelines.load(feature_set_id), tolerance_s=self.tolerance_s,
                count_ttl_s=self.count_ttl_s)
        return plan

    def _contract(self, dataset: str) -> DatasetContract:
        contract = self.config.datasets.get(dataset)
        if contract is None:
            raise InvalidInput(f"dataset {dataset!r} is not in the pipeline config "
                               f"(known: {', '.join(sorted(self.config.datasets))})")
        return contract

    def _apply(self, dataset: str, checked: CheckedRecords) -> Applied:
        total = Applied()
        if not checked.records:
            return total
        self._prune(dataset)
        for fsid in self.targets.of(dataset):
            plan = self.plan(fsid)
            entries = plan.record_entries(checked.records, checked.ids)
            done = self.state.apply(fsid, entries, plan.retention)
            total = Applied(max(total.applied, done.applied),
                            max(total.duplicates, done.duplicates), 0,
                            tuple(sorted(set(total.late_records) | set(done.late_records))))
        return total

    def _prune(self, dataset: str) -> None:
        """Every ``prune_every_s``: stop keeping the sets neither in the registry chain nor
        among the ``recent_sets`` newest (their state expires with its TTL)."""
        if self.registry is None or self.models is None:
            return
        if time.monotonic() - self._pruned_at < self.prune_every_s:
            return
        self._pruned_at = time.monotonic()
        kept = self.targets.of(dataset)
        needed = set(kept[-self.recent_sets:]) | set(self._chain_sets())
        stale = [fsid for fsid in kept if fsid not in needed]
        if stale:
            log.info("the stream no longer keeps feature sets %s of %s", stale, dataset)
            self.targets.remove(dataset, stale)

    def _chain_sets(self) -> Sequence[str]:
        assert self.registry is not None and self.models is not None
        return [str(self.models.metadata(entry.model_id).metadata.get("feature_set_id"))
                for entry in self.registry.chain()]


def _late_problems(checked: CheckedRecords, applied: Applied) -> list[RecordProblem]:
    late = set(applied.late_records)
    return [RecordProblem(index=index, field=None, record_id=record_id,
                          reason=f"record {record_id} came later than the tolerance behind "
                                 "its entity's newest record")
            for index, record_id in zip(checked.indices, checked.ids, strict=True)
            if record_id in late]


def build_online(settings: Settings, config: FeatureSections) -> OnlinePreparationService:
    """The online preparation service for the settings and the pipeline config."""
    stores = Stores.from_settings(settings)
    return OnlinePreparationService(
        config, stores.feature_pipelines, RedisEntityState(stores.redis, settings.namespace),
        RedisStreamTargets(stores.redis, settings.namespace),
        registry=stores.registry(settings, config.name), models=stores.models,
        tolerance_s=settings.stream_late_tolerance_s, count_ttl_s=settings.stream_count_ttl_s,
        recent_sets=settings.stream_recent_sets)
