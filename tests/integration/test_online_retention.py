"""Superseded feature sets' online keys expire; the chain's and the newest sets' stay."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from uuid import uuid4

import numpy as np
import pandas as pd
import pytest
import redis

from common.settings import Settings
from common.stores.entity_state import state_key, state_ready_key
from common.stores.features import RedisOnlineStore, completed_sets_key, online_key
from common.stores.online_retention import OnlineRetention, chain_feature_sets

pytestmark = pytest.mark.integration
GRACE = 600


@pytest.fixture
def client() -> redis.Redis:
    return redis.Redis.from_url(Settings().redis_url)


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    name = f"test-{uuid4().hex[:8]}"
    yield name
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.delete(*keys)


def materialise(client: redis.Redis, namespace: str, fsid: str, n: int = 30) -> None:
    """A set as preparation leaves it: online rows, marked complete, entity state."""
    frame = pd.DataFrame({"entity": [f"C{i}" for i in range(n)],
                          "amount": np.arange(n, dtype=float)})
    online = RedisOnlineStore(client, namespace)
    online.write_batch(fsid, frame, "entity", event_time=pd.Timestamp("2026-01-01", tz="UTC"))
    online.mark_complete(fsid, n)
    for i in range(n):
        client.set(state_key(namespace, fsid, f"C{i}"), b"state")
    client.set(state_ready_key(namespace, fsid), n)
    client.zadd(f"{namespace}:stream:paysim", {fsid: 1.0})


def ttls(client: redis.Redis, namespace: str, fsid: str) -> set[int]:
    keys = [*client.scan_iter(match=f"{namespace}:*{fsid}*", count=1000)]
    return {int(client.ttl(key)) for key in keys}


def test_sets_neither_in_the_chain_nor_newest_expire_the_others_stay(client, namespace):
    for fsid in ("fs1", "fs2", "fs3", "fs4", "fs5"):
        materialise(client, namespace, fsid)
    retention = OnlineRetention(client, namespace, grace_s=GRACE, keep_recent=2)
    assert retention.prune({"fs2"}) == ["fs1", "fs3"]
    for gone in ("fs1", "fs3"):
        found = ttls(client, namespace, gone)
        assert found and all(0 < t <= GRACE for t in found)  # 30 rows, 30 states, 3 marks
        assert len([*client.scan_iter(match=f"{namespace}:*{gone}*")]) == 61  # not its marks
        assert not RedisOnlineStore(client, namespace).is_complete(gone)
    for kept in ("fs2", "fs4", "fs5"):
        assert ttls(client, namespace, kept) == {-1}
    assert [m.decode() for m in client.zrange(f"{namespace}:stream:paysim", 0, -1)] == [
        "fs2", "fs4", "fs5"]
    assert retention.completed() == ["fs2", "fs4", "fs5"]
    assert retention.prune({"fs2"}) == []  # pruned once


def test_a_shorter_ttl_is_kept(client, namespace):
    materialise(client, namespace, "fs1")
    materialise(client, namespace, "fs2")
    client.expire(online_key(namespace, "fs1", "C0"), 300)
    OnlineRetention(client, namespace, grace_s=GRACE, keep_recent=1).prune(set())
    assert 0 < client.ttl(online_key(namespace, "fs1", "C0")) <= 300
    assert 300 < client.ttl(online_key(namespace, "fs1", "C1")) <= GRACE


def test_sets_completed_before_the_list_existed_are_found_by_their_mark(client, namespace):
    materialise(client, namespace, "b")
    materialise(client, namespace, "a")
    client.delete(completed_sets_key(namespace))  # as an older version left them
    retention = OnlineRetention(client, namespace, grace_s=GRACE, keep_recent=1)
    assert retention.completed() == ["a", "b"]  # listed as oldest, their time unknown
    materialise(client, namespace, "c")
    assert retention.prune(set()) == ["a", "b"]


def test_the_chain_needs_the_sets_of_its_first_versions() -> None:
    chain = [SimpleNamespace(model_id=f"m{i}") for i in (5, 4, 3, 2, 1)]  # champion first
    registry = SimpleNamespace(chain=lambda: chain)
    models = SimpleNamespace(metadata=lambda model_id: SimpleNamespace(
        metadata={"feature_set_id": f"fs-of-{model_id}"}))
    assert chain_feature_sets(registry, models, keep_versions=3) == {  # type: ignore[arg-type]
        "fs-of-m5", "fs-of-m4", "fs-of-m3"}
