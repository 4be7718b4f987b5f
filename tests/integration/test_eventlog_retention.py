"""The event log stays bounded: bodies and lineage links expire, ScoreServed bodies are not
kept (or briefly), the stream is trimmed; Redis's memory is exported as a gauge."""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from app.cli import main
from common.eventlog import EventLog, EventLogService
from common.events import (
    Event,
    OutcomeObserved,
    RawDataExtracted,
    RecordsObserved,
    ScoreServed,
    ServedScore,
    SourceDataAvailable,
)
from common.lineage import trace
from common.redis_memory import RedisMemory
from common.settings import Settings
from tests.support.harness import BusNamespace

pytestmark = pytest.mark.integration
DAY = 86_400


def served(n: int = 3) -> ScoreServed:
    scores = [ServedScore(request_id=f"r{i}", entity_id=f"C{i}", model_version="v1", score=0.5,
                          latency_ms=1.0, features={"amount": 1.0 * i}) for i in range(n)]
    return ScoreServed(scores=scores, producer="scoring")


def source_and_raw() -> tuple[SourceDataAvailable, RawDataExtracted]:
    source = SourceDataAvailable(dataset="d", uri="d.csv", producer="test")
    return source, source.caused(RawDataExtracted, producer="ingestion", dataset="d",
                                 batch_id="b1", source_uri="d.csv", rows=3, columns=["a"])


def ttl(ns: BusNamespace, *parts: str) -> int:
    return int(ns.redis.ttl(":".join((ns.namespace, *parts))))


def test_a_score_served_body_is_not_kept_by_default_only_its_size(ns: BusNamespace) -> None:
    log = EventLog(ns.redis, ns.namespace)
    event = served(3)
    log.record(event)
    assert log.get(event.event_id) is None
    assert ns.redis.exists(f"{ns.namespace}:event:{event.event_id}") == 0
    entry = log.recent(1)[0]
    assert entry["event_type"] == "ScoreServed" and json.loads(entry["payload"]) == {"scores": 3}


def test_a_score_served_body_can_be_kept_briefly(ns: BusNamespace) -> None:
    log = EventLog(ns.redis, ns.namespace, score_served_ttl_s=120)
    event = served()
    log.record(event)
    assert log.get(event.event_id) == event
    assert 0 < ttl(ns, "event", str(event.event_id)) <= 120


def test_an_outcome_body_is_not_kept_by_default_its_payload_is_in_the_stream(
        ns: BusNamespace) -> None:
    log = EventLog.from_settings(ns.redis, Settings(namespace=ns.namespace))
    event = OutcomeObserved(entity_id="C1", outcome="1", request_id="r1", producer="app")
    log.record(event)
    assert ns.redis.exists(f"{ns.namespace}:event:{event.event_id}") == 0
    payload = json.loads(log.recent(1)[0]["payload"])
    assert (payload["entity_id"], payload["outcome"], payload["request_id"]) == ("C1", "1", "r1")


def test_observed_bodies_can_be_kept_briefly_and_records_are_summarised_by_count(
        ns: BusNamespace) -> None:
    log = EventLog.from_settings(ns.redis, Settings(namespace=ns.namespace,
                                                    eventlog_observed_ttl_s=600))
    records = RecordsObserved(dataset="paysim", records=[{"a": i} for i in range(50)],
                              producer="app")
    log.record(records)
    assert log.get(records.event_id) == records
    assert 0 < ttl(ns, "event", str(records.event_id)) <= 600
    assert json.loads(log.recent(1)[0]["payload"]) == {"dataset": "paysim", "records": 50}


