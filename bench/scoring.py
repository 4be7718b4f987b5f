"""Benchmark: online scoring, Conveyor side by side with Seldon MLServer, in one run.

Run it with ``make bench-scoring`` (``--seconds 10`` per measurement, ``--quick`` for a
3-second smoke run). One model for everyone: a scikit-learn HistGradientBoostingClassifier
(``max_iter=100``) on 20 float features, trained here on seeded synthetic data. One load
generator for everyone: this process, one asynchronous gRPC client (``grpc.aio``, one
channel on loopback) with ``concurrency`` coroutines each sending its next request as soon
as the last is answered; the servers are separate processes, started one at a time:

- MLServer 1.7 with its scikit-learn runtime, V2 gRPC ``ModelInfer`` (a ``[1, 20]`` FP64
  tensor, output ``predict_proba``), adaptive batching off, then on (``max_batch_size``
  32, ``max_batch_time`` 2 ms). The script installs it once into ``bench/.venv-mlserver``
  (with the project's scikit-learn version, so both load the same pickled model) and
  starts ``mlserver start`` on free ports; readiness is polled through ``ServerReady`` and
  ``ModelReady``.
- Conveyor ``ModelInfer``: the same request to the scoring server's Open Inference
  Protocol service (``scoring/oip.py``), the same work as MLServer's.
- Conveyor ``Score``: the model registered as champion in a throwaway namespace with a
  feature set whose 8 entity aggregates come from Redis (written here for 10,000
  entities) and whose 12 other features come in the request: a Redis read, the compiled
  online transform and the predict, per call.
- Fallback: a second registry whose champion is the same model wrapped to sleep 100 ms per
  predict call (``tests.fixtures.models.SlowClassifier``) and whose previous version is the
  model itself; ``Score`` at concurrency 8 (a load this machine answers within the
  deadline when no model is slow, to show the router apart from capacity), then at 32
  with a 20 ms client deadline. Reported: the share of requests answered within the deadline,
  and errors; the target is judged at 32.

- The ceiling: ``ModelInfer`` against a no-op server in its own process, one on
  ``grpc.aio`` and one on the thread-pool ``grpc.server`` Conveyor uses, each answering a
  response built once: only gRPC's own work and the load generator's. ``targets_feasibility``
  sets the c32 requests/s the 6x and 4x targets need beside it.

Each measurement is ``--warmup`` seconds unrecorded, then ``--seconds`` recorded, at
concurrency 1 and 32: requests per second (answers whose call started in the recorded
window), p50 and p99 of their latency as the client saw it, errors (any status but OK),
and the CPU milliseconds per call of the load generator (this process, every thread) and
of the server (every process of its session, from /proc) over the recorded window.
Conveyor's rows add ``mean_batch_size`` and ``handler_ms_per_call``, the time a call
spends in its handler (the server's own ``conveyor_scoring_rpc_duration_seconds``), both
over the server's life: at concurrency 1 the Python work of one call, against which the
server's CPU per call shows what gRPC and the process's other threads cost around it.
The servers predict on one OpenMP thread: Conveyor's batchers set it for themselves,
MLServer gets ``OMP_NUM_THREADS=1`` (scikit-learn's default of one thread per core spins
against everything else on a 2-core machine and makes a predict ~10x slower).
Conveyor's servers run without the ScoreServed reporter (no broker in this benchmark), and
with ``CoreSettings(freeze_gc=True)`` (loaded models kept out of full collections).
Results go to ``bench/results/scoring.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any
from uuid import uuid4

import grpc
import numpy as np
import pandas as pd
import redis
from features import delete_keys, host
from pipeline import free_port
from save import save_results
from timing import times_ms

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # tests.fixtures.models (the slow model) for the fallback

from common.settings import Settings  # noqa: E402
from protos.conveyor.scoring.v1 import scoring_pb2 as spb  # noqa: E402
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as spb_grpc  # noqa: E402
from protos.inference import grpc_service_pb2 as ipb  # noqa: E402
from protos.inference import grpc_service_pb2_grpc as ipb_grpc  # noqa: E402

MLSERVER_VENV = HERE / ".venv-mlserver"
MLSERVER_PINS = ("mlserver==1.7.*", "mlserver-sklearn==1.7.*", "uvloop<0.20")
WORK = HERE / ".work"
RESULTS = HERE / "results" / "scoring.json"
MODEL = "bench-hgb"
SEED = 11
FEATURES, REQUEST_FEATURES = 20, 12
TRAIN_ROWS, POOL_ROWS, ENTITIES = 20_000, 1_024, 10_000
CONCURRENCY = (1, 32)
CHANNELS = 16
"""Connections the load generator spreads its calls over (round robin), for every system:
a server of several processes on one port gets a share of the connections each (the
kernel hashes each connection to a worker: with 4, all of them landed on one worker of
two in one run in eight)."""
FALLBACK = {"concurrency": 32, "deadline_ms": 20.0, "champion_delay_ms": 100.0}
FALLBACK_LIGHT_CONCURRENCY = 8
MLSERVER_BATCHING = {"max_batch_size": 32, "max_batch_time": 0.002}
SPEC: dict[str, Any] = {
    "name": "bench_scoring", "inputs": ["bench"], "entity_key": "account", "label": "label",
    "steps": [
        {"kind": "entity_aggregate", "params": {"column": "a", "window": 5}},
        {"kind": "entity_aggregate", "params": {"column": "a", "window": 50}},
        {"kind": "entity_aggregate",
         "params": {"column": "b", "window": 5, "stats": ["sum", "mean"]}},
        {"kind": "drop", "params": {"columns": ["a", "b"]}},
    ],
}
"""12 request features x0..x11 as they are, and 8 per-account aggregates the online store
holds (their raw columns a and b are dropped): 20 features, all floats."""


def main() -> None:
    args = parse_args()
    settings = Settings()
    run = uuid4().hex[:8]
    work = WORK / f"scoring-{run}"
    work.mkdir(parents=True)
    client = redis.Redis.from_url(settings.redis_url)
    namespace = f"bench-scoring-{run}"
    try:
        in_process = profile_score(work, namespace)
        if args.profile:
            print(json.dumps(in_process, indent=2))
            return
        world = build_world(work, client, namespace)
        if args.only_conveyor:
            tuning(world, args, settings)
            return
        if args.only_fallback:
            print(json.dumps(bench_fallback(world, args, settings), indent=1))
            return
        ensure_mlserver()
        systems = {
            "mlserver_batching_off": bench_mlserver(world, work, args, batching=False),
            "mlserver_batching_on": bench_mlserver(world, work, args, batching=True),
            **bench_conveyor(world, args, settings),
            **bench_ceiling(world, args),
        }
        fallback = bench_fallback(world, args, settings)
        batches = world.batches
    finally:
        delete_keys(client, f"{namespace}:*".encode())
        shutil.rmtree(work, ignore_errors=True)
    results = report(systems, fallback, args, settings) | {
        "conveyor_predict_calls": batches, "score_in_process_c1": in_process}
    save_results(RESULTS, results)
    print_summary(results)


def tuning(world: World, args: argparse.Namespace, settings: Settings) -> None:
    """Conveyor beside the no-op ceiling, printed only (``--only-conveyor``)."""
    systems = {**bench_conveyor(world, args, settings), **bench_ceiling(world, args)}
    with_cpu_vs_noop(systems)
    print(json.dumps({name: figures for name, figures in systems.items()}, indent=1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="recorded, per setting")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded, per setting")
    parser.add_argument("--quick", action="store_true", help="3 s per setting: a smoke run")
    parser.add_argument("--workers", type=int, default=0,
                        help="Conveyor's worker processes (0: the CPUs this process may use)")
    parser.add_argument("--only-conveyor", action="store_true",
                        help="Conveyor and the no-op ceiling only, no results file (tuning)")
    parser.add_argument("--only-fallback", action="store_true",
                        help="the fallback scenario only, printed, no results file (tuning)")
    parser.add_argument("--profile", action="store_true",
                        help="only the in-process cost of one Score, fast and pandas paths")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup = 3.0, 1.0
    if not args.workers:
        from scoring.workers import available_cpus

        args.workers = available_cpus()
    return args


def say(message: str) -> None:
    print(f"[bench-scoring] {message}", file=sys.stderr, flush=True)


# --- MLServer's own environment -------------------------------------------------------


def ensure_mlserver() -> None:
    """Install MLServer 1.7 into bench/.venv-mlserver unless it is there with our
    scikit-learn (the model is pickled once, by this process, for both servers)."""
    sklearn = version("scikit-learn")
    installed = mlserver_versions()
    if installed.get("mlserver", "").startswith("1.7.") and installed.get("sklearn") == sklearn:
        return
    say(f"installing MLServer 1.7 into {MLSERVER_VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(MLSERVER_VENV)], check=True)
    pip = [str(MLSERVER_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *MLSERVER_PINS, f"scikit-learn=={sklearn}"], check=True)
    installed = mlserver_versions()
    if not installed.get("mlserver", "").startswith("1.7."):
        sys.exit(f"MLServer 1.7 did not install into {MLSERVER_VENV}: {installed}")


def mlserver_versions() -> dict[str, str]:
    python = MLSERVER_VENV / "bin" / "python"
    if not python.exists():
        return {}
    probe = ("import json, importlib.metadata as m; print(json.dumps({k: m.version(p) for k, p "
             "in [('mlserver', 'mlserver'), ('mlserver_sklearn', 'mlserver-sklearn'), "
             "('sklearn', 'scikit-learn'), ('uvloop', 'uvloop')]}))")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


# --- the model, the stores, the requests ----------------------------------------------


@dataclass
class World:
    """What every system serves and is asked."""

    work: Path
    namespace: str
    key: bytes
    feature_names: list[str]
    matrix: np.ndarray
    """Rows for ModelInfer, in the model's feature order."""
    score_requests: list[spb.ScoreRequest]
    model_path: Path
    batches: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per Conveyor server (registry), its versions' predict calls and rows over the run."""
    handlers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per Conveyor server, each worker's calls and handler seconds by method."""


