"""Training candidates in parallel: one process per candidate, a timeout, retries.

Pure core of the Model Training Service: frames in, fitted models and metadata out. One
failing candidate never sinks the others; it is reported in ``failures``. Each model's
metadata carries its drift ``reference`` (common/reference.py). Without a
``WorkerPool`` each run starts (and stops) worker processes of its own; a service keeps
one ``WorkerPool`` warm across runs instead (worker start-up and imports are seconds).

Example::

    result = train_candidates(config, X_train, y_train, feature_set_id="fs1", batch_ids=["b1"])
    for trained in result.trained: print(trained.model_id, trained.metadata["timings"])
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import platform
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import sklearn
from pebble import ProcessPool
from pyarrow import feather
from threadpoolctl import threadpool_limits

from common.cpus import available_cpus
from common.errors import InvalidInput
from common.reference import input_references, model_reference, reference_rows
from training.config import Candidate, TrainingConfig, expand, resolve_estimator
from training.failures import TRANSIENT, Failure, describe

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)
LABEL_COLUMN = "__label__"
_worker_data: dict[str, Any] = {}
_worker_start: dict[str, Any] = {}
RENDEZVOUS_S = 300.0


@dataclass(frozen=True)
class TrainedCandidate:
    """A fitted candidate with the metadata the model store keeps beside it."""

    model_id: str
    name: str
    model: Any
    metadata: dict[str, Any]


@dataclass
class TrainingResult:
    """What a training run produced."""

    trained: list[TrainedCandidate] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def model_id_for(candidate: Candidate, feature_set_id: str) -> str:
    """Content-derived model id: hash of the candidate config and the feature set."""
    canonical = json.dumps(
        {"candidate": candidate.model_dump(mode="json"), "feature_set_id": feature_set_id},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def select_features(frame: pd.DataFrame, features: list[str] | None) -> pd.DataFrame:
    """The configured feature columns; ``InvalidInput`` names any that are missing."""
    if features is None:
        return frame
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise InvalidInput(f"training features not in the feature set: {missing}")
    return frame[features]


def train_candidates(
    config: TrainingConfig,
    X: pd.DataFrame,
    y: pd.Series,
    *,
    feature_set_id: str,
    batch_ids: list[str],
    progress: Callable[[str], None] | None = None,
    pool: WorkerPool | None = None,
    client: Client | None = None,
    sample: dict[str, Any] | None = None,
) -> TrainingResult:
    """Train every candidate of the config in parallel on (X, y): on the workers of a Dask
    ``client`` if given, else in ``pool`` (or worker processes of the run's own).
    ``sample``: how (X, y) was sampled from a larger training set, for the metadata."""
    candidates = expand(config)
    X = select_features(X, config.features)
    if client is not None:
        from training.distributed import DaskScheduler  # Dask only where a cluster is used

        outcomes = DaskScheduler(client, config, progress or log.info).run(candidates, X, y)
    else:
        with tempfile.TemporaryDirectory(prefix="conveyor-train-") as tmp:
            data_path = Path(tmp) / "train.arrow"
            _write_training_data(X, y, data_path)
            outcomes = _run_pool(config, candidates, str(data_path), progress or log.info, pool)
    rows = reference_rows(X)  # monitoring's drift reference: inputs once, predictions each
    context = _Context(feature_set_id, batch_ids, list(X.columns), y, rows,
                       input_references(rows), sample)
    return _collect(candidates, outcomes, context)


class WorkerPool:
    """Forkserver worker processes for training, kept across runs.

    Workers import the named estimators' modules when they start, and keep the training
    data of the run they last served (read once per worker and run, by a run key), so a
    run hands over only a path. A worker that times out or dies is replaced by pebble.

    Example::

        pool = WorkerPool(2, ["HistGradientBoostingClassifier"]).start()
        train_candidates(config, X, y, feature_set_id="fs1", batch_ids=["b1"], pool=pool)
        pool.close()
    """

    def __init__(self, workers: int, estimators: Iterable[str] = ()) -> None:
        self.workers = workers
        ctx = multiprocessing.get_context("forkserver")
        # Inherited by the workers: a rendezvous proves each of them has started.
        barrier = ctx.Barrier(workers)
        self._pool = ProcessPool(workers, initializer=_init_worker,
                                 initargs=(tuple(estimators), barrier), context=ctx)
        self._warming: list[Future] = []

    def start(self) -> WorkerPool:
        """Start the workers now rather than at the first run; ``warm`` says when they are."""
        self._warming = [self._pool.schedule(_rendezvous) for _ in range(self.workers)]
        return self

    def warm(self) -> bool:
        """Whether every worker has started (a failed start counts: runs replace workers)."""
        return all(future.done() for future in self._warming)

    def schedule(self, candidate: Candidate, data: _Data, timeout: float) -> Future:
        """Fit ``candidate`` on ``data`` in a worker, stopped after ``timeout`` seconds."""
        return self._pool.schedule(_fit, args=(candidate, data), timeout=timeout)

    def close(self) -> None:
        """Stop the workers (a run still going fails and is redelivered)."""
        self._pool.stop()
        self._pool.join()


@dataclass(frozen=True)
class _Data:
    """Where a run's training data is, the run's key, and each worker's thread budget."""

    path: str
    key: str
    threads: int


def _run_pool(
    config: TrainingConfig, candidates: list[Candidate], data_path: str,
    progress: Callable[[str], None], pool: WorkerPool | None,
) -> dict[str, Any]:
    workers = min(config.workers, len(candidates))
    if pool is not None:
        workers = min(pool.workers, len(candidates))
    # no oversubscribed OpenMP pools: the CPUs of the container's limit, not the node's
    threads = max(1, available_cpus() // workers)
    data = _Data(data_path, uuid.uuid4().hex, threads)
    if pool is not None:
        return _Scheduler(pool, config, progress, data).run(candidates)
    own = WorkerPool(workers)
    try:
        return _Scheduler(own, config, progress, data).run(candidates)
    finally:
        own.close()


class _Scheduler:
    """Schedules candidates, retries transient failures, collects outcomes by name."""

    def __init__(self, pool: WorkerPool, config: TrainingConfig, progress: Callable,
                 data: _Data) -> None:
        self.pool, self.config, self.progress, self.data = pool, config, progress, data
        self.attempts: dict[str, int] = {}
        self.pending: dict[Future, Candidate] = {}
        self.outcomes: dict[str, Any] = {}

    def run(self, candidates: list[Candidate]) -> dict[str, Any]:
        for candidate in candidates:
            self._schedule(candidate)
        while self.pending:
            done, _ = wait(list(self.pending), return_when=FIRST_COMPLETED)
            for future in done:
                self._settle(self.pending.pop(future), future)
        return self.outcomes

    def _schedule(self, candidate: Candidate) -> None:
        self.attempts[candidate.name] = self.attempts.get(candidate.name, 0) + 1
        future = self.pool.schedule(candidate, self.data, self.config.timeout_s)
        self.pending[future] = candidate

    def _settle(self, candidate: Candidate, future: Future) -> None:
        try:
            self.outcomes[candidate.name] = future.result()
            self.progress(f"trained {candidate.name}")
        except TimeoutError:
            self.outcomes[candidate.name] = Failure(
                candidate.name, f"timed out after {self.config.timeout_s:g}s"
            )
        except TRANSIENT as exc:
            self._retry_or_fail(candidate, exc)
        except Exception as exc:  # noqa: BLE001 - a candidate's own error sinks only it
            self.outcomes[candidate.name] = Failure(candidate.name, describe(exc))

    def _retry_or_fail(self, candidate: Candidate, exc: BaseException) -> None:
        if self.attempts[candidate.name] <= self.config.retries:
            self.progress(f"retrying {candidate.name} after transient failure: {describe(exc)}")
            self._schedule(candidate)
        else:
            self.outcomes[candidate.name] = Failure(candidate.name, describe(exc))


def _init_worker(estimators: tuple[str, ...], barrier: Any) -> None:
    """Import the estimators' modules once per worker, before any run needs them."""
    _worker_start["barrier"] = barrier
    for name in estimators:
        try:
            resolve_estimator(name)
        except Exception:  # noqa: BLE001 - only a warm-up: the run reports the real error
            log.debug("could not preload estimator %s", name, exc_info=True)


def _write_training_data(X: pd.DataFrame, y: pd.Series, path: Path) -> None:
    """(X, y) for the workers as one uncompressed Arrow file, which each maps and reads
    in milliseconds (Parquet's encoding took ~0.3 s of the run for 800,000 rows)."""
    table = pa.Table.from_pandas(X.assign(**{LABEL_COLUMN: y.to_numpy()}), preserve_index=False)
    feather.write_feather(table, str(path), compression="uncompressed")


def _rendezvous() -> None:
    """Wait for every worker to get here: one such task per worker proves all started."""
    _worker_start["barrier"].wait(timeout=RENDEZVOUS_S)


def _training_data(data: _Data) -> tuple[pd.DataFrame, pd.Series]:
    """The run's (X, y), read once per worker and run; an earlier run's data is let go."""
    if _worker_data.get("key") != data.key:
        _worker_data.clear()
        frame = feather.read_table(data.path, memory_map=True).to_pandas()
        _worker_data.update(key=data.key, y=frame.pop(LABEL_COLUMN), X=frame)
    return _worker_data["X"], _worker_data["y"]


def _fit(candidate: Candidate, data: _Data) -> tuple[Any, float]:
    X, y = _training_data(data)
    model = resolve_estimator(candidate.estimator, candidate.name)(**candidate.params)
    with threadpool_limits(limits=data.threads):
        started = time.perf_counter()
        model.fit(X, y)
        return model, time.perf_counter() - started


@dataclass(frozen=True)
class _Context:
    feature_set_id: str
    batch_ids: list[str]
    features: list[str]
    y: pd.Series
    reference_rows: pd.DataFrame
    input_references: dict[str, Any]
    sample: dict[str, Any] | None = None


def _collect(
    candidates: list[Candidate], outcomes: dict[str, Any], ctx: _Context
) -> TrainingResult:
    result = TrainingResult()
    for candidate in candidates:
        outcome = outcomes[candidate.name]
        if isinstance(outcome, Failure):
            result.failures.append(outcome)
        else:
            model, fit_s = outcome
            result.trained.append(_trained(candidate, model, fit_s, ctx))
    return result


def _trained(candidate: Candidate, model: Any, fit_s: float, ctx: _Context) -> TrainedCandidate:
    model_id = model_id_for(candidate, ctx.feature_set_id)
    return TrainedCandidate(model_id, candidate.name, model, {
        "model_id": model_id,
        "name": candidate.name,
        "algorithm": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": candidate.model_dump(mode="json"),
        "params": _json_safe(model.get_params()),
        "learned": learned_summary(model),
        "feature_set_id": ctx.feature_set_id,
        "batch_ids": ctx.batch_ids,
        "features": ctx.features,
        "training_rows": int(len(ctx.y)),
        **({"training_sample": ctx.sample} if ctx.sample is not None else {}),
        "class_balance": class_balance(ctx.y),
        "timings": {"fit_s": round(fit_s, 4)},
        "library_versions": library_versions(),
        "trained_at": datetime.now(UTC).isoformat(),
        "status": "candidate",
        "reference": _reference(candidate, model, ctx),
    })


def _reference(candidate: Candidate, model: Any, ctx: _Context) -> dict[str, Any] | None:
    """The drift reference of a model; None (and a warning) if its predictions fail."""
    try:
        return model_reference(model, ctx.reference_rows, ctx.input_references)
    except Exception as exc:  # noqa: BLE001 - a model without a reference is still a model
        log.warning("no drift reference for %s: %s", candidate.name, describe(exc))
        return None


def class_balance(y: pd.Series) -> dict[str, float]:
    """Share of each class in the training labels."""
    return {str(k): round(float(v), 6) for k, v in y.value_counts(normalize=True).items()}


def learned_summary(model: Any, max_values: int = 20) -> dict[str, Any]:
    """Learned attributes (ending in ``_``): small ones by value, large ones by shape."""
    summary: dict[str, Any] = {}
    for name, value in vars(model).items():
        if name.endswith("_") and not name.startswith("_"):
            summary[name] = _summarise(value, max_values)
    return summary


def _summarise(value: Any, max_values: int) -> Any:
    if isinstance(value, np.ndarray):
        if value.size <= max_values and value.dtype.kind in "biuf":
            return np.round(value.astype(float), 6).tolist()
        return {"shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, (int, float, str, bool, np.generic)):
        return value.item() if isinstance(value, np.generic) else value
    return type(value).__name__


def _json_safe(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=lambda v: repr(v)))


def library_versions() -> dict[str, str]:
    """Versions of the libraries a model depends on."""
    return {
        "python": platform.python_version(), "scikit-learn": sklearn.__version__,
        "numpy": np.__version__, "pandas": pd.__version__,
    }
