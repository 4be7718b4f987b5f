"""Benchmark: the online path, records → RabbitMQ → online preparation → Redis → Score,
with Feast's push to its Redis online store side by side in the same run.

Run it with ``make bench-streaming``; it writes ``bench/results/streaming.json``:

- ``records_per_s``: 20-float records (dataset ``bench``: an entity, a time, f0..f19)
  whose feature set keeps a last-5 sum of every float, so each record's 20 floats go into
  its entity's state. ``conveyor run online-preparation`` runs in its own process. A
  backlog of ``BACKLOG`` records in events of 500 is drained (``drain_records_per_s``);
  then records are published at steps of that rate for ``PACED_S`` seconds each, and
  ``records_per_s`` is the highest step after which the queue held no more than one
  second of records (not growing).
- ``feast_push_rows_per_s``: Feast 0.67's ``store.push(..., to=PushMode.ONLINE)`` of the
  same rows, 500 per DataFrame, to a PushSource feature view of the 20 floats, in the same
  Redis (database ``CONVEYOR_BENCH_FEAST_DB``, default 12), in ``bench/.feast-venv``.
- ``freshness_p50_ms`` / ``freshness_p99_ms``: PaySim records at 2,000 records/s (events
  of 20 every 10 ms) while a probe entity's record is published every 100 ms; the time
  from its publish to the first Score answer (a real gRPC server over the entity state)
  whose feature age says the record is counted.
- ``parity_rows_checked`` / ``parity_mismatches``: 50,000 PaySim rows of 400 accounts
  streamed through the service; before each record, the features Score uses for it
  against the offline transform's row (tolerance 1e-9), as tests/integration/
  test_online_path.py does.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path.pop(0)  # bench/ first on the path would hide nothing here, but keep it clean
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlparse  # noqa: E402
from uuid import uuid4  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import redis  # noqa: E402
import yaml  # noqa: E402

from bench.features import FEAST_VENV, FEAST_VERSION, cpu_model, ensure_feast  # noqa: E402
from common.bus.idempotency import processed_key  # noqa: E402
from common.bus.rabbitmq import RabbitMQBus  # noqa: E402
from common.events import RecordsObserved  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.stores.entity_state import RedisEntityState, RedisStreamTargets  # noqa: E402
from common.wiring import Stores  # noqa: E402
from preparation import build_pipeline  # noqa: E402
from protos.conveyor.scoring.v1 import scoring_pb2 as pb  # noqa: E402
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc  # noqa: E402
from scoring.core import CoreSettings, ScoreQuery, ScoringCore  # noqa: E402
from scoring.server import GrpcSettings, ScoringServer, field_value  # noqa: E402
from tests.fixtures.streaming import (  # noqa: E402
    as_records,
    chunks_without_repeats,
    stream_config,
    stream_frame,
)
from tests.support.harness import delete_namespace, delete_redis_keys  # noqa: E402

RESULTS = REPO / "bench" / "results" / "streaming.json"
FLOATS, PER_EVENT, ENTITIES = 20, 500, 10_000
BACKLOG, PACED_S = 200_000, 10.0
FRESHNESS_RATE, FRESHNESS_S, PROBE_EVERY_S = 2_000, 20.0, 0.1
PARITY_ROWS, PARITY_ACCOUNTS = 50_000, 400
TARGETS = {"records_per_s": 10_000, "records_vs_feast": 10.0, "freshness_p99_ms": 100.0}


def say(message: str) -> None:
    print(f"[bench-streaming] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parity-rows", type=int, default=PARITY_ROWS)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run at a tenth of the sizes; prints, writes nothing")
    args = parser.parse_args()
    if args.quick:
        global BACKLOG, PACED_S, FRESHNESS_S
        BACKLOG, PACED_S, FRESHNESS_S = BACKLOG // 10, PACED_S / 5, FRESHNESS_S / 5
        args.parity_rows = min(args.parity_rows, 3_000)
    base = Settings()
    if urlparse(base.redis_url).hostname not in {"127.0.0.1", "localhost", "::1"}:
        sys.exit("bench-streaming only talks to a local Redis")
    ensure_feast()
    results: dict[str, Any] = {}
    with bench_world(base) as world:
        results.update(throughput(world))
        results.update(freshness(world))
        results.update(parity(world, args.parity_rows))
    results.update(feast_push())
    write(results, base, save=not args.quick)


# --- the world: settings, config, stores, the service process --------------------------


class World:
    """One run's namespace, data root, pipeline config and service process."""

    def __init__(self, base: Settings, root: Path) -> None:
        self.root = root
        self.config_path = root / "pipeline.yaml"
        config = stream_config()
        config["datasets"]["bench"] = {
            "columns": {"entity": "string", "at": "datetime",
                        **{f"f{i}": "float" for i in range(FLOATS)}},
            "entity_key": "entity", "timestamp": "at"}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config = config
        self.settings = base.model_copy(update={
            "namespace": f"bench-stream-{uuid4().hex[:8]}", "data_root": str(root / "data"),
            "pipeline_config": str(self.config_path), "local_dev": True, "http_port": 0})
        self.stores = Stores.from_settings(self.settings)
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.targets = RedisStreamTargets(self.redis, self.settings.namespace)
        self.state = RedisEntityState(self.redis, self.settings.namespace)
        self.bus = RabbitMQBus(self.settings, name=f"{self.settings.namespace}-bench")
        self.service: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"CONVEYOR_NAMESPACE": self.settings.namespace,
                    "CONVEYOR_DATA_ROOT": self.settings.data_root,
                    "CONVEYOR_PIPELINE_CONFIG": str(self.config_path),
                    "CONVEYOR_LOCAL_DEV": "1", "CONVEYOR_HTTP_PORT": "0",
                    "CONVEYOR_LOG_LEVEL": "WARNING"})
        return env

    def start_service(self) -> None:
        """``conveyor run online-preparation`` in its own process, consuming; a queue
        takes its RecordsRefused, as the event log would."""
        self.bus.declare("online-preparation", ["RecordsObserved"])
        self.bus.declare("refused", ["RecordsRefused"])
        self.service = subprocess.Popen([str(REPO / ".venv" / "bin" / "conveyor"), "run",
                                         "online-preparation"], env=self.environment())
        wait_for(lambda: self.consumers() > 0, 60, "the service consuming")

    def unhandled(self, events: list[RecordsObserved]) -> int:
        """How many of ``events`` the service has not applied yet (no idempotency record,
        which it writes once an event's records are in Redis)."""
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            pipe.exists(processed_key(self.settings.namespace, "online-preparation",
                                      event.event_id))
        return sum(1 for found in pipe.execute() if not found)

    def consumers(self) -> int:
        return int(self.queue_info().get("consumers", 0))

    def queue_info(self) -> dict[str, Any]:
        import pika  # a passive declare answers the depth and the consumers

        from common.bus.rabbitmq import connection_parameters
        with pika.BlockingConnection(connection_parameters(self.settings)) as connection:
            ok = connection.channel().queue_declare(
                self.settings.queue("online-preparation"), passive=True)
            return {"messages": ok.method.message_count, "consumers": ok.method.consumer_count}

    def keep(self, dataset: str, frame: pd.DataFrame, spec: dict[str, Any]) -> Any:
        """Fit ``spec`` on ``frame``, store it signed, keep it from ``dataset``'s records."""
        fitted = build_pipeline(spec).fit(frame, batch_ids=[uuid4().hex])  # a set of its own
        self.stores.feature_pipelines.save(fitted.feature_set_id, fitted)
        self.targets.add(dataset, fitted.feature_set_id)
        self.state.mark_ready(fitted.feature_set_id)  # no batch state: the stream starts it
        return fitted

    def close(self) -> None:
        if self.service is not None:
            self.service.terminate()
            self.service.wait(30)
        self.bus.close()
        delete_namespace(self.settings, {"online-preparation", "refused"})
        delete_redis_keys(self.settings)


