"""Performance Monitoring Service: ScoreServed / OutcomeObserved → drift, quality, healing.

Feeds each ScoreServed batch to the ``MonitoringCore`` (serving figures and drift per
model version), remembers each answer for the outcome join, and writes the live view to
Redis and a Parquet report per drift measurement. Joins each OutcomeObserved to the score
it judges (by request id, else the entity's latest score) and scores the version's
sliding window of outcomes against its evaluation figures. The core's rules
(``monitoring.core.DecisionRules``) then decide:

- drift at warn or alert → ``DriftDetected`` (once per version and level per cooldown);
- drift alert → ``RetrainRequested`` (once per retrain cooldown, whatever the version);
- live quality below the evaluation figure by the margin, or p99 serving time over the
  budget → ``ModelDegraded`` (once per version and reason per cooldown); the scoring
  service demotes that version and the previous one serves.

The service claims each decision in Redis for the event that made it, and keeps the events
it emitted by that event's id, so a redelivered event re-emits the same events (with the
same derived ids) and never a second decision. An outcome that matches no served score
(its score expired, was never reported, or the id is wrong) is counted
(``conveyor_outcomes_total{result="unmatched"}``) and logged, and acknowledged: no retry
would make it match. Example::

    conveyor run monitoring        # settings: CONVEYOR_MONITORING_* (MonitoringSettings)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import ModelIdNotFound, ModelNotFound
from common.events import (
    DriftDetected,
    Event,
    ModelDegraded,
    OutcomeObserved,
    ScoreServed,
    ServedScore,
)
from common.reference import classes_from, references_from
from common.runtime import Service, handles
from common.settings import Settings
from common.stores import ModelRegistry, ModelStore
from common.wiring import Stores
from monitoring.core import (
    Cooldowns,
    CoreConfig,
    Decision,
    DecisionRules,
    DriftFinding,
    Finding,
    ModelInfo,
    MonitoringCore,
    report_due,
    summary,
)
from monitoring.drift import DriftThresholds
from monitoring.metrics import MonitoringMetrics
from monitoring.quality import QualityRule, confusion, label_of, quality_of
from monitoring.reports import Reports
from monitoring.state import SERVED_MAX_ENTRIES, MonitoringState

log = logging.getLogger(__name__)
SEEN_BATCHES = 1_000
CHAMPION_TTL_S = 1.0


class MonitoringSettings(BaseSettings):
    """Settings of the monitoring service (prefix ``CONVEYOR_``)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    monitoring_drift_every: int = 1_000
    """Scores of a version between two drift measurements."""
    monitoring_drift_window: int = 5_000
    """Latest scores of a version a drift measurement looks at."""
    monitoring_drift_min_scores: int = 500
    """Live values an input needs before its drift is measured."""
    monitoring_psi_warn: float = 0.1
    """PSI from which an input's drift is a warning."""
    monitoring_psi_alert: float = 0.2
    """PSI from which an input's drift is an alert (and retraining is requested)."""
    monitoring_ks_warn: float = 0.1
    """KS statistic from which a significant difference is a warning."""
    monitoring_ks_alert: float = 0.2
    """KS statistic from which a significant difference is an alert."""
    monitoring_ks_pvalue: float = 0.01
    """KS p-value under which a difference is significant."""
    monitoring_quality_metric: Literal["accuracy", "precision", "recall", "f1"] = "accuracy"
    """The live quality figure compared with the evaluation's."""
    monitoring_quality_margin: float = 0.05
    """How far the live figure may fall below the evaluation's before ModelDegraded."""
    monitoring_quality_min_outcomes: int = 100
    """Outcomes a version needs before its quality is judged."""
    monitoring_outcome_window: int = 500
    """The latest outcomes of a version its live quality is computed over."""
    monitoring_latency_budget_ms: float = 100.0
    """p99 serving time (own answers) past which a version is degraded."""
    monitoring_latency_min_scores: int = 200
    """Own answers a version needs before its serving time is judged (and requests the
    champion needs before its fallback share is)."""
    monitoring_max_fallback_share: float = 0.5
    """Share of the champion's requests answered by a fallback past which it is degraded
    (reason latency; observed and expected are then shares, not seconds)."""
    monitoring_latency_sustain_s: float = 60.0
    """How long a version must stay over its latency bounds (p99 or fallback share)
    before it is degraded: a host stalled for seconds (other work on its cores) is
    answered by the previous model call by call, not demoted for good."""
    monitoring_served_ttl_s: int = 86_400
    """How long a served score can still be joined to its outcome."""
    monitoring_served_max_entries: int = SERVED_MAX_ENTRIES
    """Bound of the outcome join's state in fields (two per score); past it the oldest
    scores are forgotten first, whatever ``monitoring_served_ttl_s`` says."""
    monitoring_retrain_cooldown_s: int = 3_600
    """At most one RetrainRequested per this many seconds."""
    monitoring_drift_cooldown_s: int = 600
    """At most one DriftDetected per version and level per this many seconds."""
    monitoring_degraded_cooldown_s: int = 3_600
    """At most one ModelDegraded per version and reason per this many seconds."""
    monitoring_reports: bool = True
    """Write Parquet reports of drift measurements under the data root."""
    monitoring_report_every_s: float = 60.0
    """At most one report per version per this many seconds (and one whenever the drift
    level changes); 0 writes every measurement."""

    def core(self) -> CoreConfig:
        """The core's part of the settings."""
        return CoreConfig(
            drift_every=self.monitoring_drift_every, drift_window=self.monitoring_drift_window,
            drift_min_scores=self.monitoring_drift_min_scores,
            thresholds=DriftThresholds(
                psi_warn=self.monitoring_psi_warn, psi_alert=self.monitoring_psi_alert,
                ks_warn=self.monitoring_ks_warn, ks_alert=self.monitoring_ks_alert,
                ks_pvalue=self.monitoring_ks_pvalue),
            latency_budget_ms=self.monitoring_latency_budget_ms,
            latency_min_scores=self.monitoring_latency_min_scores,
            max_fallback_share=self.monitoring_max_fallback_share,
            latency_sustain_s=self.monitoring_latency_sustain_s,
        )

    def cooldowns(self) -> Cooldowns:
        """How long each kind of decision holds."""
        return Cooldowns(drift_s=self.monitoring_drift_cooldown_s,
                         retrain_s=self.monitoring_retrain_cooldown_s,
                         degraded_s=self.monitoring_degraded_cooldown_s)

    def quality_rule(self) -> QualityRule:
        """When live quality counts as degraded."""
        return QualityRule(self.monitoring_quality_metric, self.monitoring_quality_margin,
                           self.monitoring_quality_min_outcomes)


