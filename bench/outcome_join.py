"""What the outcome join keeps at a given scoring rate, on the real Redis.

Scores are remembered as monitoring remembers them (``MonitoringState.remember``, batches
of ``--batch``), ``--rate`` a second over ``--entities`` entities, for ``--minutes`` of
scores by their served time (written as fast as Redis takes them), at the default bounds
(``MONITORING_SERVED_TTL_S`` 1 day, ``MONITORING_SERVED_MAX_ENTRIES`` 2,000,000). It
prints the buckets, the fields and their memory (``MEMORY USAGE``), how far back the join
reaches, whether the newest batch was ever not joinable, and the time of ``remember`` and
of a lookup that misses (it reads every bucket). The keys live in a throwaway namespace
of the given Redis database and are deleted afterwards.

Example (the README's figures; ~1 minute)::

    .venv/bin/python bench/outcome_join.py --redis-url redis://127.0.0.1:6379/15
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, the repository root is not on the path (bench/ is).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import cast  # noqa: E402

import redis  # noqa: E402

from common.events import ServedScore  # noqa: E402
from monitoring.state import MonitoringState  # noqa: E402


def batch_of(step: int, size: int, entities: int) -> list[ServedScore]:
    """The step-th batch: scoring-style request ids, entities in turn."""
    return [ServedScore(request_id=uuid.uuid4().hex, entity_id=f"C{(step * size + i) % entities}",
                        model_version="v1", score=0.5, label="1", latency_ms=1.0)
            for i in range(size)]


def fill(state: MonitoringState, args: argparse.Namespace, t0: float) -> tuple[list[float], int]:
    """Remember the scores; each call's seconds, and how often the newest was not found."""
    steps = int(args.minutes * 60 * args.rate / args.batch)
    took, missed = [], 0
    for step in range(steps):
        now, batch = t0 + step * args.batch / args.rate, batch_of(step, args.batch, args.entities)
        started = time.perf_counter()
        state.remember(batch, now=now)
        took.append(time.perf_counter() - started)
        missed += state.served(batch[-1].request_id, "-", now=now) is None
    return sorted(took), missed


def report(state: MonitoringState, now: float, took: list[float], missed: int) -> None:
    client, buckets = state.client, state.buckets(now=now)
    fields = sum(cast(int, client.hlen(b)) for b in buckets)
    usage = sum(cast(int, client.memory_usage(b)) for b in buckets)
    index = cast(list[tuple[bytes, float]],
                 client.zrange(state.key("served_buckets"), 0, -1, withscores=True))
    reach = now - min(first for _, first in index)
    started = time.perf_counter()
    for _ in range(200):
        state.served("0" * 32, "nobody", now=now)
    lookup_ms = (time.perf_counter() - started) / 200 * 1e3
    print(f"buckets {len(buckets)}, fields {fields:,}, MEMORY USAGE {usage / 1e6:.1f} MB "
          f"({usage / max(1, fields):.0f} B a field); joins the last {reach:.0f} s; newest "
          f"batch not joinable {missed} time(s)")
    print(f"remember p50 {took[len(took) // 2] * 1e3:.2f} ms, p99 "
          f"{took[int(len(took) * 0.99)] * 1e3:.2f} ms; a missed lookup {lookup_ms:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--rate", type=float, default=1_000.0, help="scores a second")
    parser.add_argument("--batch", type=int, default=100, help="scores a ScoreServed")
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=40.0)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    namespace = f"bench-join-{uuid.uuid4().hex[:8]}"
    state, t0 = MonitoringState(client, namespace), time.time()
    try:
        took, missed = fill(state, args, t0)
        report(state, t0 + args.minutes * 60, took, missed)
    finally:
        for key in client.scan_iter(f"{namespace}:*", count=10_000):
            client.delete(key)


if __name__ == "__main__":
    main()
