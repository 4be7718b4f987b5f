"""Prometheus metrics of a service's event handling, on a registry of its own.

Example::

    metrics = BusMetrics(CollectorRegistry())
    metrics.handled.labels("ingestion", "SourceDataAvailable").inc()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800)


class BusMetrics:
    """Counters and a duration histogram per service and event type."""

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
        self.duration = Histogram(
            "conveyor_handler_duration_seconds",
            "Handler duration in seconds.",
            labels,
            buckets=HANDLER_BUCKETS,
            registry=self.registry,
        )

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        return Counter(f"conveyor_{name}", doc, labels, registry=self.registry)


class QueueDepthCollector(Collector):
    """``conveyor_queue_depth{service, queue}``, read from the broker at each scrape.

    ``queue`` is ``ready``, ``dead`` or ``retry_<ms>ms``; a broker that cannot be asked
    yields no sample rather than a failed scrape.
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
