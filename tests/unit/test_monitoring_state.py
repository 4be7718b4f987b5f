"""Monitoring's state in the real Redis: the outcome join's buckets, claims, decisions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from common.events import DriftDetected, RetrainRequested, ServedScore
from common.settings import Settings
from monitoring.core import Counters
from monitoring.state import MonitoringState, Served
from tests.support.harness import delete_redis_keys, isolated_settings

T0 = 1_700_000_000.0


@pytest.fixture
def state(services_up: None) -> Iterator[MonitoringState]:
    settings: Settings = isolated_settings()
    client = redis.Redis.from_url(settings.redis_url)
    yield MonitoringState(client, settings.namespace, served_ttl_s=3_600, outcome_window=3)
    delete_redis_keys(settings)
    client.close()


def score(request: str, entity: str, version: str, label: str = "1") -> ServedScore:
    return ServedScore(request_id=request, entity_id=entity, model_version=version, score=0.75,
                       label=label, latency_ms=1.0)


def test_a_score_is_found_by_request_or_as_the_entitys_latest(state: MonitoringState) -> None:
    state.remember([score("r1", "C1", "v1", "0")], now=T0)
    state.remember([score("r2", "C1", "v2", "1")], now=T0 + 2 * state.bucket_s)
    later = T0 + 3 * state.bucket_s
    assert state.served("r1", "ignored", now=later) == Served("v1", "0", 0.75)
    assert state.served(None, "C1", now=later) == Served("v2", "1", 0.75)
    assert state.served("nope", "C1", now=later) is None  # a named request is not guessed


def test_a_model_infer_row_is_joined_by_its_request_only(state: MonitoringState) -> None:
    state.remember([score("call-7/0", "", "v3", "0"), score("call-7/1", "", "v3", "1")], now=T0)
    assert state.served("call-7/1", "", now=T0) == Served("v3", "1", 0.75)
    assert state.served(None, "", now=T0) is None  # no entity: nothing to guess from
    assert b"e:" not in state.client.hkeys(state.buckets(now=T0)[0])


def test_a_score_older_than_the_ttl_is_not_joined(state: MonitoringState) -> None:
    state.remember([score("r1", "C1", "v1")], now=T0)
    assert state.served("r1", "C1", now=T0 + 3_600) is not None
    assert state.served("r1", "C1", now=T0 + 3_600 + 2 * state.bucket_s) is None
    ttl = state.client.ttl(state.buckets(now=T0)[0])
    assert 3_600 < ttl <= 3_600 + state.bucket_s  # the bucket expires in Redis too


def test_the_outcome_window_is_bounded(state: MonitoringState) -> None:
    for i in range(5):
        pairs = state.add_outcome("v1", str(i), "0")
    assert pairs == [("2", "0"), ("3", "0"), ("4", "0")]
    assert state.count_unmatched() == 1 and state.unmatched() == 1


def test_a_claim_holds_for_its_event_only_until_it_expires(state: MonitoringState) -> None:
    assert state.claim("retrain", "event-1", ttl_s=60)
    assert state.claim("retrain", "event-1", ttl_s=60)  # the same event asking again
    assert not state.claim("retrain", "event-2", ttl_s=60)
    state.client.delete(state.key("claim", "retrain"))  # as if the cooldown had passed
    assert state.claim("retrain", "event-2", ttl_s=60)


def test_decisions_come_back_as_the_same_events(state: MonitoringState) -> None:
    emitted = [DriftDetected(model_version="v1", level="alert", psi={"a": 0.4},
                             producer="monitoring"),
               RetrainRequested(reason="drift", dataset="toy", producer="monitoring")]
    assert state.decisions("cause-1") is None
    state.record_decisions("cause-1", emitted, ttl_s=60)
    assert state.decisions("cause-1") == emitted


def test_the_live_view_keeps_totals_and_json_values(state: MonitoringState) -> None:
    counters = Counters(served=7, fallbacks=2, latency_sum_ms=21.0, latency_min_ms=1.0,
                        latency_max_ms=9.0, histogram=[1] * 13)
    state.write_live("v1", {"served": 7, "fallbacks": 2, "latency_sum_ms": 21.0,
                            "latency_min_ms": 1.0, "latency_max_ms": 9.0,
                            "histogram": [1] * 13, "quality": {"accuracy": 0.5},
                            "latency_p99_ms": float("nan"), "model_id": "123"})
    assert state.counters("v1") == counters
    assert state.counters("v2") is None
    view = state.live_all()["v1"]
    assert view["quality"] == {"accuracy": 0.5} and view["model_id"] == "123"
    assert view["latency_p99_ms"] != view["latency_p99_ms"]  # NaN survives


def test_answers_are_packed_and_scorings_request_ids_kept_as_bytes(
        state: MonitoringState) -> None:
    rid = "0123456789abcdef0123456789abcdef"  # scoring's own ids: uuid4 hex
    state.remember([score(rid, "C1", "v3", "1"),
                    ServedScore(request_id="app-7", entity_id="C2", model_version="v3",
                                score=0.1 + 0.2, label=None, latency_ms=1.0)], now=T0)
    [bucket] = state.buckets(now=T0)
    fields = set(state.client.hkeys(bucket))
    assert fields == {b"R" + bytes.fromhex(rid), b"r:app-7", b"e:C1", b"e:C2"}
    assert sorted(len(v) for v in state.client.hvals(bucket)) == [11, 11, 13, 13]  # JSON: ~28
    assert state.served(rid, "C1", now=T0) == Served("v3", "1", 0.75)
    assert state.served("app-7", "C2", now=T0) == Served("v3", None, 0.1 + 0.2)  # exact


def test_answers_written_as_json_with_text_ids_are_still_joined(
        state: MonitoringState) -> None:
    rid = "fedcba9876543210fedcba9876543210"
    state.remember([score("r0", "C0", "v1")], now=T0)
    [bucket] = state.buckets(now=T0)
    state.client.hset(bucket, mapping={f"r:{rid}": b'["v1","0",0.5]', "e:C9": b'["v1",null,0.25]'})
    assert state.served(rid, "C9", now=T0) == Served("v1", "0", 0.5)
    assert state.served(None, "C9", now=T0) == Served("v1", None, 0.25)
