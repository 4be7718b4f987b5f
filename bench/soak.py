"""Soak (issue 12): Score at a steady rate for minutes, with outcomes, and two pipeline runs
in the middle; does anything leak, fail or get lost?

Run with ``make soak`` (``.venv/bin/python bench/soak.py``; ``--minutes 3 --warmup-minutes 1``
for a short run). What it does:

1. starts the services as local processes (``bench/pipeline.py``'s ``Fleet``: eventlog,
   ingestion, preparation, training, evaluation, scoring with its workers on a free gRPC
   port, monitoring) in a fresh namespace ``soak-<id>`` with a data root under
   ``bench/.work/``, runs the pipeline once on a seeded PaySim file (``--rows``) and waits
   until ``Score`` answers;
2. sends ``Score`` at ``--rate`` calls a second for ``--minutes``, paced (an open loop: a
   call is due every 1/rate s whatever the answers; at most ``--in-flight`` calls wait,
   a due call beyond that is not sent and counted in ``skipped``), over several channels
   (connections, so both scoring workers get calls), each a transaction of the first
   file; and publishes, confirmed, the true outcome of every ``--outcome-every``-th answer
   (``OutcomeObserved`` with its request id);
3. at 40 % and 65 % of the time, publishes ``SourceDataAvailable`` with a fresh file (a
   new seed) and follows each run to its final event;
4. after ``--warmup-minutes`` (2) takes the baseline: Redis ``used_memory`` (the server's,
   shared with anything else using it, and the namespace's own keys, ``MEMORY USAGE``)
   and each service's RSS (with its child processes); at the end the same again, and the
   growths as fractions of the baseline;
5. events lost: the outcomes published and confirmed against those monitoring handled
   (``conveyor_events_handled_total``), and the answers scoring gave against the scores
   monitoring received in ``ScoreServed`` events (``conveyor_model_served_total``), after
   waiting up to two minutes for the queues to drain; plus every dead letter.

Results go to ``bench/results/soak.json``: ``calls``, ``errors``, ``achieved_rate``,
``redis_used_memory_growth``, ``rss_growth`` ({service: fraction}), ``events_lost``,
the per-minute rates and latencies, the pipeline runs and the figures behind each.
Targets: errors 0, events_lost 0, Redis and RSS growth <= 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import statistics
import sys
import threading
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import grpc
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.pipeline import (  # noqa: E402 - the repository root goes on the path first
    FINAL,
    WORK,
    Fleet,
    Observer,
    _tree,
    cleanup,
    free_port,
    source_csv,
)

RESULTS = ROOT / "bench" / "results" / "soak.json"
SERVICES = ("eventlog", "ingestion", "preparation", "training", "evaluation", "scoring",
            "monitoring")
CHANNELS = 8
PROBES = 1  # answers before the load (wait_serving's), reported to monitoring too
log = logging.getLogger("bench.soak")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="Score calls a second")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each pipeline run")
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--outcome-every", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="per pipeline run, s")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


# -- the fleet -----------------------------------------------------------------------------


@dataclass
class SoakFleet(Fleet):
    """bench/pipeline.py's fleet with scoring (on a free gRPC port) and monitoring."""

    grpc_port: int = field(default_factory=free_port)

    def env(self, name: str) -> dict[str, str]:
        env = super().env(name)
        if name == "scoring":
            env["CONVEYOR_GRPC_PORT"] = str(self.grpc_port)
        return env

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            with open(self.logs / f"{name}.log", "wb") as out:
                self.procs[name] = _popen(self.command(name), self.env(name), out)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for name in SERVICES:
            while not self._ready(name) and name != "scoring":  # ready once it has a model
                self.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {timeout}s; see {self.logs}")
                time.sleep(0.1)

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each service with its live child processes (scoring's
        workers, training's pool)."""
        return {name: sum(_rss_of(pid) for pid in _tree(proc.pid))
                for name, proc in self.procs.items()}

    def metrics(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())


def _popen(command: list[str], env: dict[str, str], out: Any) -> Any:
    import subprocess

    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _rss_of(pid: int) -> int:
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# -- Redis -------------------------------------------------------------------------------


def redis_memory(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """The server's used_memory and the namespace's keys' own (MEMORY USAGE, summed), in
    all and by kind (the key's second part: ``<ns>:<kind>:...``), to see what grows."""
    used = int(client.info("memory")["used_memory"])  # type: ignore[index]
    kinds: Counter[str] = Counter()
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{namespace}:*", count=5_000):
        batch.append(key)
        if len(batch) == 1_000:
            _usage(client, batch, kinds)
            batch = []
    _usage(client, batch, kinds)
    return {"used_memory": used, "namespace_bytes": sum(kinds.values()), "by_kind": dict(kinds)}


def _usage(client: redis.Redis, keys: list[bytes], kinds: Counter[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key)
    for key, size in zip(keys, pipe.execute(), strict=True):
        parts = key.decode(errors="replace").split(":")
        kinds[parts[1] if len(parts) > 1 else ""] += int(size or 0)


# -- the load ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What the load generator saw, per second of the run and in all."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    per_second: Counter[int] = field(default_factory=Counter)
    latencies: dict[int, list[float]] = field(default_factory=dict)
    answered: deque[tuple[str, str, Any]] = field(default_factory=deque)  # for outcomes
    versions: Counter[str] = field(default_factory=Counter)
    fallbacks: int = 0

    def record(self, second: int, latency: float) -> None:
        self.per_second[second] += 1
        self.latencies.setdefault(second // 60, []).append(latency)


async def paced_load(target: str, requests: list[Any], labels: list[Any], args: Any,
                     tally: Tally, started: float, stop_at: float) -> None:
    """Score calls at ``args.rate`` a second until ``stop_at`` (monotonic), paced."""
    from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    stubs = [pb_grpc.ScoringStub(channel) for channel in channels]
    in_flight: set[asyncio.Task[None]] = set()
    sent = 0

    async def one(index: int) -> None:
        began = time.monotonic()
        request = requests[index % len(requests)]
        try:
            reply = await stubs[index % CHANNELS].Score(request, timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            tally.errors[exc.code().name] += 1
            return
        tally.ok += 1
        tally.versions[reply.model_version] += 1
        tally.fallbacks += reply.fallback
        tally.record(int(began - started), time.monotonic() - began)
        if index % args.outcome_every == 0:
            tally.answered.append((request.entity_id, reply.request_id,
                                   labels[index % len(labels)]))

    while (now := time.monotonic()) < stop_at:
        due = int((now - started) * args.rate)
        while sent < due:
            if len(in_flight) >= args.in_flight:
                tally.skipped += due - sent
                sent = due
                break
            task = asyncio.create_task(one(sent))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            sent += 1
        await asyncio.sleep(0.005)
    if in_flight:
        await asyncio.wait(in_flight, timeout=10)
    for channel in channels:
        await channel.close()


class OutcomePublisher:
    """Publishes the outcomes of answered calls (confirmed) from a thread of its own."""

    def __init__(self, settings: Any, tally: Tally) -> None:
        from common.bus.rabbitmq import RabbitMQBus

        self.bus, self.tally = RabbitMQBus(settings, name="soak-outcomes"), tally
        self.confirmed = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="outcomes", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        from monitoring.outcomes import outcome_event

        batch = []
        with contextlib.suppress(IndexError):  # the load appends on its own thread
            while True:
                batch.append(self.tally.answered.popleft())
        if not batch:
            return
        events = [outcome_event(entity, str(label), request_id, producer="soak")
                  for entity, request_id, label in batch]
        try:
            self.bus.publish_many(events)
            self.confirmed += len(events)
        except Exception:  # noqa: BLE001 - counted: a refused publish is not a lost event
            log.exception("publishing %d outcomes failed", len(events))
            self.failed += len(events)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.bus.close()


# -- pipeline runs ---------------------------------------------------------------------------


class PipelineRun(threading.Thread):
    """Publishes SourceDataAvailable for a fresh file and follows it to its final event."""

    def __init__(self, settings: Any, fleet: SoakFleet, rows: int, seed: int,
                 timeout: float) -> None:
        super().__init__(name=f"pipeline-{seed}", daemon=True)
        self.settings, self.fleet, self.rows, self.seed = settings, fleet, rows, seed
        self.timeout = timeout
        self.result: dict[str, Any] = {"seed": seed}

    def run(self) -> None:
        from common.bus.rabbitmq import RabbitMQBus
        from common.events import SourceDataAvailable

        csv = source_csv(self.rows, self.seed)
        observer, bus = Observer(self.settings), RabbitMQBus(self.settings, name="soak-producer")
        try:
            event = SourceDataAvailable(dataset="paysim", uri=str(csv), producer="soak")
            began = time.perf_counter()
            bus.publish(event)
            seen = observer.until_final(str(event.correlation_id), self.timeout, lambda: None)
            final = next(t for t in FINAL if t in seen)
            self.result.update(final=final, seconds=round(time.perf_counter() - began, 1),
                               started_at=datetime.now(UTC).isoformat())
            if final == "ModelReady":
                self.result["version"] = seen[final][0].version
        except Exception as exc:  # noqa: BLE001 - reported in the results
            self.result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            observer.close()
            bus.close()


def wait_serving(target: str, request: Any, timeout: float = 300.0) -> str:
    """Wait until Score answers (scoring has loaded the champion); its version."""
    from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ScoringStub(channel)
        while True:
            try:
                return str(stub.Score(request, timeout=5).model_version)
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


# -- the run -------------------------------------------------------------------------------


def traffic(args: argparse.Namespace, config: Any) -> tuple[list[Any], list[Any]]:
    """Score requests (and the true label of each) from the first run's transactions."""
    import pandas as pd

    from app.demo_monitoring import ScoreClient

    frame = pd.read_csv(source_csv(args.rows, 1), nrows=20_000)
    client = ScoreClient.__new__(ScoreClient)  # only its request builder: no channel
    client.key, client.label = config.features.entity_key or "", config.features.label or ""
    records = frame.to_dict(orient="records")
    return [client.request(row) for row in records], [row[client.label] for row in records]


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from app.config import load_pipeline_config
    from common.settings import Settings

    run_id = uuid4().hex[:8]
    work = WORK / f"soak-{run_id}"
    settings = Settings(namespace=f"soak-{run_id}", data_root=str(work / "data"))
    fleet = SoakFleet(settings.namespace, work / "data", work / "logs")
    client = redis.Redis.from_url(settings.redis_url)
    requests, labels = traffic(args, load_pipeline_config(settings.pipeline_config))
    target = f"127.0.0.1:{fleet.grpc_port}"
    result: dict[str, Any] = {}
    try:
        fleet.start()
        fleet.wait_ready()
        first = PipelineRun(settings, fleet, args.rows, 1, args.timeout)
        first.run()
        result["first_run"] = first.result
        result["serving_before"] = wait_serving(target, requests[0])  # one answer, reported
        result |= load_phase(args, settings, fleet, client, requests, labels, target)
    finally:
        result["service_exit_codes"] = fleet.stop()
        delete_topologies(settings)
        cleanup(settings, work / "data")
        client.close()
    return result


def load_phase(args: argparse.Namespace, settings: Any, fleet: SoakFleet,
               client: redis.Redis, requests: list[Any], labels: list[Any],
               target: str) -> dict[str, Any]:
    """The paced load with its two pipeline runs and the baseline and final samples."""
    tally, seconds = Tally(), args.minutes * 60
    outcomes = OutcomePublisher(settings, tally)
    runs = [PipelineRun(settings, fleet, args.rows, seed, args.timeout) for seed in (2, 3)]
    marks = {seconds * 0.4: runs[0].start, seconds * 0.65: runs[1].start}
    samples: dict[str, Any] = {}

    def sampler() -> None:
        for at, action in sorted({args.warmup_minutes * 60: baseline, **marks}.items()):
            if stop.wait(max(0.0, started + at - time.monotonic())):
                return
            action()

    def baseline() -> None:
        samples["baseline"] = sample(fleet, client, settings.namespace)
        log.warning("baseline after %.0f s: %s", time.monotonic() - started, samples["baseline"])

    stop, started = threading.Event(), time.monotonic()
    thread = threading.Thread(target=sampler, name="sampler", daemon=True)
    thread.start()
    try:
        asyncio.run(paced_load(target, requests, labels, args, tally, started, started + seconds))
    finally:
        stop.set()
        samples["end"] = sample(fleet, client, settings.namespace)
        outcomes.close()
        for run in runs:
            run.join(args.timeout)
    lost = events_lost(fleet, settings, tally, outcomes)
    return {**summarise(args, tally, samples, runs, lost, seconds),
            "events_seen": events_seen(client, settings.namespace)}


def events_seen(client: redis.Redis, namespace: str) -> dict[str, int]:
    """Events of the run by type, from the event log (ModelDegraded, DriftDetected...)."""
    from common.eventlog import EventLog

    return dict(Counter(e["event_type"] for e in EventLog(client, namespace).recent(100_000)))


def sample(fleet: SoakFleet, client: redis.Redis, namespace: str) -> dict[str, Any]:
    return {"at": datetime.now(UTC).isoformat(), "redis": redis_memory(client, namespace),
            "rss": fleet.rss_bytes()}


def events_lost(fleet: SoakFleet, settings: Any, tally: Tally,
                outcomes: OutcomePublisher, drain_s: float = 120.0) -> dict[str, Any]:
    """Published-and-confirmed against handled, once the queues have drained (or not)."""
    from common.bus.rabbitmq import RabbitMQBus

    deadline = time.monotonic() + drain_s
    while True:
        counts = handled_counts(fleet)
        drained = (counts["outcomes_handled"] >= outcomes.confirmed
                   and counts["scores_received"] >= tally.ok + PROBES)
        if drained or time.monotonic() > deadline:
            break
        time.sleep(2)
    bus = RabbitMQBus(settings, name="soak-depths")
    try:
        dead = {name: bus.queue_depths(name)["dead"] for name in SERVICES}
    finally:
        bus.close()
    lost_outcomes = max(0, outcomes.confirmed - int(counts["outcomes_handled"]))
    lost_scores = max(0, tally.ok + PROBES - int(counts["scores_received"]))
    return {"events_lost": lost_outcomes + lost_scores + sum(max(0, d) for d in dead.values()),
            "outcomes_confirmed": outcomes.confirmed, "outcomes_refused": outcomes.failed,
            "scores_answered": tally.ok, "dead_letters": dead, **counts,
            "lost_outcomes": lost_outcomes, "lost_scores": lost_scores}


def handled_counts(fleet: SoakFleet) -> dict[str, float]:
    monitoring, scoring = fleet.metrics("monitoring"), fleet.metrics("scoring")
    return {
        "outcomes_handled": metric_sum(monitoring, "conveyor_events_handled_total",
                                       service="monitoring", event_type="OutcomeObserved"),
        "score_served_events_handled": metric_sum(
            monitoring, "conveyor_events_handled_total", service="monitoring",
            event_type="ScoreServed"),
        "scores_received": metric_sum(monitoring, "conveyor_model_served_total"),
        "scoring_reports_dropped": metric_sum(scoring,
                                              "conveyor_scoring_reports_dropped_total"),
    }


def growth(before: float, after: float) -> float:
    return round((after - before) / before, 4) if before else float("nan")


def summarise(args: argparse.Namespace, tally: Tally, samples: dict[str, Any],
              runs: list[PipelineRun], lost: dict[str, Any], seconds: float) -> dict[str, Any]:
    base, end = samples.get("baseline"), samples["end"]
    per_second = [tally.per_second.get(s, 0) for s in range(int(seconds))]
    result: dict[str, Any] = {
        "calls": tally.ok + sum(tally.errors.values()),
        "errors": sum(tally.errors.values()), "error_codes": dict(tally.errors),
        "skipped_not_sent": tally.skipped, "target_rate": args.rate,
        "achieved_rate": round(tally.ok / seconds, 1),
        "achieved_rate_min_second": min(per_second) if per_second else 0,
        "per_minute": [{"minute": m, "answers": len(v),
                        "p50_ms": round(statistics.median(v) * 1e3, 2),
                        "p99_ms": round(sorted(v)[int(len(v) * 0.99)] * 1e3, 2)}
                       for m, v in sorted(tally.latencies.items())],
        "answered_by": dict(tally.versions), "fallbacks": tally.fallbacks,
        "pipeline_runs": [run.result for run in runs],
        **lost, "samples": samples,
    }
    if base is not None:
        result["redis_used_memory_growth"] = growth(base["redis"]["used_memory"],
                                                    end["redis"]["used_memory"])
        result["redis_namespace_memory_growth"] = growth(base["redis"]["namespace_bytes"],
                                                         end["redis"]["namespace_bytes"])
        result["rss_growth"] = {name: growth(base["rss"][name], end["rss"][name])
                                for name in base["rss"]}
    return result


def delete_topologies(settings: Any) -> None:
    """The services' queues and retry exchanges (cleanup() knows the pipeline's five)."""
    import pika

    from common.bus.rabbitmq import connection_parameters, delete_topology

    connection = pika.BlockingConnection(connection_parameters(settings, "soak-cleanup"))
    try:
        channel = connection.channel()
        for name in SERVICES:
            delete_topology(channel, settings, name)
    finally:
        connection.close()


def targets(result: dict[str, Any]) -> dict[str, bool | None]:
    rss = result.get("rss_growth") or {}
    redis_growth = result.get("redis_used_memory_growth")
    return {
        "errors == 0": result["errors"] == 0,
        "events_lost == 0": result["events_lost"] == 0,
        "redis growth <= 10%": None if redis_growth is None else redis_growth <= 0.10,
        "rss growth <= 10% (every service)": all(g <= 0.10 for g in rss.values()) if rss
        else None,
        "rate >= 99% of target": result["achieved_rate"] >= 0.99 * result["target_rate"],
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args = parse_args()
    os.environ.setdefault("CONVEYOR_LOCAL_DEV", "true")
    began = datetime.now(UTC)
    result = soak(args)
    result["targets"] = targets(result)
    result["run"] = {"started": began.isoformat(), "ended": datetime.now(UTC).isoformat(),
                     "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
                     "minutes": args.minutes, "warmup_minutes": args.warmup_minutes,
                     "rows": args.rows, "machine": {"cpus": os.cpu_count(),
                                                    "python": platform.python_version(),
                                                    "load_avg": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = {k: result.get(k) for k in ("calls", "errors", "achieved_rate", "events_lost",
                                          "redis_used_memory_growth",
                                          "redis_namespace_memory_growth", "rss_growth")}
    print(json.dumps({**summary, "targets": result["targets"]}, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
