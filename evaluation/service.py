"""Model Evaluation Service: CandidatesTrained → ModelReady or ModelRejected.

Scores the candidates on the evaluation part of the split, picks the best by the
configured metric, gates it against the current champion on the same rows (through the
champion's own feature pipeline when it was trained on another feature set) and against
the latency budget, then promotes it in the registry, once preparation has the feature
set's rows online (it materialises them while training runs; see preparation.service).
Promotion is atomic and promoting the champion again changes nothing, so a redelivered
event re-announces the same result.

With ``CONVEYOR_COMPUTE`` naming a Dask cluster the evaluation part is read and split on
the cluster and the metrics are summed partition by partition there (see
evaluation.partitioned); only a champion of another feature set, whose rows must be
transformed by its own pipeline, is still judged on the pandas path.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import pandas as pd

from common.compute import Compute, open_compute
from common.errors import ModelNotFound, NotReady
from common.events import CandidatesTrained, ModelReady, ModelRejected
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import (
    ModelRegistry,
    ModelStore,
    OfflineFeatureStore,
    OnlineFeatureStore,
    RawBatchStore,
)
from common.wiring import Stores
from evaluation.gate import EvaluationConfig
from evaluation.report import EvaluationReport, evaluate_candidates
from preparation.join import joined_frame
from preparation.spec import PreparationSections

log = logging.getLogger(__name__)


@runtime_checkable
class EvaluationSections(PreparationSections, Protocol):
    """What evaluation reads of the pipeline config: preparation's sections (it rebuilds
    the champion's rows as preparation made them) and the gate."""

    @property
    def evaluation(self) -> EvaluationConfig:
        """How candidates are scored and gated."""


class OnRows:
    """A model trained on another feature set, answering for rows by their index.

    Evaluation hands every model the new feature set's rows; this adapter looks up the
    same rows in the champion's own features, so both are judged on the same data.
    """

    def __init__(self, model: Any, own_features: pd.DataFrame) -> None:
        self.model, self.own_features = model, own_features

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def predict(self, X: pd.DataFrame) -> Any:
        return self.model.predict(self.own_features.loc[X.index])

    def predict_proba(self, X: pd.DataFrame) -> Any:
        return self.model.predict_proba(self.own_features.loc[X.index])


