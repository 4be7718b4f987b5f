"""The transport-free core of monitoring: served scores in, per-version figures and findings out.

``MonitoringCore.observe`` takes a list of ``ServedScore`` (what one ScoreServed event
carries, or anything a script builds) and keeps, per model version: times served and
answered as a fallback, min/avg/max and a histogram of serving time, recent serving-time
percentiles, and a sliding window of each input feature and of the predictions. Every
``drift_every`` scores of a version it compares that window with the version's training
reference (``monitoring.drift``) and returns a ``DriftFinding``; when the version's p99
serving time (its own answers, not fallbacks) breaks the budget, or, given the champion's
version, when more than ``max_fallback_share`` of the champion's requests were answered
by a fallback, it returns a ``LatencyFinding``. It never talks to Redis or the broker.

``DecisionRules`` turns findings (and live quality) into ``Decision``: the event to emit
and the claim that keeps it to one per cooldown. The service only asks Redis for each
claim and emits the events whose claim it gets. Example::

    core = MonitoringCore(CoreConfig(drift_every=1_000), describe=lambda v: ModelInfo(v))
    findings = core.observe(event.scores, champion="v3")
    core.stats("v3").served, core.stats("v3").latency_percentiles()
    [f.report.level for f in findings if isinstance(f, DriftFinding)]   # ["alert"]
    rules = DecisionRules(Cooldowns(drift_s=600), QualityRule("accuracy", 0.05, 100))
    [d.claim for d in rules.on_finding(findings[0], dataset="paysim")]
    # ["v3:drift:alert", "retrain"]: DriftDetected, then RetrainRequested
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np

from common.events import (
    DriftDetected,
    Event,
    ModelDegraded,
    RetrainRequested,
    ServedScore,
    utc_now,
)
from common.reference import PREDICTION, Reference
from monitoring.drift import DriftReport, DriftThresholds, drift_report
from monitoring.quality import QualityRule, degradation

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Upper bounds of the serving-time histogram (ms); one more bucket holds the rest."""


@dataclass(frozen=True)
class CoreConfig:
    """How often drift is measured, over how many scores, and the latency budget."""

    drift_every: int = 1_000
    """Scores of a version between two drift measurements."""
    drift_window: int = 5_000
    """The latest scores of a version that a drift measurement looks at."""
    drift_min_scores: int = 500
    """Live values an input needs before its drift is measured."""
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)
    latency_budget_ms: float = 100.0
    """p99 serving time a version must keep (its own answers, fallbacks excluded)."""
    latency_window: int = 1_000
    """The latest own answers the serving-time percentiles are taken over."""
    latency_min_scores: int = 200
    """Own answers (or requests to the champion) needed before the budget is checked."""
    max_fallback_share: float = 0.5
    """Share of the champion's requests that may be answered by a fallback (it was past
    its deadline, its circuit open, or it failed) before it counts as too slow."""
    latency_sustain_s: float = 0.0
    """How long (by the scores' ``served_at``) a version must stay over its latency
    bounds before it is found too slow: a short stall of the whole host (a pipeline run
    on the scoring nodes' cores, say) is not the model's fault, and the router already
    answers it with the previous model call by call. 0: at once."""


@dataclass(frozen=True)
class ModelInfo:
    """What monitoring knows of a version: its model, reference and evaluation figures."""

    version: str
    model_id: str | None = None
    deployed_at: datetime | None = None
    references: Mapping[str, Reference] = field(default_factory=dict)
    expected: Mapping[str, float] = field(default_factory=dict)
    """The model's metrics on the evaluation part (accuracy, precision, recall, f1...)."""
    classes: Sequence[str] = ()
    dataset: str | None = None
    """The dataset it was trained on, when it is a single one (for RetrainRequested)."""

    @property
    def feature_names(self) -> list[str]:
        """The inputs that have a reference, in reference order."""
        return [name for name in self.references if name != PREDICTION]