def build_world(work: Path, client: redis.Redis, namespace: str) -> World:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from common.stores import ModelRegistry, ModelStore, RedisOnlineStore
    from preparation import build_pipeline
    from tests.fixtures.models import SlowClassifier

    rng = np.random.default_rng(SEED)
    fitted = build_pipeline(SPEC).fit(raw_rows(rng, 2_000), batch_ids=["bench"])
    names = list(fitted.feature_names)
    aggregates = fitted.aggregate_columns
    assert len(names) == FEATURES and len(aggregates) == FEATURES - REQUEST_FEATURES, names
    say(f"training HistGradientBoostingClassifier(max_iter=100) on {TRAIN_ROWS:,} rows")
    X = rng.normal(size=(TRAIN_ROWS, FEATURES))
    y = (X @ rng.normal(size=FEATURES) + rng.normal(size=TRAIN_ROWS) > 0).astype(int)
    model = HistGradientBoostingClassifier(max_iter=100, random_state=SEED).fit(X, y)
    model_path = work / "model.joblib"
    import joblib

    joblib.dump(model, model_path)
    key = secrets.token_bytes(32)
    pipelines = ModelStore(str(work / "pipelines"), key)
    pipelines.save(fitted.feature_set_id, fitted)
    metadata = {"feature_set_id": fitted.feature_set_id, "features": names}
    for registry_name, models in (("normal", [model]),
                                  ("fallback", [model, SlowClassifier(
                                      model, FALLBACK["champion_delay_ms"] / 1e3)])):
        store = ModelStore(str(work / registry_name), key)
        registry = ModelRegistry(str(work / registry_name), MODEL)
        for i, estimator in enumerate(models):
            store.save(f"{registry_name}-m{i}", estimator, metadata)
            registry.register(f"{registry_name}-m{i}")
            registry.promote(f"{registry_name}-m{i}")
    online = RedisOnlineStore(client, namespace)
    accounts = [f"A{i}" for i in range(ENTITIES)]
    rows = pd.DataFrame(rng.normal(size=(ENTITIES, len(aggregates))), columns=aggregates)
    online.write_batch(fitted.feature_set_id, rows.assign(account=accounts), "account")
    matrix = rng.normal(size=(POOL_ROWS, FEATURES))
    requests = [score_request(accounts[int(rng.integers(ENTITIES))], names, row)
                for row in matrix]
    return World(work, namespace, key, names, matrix, requests, model_path)


