"""Pre-forked scoring workers sharing one gRPC port, and the supervisor that keeps them.

A Python gRPC server answers on one core at a time (the GIL), so one process cannot use
a pod's cores. ``WorkerPool`` forks ``CONVEYOR_SCORING_WORKERS`` processes (default: the
CPUs this container may use, ``available_cpus``) after the models have been read once in
the parent, so the workers start from the same pages; each worker then builds its own
core, batchers and gRPC server on the shared port (``grpc.so_reuseport``: the kernel
spreads new connections over them) and its own broker connections. A worker that dies
is forked again; readiness is any live worker with a warmed model. The supervisor
re-exposes each worker's metrics under a ``worker`` label (``WorkerMetrics``).

A client spreads its load over the workers by opening several channels (connections);
one long-lived channel stays on one worker until ``max_connection_age`` sends it away.
Example::

    pool = WorkerPool(2, run_worker).start()     # run_worker(index, slot) in each child
    pool.ready(), pool.pids(), pool.restarts
    pool.stop()
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
STOP_GRACE_S = 10.0
YOUNG_S = 5.0  # a worker that dies younger than this is failing, not unlucky
MAX_BACKOFF_S = 30.0
SCRAPE_TIMEOUT_S = 2.0


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota
    (a Kubernetes CPU limit) rounded up; ``os.cpu_count`` counts the host's instead."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of the cgroup's quota (v2 ``cpu.max``, else v1), None when unlimited."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = CGROUP_V2_CPU_MAX.read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int(CGROUP_V1_QUOTA.read_text())
        return None if quota_us <= 0 else quota_us / int(CGROUP_V1_PERIOD.read_text())
    return None


@dataclass
class WorkerSlot:
    """What a worker shares with its supervisor: whether it is ready, its metrics port."""

    index: int
    ready_flags: Any  # multiprocessing Array of bytes, one per worker
    metrics_ports: Any  # multiprocessing Array of ints, one per worker

    def set_ready(self, ready: bool) -> None:
        self.ready_flags[self.index] = int(ready)

    def set_metrics_port(self, port: int) -> None:
        self.metrics_ports[self.index] = port


RunWorker = Callable[[WorkerSlot], None]


class WorkerPool:
    """``count`` forked workers, each running ``run_worker(slot)`` until SIGTERM; a
    worker that exits while the pool runs is forked again."""

    def __init__(self, count: int, run_worker: RunWorker) -> None:
        if count < 1:
            raise ValueError(f"need at least one scoring worker, got {count}")
        self.count, self.run_worker = count, run_worker
        self._context = multiprocessing.get_context("fork")
        self._ready = self._context.Array("b", count, lock=False)
        self._ports = self._context.Array("i", count, lock=False)
        self._processes: list[BaseProcess | None] = [None] * count
        self._started = [0.0] * count  # when each slot's worker was forked (monotonic)
        self._delays = [0.0] * count  # the back-off before each slot's next fork
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.restarts = 0
        self._monitor = threading.Thread(target=self._watch, name="workers", daemon=True)

    def start(self) -> WorkerPool:
        """Fork every worker (call before this process starts gRPC), then watch them."""
        for index in range(self.count):
            self._fork(index)
        self._monitor.start()
        return self

    def ready(self) -> bool:
        """Whether a live worker has a warmed model."""
        with self._lock:
            return any(p is not None and p.is_alive() and self._ready[i]
                       for i, p in enumerate(self._processes))

    def all_ready(self) -> bool:
        """Whether every worker is alive with a warmed model."""
        with self._lock:
            return all(p is not None and p.is_alive() and self._ready[i]
                       for i, p in enumerate(self._processes))

    def pids(self) -> list[int]:
        """The live workers' process ids, by slot."""
        with self._lock:
            return [p.pid for p in self._processes if p is not None and p.pid is not None]

    def metrics_ports(self) -> dict[int, int]:
        """Each live worker's metrics port, by slot (0 until it serves them)."""
        return {i: self._ports[i] for i in range(self.count) if self._ports[i]}

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every worker (each finishes its calls in flight), SIGKILL the late."""
        self._stopping.set()
        with self._lock:
            processes = [p for p in self._processes if p is not None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for process in processes:
            process.join(grace_s)
            if process.is_alive():
                log.warning("scoring worker %s did not stop in %.0fs: killed", process.pid,
                            grace_s)
                process.kill()
                process.join()

    def _fork(self, index: int) -> None:
        self._ready[index], self._ports[index] = 0, 0
        slot = WorkerSlot(index, self._ready, self._ports)
        process = self._context.Process(target=_worker_main, args=(self.run_worker, slot),
                                        name=f"scoring-worker-{index}", daemon=False)
        with self._lock:  # stop() takes its list under the lock: none forked after it
            if self._stopping.is_set():
                return
            process.start()
            self._started[index] = time.monotonic()
            self._processes[index] = process
        log.info("scoring worker %d started (pid %s)", index, process.pid)

    def _watch(self) -> None:
        """Fork a worker again when one exits (unless the pool is stopping)."""
        while not self._stopping.is_set():
            with self._lock:
                sentinels = {p.sentinel: i for i, p in enumerate(self._processes)
                             if p is not None}
            for sentinel in wait(list(sentinels), timeout=1.0):
                self._replace(sentinels[sentinel])  # type: ignore[index]

    def _replace(self, index: int) -> None:
        process = self._processes[index]
        if process is not None:
            process.join()
        self._ready[index] = 0
        if self._stopping.is_set():
            return
        code = None if process is None else process.exitcode
        delay = self._backoff(index)
        log.warning("scoring worker %d exited (code %s): forking a new one in %.1fs", index,
                    code, delay)
        if self._stopping.wait(delay):
            return
        self.restarts += 1
        self._fork(index)

    def _backoff(self, index: int) -> float:
        """No wait after a worker that lived; doubling waits (to ``MAX_BACKOFF_S``) while
        workers die young (a bad setting, a missing file: no fork loop)."""
        lived = time.monotonic() - self._started[index]
        self._delays[index] = 0.0 if lived > YOUNG_S else min(
            MAX_BACKOFF_S, max(0.5, 2 * self._delays[index]))
        return self._delays[index]


def _worker_main(run_worker: RunWorker, slot: WorkerSlot) -> None:
    """A worker's life: the default SIGTERM (the runner installs its own), then run."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        run_worker(slot)
    finally:
        slot.set_ready(False)


class WorkerMetrics:
    """A collector that re-exposes every worker's metrics (scoring's and the bus's) with a
    ``worker`` label, read from each worker's own /metrics at scrape time (a worker that
    does not answer in time is left out of that scrape). The supervisor exports none of
    its own bus metrics (``Service.exports_bus_metrics``), so each name appears once."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def describe(self) -> list[Metric]:
        """Nothing known before a scrape (the registry must not scrape at registration)."""
        return []

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, port in self.pool.metrics_ports().items():
            for family in _scrape(port):
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    labels = {**sample.labels, "worker": str(index)}
                    target.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()


def _scrape(port: int) -> list[Metric]:
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as reply:  # noqa: S310
            text = reply.read().decode()
    except OSError as exc:
        log.info("metrics of the scoring worker on port %d not read: %s", port, exc)
        return []
    return list(text_string_to_metric_families(text))