@contextmanager
def bench_world(base: Settings) -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    world = World(base, root)
    try:
        yield world
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)


def wait_for(predicate: Any, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(every_s)


# --- 1. throughput ----------------------------------------------------------------------


def float_rows(count: int, start: int = 0) -> list[dict[str, Any]]:
    """``count`` records of 20 floats over ``ENTITIES`` entities, one a millisecond."""
    rng = np.random.default_rng(start)
    values = rng.normal(size=(count, FLOATS)) * 100
    origin = pd.Timestamp("2026-01-01", tz="UTC").value // 1_000
    return [{"entity": f"E{(start + i) % ENTITIES}",
             "at": pd.Timestamp((origin + (start + i) * 1_000) * 1_000, tz="UTC").isoformat(),
             **{f"f{j}": float(v) for j, v in enumerate(row)}}
            for i, row in enumerate(values.tolist())]


def float_spec() -> dict[str, Any]:
    return {"name": "bench_floats", "inputs": ["bench"], "entity_key": "entity",
            "timestamp": "at",
            "steps": [{"kind": "entity_aggregate",
                       "params": {"column": f"f{i}", "window": 5, "stats": ["sum"]}}
                      for i in range(FLOATS)]}


def events_of(dataset: str, records: list[dict[str, Any]], size: int) -> list[RecordsObserved]:
    return [RecordsObserved(dataset=dataset, records=records[i:i + size], producer="bench")
            for i in range(0, len(records), size)]


def throughput(world: World) -> dict[str, Any]:
    seed = float_rows(2_000)
    frame = pd.DataFrame(seed).assign(at=lambda f: pd.to_datetime(f["at"], format="ISO8601"))
    world.keep("bench", frame, float_spec())
    say(f"publishing a backlog of {BACKLOG:,} records in events of {PER_EVENT}")
    backlog = events_of("bench", float_rows(BACKLOG, start=10_000), PER_EVENT)
    world.bus.declare("online-preparation", ["RecordsObserved"])
    for i in range(0, len(backlog), 50):
        world.bus.publish_many(backlog[i:i + 50])
    world.start_service()
    began = time.perf_counter()
    wait_for(lambda: world.unhandled(backlog) == 0, 600, "the backlog drained", every_s=0.02)
    drain = BACKLOG / (time.perf_counter() - began)
    say(f"drained at {drain:,.0f} records/s; now paced runs")
    steps, held = [], 0.0
    start = 10_000 + BACKLOG
    for share in (0.4, 0.5, 0.6, 0.75, 0.9):
        rate = drain * share
        events = paced(world, rate, start)
        left = world.unhandled(events) * PER_EVENT
        start += int(rate * PACED_S) + 1
        steps.append({"rate": round(rate), "queue_left_records": left})
        say(f"paced {rate:,.0f} records/s for {PACED_S:.0f} s: {left:,} not yet applied")
        if left <= rate:  # no more than a second's worth behind: it kept up
            held = rate
        wait_for(lambda e=events: world.unhandled(e) == 0, 300, "the queue drained")
    return {"records_per_s": round(held), "drain_records_per_s": round(drain),
            "paced_steps": steps, "records_per_event": PER_EVENT, "floats_per_record": FLOATS}


def paced(world: World, rate: float, start: int) -> list[RecordsObserved]:
    """Publish ``rate`` records/s for ``PACED_S`` s in events of ``PER_EVENT``."""
    total = int(rate * PACED_S)
    events = events_of("bench", float_rows(total, start=start), PER_EVENT)
    every = PER_EVENT / rate
    began = time.perf_counter()
    for i, event in enumerate(events):
        due = began + i * every
        if (pause := due - time.perf_counter()) > 0:
            time.sleep(pause)  # pacing the load, not synchronising
        world.bus.publish_many([event])
    return events


# --- 2. freshness -----------------------------------------------------------------------


def freshness(world: World) -> dict[str, Any]:
    say(f"freshness: probes while PaySim records stream at {FRESHNESS_RATE:,}/s")
    frame = stream_frame(20_000, accounts=2_000)
    fitted = world.keep("paysim", frame, stream_config()["features"])
    core, server = serve(world, fitted, frame)
    stop = threading.Event()
    publisher = threading.Thread(target=background_stream, args=(world, frame, stop),
                                 daemon=True)
    publisher.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            waits = probe(world, pb_grpc.ScoringStub(channel), frame)
    finally:
        stop.set()
        publisher.join(10)
        server.stop(0)
        core.close()
    ms = sorted(waits)
    return {"freshness_p50_ms": round(statistics.median(ms), 2),
            "freshness_p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
            "freshness_probes": len(ms), "freshness_rate_records_per_s": FRESHNESS_RATE}


def serve(world: World, fitted: Any, frame: pd.DataFrame) -> tuple[ScoringCore, ScoringServer]:
    """A champion on the feature set, served over gRPC from the entity state."""
    from sklearn.linear_model import LogisticRegression

    X = fitted.transform(frame)[list(fitted.feature_names)].to_numpy()
    model = LogisticRegression(max_iter=500).fit(X, frame["isFraud"])
    model_id = f"m-bench-{fitted.feature_set_id}"  # a model of its own per feature set
    world.stores.models.save(model_id, model, {"feature_set_id": fitted.feature_set_id,
                                              "features": list(fitted.feature_names)})
    registry = world.stores.registry(world.settings, world.config["name"])
    registry.register(model_id)
    registry.promote(model_id)
    core = ScoringCore(world.stores.models, world.stores.feature_pipelines, registry,
                       world.stores.online, CoreSettings(deadline_s=1.0), state=world.state)
    core.load_chain()
    return core, ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0)).start()


