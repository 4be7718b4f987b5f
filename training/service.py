"""Model Training Service: FeaturesGenerated / RetrainRequested → CandidatesTrained.

Trains the configured candidates in parallel on the training part of the split and saves
each to the model store with its metadata. Model ids are hashes of the candidate config
and the feature set, so a redelivered event re-trains nothing that is already stored.

With ``CONVEYOR_COMPUTE`` naming a Dask cluster the feature set is read, split and (past
``CONVEYOR_TRAIN_MAX_ROWS``) sampled on the cluster, so only the rows trained on come to
this process, and the candidates train on the cluster's workers instead of local worker
processes. The sample, seeded and class-stratified, is recorded in each model's metadata
(``training_sample``); the pandas path samples the same way when the cap is set.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pandas as pd

from common.compute import Compute, open_compute
from common.errors import InvalidInput
from common.events import (
    CandidateFailure,
    CandidatesTrained,
    Event,
    FeaturesGenerated,
    RetrainRequested,
)
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import FeatureSetRecord, ModelStore, OfflineFeatureStore
from common.wiring import Stores
from training.config import TrainingConfig, expand
from training.sampling import (
    TrainingSettings,
    class_counts_by_partition,
    needs_sample,
    sample_plan,
    take_sample,
    take_sample_partitioned,
)
from training.trainer import WorkerPool, model_id_for, train_candidates

if TYPE_CHECKING:
    from segregation.config import SplitConfig

TrainingSet = tuple[pd.DataFrame, pd.Series, dict[str, Any] | None]

log = logging.getLogger(__name__)


@runtime_checkable
class TrainingSections(Protocol):
    """What training reads of the pipeline config: the model's name, the split and the
    candidates."""

    @property
    def name(self) -> str:
        """The model's name in the registry."""

    @property
    def split(self) -> SplitConfig:
        """How feature sets are split into train and evaluation parts."""

    @property
    def training(self) -> TrainingConfig:
        """Candidate models and how to train them."""