def raw_rows(rng: np.random.Generator, rows: int) -> pd.DataFrame:
    frame = pd.DataFrame(rng.normal(size=(rows, REQUEST_FEATURES)),
                         columns=[f"x{i}" for i in range(REQUEST_FEATURES)])
    return frame.assign(account=[f"A{i}" for i in rng.integers(0, 200, rows)],
                        a=rng.normal(size=rows), b=rng.normal(size=rows),
                        label=rng.integers(0, 2, rows))


def score_request(account: str, names: list[str], row: np.ndarray) -> spb.ScoreRequest:
    fields = {name: spb.FieldValue(number=float(value))
              for name, value in zip(names, row, strict=True) if name.startswith("x")}
    return spb.ScoreRequest(entity_id=account, fields=fields)


def infer_requests(world: World, model_name: str) -> list[ipb.ModelInferRequest]:
    """The same [1, 20] FP64 rows for MLServer and Conveyor, asking for predict_proba."""
    return [ipb.ModelInferRequest(
        model_name=model_name,
        inputs=[ipb.ModelInferRequest.InferInputTensor(
            name="input-0", datatype="FP64", shape=[1, FEATURES],
            contents=ipb.InferTensorContents(fp64_contents=row.tolist()))],
        outputs=[ipb.ModelInferRequest.InferRequestedOutputTensor(name="predict_proba")],
    ) for row in world.matrix]


# --- one Score in process, where its time goes -----------------------------------------


def profile_score(work: Path, namespace: str, calls: int = 300) -> dict[str, Any]:
    """Milliseconds per ``ScoringCore.score`` at concurrency 1, in this process, on the
    tests' realistic feature set (aggregates, impute, difference, date parts, log, one-hot,
    drop) and model, with the real Redis: the median of ``calls``, and of its parts (the
    Redis read, the transform, a predict of one row), for the compiled row transform and
    for the pandas transform it replaced (``transform_online(fast=False)``)."""
    import scoring.core
    from scoring.inputs import InputSchema
    from tests.fixtures.scoring import fields_of, scoring_world

    say(f"in process: {calls} Score calls at concurrency 1, row path then pandas path")
    world = scoring_world(work / "profile", f"{namespace}-profile")
    core = world.core()
    core.load_chain()
    model = core.loaded()
    schema = InputSchema.of(world.fitted)
    queries = [scoring.core.ScoreQuery(row["nameOrig"], fields_of(row, schema))
               for _, row in world.frame.sample(calls, random_state=SEED).iterrows()]
    requests = [core._with_online([q], [model], time.monotonic() + 60)[0] for q in queries]
    fsid = world.fitted.feature_set_id
    figures = {
        "redis_read_ms": median_ms(lambda q: world.online.read(fsid, [q.entity_id]), queries),
        "predict_one_row_ms": median_ms(
            lambda r: model.predict_batch([model.features_of(r)]), requests),
    }
    fast_transform, plan_matrix = scoring.core.online_matrix, scoring.core.LoadedModel._plan_matrix
    try:
        for path, transform in (("row_path", fast_transform), ("pandas_path", _pandas_matrix)):
            scoring.core.online_matrix = transform  # type: ignore[assignment]
            if path == "pandas_path":  # a block's rows one by one, through online_matrix
                scoring.core.LoadedModel._plan_matrix = lambda *_: None  # type: ignore
            figures[f"{path}_transform_ms"] = median_ms(model.features_of, requests)
            figures[f"{path}_score_ms"] = median_ms(core.score, queries)
    finally:
        scoring.core.online_matrix = fast_transform
        scoring.core.LoadedModel._plan_matrix = plan_matrix  # type: ignore[method-assign]
        core.close()
        delete_keys(redis.Redis.from_url(Settings().redis_url),
                    f"{namespace}-profile:*".encode())
    return {key: round(value, 3) for key, value in figures.items()} | {"calls": calls}


def _pandas_matrix(fitted: Any, records: Any, names: Sequence[str]) -> np.ndarray:
    """What the scoring path did before the row transform: the pandas steps."""
    return fitted.transform_online(records, fast=False)[list(names)].to_numpy(np.float64)