@dataclass
class Counters:
    """Running totals of one version (restored from the live view after a restart)."""

    served: int = 0
    fallbacks: int = 0
    latency_sum_ms: float = 0.0
    latency_min_ms: float = float("inf")
    latency_max_ms: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))

    def add(self, latencies_ms: np.ndarray, fallbacks: int) -> None:
        """Account a batch of serving times (ms), ``fallbacks`` of them fallback answers."""
        self.served += len(latencies_ms)
        self.fallbacks += fallbacks
        self.latency_sum_ms += float(latencies_ms.sum())
        self.latency_min_ms = min(self.latency_min_ms, float(latencies_ms.min()))
        self.latency_max_ms = max(self.latency_max_ms, float(latencies_ms.max()))
        buckets = np.searchsorted(LATENCY_BUCKETS_MS, latencies_ms, side="left")
        counts = np.bincount(buckets, minlength=len(self.histogram))
        self.histogram = [a + int(b) for a, b in zip(self.histogram, counts, strict=True)]

    @property
    def latency_avg_ms(self) -> float:
        """Mean serving time (NaN before the first score)."""
        return self.latency_sum_ms / self.served if self.served else float("nan")


class Ring:
    """The latest ``size`` rows of ``width`` floats (row order is not kept)."""

    def __init__(self, size: int, width: int) -> None:
        self._data = np.full((size, width), np.nan)
        self._next = self._count = 0

    def extend(self, rows: np.ndarray) -> None:
        """Add rows, overwriting the oldest once full."""
        size = len(self._data)
        rows = rows[-size:]
        index = (self._next + np.arange(len(rows))) % size
        self._data[index] = rows
        self._next = (self._next + len(rows)) % size
        self._count = min(self._count + len(rows), size)

    def values(self) -> np.ndarray:
        """The rows held (a view)."""
        return self._data[: self._count]

    def __len__(self) -> int:
        return self._count


def _tuple_getter(names: Sequence[str]) -> Callable[[Mapping[str, float]], tuple[float, ...]]:
    """A function giving the values of ``names`` as a tuple (KeyError if one is missing)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda features: tuple(features[name] for name in names)


@dataclass(frozen=True)
class DriftFinding:
    """A drift measurement of one version over its latest scores (level may be "none")."""

    version: str
    report: DriftReport
    served: int
    """The version's total scores when it was measured (names the window)."""


@dataclass(frozen=True)
class LatencyFinding:
    """A version too slow: its p99 serving time broke the budget (``measure`` "p99_ms"),
    or, as the champion, too many of its requests were answered by a fallback
    (``measure`` "fallback_share"): ``observed`` against the ``allowed`` bound."""

    version: str
    measure: Literal["p99_ms", "fallback_share"]
    observed: float
    allowed: float


Finding = DriftFinding | LatencyFinding