class TrainingService(Service):
    """Trains candidate models for each new feature set."""

    name = "training"
    prefetch = 1  # long handlers: leave waiting events to the other consumers

    def __init__(
        self, config: TrainingSections, offline: OfflineFeatureStore, models: ModelStore,
        compute: Compute | None = None, settings: TrainingSettings | None = None,
    ) -> None:
        self.config, self.offline, self.models = config, offline, models
        self.compute = compute or Compute("local")
        self.settings = settings or TrainingSettings()
        self._pool: WorkerPool | None = None

    def warm(self) -> TrainingService:
        """Start the worker processes now, so the first run does not wait for them (on a
        Dask cluster the cluster's workers train: no local ones)."""
        if self.compute.client is None:
            self._workers()
        else:
            from training.distributed import warm_workers

            warm_workers(self.compute.client, self._estimators())
        return self

    def ready(self) -> bool:
        """Ready once the training workers have started (imports take seconds)."""
        return self._pool is None or self._pool.warm()

    def close(self) -> None:
        """Stop the worker processes and let go of the cluster."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.compute.close()

    def _workers(self) -> WorkerPool:
        """The training workers, started once and kept across runs."""
        if self._pool is None:
            self._pool = WorkerPool(self.config.training.workers, self._estimators()).start()
        return self._pool

    def _estimators(self) -> list[str]:
        return sorted({c.estimator for c in expand(self.config.training)})

    @handles(FeaturesGenerated)
    def on_features_generated(self, event: FeaturesGenerated) -> CandidatesTrained:
        """Train the candidates on the new feature set."""
        return self._train(event, event.feature_set_id)

    @handles(RetrainRequested)
    def on_retrain_requested(self, event: RetrainRequested) -> CandidatesTrained:
        """Train again on the latest feature set of this pipeline (that reads the dataset)."""
        return self._train(event, self._latest_feature_set(event.dataset))

    def _latest_feature_set(self, dataset: str | None = None) -> str:
        records = [r for r in self.offline.list() if r.metadata.get("pipeline") == self.config.name
                   and (dataset is None or dataset in r.metadata.get("batch_ids", {}))]
        if not records:
            of = f" reading dataset {dataset!r}" if dataset else ""
            raise InvalidInput(f"no feature set of pipeline {self.config.name}{of} to retrain on")
        return max(records, key=lambda r: r.created_at).feature_set_id

    def _train(self, event: Event, fsid: str) -> CandidatesTrained:
        record = self.offline.metadata(fsid)
        todo = self._untrained(self.config.training, fsid)
        failures: list[CandidateFailure] = []
        if todo is not None:
            failures = self._fit_and_save(todo, record)
        return event.caused(
            CandidatesTrained, producer=self.name, feature_set_id=fsid,
            model_ids=self._stored_ids(fsid), failures=failures,
        )

    def _untrained(self, training: TrainingConfig, fsid: str) -> TrainingConfig | None:
        """The config restricted to candidates not stored yet (None if all are)."""
        stored = set(self._stored_ids(fsid))
        names = {c.name for c in expand(training) if model_id_for(c, fsid) not in stored}
        if not names:
            return None
        keep = [s for s in training.candidates if any(n.split("[")[0] == s.name for n in names)]
        return training.model_copy(update={"candidates": keep})

    def _stored_ids(self, fsid: str) -> list[str]:
        ids = [model_id_for(c, fsid) for c in expand(self.config.training)]
        return [model_id for model_id in ids if self.models.exists(model_id)]

    def _fit_and_save(
        self, training: TrainingConfig, record: FeatureSetRecord
    ) -> list[CandidateFailure]:
        X, y, sample = self._training_part(record)
        client = self.compute.client
        result = train_candidates(
            training, X, y, feature_set_id=record.feature_set_id,
            batch_ids=sorted(record.metadata["batch_ids"].values()),
            pool=None if client is not None else self._workers(), client=client, sample=sample,
        )
        for trained in result.trained:
            self.models.save(trained.model_id, trained.model, {
                **trained.metadata, "pipeline": self.config.name,
                "datasets": sorted(record.metadata["batch_ids"])})
        for failure in result.failures:
            log.warning("candidate %s failed: %s", failure.name, failure.error)
        return [CandidateFailure(name=f.name, error=f.error) for f in result.failures]

    def _training_part(self, record: FeatureSetRecord) -> TrainingSet:
        """(X, y) of the split's training part, sampled past the cap, and how it was."""
        if self.compute.distributed:
            X, y, sample = self._training_part_on_cluster(record)
        else:
            X, y, sample = self._training_part_here(record)
        values = y.unique()
        if len(values) < 2:  # nothing to learn; say so here, not as a metric error later
            raise InvalidInput(
                f"label {record.metadata['label']!r} of feature set {record.feature_set_id} "
                f"has a single value {sorted(values.tolist())} in the training part; "
                "nothing to learn"
            )
        return X, y, sample

    def _training_part_here(self, record: FeatureSetRecord) -> TrainingSet:
        frame = self.offline.read(record.feature_set_id)
        part = self.config.split.apply(frame, record.metadata["label"])
        X, y = part.X_train[record.metadata["features"]], part.y_train
        if not needs_sample(len(y), self.settings.train_max_rows):
            return X, y, None
        plan = sample_plan(y.value_counts(), self.settings.train_max_rows,  # type: ignore[arg-type]
                           self.settings.train_sample_seed)
        return *take_sample(X, y, plan), plan.metadata()

    def _training_part_on_cluster(self, record: FeatureSetRecord) -> TrainingSet:
        from segregation.partitioned import split_partitioned  # the Dask path only

        label, features, client = record.metadata["label"], record.metadata["features"], \
            self.compute.client
        assert client is not None  # distributed
        stored = self.offline.read_dask(record.feature_set_id, columns=[*features, label])
        train = split_partitioned(stored.frame, self.config.split, stored.lengths).train
        counts = class_counts_by_partition(train[label], client)
        totals = pd.DataFrame(counts).fillna(0).sum()
        sample = None
        if needs_sample(int(totals.sum()), self.settings.train_max_rows):
            plan = sample_plan(totals, self.settings.train_max_rows,  # type: ignore[arg-type]
                               self.settings.train_sample_seed)
            train, sample = take_sample_partitioned(train, label, plan, counts), plan.metadata()
        rows = client.compute(train, sync=True)
        return rows[features], rows[label], sample


def build(settings: Settings, config: TrainingSections) -> TrainingService:
    """The training service for the settings and the pipeline config."""
    stores = Stores.from_settings(settings)
    return TrainingService(config, stores.offline, stores.models, open_compute(),
                           TrainingSettings()).warm()
