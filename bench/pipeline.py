"""End-to-end benchmark: PaySim from SourceDataAvailable to ModelReady through the services.

Run with ``make bench-pipeline`` (``.venv/bin/python bench/pipeline.py``; ``--rows 50000``
for a quick run). It takes about 5 minutes at the default 1,000,000 rows:

1. a seeded PaySim CSV is generated, untimed, and cached under ``bench/.work/`` (keyed by
   rows, seed and the generator's source) for later runs;
2. each of ``--rounds`` rounds (default 2) runs both sides one after the other, the order
   alternating: the plain single-process script ``bench/plain_pipeline.py`` in a process
   of its own (same steps, same libraries, same config; see its docstring), and the
   services;
3. services: the five of them (eventlog, ingestion, preparation, training, evaluation)
   start as separate local processes, ``python -m app.cli run NAME``, in a fresh
   namespace ``bench-<id>`` with a data root under ``bench/.work/``, HTTP probes on free
   ports of 127.0.0.1 and logs in the round's work folder; once every ``/readyz``
   answers, a ``SourceDataAvailable`` is published and timed until ``ModelReady`` (or
   ``ModelRejected`` / ``IngestionFailed``) reaches a queue of the bench's own, bound on
   the namespace's exchange to every event type of the run. Then the services get
   SIGTERM and the namespace's queues, exchange and Redis keys and the data root are
   deleted (``--keep`` keeps the logs of a successful round; a failed one keeps them).

``pipeline_s`` is publish → ModelReady received; per-stage seconds come from the events'
``occurred_at`` (RawDataExtracted − SourceDataAvailable, and so on); the top-level figures
are medians over the rounds, every round is in ``rounds`` with the CPU seconds each service
(and its worker processes) used during the run, the Redis server's, and the plain
process's (``bench/stages.py`` splits the services' costs by stage in one process). Results go to
``bench/results/pipeline.json``. ``--profile`` runs each service's handlers under cProfile
(a bench-only wrapper, see ``serve``) and puts the top functions in the results. The
machine is a shared 2-core one: single runs swing by a third; compare several.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import logging
import os
import platform
import pstats
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pika
import redis
from save import save_results

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
RESULTS = ROOT / "bench" / "results" / "pipeline.json"
PYTHON = ROOT / ".venv" / "bin" / "python"
if not PYTHON.exists():  # a copy of the tree without its own venv (a before/after check)
    PYTHON = Path(sys.executable)
SERVICES = ("eventlog", "ingestion", "preparation", "training", "evaluation")
STAGES = {  # stage: (event that starts it, event that ends it)
    "ingestion": ("SourceDataAvailable", "RawDataExtracted"),
    "preparation": ("RawDataExtracted", "FeaturesGenerated"),
    "training": ("FeaturesGenerated", "CandidatesTrained"),
    "evaluation": ("CandidatesTrained", "ModelReady"),
}
OBSERVED = ("SourceDataAvailable", "RawDataExtracted", "FeaturesGenerated", "CandidatesTrained",
            "ModelReady", "ModelRejected", "IngestionFailed")
FINAL = ("ModelReady", "ModelRejected", "IngestionFailed")
SERVICE_ONLY_WORK = [
    "ingestion: sha256 of the source, a copy of its bytes (on a thread, verified), chunked "
    "CSV -> Parquet with each chunk checked and typed by the contract on the way",
    "preparation: the typed batch read back from Parquet; the fitted pipeline saved "
    "(dill + HMAC); the features and each entity's latest aggregates written as Parquet; "
    "then, while training runs, those latest values written to Redis by preparation's own "
    "FeaturesGenerated handler (one Lua call per 64 entities, rows packed in one argument, "
    "last write wins), which evaluation waits for before promoting",
    "training: features read back, an Arrow file hand-off to the worker processes, models saved "
    "(dill + HMAC) with metadata",
    "evaluation: features read back, models loaded after signature checks, latency gate "
    "(100 single-row and 20 batch calls), ROC/PR curves, registry promotion",
    "between stages: an event published with confirms, consumed, acked; idempotency records",
]
log = logging.getLogger("bench.pipeline")


# -- data ----------------------------------------------------------------------------------


def source_csv(rows: int, seed: int) -> Path:
    """The PaySim CSV of ``rows`` rows, generated once per generator version and cached."""
    version = hashlib.sha256((ROOT / "common" / "datasets.py").read_bytes()).hexdigest()[:8]
    path = WORK / f"paysim-{rows}-{seed}-{version}.csv"
    if not path.exists():
        from common.datasets import paysim

        log.warning("generating %s (untimed)", path.name)
        WORK.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".csv.part")
        paysim(rows, seed=seed).to_csv(partial, index=False)
        partial.rename(path)
    return path


def run_plain(csv: Path, out: Path, sequential: bool) -> dict[str, Any]:
    """The plain script in a process of its own; its JSON result plus the process's time."""
    command = [str(PYTHON), str(ROOT / "bench" / "plain_pipeline.py"), str(csv), "--json",
               str(out), *(["--sequential"] if sequential else [])]
    started, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's packages, whatever is installed
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"plain script failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = round(time.perf_counter() - started, 3)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The whole process with its workers, imports included (the services' start-up is not).
    result["process_cpu_s"] = round(after.ru_utime + after.ru_stime
                                    - children.ru_utime - children.ru_stime, 2)
    return result


