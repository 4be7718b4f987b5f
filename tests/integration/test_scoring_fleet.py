"""Scoring as a fleet: several processes and workers on one registry and one broker.

Real ``conveyor run scoring`` processes (RabbitMQ, Redis, the registry on disk), called
through real stubs:

- two processes hear the same ModelReady and ModelDegraded (each on a queue of its own):
  both swap, then both revert, under concurrent load, with no failed call; a process
  started after the promotion serves the new champion (it reconciles with the registry);
- two workers share one port: any worker gives the same answer; a killed worker is
  forked again and calls keep being answered.

Loads run on threads of their own; the tests wait for what the answers say, never for
the clock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from app.local import LocalService, free_port
from common.events import ModelDegraded, ModelReady
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring.server import field_value
from tests.fixtures.scoring import KEY
from tests.fixtures.scoring_service import (
    ServiceWorld,
    scoring_settings,
    world_fixture,
)
from tests.support.harness import BusNamespace, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
STARTUP_S = 90.0


@pytest.fixture
def ns(tmp_path: Path, services_up: None) -> Iterator[BusNamespace]:
    namespace = BusNamespace(scoring_settings(tmp_path))
    namespace.services.add("scoring")
    namespace.declare("monitoring", ["ScoreServed"])  # the reports have somewhere to go
    yield namespace
    namespace.close()


world = world_fixture()


def _children(task: Path) -> list[str]:
    """A thread's child processes; none if the thread ended since its folder was listed
    (CI at 938140b read a task that had just gone: FileNotFoundError)."""
    try:
        return (task / "children").read_text().split()
    except FileNotFoundError:
        return []


class ScoringProcess:
    """``conveyor run scoring`` in a process of its own, on a gRPC port of its own."""

    def __init__(self, ns: BusNamespace, folder: Path, workers: int = 1) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.grpc_port = free_port()
        settings = ns.settings
        env = {"CONVEYOR_GRPC_PORT": str(self.grpc_port),
               "CONVEYOR_SCORING_WORKERS": str(workers),
               "CONVEYOR_DATA_ROOT": settings.data_root,
               "CONVEYOR_PIPELINE_CONFIG": settings.pipeline_config,
               "CONVEYOR_MODEL_SIGNING_KEY": KEY.decode(),
               "CONVEYOR_RECONNECT_MAX_DELAY_S": "1",
               # a loaded test machine is not the fault: no circuit opens, no deadline
               "CONVEYOR_SCORING_DEADLINE_S": "10",
               "CONVEYOR_SCORING_LATENCY_BUDGET_S": "10"}
        self.local = LocalService("scoring", settings, folder, env)
        wait_until(self.local.ready, STARTUP_S, 0.1, f"scoring ready (log {folder})")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.local.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    def worker_pids(self) -> set[int]:
        """The supervisor's child processes (its workers), whichever thread forked them."""
        tasks = Path(f"/proc/{self.local.process.pid}/task")
        return {int(child) for task in tasks.iterdir() for child in _children(task)}

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.local.stop()


def request(world: ServiceWorld, i: int) -> pb.ScoreRequest:
    row = world.typed.iloc[i % len(world.typed)]
    fields = {k: field_value(v) for k, v in world.fields(row).items()}
    return pb.ScoreRequest(entity_id=row["nameOrig"], fields=fields)