class EvaluationService(Service):
    """Chooses, gates and promotes the best candidate of each training run."""

    name = "evaluation"
    prefetch = 1  # long handlers: leave waiting events to the other consumers

    def __init__(
        self,
        config: EvaluationSections,
        offline: OfflineFeatureStore,
        models: ModelStore,
        pipelines: ModelStore,
        registry: ModelRegistry,
        raw_store: RawBatchStore,
        online: OnlineFeatureStore | None = None,
        online_wait_s: float = 600.0,
        compute: Compute | None = None,
    ) -> None:
        self.config, self.offline, self.models = config, offline, models
        self.pipelines, self.registry, self.raw_store = pipelines, registry, raw_store
        self.online, self.online_wait_s = online, online_wait_s
        self.compute = compute or Compute("local")
        if self.compute.client is not None:
            from evaluation.partitioned import warm_workers  # the Dask path only

            warm_workers(self.compute.client)

    def close(self) -> None:
        """Let go of the cluster (if any)."""
        self.compute.close()

    @handles(CandidatesTrained)
    def on_candidates_trained(self, event: CandidatesTrained) -> ModelReady | ModelRejected:
        """Promote the best candidate that passes the gate, or say why none did."""
        if not event.model_ids:
            reasons = [f"{f.name}: {f.error}" for f in event.failures] or ["no candidates"]
            return self._rejected(event, [f"no candidate was trained ({'; '.join(reasons)})"])
        candidates = {model_id: self.models.load(model_id) for model_id in event.model_ids}
        client = self.compute.client if self._on_cluster(event.feature_set_id) else None
        if client is not None:
            X_test, y_test = self._evaluation_part_on_cluster(event.feature_set_id)
        else:
            X_test, y_test = self._evaluation_part(event.feature_set_id)
        champion = self._champion_on(X_test, event.feature_set_id)
        report = evaluate_candidates(candidates, champion, X_test, y_test,
                                     self.config.evaluation, client)
        if not report.accepted:
            self._record(report, accepted=None)
            return self._rejected(event, report.reasons())
        return self._promote(event, report)

    def _evaluation_part(self, fsid: str) -> tuple[pd.DataFrame, pd.Series]:
        record = self.offline.metadata(fsid)
        frame = self.offline.read(fsid)
        part = self.config.split.apply(frame, record.metadata["label"])
        return part.X_test[record.metadata["features"]], part.y_test

    def _evaluation_part_on_cluster(self, fsid: str) -> tuple[Any, Any]:
        """The evaluation part as Dask collections, split on the cluster."""
        from segregation.partitioned import split_partitioned  # the Dask path only

        record = self.offline.metadata(fsid)
        label, features = record.metadata["label"], record.metadata["features"]
        stored = self.offline.read_dask(fsid, columns=[*features, label])
        test = split_partitioned(stored.frame, self.config.split, stored.lengths).test
        return test[features], test[label]

    def _on_cluster(self, fsid: str) -> bool:
        """Whether to evaluate on the cluster: there is one, and the champion (if any)
        reads the same feature set (another one's rows are transformed here)."""
        if not self.compute.distributed:
            return False
        champion_id = self._champion_id()
        return champion_id is None or self._feature_set_of(champion_id) == fsid

    def _feature_set_of(self, model_id: str) -> str:
        return str(self.models.metadata(model_id).metadata["feature_set_id"])

    def _champion_on(self, X_test: Any, fsid: str) -> Any | None:
        try:
            champion_id = self.registry.champion().model_id
        except ModelNotFound:
            return None
        model = self.models.load(champion_id)
        champion_fsid = self._feature_set_of(champion_id)
        if champion_fsid == fsid:
            return model
        return OnRows(model, self._features_by(champion_fsid, fsid))

    def _features_by(self, champion_fsid: str, fsid: str) -> pd.DataFrame:
        """The new feature set's input rows, transformed by the champion's pipeline."""
        fitted = self.pipelines.load(champion_fsid)
        batches = self.offline.metadata(fsid).metadata["batch_ids"]
        frame = joined_frame(self.raw_store, self.config.datasets, self.config.features, batches)
        return fitted.transform(frame)[list(fitted.feature_names)]

    def _promote(self, event: CandidatesTrained, report: EvaluationReport) -> ModelReady:
        self._wait_online(event.feature_set_id)
        chosen = report.chosen_id
        old = self._champion_id()
        version = self.registry.promote(chosen, reason=_why(report))
        self._record(report, accepted=chosen)
        if old and old != chosen:
            self.models.update_metadata(old, status="previous")
        log.info("model %s promoted as %s", chosen, version)
        return event.caused(
            ModelReady, producer=self.name, model_id=chosen, version=version,
            previous_version=self._previous_version(), metrics=report.candidates[chosen],
        )

    def _wait_online(self, fsid: str) -> None:
        """Until preparation has materialised the set online (``NotReady`` past the wait):
        scoring reads those rows as soon as the model is promoted."""
        if self.online is None or not self.offline.has_online(fsid):
            return
        if not self.online.wait_complete(fsid, self.online_wait_s):
            raise NotReady(f"online features of feature set {fsid}", self.online_wait_s)

    def _champion_id(self) -> str | None:
        try:
            return self.registry.champion().model_id
        except ModelNotFound:
            return None

    def _previous_version(self) -> str | None:
        try:
            return self.registry.previous().version
        except ModelNotFound:
            return None

    def _record(self, report: EvaluationReport, accepted: str | None) -> None:
        """Keep metrics, curves and the gate's verdict with every candidate."""
        for model_id, metrics in report.candidates.items():
            decision = report.decisions.get(model_id)
            self.models.update_metadata(
                model_id,
                status="champion" if model_id == accepted else "rejected",
                metrics=metrics,
                evaluation={
                    "metric": report.metric, "ranking": report.ranking,
                    "accepted": model_id == accepted,
                    "reasons": decision.reasons if decision else ["a better candidate passed"],
                    "latency": report.latency.get(model_id),
                    "champion_metrics": report.champion_metrics,
                },
                **({"curves": report.curves} if model_id == report.chosen_id else {}),
            )

    def _rejected(self, event: CandidatesTrained, reasons: list[str]) -> ModelRejected:
        log.warning("candidates rejected: %s", "; ".join(reasons))
        return event.caused(
            ModelRejected, producer=self.name, feature_set_id=event.feature_set_id,
            model_ids=event.model_ids, reasons=reasons,
        )


def _why(report: EvaluationReport) -> str:
    value = report.candidates[report.chosen_id][report.metric]
    return f"{report.metric} {value:.4f} on the evaluation part; passed the gate"


def build(settings: Settings, config: EvaluationSections) -> EvaluationService:
    """The evaluation service for the settings and the pipeline config."""
    stores = Stores.from_settings(settings)
    return EvaluationService(
        config, stores.offline, stores.models, stores.feature_pipelines,
        stores.registry(settings, config.name), stores.raw,
        online=stores.online, online_wait_s=settings.online_wait_s, compute=open_compute(),
    )
