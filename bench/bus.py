"""Benchmark of the RabbitMQ bus against raw pika, on the real local broker.

Run with ``make bench-bus`` (``.venv/bin/python bench/bus.py``). In one run it measures:

1. publishing through ``RabbitMQBus.publish_many`` (confirms, mandatory, persistent), in
   batches, and one event at a time through ``publish``;
2. consuming through ``RabbitMQBus.consume`` and a ``Dispatcher`` with a trivial handler,
   without and with Redis idempotency records;
3. a raw pika baseline on the same quorum queue and message size: one confirmed
   ``basic_publish`` at a time, and ``basic_consume`` with prefetch 100, one ack each.

Results go to ``bench/results/bus.json``; the bench namespace is deleted afterwards.
Consume rates are medians over ``--rounds`` rounds, and the bus/raw ratio the median of
the per-round ratios (on a shared 2-core machine single runs swing by 2x); see
``--help`` for the sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pika
import redis
from save import save_results

# The repository root on the path: the bench namespace is cleaned up by the test harness
# (tests/support), which is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.bus.dispatch import Dispatcher, HandlerSpec  # noqa: E402
from common.bus.idempotency import ProcessedEvents, RedisProcessedEvents  # noqa: E402
from common.bus.rabbitmq import RabbitMQBus, connection_parameters, properties  # noqa: E402
from common.events import SourceDataAvailable  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.support.harness import delete_namespace, policy_for  # noqa: E402

SERVICE = "bench"
EVENT_TYPE = "SourceDataAvailable"
RESULTS = Path(__file__).resolve().parent / "results" / "bus.json"
SETTLE_S = 1.0
log = logging.getLogger("bench.bus")


def make_events(n: int) -> list[SourceDataAvailable]:
    """Events of the size the pipeline sends (about 300 bytes of JSON)."""
    return [
        SourceDataAvailable(dataset="paysim", uri=f"s3://bench/part-{i:06d}.csv", producer="bench")
        for i in range(n)
    ]


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the bus -------------------------------------------------------------------------------


def bench_publish_many(settings: Settings, n: int, batch: int) -> float:
    events = make_events(n)
    bus = RabbitMQBus(settings, name="bench-publisher")
    try:
        bus.publish_many(events[:1])  # connect outside the timing
        rest = events[1:]

        def publish_batches() -> None:
            for i in range(0, len(rest), batch):
                bus.publish_many(rest[i : i + batch])

        seconds = timed(publish_batches)
        return rate(len(rest), seconds)
    finally:
        bus.close()


def bench_publish_single(settings: Settings, n: int) -> float:
    events = make_events(n)
    bus = RabbitMQBus(settings, name="bench-publisher")
    try:
        bus.publish(events[0])

        def publish_each() -> None:
            for event in events[1:]:
                bus.publish(event)

        seconds = timed(publish_each)
        return rate(n - 1, seconds)
    finally:
        bus.close()


def fill(settings: Settings, n: int) -> None:
    """Put n events in the bench queue (untimed)."""
    bus = RabbitMQBus(settings, name="bench-filler")
    try:
        events = make_events(n)
        for i in range(0, n, 1000):
            bus.publish_many(events[i : i + 1000])
    finally:
        bus.close()


def bench_bus_consume(settings: Settings, n: int, processed: ProcessedEvents | None) -> float:
    """Consume n waiting events through RabbitMQBus.consume and a Dispatcher."""
    bus = RabbitMQBus(settings, name="bench-consumer")
    done, handled = threading.Event(), [0]

    def handle(_event: SourceDataAvailable) -> None:
        handled[0] += 1  # one worker thread runs the handler: no lock needed
        if handled[0] == n:
            done.set()

    specs = {EVENT_TYPE: HandlerSpec(EVENT_TYPE, handle)}
    dispatcher = Dispatcher(
        SERVICE, specs, bus.publish_many, policy=policy_for(settings), processed=processed
    )
    stop, connected = threading.Event(), threading.Event()
    thread = threading.Thread(target=bus.consume, args=(dispatcher, stop, connected))
    thread.start()
    try:
        if not connected.wait(30):
            raise RuntimeError("bench consumer did not connect")
        start = time.perf_counter()
        if not done.wait(600):
            raise RuntimeError(f"only {handled[0]} of {n} events consumed")
        return rate(n, time.perf_counter() - start)
    finally:
        stop.set()
        thread.join(30)
        bus.close()


# -- raw pika ------------------------------------------------------------------------------


def bench_raw_publish(settings: Settings, n: int) -> float:
    """One basic_publish at a time, each waiting for its confirm (BlockingChannel)."""
    body = make_events(1)[0].to_json()
    connection = pika.BlockingConnection(connection_parameters(settings, "bench-raw-publisher"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        props = properties(event=make_events(1)[0])

        def publish_all() -> None:
            for _ in range(n):
                channel.basic_publish(settings.exchange, EVENT_TYPE, body, props, mandatory=True)

        return rate(n, timed(publish_all))
    finally:
        connection.close()


def bench_raw_consume(settings: Settings, n: int) -> float:
    """basic_consume with manual acks, prefetch 100, one basic_ack per message."""
    connection = pika.BlockingConnection(connection_parameters(settings, "bench-raw-consumer"))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        count = [0]

        def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
            ch.basic_ack(method.delivery_tag)
            count[0] += 1
            if count[0] == n:
                ch.stop_consuming()

        channel.basic_consume(settings.queue(SERVICE), on_message)
        return rate(n, timed(channel.start_consuming))
    finally:
        connection.close()


# -- the run -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pika": pika.__version__,
        "processor": platform.processor() or platform.machine(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def broker_version(settings: Settings) -> str:
    connection = pika.BlockingConnection(connection_parameters(settings, "bench-probe"))
    try:
        version = connection._impl.server_properties.get("version", b"?")  # noqa: SLF001
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        connection.close()


def broker_cpu_s() -> float | None:
    """CPU seconds the local RabbitMQ (beam.smp) has used, where /proc shows it."""
    try:
        pid = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True)
        fields = Path(f"/proc/{pid.stdout.split()[0]}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def depth(settings: Settings) -> int:
    return RabbitMQBus(settings).queue_depths(SERVICE)["ready"]


def purge(settings: Settings) -> None:
    with RabbitMQBus(settings).channel() as channel:
        channel.queue_purge(settings.queue(SERVICE))


Consume = Callable[[Settings, int], float]


def consumers(client: redis.Redis) -> dict[str, Consume]:
    """The consumers compared, by result key."""
    return {
        "consume_eps": lambda settings, n: bench_bus_consume(settings, n, None),
        "raw_pika_consume_eps": bench_raw_consume,
        "consume_eps_with_idempotency": lambda settings, n: bench_bus_consume(
            settings, n, RedisProcessedEvents(client, settings.namespace, 600)
        ),
    }


def measure_consume(settings: Settings, key: str, consume: Consume, n: int) -> dict[str, Any]:
    """Fill the queue with n events, let the broker settle, consume them all."""
    fill(settings, n)
    time.sleep(SETTLE_S)  # the broker finishes writing the filled queue: not measured
    cpu_before = broker_cpu_s()
    eps = consume(settings, n)
    cpu_after = broker_cpu_s()
    left = depth(settings)
    if left:
        raise RuntimeError(f"{key} left {left} messages in the queue")
    broker_ms = None
    if cpu_before is not None and cpu_after is not None:
        broker_ms = round((cpu_after - cpu_before) * 1000 / n * 1000, 1)
    log.warning("%s: %.0f events/s (broker CPU %s ms per 1000 events)", key, eps, broker_ms)
    return {"eps": eps, "broker_cpu_ms_per_1000": broker_ms}


def consume_rounds(settings: Settings, args: argparse.Namespace, client: redis.Redis) -> dict:
    """Each consumer once per round, in a rotating order so that no one is always first."""
    sizes = {"consume_eps_with_idempotency": args.idempotency_events}
    table = consumers(client)
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in table}
    keys = list(table)
    for round_ in range(args.rounds):
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            n = sizes.get(key, args.consume_events)
            runs[key].append(measure_consume(settings, key, table[key], n))
    results: dict[str, Any] = {}
    for key, measured in runs.items():
        rates = [m["eps"] for m in measured]
        results[key] = round(statistics.median(rates), 1)
        results[f"{key}_best"] = max(rates)
        results[f"{key}_rounds"] = rates
        results[f"{key}_broker_cpu_ms_per_1000"] = [m["broker_cpu_ms_per_1000"] for m in measured]
    # each round measures both back to back, under about the same background load
    results["consume_vs_raw_ratio_rounds"] = [
        round(bus["eps"] / raw["eps"], 3)
        for bus, raw in zip(runs["consume_eps"], runs["raw_pika_consume_eps"], strict=True)
    ]
    return results


def publish_all(settings: Settings, args: argparse.Namespace) -> dict[str, float]:
    results = {
        "publish_eps": bench_publish_many(settings, args.events, args.batch),
        "publish_single_eps": bench_publish_single(settings, args.single_events),
        "raw_pika_confirm_publish_eps": bench_raw_publish(settings, args.raw_publish_events),
    }
    for key, value in results.items():
        log.warning("%s: %.0f events/s", key, value)
    purge(settings)
    return results


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    raw = results["raw_pika_consume_eps"]
    consume_ratio = round(statistics.median(results["consume_vs_raw_ratio_rounds"]), 3)
    return {
        "consume_vs_raw_ratio": consume_ratio,
        "consume_vs_raw_ratio_of_medians": round(results["consume_eps"] / raw, 3),
        "consume_vs_raw_ratio_best": round(
            results["consume_eps_best"] / results["raw_pika_consume_eps_best"], 3
        ),
        "consume_with_idempotency_vs_raw_ratio": round(
            results["consume_eps_with_idempotency"] / raw, 3
        ),
        "publish_vs_raw_confirm_ratio": round(
            results["publish_eps"] / results["raw_pika_confirm_publish_eps"], 2
        ),
        "targets": {
            "publish_eps >= 5000": results["publish_eps"] >= 5000,
            "consume_eps >= 0.8 * raw_pika_consume_eps": consume_ratio >= 0.8,
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(namespace=f"bench-{uuid4().hex[:8]}", log_level="WARNING")
    RabbitMQBus(settings, name="bench-setup").declare(SERVICE, [EVENT_TYPE])
    client = redis.Redis.from_url(settings.redis_url)
    try:
        results: dict[str, Any] = publish_all(settings, args)
        results.update(consume_rounds(settings, args, client))
        rabbitmq = broker_version(settings)
    finally:
        delete_namespace(settings, [SERVICE])
        client.close()
    results.update(ratios(results))
    results["n"] = {
        "publish_many": args.events, "publish_many_batch": args.batch,
        "publish_single": args.single_events, "raw_publish": args.raw_publish_events,
        "consume": args.consume_events, "consume_with_idempotency": args.idempotency_events,
        "consume_rounds": args.rounds, "prefetch": settings.prefetch,
        "message_bytes": len(make_events(1)[0].to_json()),
    }
    results["method"] = (
        "consume rates are the median of the rounds (best also given); each round fills the"
        f" quorum queue, waits {SETTLE_S}s, then consumes it all, for each consumer in turn;"
        " consume_vs_raw_ratio is the median of the per-round ratios; publishes are confirmed"
    )
    results["machine"] = {**machine(), "rabbitmq": rabbitmq}
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--single-events", type=int, default=2_000)
    parser.add_argument("--raw-publish-events", type=int, default=5_000)
    parser.add_argument("--consume-events", type=int, default=20_000)
    parser.add_argument("--idempotency-events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    results = run(args)
    save_results(args.output, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
