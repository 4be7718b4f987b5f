"""The metrics every service exports: names, pre-created series, published events, stages."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pika.exceptions import AMQPConnectionError
from prometheus_client import CollectorRegistry

from common.bus.dispatch import Delivery, Dispatcher, HandlerSpec, RetryPolicy
from common.bus.memory import InMemoryBus
from common.bus.rabbitmq import RabbitMQBus
from common.events import Event, RawDataExtracted, SourceDataAvailable
from common.metrics import BusMetrics, QueueDepthCollector, pipeline_stage
from common.runtime import Service, ServiceRunner, handles
from common.settings import Settings


def source(uri: str = "ok") -> SourceDataAvailable:
    return SourceDataAvailable(dataset="d", uri=uri, producer="test")


def extract(event: SourceDataAvailable) -> RawDataExtracted:
    if event.uri == "bad":
        raise RuntimeError("cannot read")
    return event.caused(RawDataExtracted, producer="ingestion", dataset=event.dataset,
                        batch_id="b1", source_uri=event.uri, rows=1, columns=["a"])


def dispatcher(service: str) -> Dispatcher:
    spec = HandlerSpec("SourceDataAvailable", extract)
    return Dispatcher(service, {"SourceDataAvailable": spec}, lambda events: None,
                      policy=RetryPolicy(max_attempts=1), metrics=BusMetrics())


def deliver(target: Dispatcher, event: Event) -> None:
    target.dispatch(Delivery(event.to_json(), event.event_type, {}))


def value(target: Dispatcher, name: str, **labels: str) -> float | None:
    return target.metrics.registry.get_sample_value(name, labels)


def test_series_of_handled_event_types_exist_at_zero_before_any_event() -> None:
    target = dispatcher("ingestion")
    labels = {"service": "ingestion", "event_type": "SourceDataAvailable"}
    for what in ("handled", "failed", "retried", "dead_lettered", "duplicate"):
        assert value(target, f"conveyor_events_{what}_total", **labels) == 0, what
    assert value(target, "conveyor_handler_duration_seconds_count", **labels) == 0
    assert value(target, "conveyor_pipeline_stage_duration_seconds_count",
                 stage="ingestion") == 0


def test_published_events_are_counted_per_type_of_the_event_caused() -> None:
    target = dispatcher("ingestion")
    deliver(target, source())
    deliver(target, source())
    assert value(target, "conveyor_events_published_total",
                 service="ingestion", event_type="RawDataExtracted") == 2
    assert value(target, "conveyor_events_published_total",
                 service="ingestion", event_type="SourceDataAvailable") is None


def test_a_failed_handler_publishes_nothing_and_times_no_stage() -> None:
    target = dispatcher("ingestion")
    deliver(target, source("bad"))
    assert value(target, "conveyor_events_dead_lettered_total",
                 service="ingestion", event_type="SourceDataAvailable") == 1
    assert value(target, "conveyor_events_published_total",
                 service="ingestion", event_type="RawDataExtracted") is None
    assert value(target, "conveyor_pipeline_stage_duration_seconds_count",
                 stage="ingestion") == 0


def test_the_stage_is_timed_by_the_service_that_carries_it_not_by_observers() -> None:
    carrier, observer = dispatcher("ingestion"), dispatcher("eventlog")
    deliver(carrier, source())
    deliver(observer, source())
    assert value(carrier, "conveyor_pipeline_stage_duration_seconds_count",
                 stage="ingestion") == 1
    assert value(carrier, "conveyor_handler_duration_seconds_count", service="ingestion",
                 event_type="SourceDataAvailable") == 1
    assert value(observer, "conveyor_pipeline_stage_duration_seconds_count",
                 stage="ingestion") is None


def test_each_stage_has_the_event_that_drives_it() -> None:
    assert pipeline_stage("preparation", "RawDataExtracted") == "preparation"
    assert pipeline_stage("training", "FeaturesGenerated") == "training"
    assert pipeline_stage("preparation", "FeaturesGenerated") == "online_materialisation"
    assert pipeline_stage("training", "RetrainRequested") == "training"
    assert pipeline_stage("evaluation", "CandidatesTrained") == "evaluation"
    assert pipeline_stage("scoring", "ModelReady") == "deployment"
    assert pipeline_stage("monitoring", "ModelReady") is None
    assert pipeline_stage("scoring", "ScoreServed") is None


class Ingest(Service):
    name = "ingestion"

    @handles(SourceDataAvailable)
    def on_source(self, event: SourceDataAvailable) -> RawDataExtracted:
        return extract(event)


def families(registry: CollectorRegistry) -> dict[str, Any]:
    return {family.name: family for family in registry.collect()}


def test_every_metric_a_service_exports_follows_prometheus_naming() -> None:
    runner = ServiceRunner(Ingest(), InMemoryBus(), Settings())
    exported = families(runner.metrics.registry)
    assert {"conveyor_events_published", "conveyor_pipeline_stage_duration_seconds",
            "conveyor_queue_depth", "conveyor_handler_duration_seconds"} <= set(exported)
    for name, family in exported.items():
        assert name.startswith("conveyor_"), name
        assert family.type in ("counter", "histogram", "gauge"), f"{name} is a {family.type}"
        if family.type == "counter":  # the client appends _total to the exposed samples
            assert {s.name for s in family.samples} <= {f"{name}_total", f"{name}_created"}
        if family.type == "histogram":
            assert name.endswith("_seconds"), name


def test_a_silent_broker_costs_a_scrape_its_depths_and_does_not_hang_it() -> None:
    # The listener accepts TCP connections (the kernel's backlog) but never speaks AMQP,
    # as a wedged broker would: the bounded handshake or the bounded wait gives up.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        bus = RabbitMQBus(settings, name="silent", depth_timeout_s=0.5)
        try:
            with pytest.raises((TimeoutError, AMQPConnectionError)):
                bus.queue_depths("svc")
            registry = CollectorRegistry()
            registry.register(QueueDepthCollector("svc", bus.queue_depths))
            labels = {"service": "svc", "queue": "ready"}
            assert registry.get_sample_value("conveyor_queue_depth", labels) is None
        finally:
            bus.close()
