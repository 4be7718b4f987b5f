"""The online path through a Redis restart: a ``redis-server`` of the test's own, with an
append-only file synced on every write, killed mid-stream and started again. Every record
is applied once (a message is acknowledged only after its write), none is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.local import wait_until
from common.events import RecordsObserved
from common.runtime import ServiceRunner
from common.stores.entity_state import MemoryEntityState
from ingestion.records import check_records
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.streaming import as_records, stream_frame, stream_world
from tests.support.harness import (
    BusNamespace,
    isolated_settings,
    running_consumer,
    wait_for_handler,
)

pytestmark = pytest.mark.faults
EVENTS, PER_EVENT = 40, 25


def applied(calls: list[Any]) -> set[Any]:
    """The ids of the events a handler call took without raising."""
    return {call.event.event_id for call in list(calls) if call.exception is None}


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, durable=True)
    server.start()
    yield server
    server.stop()


def test_a_redis_restart_mid_stream_loses_no_record(tmp_path: Path, services_up: None,
                                                     durable_redis: RedisServer) -> None:
    settings = isolated_settings(redis_url=durable_redis.url, prefetch=1, max_attempts=50,
                                 retry_delays_s=(0.1, 0.3), idempotency_retry_s=60.0)
    ns = BusNamespace(settings)
    client = redis.Redis.from_url(durable_redis.url)
    world = stream_world(tmp_path, ns.namespace, stream_frame(EVENTS * PER_EVENT, accounts=20),
                         redis_client=client)
    records = as_records(world.frame)
    events = [RecordsObserved(dataset="paysim", records=records[i:i + PER_EVENT],
                              producer="test") for i in range(0, len(records), PER_EVENT)]
    service = world.service()
    ns.declare(service.name, ["RecordsObserved"])
    bus = ns.bus(f"{ns.namespace}-online")
    dispatcher = ServiceRunner(service, bus, settings, processed=ns.processed()).dispatcher()
    every_event = {e.event_id for e in events}
    try:
        with running_consumer(bus, dispatcher), wait_for_handler(
                dispatcher, "RecordsObserved", count=EVENTS, timeout=120) as waited:
            with wait_for_handler(dispatcher, "RecordsObserved", count=5):
                ns.bus().publish_many(events)
            waiting_at_kill = ns.depths(service.name)["ready"]
            durable_redis.stop()
            durable_redis.start()
            wait_until(lambda: applied(waited.calls) == every_event, timeout=120,
                       message="every event applied after the restart")
        assert waiting_at_kill > 0  # the restart came with records still to apply
        entities = sorted({r["nameOrig"] for r in records})
        replay, plan = MemoryEntityState(), service.plan(world.fitted.feature_set_id)
        checked = check_records(records, world.config.datasets["paysim"])
        replay.apply("fs", plan.record_entries(checked.records, checked.ids), plan.retention)
        assert world.state.read(world.fitted.feature_set_id, entities) == replay.read(
            "fs", entities)
    finally:
        world.close()
        ns.close()
