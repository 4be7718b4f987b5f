"""Training candidates on a Dask cluster's workers: one task per candidate, as the local
worker pool does it, with the same timeout and retries.

The training set is scattered to every worker once (a broadcast), so each candidate's
task finds it where it runs; the fitted model comes back to the caller. A task past the
timeout is cancelled and reported failed (its thread may run on until the fit ends: a
Python thread cannot be stopped; the local pool's processes can). A worker that dies under
a task (``KilledWorker``, a closed connection) or a transient error is retried, as the
pool retries. Used by ``train_candidates(..., client=...)``; Dask is imported only here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pandas as pd
from distributed import Client, Future, KilledWorker, wait
from threadpoolctl import threadpool_limits

from common.cpus import available_cpus
from training.config import Candidate, TrainingConfig, resolve_estimator
from training.failures import TRANSIENT, Failure, describe

RETRIED = (*TRANSIENT, KilledWorker)


class DaskScheduler:
    """Submits candidates to the cluster, retries transient failures, times them out."""

    def __init__(self, client: Client, config: TrainingConfig,
                 progress: Callable[[str], None]) -> None:
        self.client, self.config, self.progress = client, config, progress
        self.attempts: dict[str, int] = {}
        self.pending: dict[Future, tuple[Candidate, float]] = {}
        self.outcomes: dict[str, Any] = {}
        self.data: tuple[Future, Future] | None = None

    def run(self, candidates: list[Candidate], X: pd.DataFrame, y: pd.Series) -> dict[str, Any]:
        """Each candidate's outcome by name: (model, fit seconds) or a ``Failure``."""
        self.data = (self.client.scatter(X, broadcast=True, hash=False),
                     self.client.scatter(y, broadcast=True, hash=False))
        self.host_threads = threads_by_host(self.client)
        try:
            for candidate in candidates:
                self._submit(candidate)
            while self.pending:
                self._wait_some()
        finally:
            self.client.cancel(list(self.data))
        return self.outcomes

    def _submit(self, candidate: Candidate) -> None:
        assert self.data is not None
        self.attempts[candidate.name] = self.attempts.get(candidate.name, 0) + 1
        future = self.client.submit(fit_on_worker, candidate, *self.data, self.host_threads,
                                    pure=False,
                                    key=f"train-{candidate.name}-{uuid.uuid4().hex[:8]}")
        self.pending[future] = (candidate, time.monotonic())

    def _wait_some(self) -> None:
        first_deadline = min(at for _, at in self.pending.values()) + self.config.timeout_s
        try:
            with self.client.as_current():  # the service's client is not the process default
                done, _ = wait(list(self.pending), return_when="FIRST_COMPLETED",
                               timeout=max(first_deadline - time.monotonic(), 0))
        except TimeoutError:
            done = set()
        for future in done:
            self._settle(future, *self.pending.pop(future))
        self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        for future, (candidate, started) in list(self.pending.items()):
            if now - started >= self.config.timeout_s:
                del self.pending[future]
                future.cancel()
                self.outcomes[candidate.name] = Failure(
                    candidate.name, f"timed out after {self.config.timeout_s:g}s")

    def _settle(self, future: Future, candidate: Candidate, _started: float) -> None:
        error = future.exception() if future.status == "error" else None
        if future.status == "finished":
            self.outcomes[candidate.name] = future.result()
            self.progress(f"trained {candidate.name}")
        elif isinstance(error, RETRIED) and self.attempts[candidate.name] <= self.config.retries:
            self.progress(f"retrying {candidate.name} after transient failure: {describe(error)}")
            self._submit(candidate)
        else:
            reason = describe(error) if error is not None else f"task {future.status}"
            self.outcomes[candidate.name] = Failure(candidate.name, reason)


def warm_workers(client: Client, estimators: list[str]) -> None:
    """Import the estimators' modules on every worker now (as the local pool's workers do
    when they start), not in the first run's tasks: on a busy machine that is seconds."""
    client.run(_import_estimators, estimators)


def _import_estimators(estimators: list[str]) -> None:
    for name in estimators:
        resolve_estimator(name)


def threads_by_host(client: Client) -> dict[str, int]:
    """Task threads of every worker on each host, summed (a LocalCluster's workers share
    one machine's CPUs; a Kubernetes worker pod has its own)."""
    hosts: dict[str, int] = {}
    for address, worker in client.scheduler_info(n_workers=-1)["workers"].items():
        host = worker.get("host") or address
        hosts[host] = hosts.get(host, 0) + int(worker.get("nthreads", 1))
    return hosts


def fit_on_worker(candidate: Candidate, X: pd.DataFrame, y: pd.Series,
                  host_threads: dict[str, int]) -> tuple[Any, float]:
    """Fit one candidate where the task runs, its native threads (OpenMP, BLAS) a fair
    share of the CPUs this worker may use among the task threads of its host's workers,
    as the local pool gives each of its workers CPUs / workers: no oversubscription."""
    from distributed import get_worker

    model = resolve_estimator(candidate.estimator, candidate.name)(**candidate.params)
    worker = get_worker()
    sharing = host_threads.get(worker.address.split("://")[-1].rsplit(":", 1)[0],
                               worker.state.nthreads)
    threads = max(1, available_cpus() // max(1, sharing))
    with threadpool_limits(limits=threads):
        started = time.perf_counter()
        model.fit(X, y)
        return model, time.perf_counter() - started