class Load:
    """Threads calling Score back to back on their own channels, counting answers by
    version and failures by status code, until stopped."""

    def __init__(self, world: ServiceWorld, targets: list[str], threads_each: int = 2,
                 wait_for_ready: bool = False) -> None:
        self.world, self.wait_for_ready = world, wait_for_ready
        self.answers: dict[str, Counter[str]] = {t: Counter() for t in targets}
        self.last: dict[str, str] = {}
        self.failures: Counter[str] = Counter()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._call, args=(t, n), daemon=True)
                         for t in targets for n in range(threads_each)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(30)

    def answered(self) -> int:
        return sum(sum(c.values()) for c in self.answers.values())

    def _call(self, target: str, n: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub, i = pb_grpc.ScoringStub(channel), n
            while not self._stop.is_set():
                i += 1
                try:
                    reply = stub.Score(request(self.world, i), timeout=30,
                                       wait_for_ready=self.wait_for_ready)
                except grpc.RpcError as exc:
                    self.failures[exc.code().name] += 1
                    continue
                self.answers[target][reply.model_version] += 1
                self.last[target] = reply.model_version


def serving(load: Load, target: str, version: str) -> bool:
    """Whether the target's latest answer came from ``version``."""
    return load.last.get(target) == version


def add_v3(world: ServiceWorld) -> str:
    """Store, register and promote a third model: its version (v3)."""
    names = list(world.fitted.feature_names)
    features = world.fitted.transform(world.typed)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    estimator.fit(features[names], features["isFraud"])
    world.estimators["v3"] = estimator
    world.stores.models.save("m-v3", estimator, {"feature_set_id": world.fitted.feature_set_id,
                                                 "features": names})
    return world.stores.registry(world.settings, "fraud").promote("m-v3")


@pytest.fixture
def processes() -> Iterator[list[ScoringProcess]]:
    started: list[ScoringProcess] = []
    yield started
    for process in started:
        process.stop()


def test_two_processes_swap_and_revert_together_under_load_and_a_late_one_serves_the_champion(
        ns: BusNamespace, world: ServiceWorld, tmp_path: Path,
        processes: list[ScoringProcess]) -> None:
    processes += [ScoringProcess(ns, tmp_path / name) for name in ("a", "b")]
    targets = [p.target for p in processes]
    with Load(world, targets) as load:
        wait_until(lambda: all(serving(load, t, "v2") for t in targets), 30)
        version = add_v3(world)
        ns.bus().publish(ModelReady(producer="test", model_id="m-v3", version=version))
        wait_until(lambda: all(serving(load, t, "v3") for t in targets), 60,
                   message="both processes serving v3")
        late = ScoringProcess(ns, tmp_path / "late")
        processes.append(late)
        with grpc.insecure_channel(late.target) as channel:
            reply = pb_grpc.ScoringStub(channel).Score(request(world, 0), timeout=30)
        assert reply.model_version == "v3"
        ns.bus().publish(ModelDegraded(producer="test", model_version="v3",
                                       reason="accuracy", observed=0.5, expected=0.9))
        wait_until(lambda: all(serving(load, t, "v2") for t in targets), 60,
                   message="both processes reverted to v2")
        with grpc.insecure_channel(late.target) as channel:
            reverted = pb_grpc.ScoringStub(channel).Score(request(world, 1), timeout=30)
    assert reverted.model_version == "v2"
    assert load.failures == Counter()
    assert all(load.answers[t]["v3"] > 0 for t in targets)
    assert world.stores.registry(world.settings, "fraud").champion().version == "v2"


def requests_by_worker(process: ScoringProcess) -> dict[str, float]:
    """Score calls answered OK by each worker, from the supervisor's /metrics."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(process.metrics()):
        for sample in family.samples:
            if (sample.name == "conveyor_scoring_requests_total"
                    and sample.labels.get("method", "").endswith("Score")
                    and sample.labels.get("code") == "OK"):
                counts[sample.labels["worker"]] += sample.value
    return dict(counts)


def fresh_channel_answer(target: str, world: ServiceWorld) -> tuple[str, float]:
    """One call on a new connection (the kernel picks the worker that accepts it)."""
    with grpc.insecure_channel(target) as channel:
        reply = pb_grpc.ScoringStub(channel).Score(request(world, 7), timeout=30)
    return reply.model_version, reply.score


def test_workers_share_the_port_answer_alike_and_a_killed_one_is_replaced(
        ns: BusNamespace, world: ServiceWorld, tmp_path: Path,
        processes: list[ScoringProcess]) -> None:
    process = ScoringProcess(ns, tmp_path / "workers", workers=2)
    processes.append(process)
    wait_until(lambda: len(process.worker_pids()) == 2, 30, message="two workers")
    answers: set[tuple[str, float]] = set()

    def both_workers_answered() -> bool:
        answers.add(fresh_channel_answer(process.target, world))
        return len(requests_by_worker(process)) == 2

    wait_until(both_workers_answered, 60, message="calls reaching both workers")
    assert len(answers) == 1  # the same answer, whichever worker gave it
    families = [f.name for f in text_string_to_metric_families(process.metrics())]
    assert len(families) == len(set(families))  # each name once: Prometheus refuses repeats
    assert {"conveyor_events_handled", "conveyor_scoring_requests"} <= set(families)
    before = process.worker_pids()
    with Load(world, [process.target], threads_each=4, wait_for_ready=True) as load:
        wait_until(lambda: load.answered() >= 50, 30)
        killed = min(before)
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: len(process.worker_pids() - before) == 1, 60,
                   message="the killed worker replaced")
        wait_until(process.local.ready, 30)
        answered = load.answered()
        wait_until(lambda: load.answered() >= answered + 50, 30,
                   message="calls answered after the replacement")
    assert killed not in process.worker_pids()
    # Only calls on the killed worker's connections can fail: each thread's call in
    # flight there, and at most one more when its reconnect landed in the dying socket's
    # accept queue (SO_REUSEPORT hashes a new connection to any listener, and the kernel
    # resets those queued on a socket that closes). New calls are answered by the other
    # worker, then by both.
    assert set(load.failures) <= {"UNAVAILABLE"}
    assert sum(load.failures.values()) <= 2 * len(load.threads)
    wait_until(lambda: fresh_channel_answer(process.target, world) in answers, 30)
