"""The service runtime: handler declaration, dispatch through the in-process bus, probes."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from common.bus.memory import InMemoryBus
from common.errors import InvalidInput
from common.events import RawDataExtracted, SourceDataAvailable
from common.health import HealthServer
from common.runtime import Service, ServiceRunner, handles
from common.settings import Settings


class Ingest(Service):
    name = "ingest"

    def __init__(self) -> None:
        self.seen: list[str] = []

    @handles(SourceDataAvailable, expected=(FileNotFoundError,))
    def on_source(self, event: SourceDataAvailable) -> RawDataExtracted:
        self.seen.append(event.dataset)
        if event.uri == "missing":
            raise FileNotFoundError(event.uri)
        return event.caused(
            RawDataExtracted, producer=self.name, dataset=event.dataset, batch_id="b1",
            source_uri=event.uri, rows=1, columns=["a"],
        )


class Sink(Service):
    name = "sink"

    def __init__(self) -> None:
        self.got: list[RawDataExtracted] = []

    @handles(RawDataExtracted)
    def on_raw(self, event: RawDataExtracted) -> None:
        self.got.append(event)


def wire(*services: Service) -> InMemoryBus:
    bus = InMemoryBus()
    for service in services:
        bus.register(ServiceRunner(service, bus, Settings()).dispatcher())
    return bus


def test_handles_declares_one_spec_per_event_type_with_expected_errors() -> None:
    specs = Ingest().handler_specs()
    assert list(specs) == ["SourceDataAvailable"]
    assert specs["SourceDataAvailable"].expected == (FileNotFoundError,)


def test_returned_events_are_published_with_causation() -> None:
    ingest, sink = Ingest(), Sink()
    bus = wire(ingest, sink)
    source = SourceDataAvailable(dataset="d", uri="u", producer="test")
    bus.publish(source)
    bus.run_until_idle()
    assert len(sink.got) == 1
    assert sink.got[0].causation_id == source.event_id
    assert sink.got[0].correlation_id == source.correlation_id


def test_expected_error_is_dead_lettered_without_retry() -> None:
    ingest = Ingest()
    bus = wire(ingest, Sink())
    bus.publish(SourceDataAvailable(dataset="d", uri="missing", producer="test"))
    bus.run_until_idle()
    assert ingest.seen == ["d"]  # one attempt only
    [letter] = bus.dead_letters("ingest")
    assert letter.error == "FileNotFoundError: missing"


def test_invalid_input_is_expected_everywhere() -> None:
    class Picky(Service):
        name = "picky"
        calls = 0

        @handles(SourceDataAvailable)
        def on_source(self, event: SourceDataAvailable) -> None:
            Picky.calls += 1
            raise InvalidInput(f"column 'amount' missing in {event.uri}")

    bus = wire(Picky())
    bus.publish(SourceDataAvailable(dataset="d", uri="x.csv", producer="test"))
    bus.run_until_idle()
    assert Picky.calls == 1
    assert "column 'amount' missing in x.csv" in bus.dead_letters("picky")[0].error


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_server_serves_probes_and_metrics() -> None:
    ready = threading.Event()
    runner = ServiceRunner(Ingest(), InMemoryBus(), Settings())
    server = HealthServer(runner.metrics.registry, ready.is_set, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz")[0] == 503
        ready.set()
        assert get(f"{base}/readyz")[0] == 200
        status, body = get(f"{base}/metrics")
        assert status == 200 and "conveyor_handler_duration_seconds" in body
        assert get(f"{base}/nope")[0] == 404
    finally:
        server.stop()


def test_runner_is_ready_only_when_consuming_and_service_ready() -> None:
    class NotReady(Ingest):
        def ready(self) -> bool:
            return False

    runner = ServiceRunner(NotReady(), InMemoryBus(), Settings())
    runner.connected.set()
    assert not runner.ready()
    runner = ServiceRunner(Ingest(), InMemoryBus(), Settings())
    assert not runner.ready()
    runner.connected.set()
    assert runner.ready()


def test_runner_metrics_count_handled_and_dead_lettered() -> None:
    ingest = Ingest()
    bus = InMemoryBus()
    runner = ServiceRunner(ingest, bus, Settings())
    bus.register(runner.dispatcher())
    bus.declare("sink", ["RawDataExtracted"])
    bus.publish_many([
        SourceDataAvailable(dataset="d", uri="ok", producer="t"),
        SourceDataAvailable(dataset="d", uri="missing", producer="t"),
    ])
    bus.run_until_idle()
    value = runner.metrics.registry.get_sample_value
    labels = {"service": "ingest", "event_type": "SourceDataAvailable"}
    assert value("conveyor_events_handled_total", labels) == 1
    assert value("conveyor_events_dead_lettered_total", labels) == 1


@pytest.mark.parametrize("name", ["eventlog"])
def test_catalogue_builds_services(name: str) -> None:
    from app.services import build_service

    assert build_service(name, Settings()).name == name
    with pytest.raises(KeyError, match="unknown service .nope.; known: .*eventlog"):
        build_service("nope", Settings())


def test_queue_depths_are_exported_at_scrape_time() -> None:
    bus = InMemoryBus()
    runner = ServiceRunner(Ingest(), bus, Settings())
    bus.register(runner.dispatcher())
    bus.publish(SourceDataAvailable(dataset="d", uri="ok", producer="t"))
    value = runner.metrics.registry.get_sample_value
    assert value("conveyor_queue_depth", {"service": "ingest", "queue": "ready"}) == 1
    bus.declare("sink", ["RawDataExtracted"])
    bus.run_until_idle()
    assert value("conveyor_queue_depth", {"service": "ingest", "queue": "ready"}) == 0


def test_a_service_with_idempotent_handlers_keeps_no_record_of_processed_events() -> None:
    from common.bus.idempotency import MemoryProcessedEvents
    from common.eventlog import EventLog, EventLogService

    class NoRedis:  # what the event log's memory gauge asks of Redis when registered
        def info(self, section: str) -> dict[str, int]:
            return {"used_memory": 1, "maxmemory": 0}

    processed = MemoryProcessedEvents()
    eventlog = EventLogService(EventLog(NoRedis(), "t"))  # type: ignore[arg-type]
    assert ServiceRunner(eventlog, InMemoryBus(), Settings(),
                         processed=processed).dispatcher().processed is None
    assert ServiceRunner(Sink(), InMemoryBus(), Settings(),
                         processed=processed).dispatcher().processed is processed