class ModelCatalogue:
    """What monitoring knows of each registered version (read once per version)."""

    def __init__(self, models: ModelStore, registry: ModelRegistry) -> None:
        self.models, self.registry = models, registry
        self._known: dict[str, ModelInfo] = {}
        self._champion: tuple[float, tuple[str | None, list[str]]] | None = None

    def describe(self, version: str) -> ModelInfo:
        """The version's model, reference and evaluation figures (bare if unregistered)."""
        if version not in self._known:
            self._known[version] = self._read(version)
        return self._known[version]

    def _read(self, version: str) -> ModelInfo:
        try:
            model_id = self.registry.model_id_of(version)
        except ModelNotFound:
            log.warning("scores of version %s, which the registry does not know", version)
            return ModelInfo(version)
        try:
            metadata = self.models.metadata(model_id).metadata
        except ModelIdNotFound:
            log.warning("version %s names model %s, which the store lacks", version, model_id)
            return ModelInfo(version, model_id)
        datasets = metadata.get("datasets") or []
        return ModelInfo(
            version, model_id, self._deployed_at(version), references_from(metadata),
            {k: float(v) for k, v in (metadata.get("metrics") or {}).items()},
            classes_from(metadata), datasets[0] if len(datasets) == 1 else None,
        )

    def _deployed_at(self, version: str) -> datetime | None:
        promoted = [h.at for h in self.registry.history()
                    if h.action == "promote" and h.to_version == version]
        return promoted[-1] if promoted else None

    def champion(self, fresh: bool = False) -> tuple[str | None, list[str]]:
        """The champion's version (None if none) and every registered version, read at
        most once per ``CHAMPION_TTL_S`` (every batch asks) unless ``fresh``."""
        now = time.monotonic()
        if fresh or self._champion is None or now - self._champion[0] >= CHAMPION_TTL_S:
            self._champion = (now, self._read_champion())
        return self._champion[1]

    def _read_champion(self) -> tuple[str | None, list[str]]:
        versions = list(self.registry.versions())
        try:
            return self.registry.champion().version, versions
        except ModelNotFound:
            return None, versions


