"""The outcome join's state is bounded by size as well as time (real Redis)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.connection import Connection

from common.events import ServedScore
from monitoring.service import MonitoringSettings
from monitoring.state import SERVED_MAX_ENTRIES, MonitoringState
from tests.support.harness import delete_redis_keys, isolated_settings

T0 = 1_700_000_000.0


@pytest.fixture
def client(services_up: None) -> Iterator[tuple[redis.Redis, str]]:
    settings = isolated_settings()
    connection = redis.Redis.from_url(settings.redis_url)
    yield connection, settings.namespace
    delete_redis_keys(settings)
    connection.close()


def bounded(client: tuple[redis.Redis, str], entries: int) -> MonitoringState:
    return MonitoringState(client[0], client[1], served_ttl_s=3_600,
                           served_max_entries=entries)


def scores(prefix: str, n: int) -> list[ServedScore]:
    return [ServedScore(request_id=f"{prefix}{i}", entity_id=f"{prefix}-C{i}", model_version="v1",
                        score=0.5, label="1", latency_ms=1.0) for i in range(n)]


def fields(state: MonitoringState) -> int:
    keys = state.client.keys(state.key("served", "*"))
    return sum(int(state.client.hlen(key)) for key in keys)


def test_past_the_bound_the_oldest_bucket_goes_first(client: tuple[redis.Redis, str]) -> None:
    state = bounded(client, entries=10)
    state.remember(scores("old", 3), now=T0)                       # 6 fields
    state.remember(scores("mid", 2), now=T0 + state.bucket_s)      # 10: at the bound
    assert state.served("old0", "x", now=T0 + state.bucket_s) is not None
    state.remember(scores("new", 1), now=T0 + 2 * state.bucket_s)  # 12: past it
    later = T0 + 2 * state.bucket_s
    assert state.served("old0", "x", now=later) is None
    assert state.served("mid0", "x", now=later) is not None
    assert state.served("new0", "x", now=later) is not None
    assert fields(state) == 6


def test_a_bound_hit_within_one_bucket_time_drops_the_oldest_scores_never_the_newest(
    client: tuple[redis.Redis, str], caplog: pytest.LogCaptureFixture
) -> None:
    state = bounded(client, entries=32)  # buckets close at 2 fields: one score
    with caplog.at_level(logging.WARNING, logger="monitoring.state"):
        for i in range(20):  # 40 fields within 20 s, all in the first bucket_s
            state.remember(scores(f"b{i}-", 1), now=T0 + i)
            assert state.served(f"b{i}-0", "x", now=T0 + i) is not None
    joined = [state.served(f"b{i}-0", "x", now=T0 + 20) is not None for i in range(20)]
    assert joined == [False] * 4 + [True] * 16
    assert fields(state) == 32
    assert "CONVEYOR_MONITORING_SERVED_MAX_ENTRIES" in caplog.text


def test_a_bucket_closes_at_a_sixteenth_of_the_bound(client: tuple[redis.Redis, str]) -> None:
    state = bounded(client, entries=160)
    for i in range(6):  # 4 scores, 8 fields a batch: a bucket closes once past 10
        state.remember(scores(f"b{i}-", 4), now=T0 + i)
    assert state.bucket_entries == 10
    assert [state.client.hlen(b) for b in state.buckets(now=T0 + 6)] == [16, 16, 16]


def test_memory_stays_within_the_bound_plus_one_batch_whatever_the_traffic(
    client: tuple[redis.Redis, str],
) -> None:
    state = bounded(client, entries=50)
    for step in range(200):
        now = T0 + step * state.bucket_s / 7
        state.remember(scores(f"s{step}-", 3), now=now)
        assert fields(state) <= 50 + 6
        assert state.served(f"s{step}-2", "x", now=now) is not None


class CountingConnection(Connection):
    """A Redis connection that counts what it sends: a command, or a whole pipeline, is one
    send and one round trip."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def round_trips(state: MonitoringState, batch: list[ServedScore], now: float) -> int:
    before = CountingConnection.sent
    state.remember(batch, {"v1": {"served": 1}}, now=now)
    return CountingConnection.sent - before


def test_a_batch_is_one_round_trip_and_a_restart_reads_the_buckets_it_finds_once(
    client: tuple[redis.Redis, str],
) -> None:
    counting = redis.Redis.from_url(isolated_settings().redis_url,
                                    connection_class=CountingConnection)
    counting.ping()  # the connection's handshake is not a batch's
    state = MonitoringState(counting, client[1], served_ttl_s=3_600, served_max_entries=160)
    # 8 fields a batch: buckets close at 10 fields and after bucket_s; 96 fields, no drop
    trips = [round_trips(state, scores(f"a{i}-", 4), T0 + i * state.bucket_s / 3)
             for i in range(12)]
    assert trips == [1] * 12 and len(state.buckets(now=T0 + 4 * state.bucket_s)) == 6
    assert state.live("v1") == {"served": 1}
    # 6 buckets of 16 fields; a restart with room for 112: the third batch drops one
    restarted = MonitoringState(counting, client[1], served_ttl_s=3_600, served_max_entries=112)
    now = T0 + 4 * state.bucket_s
    trips = [round_trips(restarted, scores(f"b{i}-", 4), now + i) for i in range(3)]
    assert trips == [2, 1, 2]  # the 6 buckets' HLEN once; the drop
    assert fields(restarted) == 120 - 16
    assert restarted.served("a0-0", "x", now=now + 2) is None
    assert restarted.served("a2-0", "x", now=now + 2) is not None
    counting.close()


def test_the_bound_is_a_monitoring_setting() -> None:
    assert MonitoringSettings().monitoring_served_max_entries == SERVED_MAX_ENTRIES
    assert MonitoringSettings(monitoring_served_max_entries=7).monitoring_served_max_entries == 7
