"""Prometheus metrics of the monitoring service (names as COMMON.md's contract says).

Label sets of a version are created as soon as the version is known (``track``), so its
series exist at 0 before the first drift or degradation; ``conveyor_model_champion`` is
read from the registry at each scrape. Example::

    metrics = MonitoringMetrics(registry, champion_of=lambda: ("v3", ["v1", "v2", "v3"]))
    metrics.track("v3")
    metrics.served.labels("v3").inc(100)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from monitoring.core import LATENCY_BUCKETS_MS
from monitoring.drift import PREDICTION, DriftReport
from monitoring.quality import METRICS

ChampionOf = Callable[[], tuple[str | None, Sequence[str]]]


class ChampionCollector(Collector):
    """``conveyor_model_champion{model_version}``: 1 for the champion, 0 for the others."""

    def __init__(self, champion_of: ChampionOf) -> None:
        self.champion_of = champion_of

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("conveyor_model_champion",
                                   "1 for the registry's champion version, 0 for the others.",
                                   labels=["model_version"])
        try:
            champion, versions = self.champion_of()
        except Exception:  # noqa: BLE001 - the scrape must still answer
            champion, versions = None, []
        for version in versions:
            family.add_metric([version], 1.0 if version == champion else 0.0)
        yield family


class MonitoringMetrics:
    """Every metric monitoring exports, on one registry."""

    def __init__(self, registry: CollectorRegistry, champion_of: ChampionOf | None = None):
        self.registry = registry
        version = ("model_version",)
        self.served = Counter("conveyor_model_served", "Scores served, per answering version.",
                              version, registry=registry)
        self.quality = Gauge("conveyor_model_quality", "Live quality from observed outcomes.",
                             (*version, "metric"), registry=registry)
        self.quality_expected = Gauge("conveyor_model_quality_expected",
                                      "Quality on the evaluation part.", (*version, "metric"),
                                      registry=registry)
        self.feature_psi = Gauge("conveyor_feature_drift_psi", "PSI of an input feature.",
                                 (*version, "feature"), registry=registry)
        self.feature_ks = Gauge("conveyor_feature_drift_ks", "KS statistic of an input feature.",
                                (*version, "feature"), registry=registry)
        self.prediction_psi = Gauge("conveyor_prediction_drift_psi", "PSI of the predictions.",
                                    version, registry=registry)
        self.drift_detected = Counter("conveyor_drift_detected", "DriftDetected events emitted.",
                                      (*version, "level"), registry=registry)
        self.degraded = Counter("conveyor_model_degraded", "ModelDegraded events emitted.",
                                (*version, "reason"), registry=registry)
        self.latency = Histogram("conveyor_model_serving_latency_seconds",
                                 "Serving time of scores, per answering version.", version,
                                 buckets=[b / 1e3 for b in LATENCY_BUCKETS_MS], registry=registry)
        self.outcomes = Counter("conveyor_outcomes", "Observed outcomes, joined or unmatched.",
                                ("result",), registry=registry)
        self.psi_alert = Gauge("conveyor_monitoring_psi_alert",
                               "PSI from which monitoring calls a drift an alert (its setting; "
                               "the drift alert rules compare with it).", registry=registry)
        self.quality_margin = Gauge("conveyor_monitoring_quality_margin",
                                    "How far the monitored quality metric may fall below its "
                                    "evaluation figure (its setting; the quality alert rule "
                                    "compares with it).", ("metric",), registry=registry)
        for result in ("joined", "unmatched"):
            self.outcomes.labels(result)
        if champion_of is not None:
            registry.register(ChampionCollector(champion_of))

    def thresholds(self, psi_alert: float, quality_metric: str, quality_margin: float) -> None:
        """Export the thresholds monitoring judges by, for the alert rules to use the same."""
        self.psi_alert.set(psi_alert)
        self.quality_margin.labels(quality_metric).set(quality_margin)

    def track(self, version: str, expected: Mapping[str, float] | None = None) -> None:
        """Create a version's label sets (at 0) and set its evaluation figures."""
        self.served.labels(version)
        self.prediction_psi.labels(version)
        self.latency.labels(version)
        for level in ("warn", "alert"):
            self.drift_detected.labels(version, level)
        for reason in ("accuracy", "latency"):
            self.degraded.labels(version, reason)
        for metric in METRICS:
            if expected and metric in expected:
                self.quality_expected.labels(version, metric).set(float(expected[metric]))

    def observe_drift(self, version: str, report: DriftReport) -> None:
        """Set the PSI and KS gauges of a measurement."""
        for name, drift in report.inputs.items():
            if name == PREDICTION:
                self.prediction_psi.labels(version).set(drift.psi)
            else:
                self.feature_psi.labels(version, name).set(drift.psi)
                self.feature_ks.labels(version, name).set(drift.ks_statistic)

    def observe_quality(self, version: str, live: Mapping[str, float]) -> None:
        """Set the live quality gauges."""
        for metric, value in live.items():
            self.quality.labels(version, metric).set(value)