def median_ms(call: Callable[[Any], Any], items: Sequence[Any]) -> float:
    return statistics.median(times_ms(call, items))


# --- the load generator ---------------------------------------------------------------


Call = Callable[[Any, float | None], Awaitable[Any]]


@dataclass
class Outcome:
    """What one measurement saw in its recorded window."""

    latencies_ms: list[float]
    errors: Counter[str]
    seconds: float
    fallbacks: int = 0
    finished: int = 0
    """Calls finished (answered or failed) so far, warm-up included."""
    cpu: CpuWindow | None = None

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_ms)
        return {
            "rps": round(len(ordered) / self.seconds, 1),
            "p50_ms": round(statistics.median(ordered), 3) if ordered else None,
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)
            if ordered else None,
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            "answers": len(ordered),
            **(self.cpu.per_call() if self.cpu else {}),
        }


@dataclass
class CpuWindow:
    """CPU seconds of the load generator (this process, all its threads) and of the server
    (every process of its session), and the calls finished, over the recorded window."""

    server_session: int
    client_s: float = 0.0
    server_s: float = 0.0
    calls: int = 0

    def open(self, finished: int) -> None:
        self.client_s, self.server_s = -time.process_time(), -session_cpu_s(self.server_session)
        self.calls = -finished

    def close(self, finished: int) -> None:
        self.client_s += time.process_time()
        self.server_s += session_cpu_s(self.server_session)
        self.calls += finished

    def per_call(self) -> dict[str, float | None]:
        def ms(seconds: float) -> float | None:
            return round(seconds * 1e3 / self.calls, 4) if self.calls > 0 else None
        return {"client_cpu_ms_per_call": ms(self.client_s),
                "server_cpu_ms_per_call": ms(self.server_s)}