class MonitoringService(Service):
    """Watches served scores and outcomes; reports drift and degradation; asks to retrain."""

    name = "monitoring"

    def __init__(
        self, catalogue: ModelCatalogue, state: MonitoringState, settings: MonitoringSettings,
        reports: Reports | None = None,
    ) -> None:
        self.catalogue, self.state, self.settings, self.reports = (
            catalogue, state, settings, reports)
        self.core = MonitoringCore(settings.core(), catalogue.describe, state.counters)
        self.rules = DecisionRules(settings.cooldowns(), settings.quality_rule())
        self.metrics = MonitoringMetrics(CollectorRegistry())
        self._seen: OrderedDict[str, list[Finding]] = OrderedDict()
        self._reported: dict[str, tuple[float, str]] = {}  # version: (when, level)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Export the monitoring metrics on the service's /metrics registry."""
        self.metrics = MonitoringMetrics(registry, lambda: self.catalogue.champion(fresh=True))
        self.metrics.thresholds(self.settings.monitoring_psi_alert,
                                self.settings.monitoring_quality_metric,
                                self.settings.monitoring_quality_margin)
        for version in self.catalogue.champion()[1]:
            self.metrics.track(version, self.catalogue.describe(version).expected)

    @handles(ScoreServed)
    def on_score_served(self, event: ScoreServed) -> list[Event]:
        """Account a batch of scores; drift and latency decisions it leads to."""
        done = self.state.decisions(event.event_id)
        if done is not None:
            return done  # a redelivery of a batch that already decided something
        findings = self._observe(event)
        versions = {s.model_version for s in event.scores}
        self.state.remember(event.scores, {v: self._live_fields(v) for v in versions})
        for finding in findings:
            if isinstance(finding, DriftFinding):
                self._publish_drift(finding)
        decisions = [d for finding in findings for d in self._decisions(finding)]
        return self._recorded(event, self._emit(event, decisions))

    @handles(OutcomeObserved)
    def on_outcome_observed(self, event: OutcomeObserved) -> list[Event]:
        """Join an outcome to its score; a degradation decision it leads to."""
        done = self.state.decisions(event.event_id)
        if done is not None:
            return done
        served = self.state.served(event.request_id, event.entity_id)
        if served is None or served.label is None:
            return self._unmatched(event)
        self.metrics.outcomes.labels("joined").inc()
        pairs = self.state.add_outcome(served.version, served.label, label_of(event.outcome))
        info = self.catalogue.describe(served.version)
        live = quality_of([p for p, _ in pairs], [o for _, o in pairs], info.classes)
        self.metrics.observe_quality(served.version, live)
        self.state.write_live(served.version, {
            "quality": live, "outcomes": len(pairs), "quality_expected": dict(info.expected),
            "confusion": confusion(pairs)})
        decisions = self.rules.on_quality(served.version, live, info.expected, len(pairs))
        return self._recorded(event, self._emit(event, decisions))

    # -- scores ----------------------------------------------------------------------

    def _observe(self, event: ScoreServed) -> list[Finding]:
        """The core's findings on a batch; a batch retried in this process is not counted
        twice (its first findings are given again)."""
        key = str(event.event_id)
        if key not in self._seen:
            self._count(event.scores)
            champion = self.catalogue.champion()[0]
            self._seen[key] = self.core.observe(event.scores, champion)
            while len(self._seen) > SEEN_BATCHES:
                self._seen.popitem(last=False)
        return self._seen[key]

    def _count(self, scores: Sequence[ServedScore]) -> None:
        """The served counter and serving-time histogram of each version."""
        for version in {s.model_version for s in scores}:
            self.metrics.track(version, self.catalogue.describe(version).expected)
            latencies = [s.latency_ms / 1e3 for s in scores if s.model_version == version]
            self.metrics.served.labels(version).inc(len(latencies))
            histogram = self.metrics.latency.labels(version)
            for seconds in latencies:
                histogram.observe(seconds)

    def _live_fields(self, version: str) -> dict[str, object]:
        stats = self.core.stats(version)
        counters, info = stats.counters, stats.info
        return {**summary(stats), "latency_sum_ms": counters.latency_sum_ms,
                "histogram": counters.histogram, "model_id": info.model_id or "",
                "quality_expected": dict(info.expected),
                "deployed_at": info.deployed_at.isoformat() if info.deployed_at else ""}

    def _publish_drift(self, finding: DriftFinding) -> None:
        report, version = finding.report, finding.version
        self.metrics.observe_drift(version, report)
        self.state.write_live(version, {
            "drift_level": report.level, "drift_served": finding.served,
            "drift": {name: {"psi": d.psi, "ks": d.ks_statistic, "level": d.level,
                             "live_shares": d.shares,
                             "reference_shares": self._reference_shares(version, name)}
                      for name, d in report.inputs.items()}})
        if self._report_due(finding):
            assert self.reports is not None
            path = self.reports.write(finding, summary(self.core.stats(version)))
            self._reported[version] = (time.monotonic(), report.level)
            log.info("drift of %s: %s (report %s)", version, report.level, path)

    def _report_due(self, finding: DriftFinding) -> bool:
        if self.reports is None:
            return False
        return report_due(finding, self._reported.get(finding.version), time.monotonic(),
                          self.settings.monitoring_report_every_s)

    def _reference_shares(self, version: str, name: str) -> list[float]:
        return self.catalogue.describe(version).references[name].proportions.tolist()

    def _decisions(self, finding: Finding) -> list[Decision]:
        return self.rules.on_finding(finding, self.catalogue.describe(finding.version).dataset)

    # -- emitting and bookkeeping ------------------------------------------------------

    def _emit(self, cause: Event, decisions: list[Decision]) -> list[Event]:
        """The events of the decisions whose claim ``cause`` gets, in order."""
        return [self._emitted(cause, d) for d in decisions
                if self.state.claim(d.claim, cause.event_id, d.cooldown_s)]

    def _emitted(self, cause: Event, decision: Decision) -> Event:
        event = cause.caused(decision.event, producer=self.name, **decision.fields)
        if isinstance(event, DriftDetected):
            self.metrics.drift_detected.labels(event.model_version, event.level).inc()
        elif isinstance(event, ModelDegraded):
            self._mark_degraded(cause, event)
        return event

    def _mark_degraded(self, cause: Event, event: ModelDegraded) -> None:
        version, reason = event.model_version, event.reason
        log.warning("model %s degraded (%s): %.4g against %.4g (event %s, correlation %s)",
                    version, reason, event.observed, event.expected, cause.event_id,
                    cause.correlation_id)
        self.metrics.degraded.labels(version, reason).inc()
        self.state.write_live(version, {"degraded": reason})

    def _unmatched(self, event: OutcomeObserved) -> list[Event]:
        total = self.state.count_unmatched()
        self.metrics.outcomes.labels("unmatched").inc()
        log.warning("outcome %s of entity %s (request %s) matches no served score with a "
                    "label; counted as unmatched (%d so far)", event.event_id, event.entity_id,
                    event.request_id, total)
        return []

    def _recorded(self, cause: Event, events: list[Event]) -> list[Event]:
        if events:
            self.state.record_decisions(cause.event_id, events,
                                        self.rules.cooldowns.decisions_kept_s)
        return events


@runtime_checkable
class MonitoringSections(Protocol):
    """What monitoring reads of the pipeline config: the model's name."""

    @property
    def name(self) -> str:
        """The model's name in the registry."""


def build(settings: Settings, config: MonitoringSections) -> MonitoringService:
    """The monitoring service for the settings and the pipeline config's model."""
    own = MonitoringSettings()
    stores = Stores.from_settings(settings)
    catalogue = ModelCatalogue(stores.models, stores.registry(settings, config.name))
    state = MonitoringState(stores.redis, settings.namespace,
                            served_ttl_s=own.monitoring_served_ttl_s,
                            outcome_window=own.monitoring_outcome_window,
                            served_max_entries=own.monitoring_served_max_entries)
    reports = Reports(settings.data_root) if own.monitoring_reports else None
    return MonitoringService(catalogue, state, own, reports)
