"""Online feature store and online score store against the real Redis.

Every test works in its own key namespace and deletes its keys afterwards. Redis is
guaranteed by scripts/setup.sh, so an unreachable Redis fails these tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import numpy as np
import pandas as pd
import pytest
import redis

from common.errors import InvalidInput, NotFound
from common.events import ServedScore
from common.settings import Settings
from common.stores import features as features_module
from common.stores.features import RedisOnlineStore, online_key
from common.stores.scores import FIELD_SCORE, OnlineScoreStore, score_stream_key

pytestmark = pytest.mark.integration

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class CountingConnection(redis.Connection):
    """A connection that counts (and keeps) what it sends: each send is one round trip."""

    sends = 0
    sent: list[bytes] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        chunks = [command] if isinstance(command, bytes | str) else command
        CountingConnection.sent.extend(
            bytes(c, "utf-8") if isinstance(c, str) else c for c in chunks
        )
        super().send_packed_command(command, check_health)


def reset_counts() -> None:
    CountingConnection.sends = 0
    CountingConnection.sent = []


def connect(**options: Any) -> redis.Redis:
    url = Settings().redis_url
    client = redis.Redis.from_url(url, **options)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {url} is unreachable ({exc}); run scripts/setup.sh", pytrace=False)
    return client


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"test-{uuid4().hex[:8]}"
    yield name
    client = connect()
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


@pytest.fixture
def client() -> redis.Redis:
    return connect()


@pytest.fixture
def online(client: redis.Redis, namespace: str) -> RedisOnlineStore:
    return RedisOnlineStore(client, namespace, entities_per_call=8, entities_per_pipeline=32)


def features(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "entity": [f"C{i}" for i in range(n)],
            "amount": rng.normal(size=n) * 1000,
            "count": rng.integers(0, 100, size=n),
            "kind": rng.choice(["CASH_OUT", "TRANSFER"], size=n),
        }
    )


def expected_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.drop(columns="entity").to_dict("records")


@pytest.mark.parametrize("n", [1, 100])
def test_round_trip(online, n):
    frame = features(n)
    assert online.write_batch("fs1", frame, "entity", event_time=T0) == n
    rows = online.read("fs1", frame["entity"].tolist())
    assert rows == expected_rows(frame)
    assert {type(rows[0]["amount"]), type(rows[0]["count"]), type(rows[0]["kind"])} == {
        float,
        int,
        str,
    }


def test_one_hash_per_entity_with_event_time(online, client, namespace):
    online.write_batch("fs1", features(1), "entity", event_time=T0)
    stored = client.hgetall(online_key(namespace, "fs1", "C0"))
    assert set(stored) == {b"_ts", b"_v"}
    assert stored[b"_ts"] == b"1704067200000000"


def test_missing_entity_reads_as_none(online):
    frame = features(3)
    online.write_batch("fs1", frame, "entity", event_time=T0)
    rows = online.read("fs1", ["C1", "nobody", "C2"])
    assert rows[0] == expected_rows(frame)[1] and rows[1] is None and rows[2] is not None


def test_chosen_features_only(online):
    online.write_batch("fs1", features(2), "entity", event_time=T0)
    assert list(online.read("fs1", ["C0"], ["kind", "count"])[0]) == ["kind", "count"]
    with pytest.raises(InvalidInput, match="'nope'"):
        online.read("fs1", ["C0"], ["nope"])


def test_unknown_feature_set_is_not_found(online):
    with pytest.raises(NotFound, match="never-written"):
        online.read("never-written", ["C0"])


def write_amount(online: RedisOnlineStore, amount: float, when: datetime) -> int:
    frame = pd.DataFrame({"entity": ["C0"], "amount": [amount]})
    return online.write_batch("fs1", frame, "entity", event_time=when)


def amount(online: RedisOnlineStore) -> float:
    return online.read("fs1", ["C0"])[0]["amount"]


def test_an_older_write_never_replaces_a_newer_one(online):
    assert write_amount(online, 2.0, T0 + timedelta(seconds=1)) == 1
    assert write_amount(online, 1.0, T0) == 0
    assert amount(online) == 2.0


def test_a_newer_write_replaces_an_older_one(online):
    write_amount(online, 1.0, T0)
    assert write_amount(online, 2.0, T0 + timedelta(microseconds=1)) == 1
    assert amount(online) == 2.0


def test_an_equal_time_overwrites(online):
    write_amount(online, 1.0, T0)
    assert write_amount(online, 3.0, T0) == 1
    assert amount(online) == 3.0


def test_last_write_wins_per_entity_within_a_batch(online):
    old = features(50, seed=1).assign(at=T0)
    online.write_batch("fs1", old, "entity", timestamp_column="at")
    mixed = features(50, seed=2).assign(at=[T0 + timedelta(seconds=(-1) ** i) for i in range(50)])
    assert online.write_batch("fs1", mixed, "entity", timestamp_column="at") == 25
    rows = online.read("fs1", mixed["entity"].tolist())
    for i, row in enumerate(rows):
        source = mixed if i % 2 == 0 else old
        assert row["amount"] == source["amount"][i]


def test_a_write_of_new_and_stored_entities_checks_the_stored_ones(online):
    newer = features(1).assign(amount=2.0)  # C0, newer than what follows
    online.write_batch("fs1", newer, "entity", event_time=T0 + timedelta(seconds=1))
    frame = features(20).assign(amount=1.0)  # C0..C19 in three script calls of <= 8
    assert online.write_batch("fs1", frame, "entity", event_time=T0) == 19
    rows = online.read("fs1", ["C0", "C1", "C19"])
    assert [row["amount"] for row in rows] == [2.0, 1.0, 1.0]


def test_rows_with_their_own_times_in_one_script_call(online):
    frame = features(6).assign(at=[T0 + timedelta(seconds=i) for i in range(6)])
    assert online.write_batch("fs1", frame, "entity", timestamp_column="at") == 6
    older = frame.assign(at=T0 - timedelta(seconds=1), amount=0.0)
    assert online.write_batch("fs1", older.iloc[:3], "entity", timestamp_column="at") == 0
    assert online.read("fs1", ["C2"])[0]["amount"] == frame["amount"][2]


@pytest.mark.parametrize("per_call", [0, features_module.MAX_ENTITIES_PER_CALL + 1])
def test_entities_per_call_is_bounded(client, namespace, per_call):
    with pytest.raises(InvalidInput, match="entities_per_call"):
        RedisOnlineStore(client, namespace, entities_per_call=per_call)


def test_materialize_keeps_each_entity_s_latest_row(online):
    frame = pd.DataFrame(
        {
            "entity": ["a", "a", "b"],
            "at": [T0 + timedelta(hours=2), T0, T0],
            "x": [2.0, 1.0, 5.0],
        }
    )
    assert online.materialize("fs1", frame, "entity", "at") == 2
    assert online.read("fs1", ["a", "b"]) == [{"x": 2.0}, {"x": 5.0}]


def test_ttl_is_set_on_every_key(online, client, namespace):
    online.write_batch("fs1", features(20), "entity", event_time=T0, ttl_s=300)
    ttls = [client.ttl(online_key(namespace, "fs1", f"C{i}")) for i in range(20)]
    assert all(0 < ttl <= 300 for ttl in ttls)


def test_default_ttl_and_no_ttl(client, namespace):
    store = RedisOnlineStore(client, namespace, default_ttl_s=120)
    store.write_batch("fs1", features(1), "entity", event_time=T0)
    key = online_key(namespace, "fs1", "C0")
    assert 0 < client.ttl(key) <= 120
    store.write_batch("fs1", features(1), "entity", event_time=T0, ttl_s=0)
    assert client.ttl(key) == -1


def counting_client() -> redis.Redis:
    pool = redis.ConnectionPool.from_url(Settings().redis_url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    client.ping()  # connect now: the handshake's own commands are not the store's
    return client


@pytest.mark.parametrize("n", [1, 100, 1000])
def test_a_read_of_any_number_of_entities_is_one_round_trip(online, namespace, n):
    frame = features(n)
    online.write_batch("fs1", frame, "entity", event_time=T0)
    reader = RedisOnlineStore(counting_client(), namespace)
    for _ in range(2):  # the first read also fetches the schema, in the same round trip
        reset_counts()
        rows = reader.read("fs1", frame["entity"].tolist())
        assert CountingConnection.sends == 1
        assert rows == expected_rows(frame)


def test_writes_are_chunked_non_transactional_pipelines(namespace):
    writer = RedisOnlineStore(
        counting_client(),
        namespace,
        entities_per_call=8,
        entities_per_pipeline=32,
        write_concurrency=1,  # pipelines on other connections would add their handshakes
    )
    writer.write_batch("fs1", features(1), "entity", event_time=T0)  # script loaded now
    reset_counts()
    assert writer.write_batch("fs1", features(100), "entity", event_time=T0) == 100
    assert CountingConnection.sends == 4  # 13 script calls of <= 8 entities, 4 per pipeline
    sent = b"".join(CountingConnection.sent)
    assert sent.count(b"EVALSHA") == 13 and b"MULTI" not in sent
    reset_counts()
    writer.write_batch("fs1", features(1), "entity", event_time=T0)
    assert CountingConnection.sends == 1  # schema and row together


def test_concurrent_pipelines_write_each_entity_s_latest_row(client, namespace):
    writer = RedisOnlineStore(
        client, namespace, entities_per_call=4, entities_per_pipeline=16, write_concurrency=4
    )
    frame = features(300, seed=3).assign(at=T0)
    repeated = pd.concat([features(300, seed=4).assign(at=T0), frame])  # same time: last wins
    assert writer.write_batch("fs1", repeated, "entity", timestamp_column="at") == 300
    assert writer.read("fs1", frame["entity"].tolist()) == expected_rows(frame.drop(columns="at"))


def test_a_script_unknown_to_the_server_is_loaded_and_the_write_runs(
    client, namespace, monkeypatch
):
    fresh = f"{features_module._WRITE_LUA}-- {uuid4().hex}\n"  # a sha Redis has never seen
    monkeypatch.setattr(features_module, "_WRITE_LUA", fresh)
    store = RedisOnlineStore(client, namespace)
    assert not client.script_exists(hashlib.sha1(fresh.encode()).hexdigest())[0]
    assert store.write_batch("fs1", features(3), "entity", event_time=T0) == 3
    assert store.read("fs1", ["C2"]) == expected_rows(features(3))[2:]


def test_read_frame(online):
    frame = features(3)
    online.write_batch("fs1", frame, "entity", event_time=T0)
    result = online.read_frame("fs1", ["C2", "zz", "C0"])
    assert list(result.index) == ["C2", "zz", "C0"]
    assert result.loc["C2", "amount"] == frame["amount"][2]
    assert result.loc["zz"].isna().all()


def test_a_client_that_decodes_responses_is_refused(namespace):
    with pytest.raises(InvalidInput, match="decode_responses"):
        RedisOnlineStore(connect(decode_responses=True), namespace)


def served(i: int) -> ServedScore:
    return ServedScore(
        request_id=f"r{i}", entity_id=f"C{i}", model_version="v1", score=i / 100, latency_ms=0.5
    )


def test_score_stream_is_bounded_exactly(client, namespace):
    store = OnlineScoreStore(client, namespace, maxlen=5, approximate=False)
    scores = [served(i) for i in range(12)]
    assert len(store.append_many(scores)) == 12
    assert client.xlen(score_stream_key(namespace)) == 5
    assert store.recent(3) == scores[9:]
    assert store.recent(100) == scores[7:]


def test_the_score_stream_keeps_a_score_without_its_features(client, namespace):
    store = OnlineScoreStore(client, namespace, maxlen=10)
    score = served(1).model_copy(update={"features": {f"f{i}": i / 7 for i in range(20)}})
    store.append_many([score])
    assert store.recent(1) == [score.model_copy(update={"features": {}})]
    (_, fields), = client.xrange(score_stream_key(namespace))
    assert b"features" not in fields[FIELD_SCORE] and b"fallback_reason" not in fields[FIELD_SCORE]


def test_score_stream_is_bounded_approximately(client, namespace):
    store = OnlineScoreStore(client, namespace, maxlen=100)
    for start in range(0, 1000, 250):
        store.append_many([served(i) for i in range(start, start + 250)])
    assert 100 <= store.length() < 1000


def test_appending_many_scores_is_one_round_trip(namespace):
    store = OnlineScoreStore(counting_client(), namespace, maxlen=1000)
    reset_counts()
    ids = store.append_many([served(i) for i in range(200)])
    assert CountingConnection.sends == 1 and len(ids) == 200


def test_a_feature_set_is_complete_once_marked(online, client, namespace):
    online.write_batch("fs1", features(3), "entity")
    assert not online.is_complete("fs1")
    assert not online.wait_complete("fs1", timeout_s=0.05, poll_s=0.01)

    online.mark_complete("fs1", rows=3)
    assert online.is_complete("fs1") and not online.is_complete("fs2")
    assert online.wait_complete("fs1", timeout_s=0.0)
    assert client.get(f"{namespace}:fsdone:fs1".encode()) == b"3"