def session_cpu_s(session: int) -> float:
    """User + system CPU seconds of the live processes of a session (a server started with
    ``start_new_session``: MLServer's workers too), from /proc."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[3]) == session:  # fields after the name: state, ppid, pgrp, session
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def load(call: Call, requests: Sequence[Any], concurrency: int, seconds: float,
               warmup: float, timeout: float | None = None,
               is_fallback: Callable[[Any], bool] | None = None,
               cpu: CpuWindow | None = None) -> Outcome:
    """``concurrency`` coroutines calling back to back; only calls started in the recorded
    window (after ``warmup``) count. ``cpu`` is read as the window opens and closes."""
    loop_clock = time.perf_counter
    start = loop_clock() + warmup
    stop = start + seconds
    outcome = Outcome([], Counter(), seconds, cpu=cpu)

    async def worker(first: int) -> None:
        index = first
        while (began := loop_clock()) < stop:
            request = requests[index % len(requests)]
            index += concurrency
            try:
                reply = await call(request, timeout)
            except grpc.aio.AioRpcError as exc:
                outcome.finished += 1
                if began >= start:
                    outcome.errors[exc.code().name] += 1
                continue
            outcome.finished += 1
            if began >= start:
                outcome.latencies_ms.append((loop_clock() - began) * 1e3)
                if is_fallback is not None and is_fallback(reply):
                    outcome.fallbacks += 1

    async def read_cpu(window: CpuWindow) -> None:
        await asyncio.sleep(start - loop_clock())
        window.open(outcome.finished)
        await asyncio.sleep(stop - loop_clock())
        window.close(outcome.finished)

    readers = [read_cpu(cpu)] if cpu is not None else []
    await asyncio.gather(*(worker(i) for i in range(concurrency)), *readers)
    return outcome


def measure(target: str, method: str, requests: Sequence[Any], concurrency: int,
            args: argparse.Namespace, timeout: float | None = None,
            server_pid: int | None = None) -> Outcome:
    async def run() -> Outcome:
        # a local subchannel pool: channels to one target would share one connection
        channels = [grpc.aio.insecure_channel(target, options=[
            ("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)]
        try:
            call = rpc(channels, method)
            fallback = (lambda reply: reply.fallback) if method == "Score" else None
            cpu = CpuWindow(server_pid) if server_pid is not None else None
            return await load(call, requests, concurrency, args.seconds, args.warmup,
                              timeout, fallback, cpu)
        finally:
            for channel in channels:
                await channel.close()

    return asyncio.run(run())


def rpc(channels: Sequence[grpc.aio.Channel], method: str) -> Call:
    """Calls of ``method``, round robin over the channels (one connection each)."""
    def stub(channel: grpc.aio.Channel) -> Any:
        if method == "Score":
            return spb_grpc.ScoringStub(channel)
        return ipb_grpc.GRPCInferenceServiceStub(channel)

    bound = [getattr(stub(channel), method) for channel in channels]
    turn = iter(range(1 << 62))

    def call(request: Any, timeout: float | None) -> Awaitable[Any]:
        return bound[next(turn) % len(bound)](request, timeout=timeout)

    return call


def wait_ready(target: str, model: str, process: subprocess.Popen[bytes],
               timeout_s: float = 180.0) -> None:
    """Poll the V2 ServerReady and ModelReady until both say ready (or the server died)."""
    until = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = ipb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < until:
            if process.poll() is not None:
                sys.exit(f"the server at {target} exited with {process.returncode}")
            try:
                if (stub.ServerReady(ipb.ServerReadyRequest(), timeout=1).ready
                        and stub.ModelReady(ipb.ModelReadyRequest(name=model), timeout=1).ready):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)  # polling a starting server: nothing to wait on but its port
    sys.exit(f"the server at {target} was not ready after {timeout_s:.0f} s")


@contextmanager
def running(command: list[str], log: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


# --- MLServer -------------------------------------------------------------------------


def bench_mlserver(world: World, work: Path, args: argparse.Namespace,
                   batching: bool) -> dict[str, Any]:
    folder = work / f"mlserver-{'on' if batching else 'off'}"
    folder.mkdir()
    grpc_port = free_port()
    settings = {"debug": False, "http_port": free_port(), "grpc_port": grpc_port,
                "metrics_port": free_port(), "host": "127.0.0.1"}
    model_settings: dict[str, Any] = {
        "name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(world.model_path)}}
    if batching:
        model_settings |= MLSERVER_BATCHING
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    target = f"127.0.0.1:{grpc_port}"
    command = [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(folder)]
    say(f"MLServer, adaptive batching {'on' if batching else 'off'}: starting")
    with running(command, work / f"{folder.name}.log", {"OMP_NUM_THREADS": "1"}) as process:
        wait_ready(target, MODEL, process)
        return bench_system(target, "ModelInfer", infer_requests(world, MODEL), args,
                            f"MLServer batching {'on' if batching else 'off'}", process.pid)


def bench_system(target: str, method: str, requests: Sequence[Any],
                 args: argparse.Namespace, label: str, server_pid: int) -> dict[str, Any]:
    figures = {}
    for concurrency in CONCURRENCY:
        say(f"{label}: {method} at concurrency {concurrency}")
        figures[f"c{concurrency}"] = measure(target, method, requests, concurrency, args,
                                             server_pid=server_pid).figures()
    return figures


# --- Conveyor -------------------------------------------------------------------------


@contextmanager
def conveyor_server(world: World, registry: str, settings: Settings, workers: int,
                    label: str) -> Iterator[tuple[str, int]]:
    """The benchmark's Conveyor server on ``registry``'s chain, ``workers`` processes on
    one port: its address and the supervisor's pid (its session holds the workers). Its
    predict calls are kept under ``label`` in ``world.batches`` once it has stopped."""
    port = free_port()
    marker = world.work / f"ready-{label}"
    config = {"root": str(world.work / registry), "pipelines": str(world.work / "pipelines"),
              "key": world.key.hex(), "namespace": world.namespace, "port": port,
              "redis_url": settings.redis_url, "workers": workers, "ready_file": str(marker)}
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(config)]
    target = f"127.0.0.1:{port}"
    log = world.work / f"conveyor-{label}.log"
    with running(command, log) as process:
        wait_for_file(marker, process)
        wait_ready(target, MODEL, process)
        yield target, process.pid
    text = log.read_text()
    world.batches[label] = predict_calls(text)
    world.handlers[label] = predict_calls(text, '{"rpc"')


def predict_calls(log: str, opening: str = '{"version"') -> list[dict[str, Any]]:
    """The workers' predict-call lines of a server's log (found anywhere in a line), or
    with ``opening='{"rpc"'`` their handler-time lines (``handler_times``)."""
    decoder = json.JSONDecoder()
    found = []
    for match in re.finditer(re.escape(opening), log):
        with contextlib.suppress(ValueError):
            found.append(decoder.raw_decode(log, match.start())[0])
    return found


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout_s: float = 180.0
                  ) -> None:
    """Poll for the file a server writes once every worker is ready."""
    until = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > until:
            sys.exit(f"the Conveyor server did not get ready (exit {process.returncode})")
        time.sleep(0.1)  # polling a starting server's marker: nothing else to wait on


def mean_batch_sizes(calls: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Rows per predict call of each version, over every worker of one server's life."""
    rows: Counter[str] = Counter()
    batches: Counter[str] = Counter()
    for line in calls:
        rows[line["version"]] += line["rows"]
        batches[line["version"]] += line["batches"]
    return {v: round(rows[v] / batches[v], 2) for v in rows if batches[v]}


def handler_ms(lines: Sequence[dict[str, Any]], method: str) -> float | None:
    """Milliseconds per call in ``method``'s handler, over every worker of one server's
    life (warm-up included): at concurrency 1 the Python work of a call, at 32 that and
    the wait for its batch."""
    calls = sum(line.get("calls", 0) for line in lines if line["rpc"] == method)
    seconds = sum(line.get("handler_s", 0.0) for line in lines if line["rpc"] == method)
    return round(seconds / calls * 1e3, 4) if calls else None


def bench_conveyor(world: World, args: argparse.Namespace, settings: Settings
                   ) -> dict[str, Any]:
    """ModelInfer and Score at each concurrency, each against a server of its own, so
    the mean batch size (over the server's life: warm-up calls included) is the
    measurement's."""
    figures: dict[str, dict[str, Any]] = {"conveyor_modelinfer": {}, "conveyor_score": {}}
    methods = (("conveyor_modelinfer", "ModelInfer", infer_requests(world, MODEL)),
               ("conveyor_score", "Score", world.score_requests))
    for name, method, requests in methods:
        for concurrency in CONCURRENCY:
            label = f"{name}-c{concurrency}"
            say(f"Conveyor ({args.workers} workers): {method} at concurrency {concurrency}")
            with conveyor_server(world, "normal", settings, args.workers, label) as (
                    target, pid):
                row = measure(target, method, requests, concurrency, args,
                              server_pid=pid).figures()
            sizes = mean_batch_sizes(world.batches[label])
            figures[name][f"c{concurrency}"] = row | {
                "mean_batch_size": next(iter(sizes.values()), None),
                "handler_ms_per_call": handler_ms(world.handlers[label], method)}
    return figures