# -- services ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Fleet:
    """The five services as local processes of one namespace and data root."""

    namespace: str
    data_root: Path
    logs: Path
    profile: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def env(self, name: str) -> dict[str, str]:
        self.ports[name] = free_port()
        return {
            **os.environ, "PYTHONPATH": str(ROOT), "CONVEYOR_NAMESPACE": self.namespace,
            "CONVEYOR_DATA_ROOT": str(self.data_root), "CONVEYOR_HTTP_HOST": "127.0.0.1",
            "CONVEYOR_HTTP_PORT": str(self.ports[name]), "CONVEYOR_LOG_LEVEL": "INFO",
            "CONVEYOR_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
            "CONVEYOR_REDIS_URL": "redis://127.0.0.1:6379/0",
            "CONVEYOR_SOURCE_ROOTS": json.dumps([str(WORK)]),  # the bench's own source files
        }

    def command(self, name: str) -> list[str]:
        if self.profile is None:
            return [str(PYTHON), "-m", "app.cli", "run", name]
        out = self.profile / f"{name}.prof"
        return [str(PYTHON), str(Path(__file__).resolve()), "--serve", name, "--serve-profile",
                str(out)]

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            with open(self.logs / f"{name}.log", "wb") as out:
                self.procs[name] = subprocess.Popen(
                    self.command(name), cwd=ROOT, env=self.env(name), stdout=out,
                    stderr=subprocess.STDOUT,
                )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for name in SERVICES:
            while not self._ready(name):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {timeout}s; see {self.logs}")
                time.sleep(0.1)

    def _ready(self, name: str) -> bool:
        url = f"http://127.0.0.1:{self.ports[name]}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each service with its live child processes (the
        training workers), from /proc: on a shared machine a steadier figure than wall."""
        return {name: round(sum(_cpu_of(pid) for pid in _tree(proc.pid)), 3)
                for name, proc in self.procs.items()}

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"service {name} exited with {proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM every service (the message in hand finishes), then wait for each."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(10)
        return codes


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(settings: Any) -> float:
    """The Redis server's CPU seconds so far (every client's work, not only the run's)."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        info: dict[str, Any] = client.info("cpu")  # type: ignore[assignment]
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    finally:
        client.close()


# -- observing a run -----------------------------------------------------------------------


