"""Prometheus metrics of a service's event handling, on a registry of its own.

Every service exports, per ``service`` and ``event_type``: events handled, failed,
retried, dead-lettered, duplicate and published (``conveyor_events_*_total``), the
handler duration (``conveyor_handler_duration_seconds``), its queue depths
(``conveyor_queue_depth{service, queue}``) and, where its handler carries a pipeline
stage, the stage's duration (``conveyor_pipeline_stage_duration_seconds{stage}``).

A stage's duration is the successful handler run of the event that drives the stage,
from delivery to the events it caused confirmed by the broker (see ``PIPELINE_STAGES``).
Segregation runs inside preparation, training and evaluation (a library call), so it is
part of their stages rather than one of its own.

Example::

    metrics = BusMetrics(CollectorRegistry())
    metrics.precreate("ingestion", ["SourceDataAvailable"])   # series exist at 0
    metrics.handled.labels("ingestion", "SourceDataAvailable").inc()
    pipeline_stage("ingestion", "SourceDataAvailable")       # "ingestion"
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800)
STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

PIPELINE_STAGES: dict[str, str] = {
    "SourceDataAvailable": "ingestion",
    "RawDataExtracted": "preparation",
    "FeaturesGenerated": "training",
    "RetrainRequested": "training",
    "CandidatesTrained": "evaluation",
    "ModelReady": "deployment",  # the scoring service loads, verifies and warms the model
    "BatchScoringRequested": "batch_scoring",
}
"""The event that drives each stage of the pipeline, and the stage it drives."""

SIDE_STAGES: dict[tuple[str, str], str] = {
    ("preparation", "FeaturesGenerated"): "online_materialisation",
}
"""Stages a service runs beside the main line, on an event that drives another stage:
preparation writes a feature set's online rows while training trains on it."""

OBSERVERS = frozenset({"eventlog", "monitoring"})
"""Services that watch events without carrying a stage forward: they time no stage."""


def pipeline_stage(service: str, event_type: str) -> str | None:
    """The pipeline stage a service carries when it handles an event type, if any."""
    if service in OBSERVERS:
        return None
    return SIDE_STAGES.get((service, event_type)) or PIPELINE_STAGES.get(event_type)


class BusMetrics:
    """Counters and a duration histogram per service and event type; stage durations."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ("service", "event_type")
        self.handled = self._counter("events_handled", "Events handled successfully.", labels)
        self.failed = self._counter("events_failed", "Handler attempts that raised.", labels)
        self.retried = self._counter("events_retried", "Events sent to a retry delay.", labels)
        self.dead_lettered = self._counter(
            "events_dead_lettered", "Events sent to the dead-letter queue.", labels
        )
        self.duplicates = self._counter(
            "events_duplicate", "Redelivered events whose work was already done.", labels
        )
        self.published = self._counter(
            "events_published", "Events a handler caused, confirmed by the broker.", labels
        )
        self.duration = Histogram(
            "conveyor_handler_duration_seconds",
            "Handler duration in seconds.",
            labels,
            buckets=HANDLER_BUCKETS,
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "conveyor_pipeline_stage_duration_seconds",
            "Duration of a pipeline stage: the successful handler run of the event that "
            "drives it, events caused included.",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        return Counter(f"conveyor_{name}", doc, labels, registry=self.registry)

    def precreate(self, service: str, event_types: Iterable[str]) -> None:
        """Create the series of the event types a service handles, at 0.

        So the first event of a kind shows up in ``rate()`` and ``increase()`` (a series
        born at 1 has no earlier sample to count from) and dashboards are never empty.
        """
        for event_type in event_types:
            for metric in (self.handled, self.failed, self.retried, self.dead_lettered,
                           self.duplicates, self.duration):
                metric.labels(service, event_type)
            stage = pipeline_stage(service, event_type)
            if stage is not None:
                self.stage_duration.labels(stage)


class QueueDepthCollector(Collector):
    """``conveyor_queue_depth{service, queue}``, read from the broker at each scrape.

    ``queue`` is ``ready``, ``dead`` or ``retry_<ms>ms``; a broker that cannot be asked
    (down, or not answering within the bus's depth timeout) yields no sample rather than a
    failed or hung scrape. The RabbitMQ bus asks over one connection it keeps for this.
    """

    def __init__(self, service: str, depths: Callable[[str], dict[str, int]]) -> None:
        self.service, self.depths = service, depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "conveyor_queue_depth", "Messages waiting in a service's queues.",
            labels=["service", "queue"],
        )
        try:
            depths = self.depths(self.service)
        except Exception:  # noqa: BLE001 - the scrape must still answer
            depths = {}
        for queue, depth in depths.items():
            if depth >= 0:
                family.add_metric([self.service, queue], depth)
        yield family