def bench_fallback(world: World, args: argparse.Namespace, settings: Settings
                   ) -> dict[str, Any]:
    """The fallback scenario at concurrency 32 (the target's), and beside it at
    ``FALLBACK_LIGHT_CONCURRENCY``, a load the server answers well within the deadline
    when no model is slow: the router's own behaviour, apart from the machine's capacity;
    and the normal chain (no model slowed) at 32 with the same deadline: what the deadline
    alone costs at that load, apart from the fallback."""
    say("Conveyor fallback: champion sleeps 100 ms per predict, Score with a 20 ms deadline")
    with conveyor_server(world, "fallback", settings, args.workers, "fallback") as (
            target, pid):
        # Light first: the overload at 32 leaves circuits open for their open_for_s.
        light = fallback_outcome(world, args, target, pid, FALLBACK_LIGHT_CONCURRENCY)
        figures = fallback_outcome(world, args, target, pid, int(FALLBACK["concurrency"]))
    say("Conveyor, no model slowed: Score with the same 20 ms deadline at the same concurrency")
    with conveyor_server(world, "normal", settings, args.workers, "same-deadline") as (
            target, pid):
        same_deadline = fallback_outcome(world, args, target, pid,
                                         int(FALLBACK["concurrency"]))
    return {**FALLBACK, **figures, "at_light_load": light,
            "no_model_slowed_same_deadline": same_deadline,
            "mean_batch_size": mean_batch_sizes(world.batches["fallback"])}


def fallback_outcome(world: World, args: argparse.Namespace, target: str, pid: int,
                     concurrency: int) -> dict[str, Any]:
    outcome = measure(target, "Score", world.score_requests, concurrency, args,
                      timeout=FALLBACK["deadline_ms"] / 1e3, server_pid=pid)
    within = sum(latency <= FALLBACK["deadline_ms"] for latency in outcome.latencies_ms)
    total = len(outcome.latencies_ms) + sum(outcome.errors.values())
    return {"concurrency": concurrency, **outcome.figures(),
            "within_deadline_share": round(within / total, 5) if total else 0.0,
            "fallback_answers": outcome.fallbacks}


def serve(config: dict[str, Any]) -> None:
    """The Conveyor scoring server of the benchmark (a subprocess): ``workers`` forked
    processes sharing the port, as the service runs them (``scoring.workers``), each
    with the registry's chain, the online store in the run's namespace, gRPC on
    127.0.0.1; writes ``ready_file`` once every worker serves; stops on SIGTERM."""
    from scoring.workers import WorkerPool, WorkerSlot

    def run_worker(slot: WorkerSlot) -> None:
        serve_worker(config, slot)

    pool = WorkerPool(config["workers"], run_worker).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while not stopped.wait(0.1):  # polling the workers' ready flags (shared memory)
        if pool.all_ready():
            Path(config["ready_file"]).touch()
            break
    stopped.wait()
    pool.stop()


def serve_worker(config: dict[str, Any], slot: Any) -> None:
    """One worker of the benchmark's server; prints its predict calls when it stops."""
    from common.stores import ModelRegistry, ModelStore, RedisOnlineStore
    from scoring.core import CoreSettings, ScoringCore
    from scoring.metrics import ScoringMetrics
    from scoring.server import GrpcSettings, ScoringServer

    key = bytes.fromhex(config["key"])
    client = redis.Redis.from_url(config["redis_url"], socket_timeout=1.0)
    metrics = ScoringMetrics()
    core = ScoringCore(ModelStore(config["root"], key), ModelStore(config["pipelines"], key),
                       ModelRegistry(config["root"], MODEL),
                       RedisOnlineStore(client, config["namespace"]),
                       CoreSettings(freeze_gc=True), on_batch=metrics.observe_batch)
    core.load_chain()
    grpc_settings = GrpcSettings(host="127.0.0.1", port=config["port"],
                                 reuse_port=config["workers"] > 1)
    server = ScoringServer(core, grpc_settings, metrics=metrics).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    slot.set_ready(True)
    stopped.wait()
    server.stop(grace_s=1.0)
    lines = [batch_line(model.version, core.loaded(model.version).batcher.stats())
             for model in core.health()]
    lines += handler_times(metrics)
    # One write: the other workers share the log.
    os.write(1, "".join(f"{json.dumps(line)}\n" for line in lines).encode())
    core.close()


def batch_line(version: str, stats: Any) -> dict[str, Any]:
    """A version's predict calls and rows over this worker's life (``predict_calls``)."""
    return {"version": version, "batches": stats.batches, "rows": stats.predicted,
            "mean_batch": round(stats.mean_batch_size, 2)}


def handler_times(metrics: Any) -> list[dict[str, Any]]:
    """Per method, the calls this worker answered and the seconds spent in their handler
    (``conveyor_scoring_rpc_duration_seconds``: from the handler's start to its response,
    gRPC's own reading, parsing and writing left out)."""
    totals: dict[str, dict[str, Any]] = {}
    for metric in metrics.rpc_duration.collect():
        for sample in metric.samples:
            kind = sample.name.rsplit("_", 1)[-1]
            if kind in ("count", "sum"):
                entry = totals.setdefault(sample.labels["method"],
                                          {"rpc": sample.labels["method"]})
                entry[{"count": "calls", "sum": "handler_s"}[kind]] = sample.value
    return list(totals.values())


# --- the ceiling: a server that does no work ------------------------------------------


NOOP_KINDS = ("aio", "sync")
"""grpc.aio, and the thread-pool grpc.server Conveyor uses (32 threads, as Conveyor's)."""


