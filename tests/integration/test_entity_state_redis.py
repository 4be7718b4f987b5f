"""The entity state's Lua script on the real Redis gives what the in-memory store gives."""

from __future__ import annotations

import random

import pytest

from common.stores.entity_state import (
    Entry,
    MemoryEntityState,
    RedisEntityState,
    RedisStreamTargets,
    Retention,
    state_key,
)
from tests.support.harness import BusNamespace

pytestmark = pytest.mark.integration
S = 1_000_000


def random_batches(seed: int) -> list[dict[str, list[Entry]]]:
    """Record batches over 5 entities, times jittered (some late, some tied), ids repeated."""
    rng = random.Random(seed)
    batches, clock = [], 1_000
    for _ in range(300):
        clock += rng.randint(0, 20)
        batch: dict[str, list[Entry]] = {}
        for _ in range(rng.randint(1, 6)):
            at = clock - rng.choice([0, 0, 0, 5, 30, 90])  # mostly on time, some late
            rid = f"r{rng.randint(0, 1_500)}"  # ids repeat: duplicates
            batch.setdefault(f"C{rng.randint(0, 4)}", []).append(
                Entry(at * S, rid, (rng.uniform(-1e6, 1e6), rng.random())))
        batches.append(batch)
    return batches


@pytest.mark.parametrize("retention", [
    Retention(max_count=5, max_span_us=60 * S, tolerance_us=40 * S, ttl_s=300),
    Retention(max_count=3, tolerance_us=10 * S, ttl_s=0),
    Retention(max_span_us=25 * S, tolerance_us=0, ttl_s=300),
])
def test_redis_and_memory_states_agree_on_every_apply_and_read(
        ns: BusNamespace, retention: Retention) -> None:
    redis_state, memory = RedisEntityState(ns.redis, ns.namespace), MemoryEntityState()
    entities = [f"C{i}" for i in range(5)]
    for batch in random_batches(seed=retention.max_count):
        assert redis_state.apply("fs1", batch, retention) == memory.apply("fs1", batch, retention)
        assert redis_state.read("fs1", entities) == memory.read("fs1", entities)
    ttl = ns.redis.ttl(state_key(ns.namespace, "fs1", "C0"))
    assert (0 < ttl <= 300) if retention.ttl_s else ttl == -1


def test_the_script_is_loaded_again_after_redis_forgets_it(ns: BusNamespace) -> None:
    state = RedisEntityState(ns.redis, ns.namespace)
    retention = Retention(max_count=2, ttl_s=60)
    state.apply("fs1", {"C1": [Entry(1, "a", (1.0,))]}, retention)
    ns.redis.script_flush()
    assert state.apply("fs1", {"C1": [Entry(2, "b", (2.0,))]}, retention).applied == 1
    assert [e.record_id for e in state.read("fs1", ["C1"])[0] or []] == ["a", "b"]


def test_stream_targets_are_kept_per_dataset_oldest_first(ns: BusNamespace) -> None:
    targets = RedisStreamTargets(ns.redis, ns.namespace)
    targets.add("paysim", "fs1")
    targets.add("paysim", "fs2")
    targets.add("paysim", "fs1")  # idempotent: keeps its first place
    targets.add("other", "fs9")
    assert targets.of("paysim") == ["fs1", "fs2"]
    targets.remove("paysim", ["fs1"])
    assert targets.of("paysim") == ["fs2"] and targets.of("other") == ["fs9"]