class Observer:
    """A queue of the bench's own on the namespace's exchange, bound to the run's events."""

    def __init__(self, settings: Any) -> None:
        from common.bus.rabbitmq import connection_parameters

        self.connection = pika.BlockingConnection(
            connection_parameters(settings, f"{settings.namespace}-bench-observer"))
        self.channel = self.connection.channel()
        declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.queue = declared.method.queue
        for event_type in OBSERVED:
            self.channel.queue_bind(self.queue, settings.exchange, routing_key=event_type)

    def until_final(self, correlation_id: str, timeout: float, alive: Any) -> dict[str, Any]:
        """Events of the run by type, each with the wall time it arrived, until a final one."""
        from common.events import parse_event

        seen: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                alive()
                self.connection.sleep(0.02)
                continue
            event = parse_event(body)
            if str(event.correlation_id) != correlation_id:
                continue
            seen[event.event_type] = (event, time.perf_counter())
            log.warning("%8s  %s", event.occurred_at.strftime("%H:%M:%S.%f")[:12],
                        event.event_type)
            if event.event_type in FINAL:
                return seen
        raise TimeoutError(f"no final event within {timeout}s; seen {sorted(seen)}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


def stage_seconds(seen: dict[str, Any]) -> dict[str, float | None]:
    def at(event_type: str) -> datetime | None:
        return seen[event_type][0].occurred_at if event_type in seen else None

    stages: dict[str, float | None] = {}
    for stage, (start, end) in STAGES.items():
        began, ended = at(start), at(end)
        stages[stage] = None if began is None or ended is None else round(
            (ended - began).total_seconds(), 3)
    return stages


def run_services(args: argparse.Namespace, csv: Path, work: Path,
                 watch: Callable[[Fleet], contextlib.AbstractContextManager[Any]] | None = None,
                 ) -> dict[str, Any]:
    """Start the fleet, publish SourceDataAvailable, time it to ModelReady, clean up.
    ``watch(fleet)``, if given, is entered from the publish to the final event (bench/scale.py
    samples the processes' memory in it)."""
    from common.bus.rabbitmq import RabbitMQBus
    from common.events import SourceDataAvailable
    from common.settings import Settings

    settings = Settings(namespace=f"bench-{uuid4().hex[:8]}", data_root=str(work / "data"))
    fleet = Fleet(settings.namespace, work / "data", work / "logs",
                  work / "profile" if args.profile else None)
    if fleet.profile:
        fleet.profile.mkdir(parents=True, exist_ok=True)
    observer = bus = None
    try:
        started = time.perf_counter()
        fleet.start()
        fleet.wait_ready()
        startup_s = time.perf_counter() - started
        observer, bus = Observer(settings), RabbitMQBus(settings, name="bench-producer")
        event = SourceDataAvailable(dataset="paysim", uri=str(csv), producer="bench")
        cpu_before, redis_before = fleet.cpu_seconds(), redis_cpu_seconds(settings)
        with watch(fleet) if watch else contextlib.nullcontext():
            published = time.perf_counter()
            bus.publish(event)
            seen = observer.until_final(str(event.correlation_id), args.timeout,
                                        fleet.check_alive)
        final = next(t for t in FINAL if t in seen)
        pipeline_s = seen[final][1] - published
        cpu_after, redis_after = fleet.cpu_seconds(), redis_cpu_seconds(settings)
        result = describe_run(settings, seen, final, pipeline_s, startup_s, event)
        result["service_cpu_s"] = {name: round(cpu_after[name] - cpu_before[name], 2)
                                   for name in SERVICES}
        result["redis_cpu_s"] = round(redis_after - redis_before, 2)
    finally:
        if observer:
            observer.close()
        if bus:
            bus.close()
        codes = fleet.stop()
        try:
            cleanup(settings, work / "data")
        except Exception as exc:  # noqa: BLE001 - the run is measured: keep its figures
            log.exception("cleanup of %s failed", settings.namespace)
            cleanup_error: str | None = f"{type(exc).__name__}: {exc}"[:500]
        else:
            cleanup_error = None
    result["service_exit_codes"] = codes
    if cleanup_error:
        result["cleanup_error"] = cleanup_error
    if fleet.profile:
        result["profile_top"] = profile_tops(fleet.profile)
    return result


def describe_run(settings: Any, seen: dict[str, Any], final: str, pipeline_s: float,
                 startup_s: float, source: Any) -> dict[str, Any]:
    from common.eventlog import EventLog
    from common.stores import ModelStore

    result: dict[str, Any] = {
        "outcome": final, "pipeline_s": round(pipeline_s, 3),
        "pipeline_by_occurred_at_s": round(
            (seen[final][0].occurred_at - source.occurred_at).total_seconds(), 3),
        "per_stage_s": stage_seconds(seen), "startup_s": round(startup_s, 3),
    }
    if final != "ModelReady":
        result["final_event"] = seen[final][0].model_dump(mode="json")
        return result
    ready = seen["ModelReady"][0]
    record = ModelStore.from_settings(settings).metadata(ready.model_id)
    result["champion"] = {"name": record.metadata.get("name"), "model_id": ready.model_id,
                          "version": ready.version, "metrics": ready.metrics}
    result["candidates"] = {
        ModelStore.from_settings(settings).metadata(m).metadata.get("name"): {
            "fit_s": ModelStore.from_settings(settings).metadata(m).metadata["timings"]["fit_s"]}
        for m in seen["CandidatesTrained"][0].model_ids
    }
    result["rows"] = seen["RawDataExtracted"][0].rows
    client = redis.Redis.from_url(settings.redis_url)
    try:
        recorded = EventLog(client, settings.namespace).recent(50)
        result["eventlog_recorded"] = sorted(
            e["event_type"] for e in recorded if e["correlation_id"] == str(source.correlation_id))
    finally:
        client.close()
    return result


def cleanup(settings: Any, data_root: Path) -> None:
    """Delete the namespace's Redis keys and data root, then its queues and exchange: a
    broker that does not answer leaves its queues, never millions of Redis keys (a 20M-row
    run's ~21M, 3.7 GB)."""
    from common.bus.rabbitmq import connection_parameters, delay_queue

    client = redis.Redis.from_url(settings.redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{settings.namespace}:*", count=10_000):
            batch.append(key)
            if len(batch) == 10_000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    finally:
        client.close()
    shutil.rmtree(data_root, ignore_errors=True)
    connection = pika.BlockingConnection(connection_parameters(settings, "bench-cleanup"))
    try:
        channel = connection.channel()
        for name in SERVICES:
            delays = [delay_queue(settings, name, d) for d in sorted(set(settings.retry_delays_s))]
            for queue in (settings.queue(name), settings.dead_letter_queue(name), *delays):
                channel.queue_delete(queue)
        channel.exchange_delete(settings.exchange)
    finally:
        connection.close()


# -- profiling (bench only) ----------------------------------------------------------------


def serve(name: str, profile_path: Path) -> None:
    """``conveyor run NAME`` with every handler call profiled (cProfile is per thread, and
    handlers run on the consumer's worker thread, so the handler itself is wrapped)."""
    from app.cli import main as cli_main
    from common.bus.dispatch import HandlerSpec
    from common.runtime import Service

    profiler = cProfile.Profile()
    original = Service.handler_specs

    def profiled_specs(self: Service) -> dict[str, HandlerSpec]:
        specs = original(self)
        for key, spec in specs.items():
            specs[key] = HandlerSpec(spec.event_type, _profiled(spec.fn, profiler),
                                     spec.expected)
        return specs

    Service.handler_specs = profiled_specs  # type: ignore[method-assign]
    try:
        cli_main(["run", name], standalone_mode=False)
    finally:
        profiler.dump_stats(str(profile_path))


def _profiled(handler: Any, profiler: cProfile.Profile) -> Any:
    def call(event: Any) -> Any:
        return profiler.runcall(handler, event)

    return call


def profile_tops(folder: Path, top: int = 25) -> dict[str, list[str]]:
    """Per service, the functions with the most cumulative time in its handlers."""
    tops: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.prof")):
        out = io.StringIO()
        try:
            stats = pstats.Stats(str(path), stream=out)
        except (TypeError, EOFError, ValueError):
            continue  # nothing profiled (the event log's handler is not a @handles one)
        stats.sort_stats("cumulative").print_stats(top)
        lines = [line.rstrip() for line in out.getvalue().splitlines() if line.strip()]
        tops[path.stem] = lines[-top:]
    return tops


# -- the run -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import numpy
    import pandas
    import pyarrow
    import sklearn

    return {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "pandas": pandas.__version__, "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    csv = source_csv(args.rows, args.seed)
    rounds = []
    for index in range(args.rounds):
        # Plain first in odd rounds, services first in even ones: neither always goes first.
        rounds.append(one_round(args, csv, plain_first=index % 2 == 0))
        log.warning("round %d: pipeline %.1fs, plain %s s", index + 1,
                    rounds[-1]["services"]["pipeline_s"],
                    rounds[-1]["plain"]["total_s"] if rounds[-1]["plain"] else "-")
    return summarise(args, csv, rounds)


def one_round(args: argparse.Namespace, csv: Path, plain_first: bool) -> dict[str, Any]:
    """The plain script and the services, one after the other, on the same CSV."""
    work = WORK / f"pipeline-{uuid4().hex[:8]}"
    work.mkdir(parents=True)
    found: dict[str, Any] = {"plain": None, "plain_first": plain_first}
    order = ["plain", "services"] if plain_first else ["services", "plain"]
    for side in order:
        if side == "plain" and not args.skip_plain:
            log.warning("plain script on %s", csv.name)
            found["plain"] = run_plain(csv, work / "plain.json", args.sequential_plain)
        elif side == "services":
            log.warning("services on %s (logs in %s)", csv.name, work / "logs")
            found["services"] = run_services(args, csv, work)  # on failure the logs stay
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return found


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def medians(tables: list[dict[str, Any]]) -> dict[str, float | None]:
    """Key by key, the median of the tables' numbers (None where a table has none)."""
    out: dict[str, float | None] = {}
    for key in tables[0]:
        numbers = [t[key] for t in tables if t.get(key) is not None]
        out[key] = median(numbers) if numbers else None
    return out


def summarise(args: argparse.Namespace, csv: Path, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    services = [r["services"] for r in rounds]
    plains = [r["plain"] for r in rounds if r["plain"]]
    last, plain = services[-1], plains[-1] if plains else None
    pipeline_s = median([s["pipeline_s"] for s in services])
    plain_s = median([p["total_s"] for p in plains]) if plains else None
    return {
        "rows": args.rows, "source_bytes": csv.stat().st_size,
        "pipeline_s": pipeline_s, "plain_script_s": plain_s,
        "ratio": round(pipeline_s / plain_s, 3) if plain_s else None,
        "target_ratio": 1.25,
        "per_stage_s": medians([s["per_stage_s"] for s in services]),
        "plain_steps_s": medians([p["steps_s"] for p in plains]) if plains else None,
        "rounds": [{
            "pipeline_s": r["services"]["pipeline_s"],
            "plain_script_s": r["plain"]["total_s"] if r["plain"] else None,
            "ratio": round(r["services"]["pipeline_s"] / r["plain"]["total_s"], 3)
            if r["plain"] else None,
            "plain_first": r["plain_first"],
            "per_stage_s": r["services"]["per_stage_s"],
            "plain_steps_s": r["plain"]["steps_s"] if r["plain"] else None,
            "service_cpu_s": r["services"].get("service_cpu_s"),
            "redis_cpu_s": r["services"].get("redis_cpu_s"),
            "plain_process_cpu_s": r["plain"]["process_cpu_s"] if r["plain"] else None,
        } for r in rounds],
        "plain_training": plain["training"] if plain else None,
        "champion": {
            "pipeline": last.get("champion"),
            "plain": {"name": plain["champion"], "metrics": plain["candidates"][plain["champion"]]}
            if plain else None,
        },
        "plain_candidates": plain["candidates"] if plain else None,
        "pipeline_detail": {k: v for k, v in last.items()
                            if k not in ("pipeline_s", "per_stage_s", "champion")},
        "plain_process_s": plain["process_s"] if plain else None,
        "service_only_work": SERVICE_ONLY_WORK,
        "method": (
            "pipeline_s: SourceDataAvailable published -> ModelReady received by a bench queue on "
            "the namespace exchange (services started and ready beforehand, not timed); "
            "per_stage_s from the events' occurred_at; plain_script_s: the plain script's own "
            "timer from read_csv to the end of evaluation (imports excluded; plain_process_s "
            "includes them); CSV generation untimed; top-level figures are medians over the "
            "rounds (each round runs both sides one after the other, the order alternating); "
            "service_cpu_s: CPU seconds of each service process and its children from publish "
            "to the final event (steadier than wall on a shared machine); redis_cpu_s: the "
            "Redis server's, every client's included; plain_process_cpu_s: the plain process "
            "with its workers, imports included"
        ),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both sides; the results are medians")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the final event")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--sequential-plain", action="store_true",
                        help="the plain script trains its candidates one after the other")
    parser.add_argument("--profile", action="store_true",
                        help="profile each service's handlers with cProfile")
    parser.add_argument("--keep", action="store_true", help="keep logs (the data root goes)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--serve-profile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.serve_profile)
        return
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    result = run(args)
    save_results(args.output, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