def bench_ceiling(world: World, args: argparse.Namespace) -> dict[str, Any]:
    """ModelInfer against servers that answer a response built once, doing nothing per
    call but gRPC's own work (read, parse, serialize, write): what the load generator
    and gRPC alone reach on this machine, the ceiling of any Python gRPC server here."""
    figures = {}
    for kind in NOOP_KINDS:
        port = free_port()
        target = f"127.0.0.1:{port}"
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-noop",
                   json.dumps({"port": port, "kind": kind})]
        say(f"no-op gRPC server ({kind}): starting")
        with running(command, world.work / f"noop-{kind}.log") as process:
            wait_ready(target, MODEL, process)
            figures[f"ceiling_noop_{kind}"] = bench_system(
                target, "ModelInfer", infer_requests(world, MODEL), args, f"no-op {kind}",
                process.pid)
    return figures


def noop_response() -> ipb.ModelInferResponse:
    """What Conveyor answers for one row: version, fallback parameter, [1, 2] FP64."""
    response = ipb.ModelInferResponse(
        model_name=MODEL, model_version="normal-m0",
        parameters={"fallback": ipb.InferParameter(bool_param=False)})
    tensor = response.outputs.add(name="predict_proba", datatype="FP64", shape=[1, 2])
    tensor.contents.fp64_contents.extend([0.25, 0.75])
    return response


class NoopInference(ipb_grpc.GRPCInferenceServiceServicer):
    """Ready, and every ModelInfer answered with the same response."""

    response = noop_response()

    def ServerReady(self, request: Any, context: Any) -> ipb.ServerReadyResponse:
        return ipb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> ipb.ModelReadyResponse:
        return ipb.ModelReadyResponse(ready=True)

    def ModelInfer(self, request: Any, context: Any) -> ipb.ModelInferResponse:
        return self.response


class NoopInferenceAio(NoopInference):
    """The same for grpc.aio, whose handlers are coroutines."""

    async def ServerReady(self, request: Any, context: Any) -> ipb.ServerReadyResponse:  # type: ignore[override]
        return super().ServerReady(request, context)

    async def ModelReady(self, request: Any, context: Any) -> ipb.ModelReadyResponse:  # type: ignore[override]
        return super().ModelReady(request, context)

    async def ModelInfer(self, request: Any, context: Any) -> ipb.ModelInferResponse:  # type: ignore[override]
        return self.response


def serve_noop(config: dict[str, Any]) -> None:
    """A no-op server (a subprocess) on 127.0.0.1; stops on SIGTERM."""
    address = f"127.0.0.1:{config['port']}"
    if config["kind"] == "aio":
        asyncio.run(_serve_noop_aio(address))
        return
    server = grpc.server(ThreadPoolExecutor(32))
    ipb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopInference(), server)
    server.add_insecure_port(address)
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    server.stop(0)


async def _serve_noop_aio(address: str) -> None:
    server = grpc.aio.server()
    ipb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopInferenceAio(), server)
    server.add_insecure_port(address)
    await server.start()
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    await server.stop(0)


# --- the report -----------------------------------------------------------------------


def with_cpu_vs_noop(systems: dict[str, Any]) -> None:
    """Each system's server CPU per call over the no-op grpc.aio server's, at the same
    concurrency (``cpu_vs_noop``)."""
    noop = systems["ceiling_noop_aio"]
    for figures in systems.values():
        for concurrency, row in figures.items():
            floor = noop[concurrency].get("server_cpu_ms_per_call")
            mine = row.get("server_cpu_ms_per_call")
            row["cpu_vs_noop"] = round(mine / floor, 2) if mine and floor else None


def report(systems: dict[str, Any], fallback: dict[str, Any], args: argparse.Namespace,
           settings: Settings) -> dict[str, Any]:
    with_cpu_vs_noop(systems)
    best = max(("mlserver_batching_off", "mlserver_batching_on"),
               key=lambda name: systems[name]["c32"]["rps"])
    best_rps = systems[best]["c32"]["rps"]
    ratios = {f"{name}_c32_vs_best_mlserver": round(systems[name]["c32"]["rps"] / best_rps, 2)
              for name in ("conveyor_modelinfer", "conveyor_score")} if best_rps else {}
    return {
        **systems,
        "fallback": fallback,
        "fallback_within_deadline_share": fallback["within_deadline_share"],
        "fallback_errors": fallback["errors"],
        "best_mlserver": best,
        "ratios": ratios,
        "targets": targets(systems, fallback, ratios),
        "targets_feasibility": feasibility(systems, best_rps),
        "workload": workload(args),
        "machine": machine(settings),
        "command": "make bench-scoring" + (" (--quick)" if args.quick else ""),
    }


def targets(systems: dict[str, Any], fallback: dict[str, Any],
            ratios: dict[str, float]) -> dict[str, bool]:
    """Issue 11's targets, each met or not."""
    infer, score = systems["conveyor_modelinfer"]["c32"], systems["conveyor_score"]["c32"]
    return {
        "modelinfer_c32_at_least_3x_mlserver": ratios.get(
            "conveyor_modelinfer_c32_vs_best_mlserver", 0) >= 3,
        "score_c32_at_least_2x_mlserver": ratios.get(
            "conveyor_score_c32_vs_best_mlserver", 0) >= 2,
        "modelinfer_c32_p99_within_25ms": (infer["p99_ms"] or 1e9) <= 25,
        "score_c32_p99_within_25ms": (score["p99_ms"] or 1e9) <= 25,
        "modelinfer_c32_no_errors": infer["errors"] == 0,
        "score_c32_no_errors": score["errors"] == 0,
        "modelinfer_c32_cpu_vs_noop_within_2_5": (infer["cpu_vs_noop"] or 1e9) <= 2.5,
        "score_c32_cpu_vs_noop_within_3_5": (score["cpu_vs_noop"] or 1e9) <= 3.5,
        "score_c1_p50_within_1ms": (systems["conveyor_score"]["c1"]["p50_ms"] or 1e9) <= 1.0,
        "fallback_99pct_within_deadline": fallback["within_deadline_share"] >= 0.99,
        "fallback_no_errors": fallback["errors"] == 0,
    }