class VersionStats:
    """Everything monitoring keeps in memory about one model version."""

    def __init__(self, info: ModelInfo, config: CoreConfig, counters: Counters) -> None:
        self.info, self.config, self.counters = info, config, counters
        self.names = info.feature_names
        self._getter = _tuple_getter(self.names)
        self.window = Ring(config.drift_window, len(self.names) + 1)  # + the prediction
        self.latencies = Ring(config.latency_window, 1)
        self.missed = Ring(config.latency_window, 1)  # 1: a fallback answered it as champion
        self.since_drift = 0
        self.last_drift: DriftFinding | None = None
        self.slow_since: datetime | None = None
        """When its latency last went over bounds (None: within them)."""

    @property
    def served(self) -> int:
        """Scores answered by this version, in total."""
        return self.counters.served

    def add(self, scores: Sequence[ServedScore]) -> None:
        """Account a batch of this version's scores."""
        latencies = np.fromiter((s.latency_ms for s in scores), np.float64, len(scores))
        own = np.fromiter((not s.fallback for s in scores), bool, len(scores))
        self.counters.add(latencies, int(len(scores) - own.sum()))
        self.latencies.extend(latencies[own, None])
        self.window.extend(self._rows(scores))
        self.since_drift += len(scores)

    def _rows(self, scores: Sequence[ServedScore]) -> np.ndarray:
        """Each score's features in reference order (NaN where absent), then its score."""
        return np.array([(*self._values(s.features), s.score) for s in scores],
                        dtype=np.float64)

    def _values(self, features: Mapping[str, float]) -> tuple[float, ...]:
        """The features in reference order: one C-level lookup when all are there."""
        try:
            return self._getter(features)
        except KeyError:
            return tuple(features.get(name, float("nan")) for name in self.names)

    def latency_percentiles(self) -> dict[str, float]:
        """p50, p95 and p99 of the latest own answers, in ms (NaN before any)."""
        values = self.latencies.values()[:, 0]
        if not len(values):
            return dict.fromkeys(("p50", "p95", "p99"), float("nan"))
        p50, p95, p99 = np.quantile(values, [0.50, 0.95, 0.99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}

    def drift_due(self) -> bool:
        """Whether enough scores came since the last measurement, and the version has a
        reference to measure against."""
        return bool(self.info.references) and self.since_drift >= self.config.drift_every

    def measure_drift(self) -> DriftFinding:
        """Drift of the window against the reference; resets the countdown."""
        values = self.window.values()
        live = {name: values[:, i] for i, name in enumerate([*self.names, PREDICTION])}
        report = drift_report(self.info.references, live, self.config.thresholds,
                              min_values=self.config.drift_min_scores)
        self.since_drift = 0
        self.last_drift = DriftFinding(self.info.version, report, self.served)
        return self.last_drift

    def latency_breach(self, now: datetime) -> LatencyFinding | None:
        """``over_latency_bounds``'s finding once it has held for the config's
        ``latency_sustain_s`` up to ``now`` (the latest score's time)."""
        finding = self.over_latency_bounds()
        if finding is None:
            self.slow_since = None
            return None
        self.slow_since = self.slow_since or now
        held_s = (now - self.slow_since).total_seconds()
        return finding if held_s >= self.config.latency_sustain_s else None

    def over_latency_bounds(self) -> LatencyFinding | None:
        """A finding when the p99 of enough own answers breaks the budget, or when too
        many of enough requests to it as champion were answered by a fallback."""
        config, version = self.config, self.info.version
        if len(self.latencies) >= config.latency_min_scores:
            p99 = self.latency_percentiles()["p99"]
            if p99 > config.latency_budget_ms:
                return LatencyFinding(version, "p99_ms", p99, config.latency_budget_ms)
        if len(self.missed) >= config.latency_min_scores:
            share = float(self.missed.values().mean())
            if share > config.max_fallback_share:
                return LatencyFinding(version, "fallback_share", share, config.max_fallback_share)
        return None


class MonitoringCore:
    """Per-version serving figures and drift of the scores it is given."""

    def __init__(
        self,
        config: CoreConfig,
        describe: Callable[[str], ModelInfo],
        restore: Callable[[str], Counters | None] = lambda version: None,
    ) -> None:
        self.config = config
        self._describe, self._restore = describe, restore
        self._stats: dict[str, VersionStats] = {}

    def observe(
        self, scores: Sequence[ServedScore], champion: str | None = None
    ) -> list[Finding]:
        """Account scores (of any versions); the drift and latency findings they lead to.

        With the ``champion``'s version, the scores it should have answered (its own, and
        every fallback answer) also count for or against it: a slow champion whose
        requests go to the previous version never answers slowly itself.
        """
        by_version: dict[str, list[ServedScore]] = defaultdict(list)
        for score in scores:
            by_version[score.model_version].append(score)
        if champion is not None:
            self._count_misses(champion, scores)
            by_version.setdefault(champion, [])
        findings: list[Finding] = []
        now = max(score.served_at for score in scores) if scores else utc_now()
        for version, batch in by_version.items():
            stats = self.stats(version)
            if batch:
                stats.add(batch)
            if stats.drift_due():
                findings.append(stats.measure_drift())
            breach = stats.latency_breach(now)
            if breach is not None:
                findings.append(breach)
        return findings

    def _count_misses(self, champion: str, scores: Sequence[ServedScore]) -> None:
        missed = [s.model_version != champion for s in scores
                  if s.model_version == champion or s.fallback]
        if missed:
            self.stats(champion).missed.extend(np.array(missed, dtype=np.float64)[:, None])

    def stats(self, version: str) -> VersionStats:
        """The figures of a version (described, and its totals restored, at first sight)."""
        if version not in self._stats:
            info = self._describe(version)
            if not info.references:
                log.warning("model version %s has no drift reference: drift is not measured",
                            version)
            counters = self._restore(version) or Counters()
            self._stats[version] = VersionStats(info, self.config, counters)
        return self._stats[version]

    def versions(self) -> list[str]:
        """The versions seen so far."""
        return list(self._stats)


def summary(stats: VersionStats) -> dict[str, Any]:
    """The figures of one version as flat values (for the live view and the reports)."""
    counters = stats.counters
    percentiles = stats.latency_percentiles()
    return {
        "served": counters.served, "fallbacks": counters.fallbacks,
        "fallback_share": counters.fallbacks / counters.served if counters.served else 0.0,
        "latency_min_ms": counters.latency_min_ms if counters.served else float("nan"),
        "latency_avg_ms": counters.latency_avg_ms, "latency_max_ms": counters.latency_max_ms,
        **{f"latency_{k}_ms": v for k, v in percentiles.items()},
    }


# -- decisions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cooldowns:
    """How long one decision holds before the same one can be made again (seconds)."""

    drift_s: int = 600
    """At most one DriftDetected per version and level."""
    retrain_s: int = 3_600
    """At most one RetrainRequested, whatever the version."""
    degraded_s: int = 3_600
    """At most one ModelDegraded per version and reason."""

    @property
    def decisions_kept_s(self) -> int:
        """How long the events a cause emitted are kept, so a redelivery re-emits them."""
        return max(self.retrain_s, self.degraded_s)


@dataclass(frozen=True)
class Decision:
    """An event to emit, unless decision ``claim`` was already made within ``cooldown_s``
    (by another event: the same event asking again still holds it)."""

    claim: str
    cooldown_s: int
    event: type[Event]
    fields: Mapping[str, Any]
    """The event's payload (the envelope comes from the event that caused it)."""


class DecisionRules:
    """When drift, slowness or lost quality become events, and how often."""

    def __init__(self, cooldowns: Cooldowns, quality: QualityRule) -> None:
        self.cooldowns, self.quality = cooldowns, quality

    def on_finding(self, finding: Finding, dataset: str | None = None) -> list[Decision]:
        """The decisions of a core finding (``dataset``: the version's, for retraining)."""
        if isinstance(finding, LatencyFinding):
            return [self._latency(finding)]
        return self._drift(finding.version, finding.report, dataset)

    def on_quality(
        self, version: str, live: Mapping[str, float], expected: Mapping[str, float],
        outcomes: int,
    ) -> list[Decision]:
        """A ModelDegraded when enough outcomes show the live figure fell too far."""
        found = degradation(live, expected, count=outcomes, rule=self.quality)
        if found is None:
            return []
        return [self._degraded(version, "accuracy", found.observed, found.expected)]

    def _drift(self, version: str, report: DriftReport, dataset: str | None) -> list[Decision]:
        level = report.level
        if level == "none":
            return []
        decisions = [Decision(f"{version}:drift:{level}", self.cooldowns.drift_s, DriftDetected,
                              {"model_version": version, "level": level, "psi": report.psi})]
        if level == "alert":
            decisions.append(Decision("retrain", self.cooldowns.retrain_s, RetrainRequested, {
                "reason": drift_reason(version, report), "dataset": dataset,
                "model_version": version}))
        return decisions

    def _latency(self, finding: LatencyFinding) -> Decision:
        scale = 1e-3 if finding.measure == "p99_ms" else 1.0  # the event's p99 is in seconds
        return self._degraded(finding.version, "latency", finding.observed * scale,
                              finding.allowed * scale)

    def _degraded(
        self, version: str, reason: Literal["accuracy", "latency"], observed: float,
        expected: float,
    ) -> Decision:
        return Decision(f"{version}:degraded:{reason}", self.cooldowns.degraded_s,
                        ModelDegraded, {"model_version": version, "reason": reason,
                                        "observed": observed, "expected": expected})


def drift_reason(version: str, report: DriftReport) -> str:
    """RetrainRequested's reason: the (up to) three inputs that drifted most."""
    worst = sorted(report.inputs.items(), key=lambda item: -item[1].psi)[:3]
    names = ", ".join(f"{'predictions' if n == PREDICTION else n} (PSI {d.psi:.2f})"
                      for n, d in worst)
    return f"drift alert on model {version}: {names}"


def report_due(
    finding: DriftFinding, last: tuple[float, str] | None, now: float, every_s: float
) -> bool:
    """Whether a drift measurement gets a report: one with inputs that is the version's
    first, or at a new level, or the first ``every_s`` after the ``last`` (when, level)."""
    if not finding.report.inputs:
        return False
    return last is None or last[1] != finding.report.level or now - last[0] >= every_s