def background_stream(world: World, frame: pd.DataFrame, stop: threading.Event) -> None:
    """PaySim records at ``FRESHNESS_RATE`` records/s: 20 every 10 ms, on its own bus."""
    bus = RabbitMQBus(world.settings, name=f"{world.settings.namespace}-stream")
    records, times = as_records(frame), frame["timestamp"].tolist()
    span = times[-1] - times[0] + pd.Timedelta(1, "h")
    began, sent, per = time.perf_counter(), 0, FRESHNESS_RATE // 100
    try:
        while not stop.is_set():
            # Round after round of the same rows, each later by the rows' span: new records.
            batch = [dict(records[n % len(records)], timestamp=(
                times[n % len(records)] + (n // len(records)) * span).isoformat())
                for n in range(sent, sent + per)]
            bus.publish_many([RecordsObserved(dataset="paysim", records=batch,
                                              producer="bench")])
            sent += per
            if (pause := began + sent / FRESHNESS_RATE - time.perf_counter()) > 0:
                time.sleep(pause)  # pacing the load
    finally:
        bus.close()


def probe(world: World, stub: Any, frame: pd.DataFrame) -> list[float]:
    """Every ``PROBE_EVERY_S``: a probe record published, then Score polled until its
    feature age says the record is counted; the milliseconds that took, each."""
    template = as_records(frame.iloc[[0]])[0]
    at = pd.Timestamp("2030-01-01", tz="UTC")
    waits, deadline = [], time.monotonic() + FRESHNESS_S
    while time.monotonic() < deadline:
        at += pd.Timedelta(1, "min")
        record = dict(template, nameOrig="PROBE", timestamp=at.isoformat())
        request = pb.ScoreRequest(entity_id="PROBE", fields={
            k: field_value(v) for k, v in record.items() if k != "nameOrig" and v is not None})
        request.fields["timestamp"].text = (at + pd.Timedelta(1, "ms")).isoformat()
        sent = time.perf_counter()
        world.bus.publish(RecordsObserved(dataset="paysim", records=[record], producer="bench"))
        while stub.Score(request, timeout=5).feature_age_ms != 1.0:
            pass  # each answer is a fresh read; the record counts once its age is 1 ms
        waits.append((time.perf_counter() - sent) * 1e3)
        if (pause := sent + PROBE_EVERY_S - time.perf_counter()) > 0:
            time.sleep(pause)
    return waits


# --- 3. parity --------------------------------------------------------------------------


def parity(world: World, rows: int) -> dict[str, Any]:
    frame = stream_frame(rows, accounts=PARITY_ACCOUNTS, seed=23)
    fitted = world.keep("paysim", frame, stream_config()["features"])
    world.targets.remove("paysim", [f for f in world.targets.of("paysim")
                                    if f != fitted.feature_set_id])
    core, server = serve(world, fitted, frame)
    server.stop(0)
    records = as_records(frame)
    expected = fitted.transform(frame)[list(fitted.feature_names)].to_numpy(dtype=float)
    used: list[list[float]] = []
    say(f"parity: {rows:,} records, each read before it is applied")
    for run in chunks_without_repeats(records):
        for i in run:
            fields = {k: v for k, v in records[i].items() if k != "nameOrig" and v is not None}
            got = core.features_for(ScoreQuery(records[i]["nameOrig"], fields))
            used.append([got[name] for name in fitted.feature_names])
        event = RecordsObserved(dataset="paysim", records=[records[i] for i in run],
                                producer="bench")
        world.bus.publish(event)
        wait_for(lambda e=event: handled(world, e), 60, "a run applied", every_s=0.0005)
    core.close()
    close = np.isclose(np.array(used), expected, rtol=1e-9, atol=1e-9, equal_nan=True)
    return {"parity_rows_checked": len(used), "parity_mismatches": int((~close).sum())}


def handled(world: World, event: RecordsObserved) -> bool:
    """Whether the service has taken the event (its idempotency record, written once the
    records are applied)."""
    key = processed_key(world.settings.namespace, "online-preparation", event.event_id)
    return bool(world.redis.exists(key))


# --- 4. Feast ---------------------------------------------------------------------------


def feast_push() -> dict[str, Any]:
    say("feast: push of the same rows (in bench/.feast-venv)")
    url = urlparse(Settings().redis_url)
    db = int(os.environ.get("CONVEYOR_BENCH_FEAST_DB", "12"))
    work = Path(tempfile.mkdtemp(prefix="bench-feast-push-"))
    project = f"bench_push_{uuid4().hex[:8]}"
    config = {"project": project, "repo": str(work), "rows": 50_000, "per_push": PER_EVENT,
              "redis": f"{url.hostname}:{url.port or 6379},db={db}", "floats": FLOATS,
              "entities": ENTITIES}
    script = work / "feast_push.py"
    script.write_text(FEAST_PUSH)
    try:
        done = subprocess.run([str(FEAST_VENV / "bin" / "python"), str(script),
                               json.dumps(config)], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"the feast side failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        client = redis.Redis(host=url.hostname, port=url.port or 6379, db=db)
        for key in client.scan_iter(b"*" + project.encode(), count=10_000):
            client.delete(key)
        shutil.rmtree(work, ignore_errors=True)


FEAST_PUSH = r'''
"""Feast side of bench/streaming.py: push rows to the online store, print one JSON line."""
import contextlib, json, sys, time, warnings
from datetime import timedelta

import numpy as np
import pandas as pd


def main(cfg):
    warnings.filterwarnings("ignore")
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, PushSource, RepoConfig
    from feast.data_source import PushMode
    from feast.infra.offline_stores.dask import DaskOfflineStoreConfig
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig
    from feast.types import Float64
    from feast import ValueType

    names = [f"f{i}" for i in range(cfg["floats"])]
    empty = pd.DataFrame({"entity": pd.Series(dtype="string"),
                          "at": pd.Series(dtype="datetime64[ns, UTC]"),
                          **{n: pd.Series(dtype=float) for n in names}})
    empty.to_parquet(cfg["repo"] + "/batch.parquet")
    store = FeatureStore(config=RepoConfig(
        project=cfg["project"], provider="local", registry=cfg["repo"] + "/registry.db",
        offline_store=DaskOfflineStoreConfig(type="file"),
        online_store=RedisOnlineStoreConfig(connection_string=cfg["redis"]),
        entity_key_serialization_version=3), repo_path=cfg["repo"])
    entity = Entity(name="entity", join_keys=["entity"], value_type=ValueType.STRING)
    batch = FileSource(path=cfg["repo"] + "/batch.parquet", timestamp_field="at")
    push = PushSource(name="bench_push", batch_source=batch)
    view = FeatureView(name="bench", entities=[entity], ttl=timedelta(days=3650),
                       schema=[Field(name=n, dtype=Float64) for n in names], source=push,
                       online=True)
    store.apply([entity, view])
    rng = np.random.default_rng(1)
    frames = []
    origin = pd.Timestamp("2026-01-01", tz="UTC")
    for start in range(0, cfg["rows"], cfg["per_push"]):
        size = min(cfg["per_push"], cfg["rows"] - start)
        frame = pd.DataFrame(rng.normal(size=(size, cfg["floats"])) * 100, columns=names)
        frame.insert(0, "entity", [f"E{(start + i) % cfg['entities']}" for i in range(size)])
        frame["at"] = origin + pd.to_timedelta(np.arange(start, start + size), unit="ms")
        frames.append(frame)
    store.push("bench_push", frames[0], to=PushMode.ONLINE)  # warm up
    began = time.perf_counter()
    for frame in frames:
        store.push("bench_push", frame, to=PushMode.ONLINE)
    elapsed = time.perf_counter() - began
    return {"feast_push_rows_per_s": cfg["rows"] / elapsed, "feast_push_rows": cfg["rows"]}


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):
        outcome = main(json.loads(sys.argv[1]))
    print(json.dumps(outcome))
'''


# --- the report -------------------------------------------------------------------------


def write(results: dict[str, Any], settings: Settings, save: bool = True) -> None:
    feast = results["feast_push_rows_per_s"]
    results["feast_push_rows_per_s"] = round(feast)
    results["records_vs_feast"] = round(results["records_per_s"] / feast, 2)
    results["targets"] = {
        "records_per_s": results["records_per_s"] >= TARGETS["records_per_s"],
        "records_vs_feast": results["records_vs_feast"] >= TARGETS["records_vs_feast"],
        "freshness_p99_ms": results["freshness_p99_ms"] <= TARGETS["freshness_p99_ms"],
        "parity": results["parity_mismatches"] == 0 and results["parity_rows_checked"] >= 50_000,
    }
    results["machine"] = {"platform": platform.platform(), "cpu": cpu_model(),
                          "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                          "redis_server": redis.Redis.from_url(settings.redis_url)
                          .info("server").get("redis_version"), "feast": FEAST_VERSION}
    results["command"] = "make bench-streaming"
    if save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