def feasibility(systems: dict[str, Any], best_rps: float) -> dict[str, Any]:
    """The c32 requests/s the throughput targets need, beside what a server doing no work
    reaches with the same load generator on the same machine."""
    noop = {kind: systems[f"ceiling_noop_{kind}"]["c32"] for kind in NOOP_KINDS}
    ceiling = max(row["rps"] for row in noop.values())
    client_ms = noop["aio"].get("client_cpu_ms_per_call")
    needs = {"modelinfer_3x": round(3 * best_rps), "score_2x": round(2 * best_rps)}
    return {
        "best_mlserver_c32_rps": best_rps,
        "needed_c32_rps": needs,
        # Little's law: with 32 calls always in flight, a mean latency under the fallback
        # deadline needs this many answers a second (99 % within it needs more).
        "fallback_needs_score_c32_rps_over": round(
            FALLBACK["concurrency"] / (FALLBACK["deadline_ms"] / 1e3)),
        "score_c32_rps": systems["conveyor_score"]["c32"]["rps"],
        "noop_c32_rps": {kind: row["rps"] for kind, row in noop.items()},
        "needed_vs_noop_ceiling": {name: round(rps / ceiling, 2) if ceiling else None
                                   for name, rps in needs.items()},
        "load_generator_cpu_ms_per_call_noop_aio_c32": client_ms,
        "load_generator_alone_max_rps": round((os.cpu_count() or 1) * 1e3 / client_ms)
        if client_ms else None,
        "note": "a target whose needed rps is over the no-op ceiling (ratio > 1) cannot be "
                "met here by any server: one that does no work at all answers no faster "
                "through this load generator on these cores. load_generator_alone_max_rps "
                "is the client's own limit were it given every core and the server none.",
    }


def workload(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "HistGradientBoostingClassifier(max_iter=100), 20 float features",
        "train_rows": TRAIN_ROWS,
        "request": "one row per call; ModelInfer: [1, 20] FP64 in contents, output "
                   "predict_proba; Score: entity id + 12 fields, 8 features from Redis",
        "entities_in_redis": ENTITIES,
        "concurrency": list(CONCURRENCY),
        "seconds_per_setting": args.seconds,
        "warmup_seconds": args.warmup,
        "load_generator": f"one grpc.aio client process, {CHANNELS} channels (one "
                          "connection each, calls round robin), loopback",
        "conveyor_workers": args.workers,
        "mlserver_batching_on": MLSERVER_BATCHING,
        "openmp_threads": 1,
        "conveyor_reporter": "off (no broker)",
        "conveyor_core_settings": "freeze_gc=True, the rest default",
        "conveyor_servers": "a fresh server per method and concurrency (mean_batch_size "
                            "is that measurement's, over the server's life)",
    }


def machine(settings: Settings) -> dict[str, Any]:
    return {
        **host(settings, ("grpcio", "scikit-learn", "numpy")),
        "mlserver": mlserver_versions(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def print_summary(results: dict[str, Any]) -> None:
    print(f"{'':24}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'CPU ms/call: client':>21}{'server':>8}{'vs no-op':>10}{'batch':>7}")
    for name in ("mlserver_batching_off", "mlserver_batching_on", "conveyor_modelinfer",
                 "conveyor_score", *(f"ceiling_noop_{kind}" for kind in NOOP_KINDS)):
        for concurrency in CONCURRENCY:
            row = results[name][f"c{concurrency}"]
            print(f"{name:24}{concurrency:>4}{row['rps']:>10,.0f}{row['p50_ms'] or 0:>9.2f}"
                  f"{row['p99_ms'] or 0:>9.2f}{row['errors']:>8}"
                  f"{row.get('client_cpu_ms_per_call') or 0:>21.3f}"
                  f"{row.get('server_cpu_ms_per_call') or 0:>8.3f}"
                  f"{row.get('cpu_vs_noop') or 0:>10.2f}{row.get('mean_batch_size') or 0:>7.2f}")
    fallback = results["fallback"]
    for row in (fallback, fallback["at_light_load"]):
        print(f"fallback at c{row['concurrency']}: {row['within_deadline_share']:.2%} within "
              f"{fallback['deadline_ms']:.0f} ms, {row['errors']} errors, "
              f"{row['fallback_answers']} answered by the previous model")
    same = fallback["no_model_slowed_same_deadline"]
    print(f"no model slowed at c{same['concurrency']}, same deadline: "
          f"{same['within_deadline_share']:.2%} within, {same['errors']} errors")
    print(f"ratios: {results['ratios']}")
    feasible = results["targets_feasibility"]
    print(f"feasibility: c32 needs {feasible['needed_c32_rps']} req/s; a no-op server "
          f"answers {feasible['noop_c32_rps']} (needed / ceiling "
          f"{feasible['needed_vs_noop_ceiling']})")
    print(f"targets: {results['targets']}  ->  {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve-noop":
        serve_noop(json.loads(sys.argv[2]))
    else:
        main()
