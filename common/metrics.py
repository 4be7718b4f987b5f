"""Prometheus metrics of a service's event handling, on a registry of its own.

Example::

    metrics = BusMetrics(CollectorRegistry())
    metrics.handled.labels("ingestion", "SourceDataAvailable").inc()
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.queue_depth = Gauge(
            "conveyor_queue_depth", "Messages ready in a queue.", ("queue",), registry=self.registry
        )

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        return Counter(f"conveyor_{name}", doc, labels, registry=self.registry)