def test_bodies_and_lineage_links_expire_after_the_retention(ns: BusNamespace) -> None:
    log = EventLog.from_settings(ns.redis, Settings(namespace=ns.namespace,
                                                    eventlog_retention_days=2))
    source, raw = source_and_raw()
    for event in (source, raw):
        log.record(event)
    assert 0 < ttl(ns, "event", str(raw.event_id)) <= 2 * DAY
    assert 2 * DAY - 60 < ttl(ns, "caused-by", str(source.event_id)) <= 2 * DAY
    assert 2 * DAY - 60 < ttl(ns, "artifact", "b1") <= 2 * DAY
    assert [e.event_type for e in trace(log, "b1").ancestors] == ["SourceDataAvailable"]


def test_a_link_lives_as_long_as_its_longest_lived_body(ns: BusNamespace) -> None:
    source, raw = source_and_raw()
    EventLog(ns.redis, ns.namespace, retention_s=DAY).record(raw)
    EventLog(ns.redis, ns.namespace, retention_s=60).record(
        raw.model_copy(update={"event_id": source.event_id}))  # links b1 again, shorter
    assert DAY - 60 < ttl(ns, "artifact", "b1") <= DAY
    EventLog(ns.redis, ns.namespace, retention_s=2 * DAY).record(raw)
    assert ttl(ns, "artifact", "b1") > DAY  # extended by a longer-lived body


def test_the_stream_is_trimmed_to_its_bound(ns: BusNamespace) -> None:
    log = EventLog(ns.redis, ns.namespace, maxlen=10)
    events: list[Event] = [served(1) for _ in range(400)]
    for event in events:
        log.record(event)
    # Trimming is approximate (whole stream nodes of up to 100 entries): far below 400.
    assert int(ns.redis.xlen(log.stream)) <= 10 + 100


def test_the_stream_forgets_entries_older_than_the_retention(ns: BusNamespace) -> None:
    log = EventLog(ns.redis, ns.namespace)
    old_ms = 1_000  # entries from 1970: far older than any retention
    for seq in range(100):  # trimming drops whole stream nodes (100 entries): fill one
        ns.redis.xadd(log.stream, {"event_type": "old"}, id=f"{old_ms}-{seq + 1}")
    log.record(served(1))
    assert ns.redis.xrange(log.stream, min="-", max=f"{old_ms}-100") == []
    assert int(ns.redis.xlen(log.stream)) == 1


def test_the_event_log_service_exports_redis_memory(ns: BusNamespace) -> None:
    registry = CollectorRegistry()
    EventLogService(EventLog(ns.redis, ns.namespace)).register_metrics(registry)
    used = registry.get_sample_value("conveyor_redis_used_memory_bytes")
    info = ns.redis.info("memory")
    assert used is not None and 0.5 * info["used_memory"] < used < 2 * info["used_memory"]
    assert registry.get_sample_value("conveyor_redis_maxmemory_bytes") == info["maxmemory"]


def test_conveyor_status_shows_redis_memory(ns: BusNamespace) -> None:
    env = {**os.environ, "CONVEYOR_NAMESPACE": ns.namespace,
           "CONVEYOR_AMQP_URL": ns.settings.amqp_url}
    shown = CliRunner().invoke(main, ["status"], env=env)
    line = next(x for x in shown.output.splitlines() if x.startswith("Redis memory: "))
    assert re.fullmatch(r"Redis memory: [\d.]+ (B|KiB|MiB|GiB) used \(peak [\d.]+ \w+\)"
                        r"(, no maxmemory| of [\d.]+ \w+ maxmemory \(\d+%\))", line), line


@pytest.mark.parametrize(("used", "peak", "most", "text"), [
    (512, 512, 0, "512 B used (peak 512 B), no maxmemory"),
    (3 * 2**20, 2**30, 2**31, "3.0 MiB used (peak 1.0 GiB) of 2.0 GiB maxmemory (0%)"),
    (3 * 2**30, 3 * 2**30, 4 * 2**30, "3.0 GiB used (peak 3.0 GiB) of 4.0 GiB maxmemory (75%)"),
])
def test_redis_memory_is_described_for_people(used: int, peak: int, most: int,
                                               text: str) -> None:
    assert RedisMemory(used, peak, most).describe() == text
