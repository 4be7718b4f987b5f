"""The transport-free scoring core (MLServer's "dataplane"): load, route, predict.

``ScoringCore`` loads the registry chain's models and their fitted feature sets (both
signature-verified by their ``ModelStore``), warms each up through its own
``MicroBatcher`` and deploys it in a ``ModelRouter``. ``score`` reads the entity's online
features from Redis in one round trip, merges the request's fields, runs the model's own
``transform_online`` and predicts through the batcher; ``answer`` lets the previous model
answer when the champion is slow ("better wrong than late"). The gRPC servicer and the CLI
only convert messages and call it::

    core = ScoringCore(stores.models, stores.feature_pipelines, registry, stores.online)
    core.load_chain()                                  # champion, previous, older
    result = core.score(ScoreQuery("C-42", {"amount": 9.5, ...}), deadline_s=0.020)
    result.score, result.version, result.fallback      # 0.93, "v3", False
    core.on_model_ready(event)                         # hot swap: load, warm, put in front

Versions beyond ``settings.chain_depth`` are retired after a swap: routed to no more, their
batchers stopped and their memory released once the requests in flight have finished.
``on_served(query, result)`` is called with every answer (``result.features`` holds the
model's input row), for reporting off the request path; it must return at once;
``on_inferred(result)`` likewise with every ``infer`` answer (its rows' inputs in
``result.features``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Generic, TypeVar

import numpy as np
import pandas as pd
import redis
from threadpoolctl import threadpool_limits

from common.errors import ConveyorError, InvalidInput, ModelNotFound, NotFound, Status
from common.events import ModelReady
from common.stores import ModelRegistry, ModelStore, OnlineFeatureStore
from common.stores.entity_state import EntityStateStore, Entry
from preparation.online import compile_online, online_matrix
from preparation.streaming import NotStreamable, StreamPlan, last_record_us, timestamp_us
from scoring.batching import AdaptiveBatchSize, DeadlineExceeded, MicroBatcher, Overloaded
from scoring.compiled import CompiledTrees, compiled_or_same
from scoring.inputs import FieldValue, InputSchema
from scoring.latency import CircuitBreaker, CircuitState
from scoring.router import (
    Answer,
    DeployedModel,
    FallbackKind,
    ModelHealth,
    ModelRouter,
    NoAnswer,
    NoModelDeployed,
    RouteDecision,
    answer,
)

logger = logging.getLogger(__name__)

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class FeaturesUnavailable(ConveyorError):
    """The online store is unreachable and the request does not carry what it would give."""

    status = Status.UNAVAILABLE

    def __init__(self, feature_set_id: str, missing: Sequence[str]):
        self.feature_set_id, self.missing = feature_set_id, list(missing)
        super().__init__(
            f"online features of feature set {feature_set_id} are unavailable and the request "
            f"does not carry {', '.join(missing)}"
        )


@dataclass(frozen=True)
class CoreSettings:
    """Deadlines, latency budgets and batching of the scoring core."""

    # Generous: one Score costs under a millisecond in process, but over gRPC under load on
    # a shared 2-core machine its tail reaches tens of milliseconds (bench/scoring.py).
    deadline_s: float = 0.250
    """Deadline of a request that brings none of its own."""
    max_deadline_s: float = 10.0
    """The longest deadline a client may bring (a longer one is cut to this): a client's
    own deadline is kept, shorter or longer than ``deadline_s``, so a call is never told
    DEADLINE_EXCEEDED while its client would still wait for it."""
    latency_budget_s: float = 0.100
    """A link's circuit opens when its p99 latency breaks this budget."""
    max_batch: int = 64
    """Largest micro-batch of one model."""
    max_queue: int = 1024
    """Requests one model may hold queued before refusing (RESOURCE_EXHAUSTED)."""
    max_wait_s: float = 0.004
    """How long a batch (of calls, or of a model's rows) may wait for more after its first,
    only while other requests are about (the last batch had more than one): a lone request
    never waits."""
    quiet_s: float = 0.001
    """A waiting batch is taken as soon as this long passes with no new call: it waits
    only while calls keep coming, so a light load is not slowed by ``max_wait_s``."""
    workers: int = 64
    """Threads that run model links (a slow model is abandoned, not waited for)."""
    warmup_calls: int = 3
    """Predict calls made on a model before it takes traffic (0: none at all, so a model
    fitted on DataFrames is not checked for plain arrays and keeps DataFrames)."""
    chain_depth: int = 3
    """Versions kept deployed (champion, previous, older); the rest are retired."""
    retire_wait_s: float = 30.0
    """How long a retirement waits for the requests in flight before stopping a model."""
    freeze_gc: bool = False
    """For a serving process: after each chain load, collect, then move everything left
    into the cycle collector's permanent generation (``gc.freeze``), so full collections
    no longer walk the loaded models and libraries (~0.1 s each, the c32 p99 of
    bench/scoring.py). A load unfreezes first, so retired models' cycles are collected.
    Off by default: a test process would keep what it holds at each load for good."""
    inject_delay_s: float = 0.0
    """Fault injection for demos and drills, off at 0: every predict call of the version
    ``inject_delay_version`` first sleeps this long, as a slow model would."""
    inject_delay_version: str = ""
    max_feature_age_s: float = 0.0
    """An answer whose entity's last record (streamed or batched) is older than this, at
    the request's time, is marked degraded (0: never)."""


@dataclass(frozen=True)
class ScoreQuery:
    """One row to score: the entity, its raw fields, and optionally a version."""

    entity_id: str
    fields: Mapping[str, FieldValue]
    model_version: str | None = None
    request_id: str = ""
    observe: bool = False
    """Score, then observe the record (``on_observed``): its entity's online state takes
    it after this answer, so the score never includes the record itself."""


@dataclass(frozen=True)
class ScoreResult:
    """The answer to one ``ScoreQuery``."""

    score: float
    label: str
    probabilities: dict[str, float]
    version: str
    fallback: bool
    fallback_reason: str | None
    latency_ms: float
    request_id: str
    degraded: bool = False
    features: Mapping[str, float] = field(default_factory=dict)
    """The model's input row (its feature set's transform), by feature name."""
    fallback_kind: FallbackKind | None = None
    """Why a fallback answered, as a fixed label (metrics)."""
    role: str = ""
    """The answering link: champion, previous, older, canary or named."""
    feature_age_s: float | None = None
    """Age, at the request's time, of the entity's last record its features count (None:
    no history, or features not read from the entity state)."""
    feature_ages_s: Mapping[str, float] = field(default_factory=dict)
    """Per aggregate feature, the age of the newest record its window counts (absent: an
    empty window, or not read from the entity state)."""


@dataclass(frozen=True)
class InferResult:
    """The answer to one ``infer`` call: class probabilities of every row."""

    probabilities: np.ndarray
    """rows x classes, in the order of ``classes``."""
    classes: list[str]
    version: str
    fallback: bool
    fallback_reason: str | None
    fallback_kind: FallbackKind | None
    role: str
    latency_ms: float
    request_id: str = ""
    """The call's id: ModelInfer's ``id``, or one made up when the call has none (the
    response carries it, so the client can name it in an outcome)."""
    features: np.ndarray | None = None
    """The answering model's input rows (raw records after its feature set's transform)."""
    feature_names: Sequence[str] = ()
    """The names of ``features``' columns: the answering model's features."""


@dataclass(frozen=True)
class _Request:
    """A query with its online rows (by feature set) and its deadline on the monotonic clock."""

    query: ScoreQuery
    online: Mapping[str, Mapping[str, Any] | None]
    deadline: float | None
    degraded: bool = False
    freshness: Freshness | None = None


@dataclass(frozen=True)
class _Ask:
    """One Score call, queued to be scored with the calls that came at the same time."""

    query: ScoreQuery
    deadline: float
    """On the monotonic clock."""
    began: float
    """On the ``perf_counter`` clock: the answer's latency counts from here."""


@dataclass(frozen=True)
class _InferAsk:
    """One ModelInfer call's rows, queued to be predicted with the calls that came at the
    same time and were routed alike."""

    rows: np.ndarray | list[dict[str, Any]]
    version: str | None
    deadline: float
    """On the monotonic clock."""
    began: float
    """On the ``perf_counter`` clock."""
    request_id: str = ""


Ask = TypeVar("Ask", _Ask, _InferAsk)
Outcome = TypeVar("Outcome", ScoreResult, InferResult)


@dataclass(frozen=True)
class _Block:
    """Several requests' feature rows for one model: the rows of the requests that could
    be transformed (``members``: their places), and why the others could not."""

    matrix: np.ndarray
    members: list[int]
    errors: dict[int, Exception]


class _Group(Generic[Outcome]):
    """Calls routed alike, answered once as one block by ``answer`` (a closure): by
    whoever asks first, the others waiting for it."""

    def __init__(self, size: int, answer: Callable[[], list[Outcome | Exception]]) -> None:
        self._size = size
        self._answer: Callable[[], list[Outcome | Exception]] = answer
        self._lock = threading.Lock()
        self._outcomes: list[Outcome | Exception] | None = None

    def outcomes(self) -> list[Outcome | Exception]:
        """Each call's answer or error, in order; answered by the first caller."""
        with self._lock:
            if self._outcomes is None:
                try:
                    self._outcomes = self._answer()
                except Exception as exc:  # a bug: every call of the group fails with it
                    logger.exception("scoring a group of %d calls failed", self._size)
                    self._outcomes = [exc] * self._size
                self._answer = _answered  # holds the models no more (a retirement waits)
            return self._outcomes


def _answered() -> list[Any]:
    raise AssertionError("a group is answered once")


@dataclass(frozen=True)
class _Share(Generic[Outcome]):
    """One call's place in a ``_Group``."""

    group: _Group[Outcome]
    index: int

    def outcome(self) -> Outcome | Exception:
        """The call's answer or error (waits while another caller answers the group)."""
        return self.group.outcomes()[self.index]


@dataclass(eq=False)
class LoadedModel:
    """A model version with its fitted feature set and its micro-batcher."""

    version: str
    model_id: str
    estimator: Any
    features: Any  # preparation.FittedFeatureSet
    feature_names: list[str]
    schema: InputSchema
    batcher: MicroBatcher[np.ndarray, np.ndarray] = field(init=False)
    on_batch: Callable[[int], None] | None = None
    """Told the rows of each predict call (its batcher's and the direct ones)."""
    frame_input: bool = False
    """Predict on DataFrames with the feature names: a model fitted on a DataFrame whose
    arrays do not give the same answers (``_frame_input``), or one that refuses a plain
    2-D array (it selects columns by name). Others get 2-D float arrays, in the order of
    the features they were trained on (a DataFrame costs ~0.45 ms a predict call)."""
    delay_s: float = 0.0
    """Injected slowness of each predict call (``CoreSettings.inject_delay_s``)."""
    stream: StreamPlan | None = None
    """How its aggregates are read from the entity state (None: from the latest rows)."""

    @property
    def feature_set_id(self) -> str:
        """The id of the feature set the model was trained on."""
        return str(self.features.feature_set_id)

    @cached_property
    def classes(self) -> list[str]:
        """The model's classes as labels; the last one is the positive class."""
        return [str(c) for c in self.estimator.classes_]

    def predict_batch(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities for a batch of items (the batcher calls this), each a feature
        row (its probabilities) or a 2-D block of rows (theirs, 2-D): one ``predict_proba``
        on one 2-D array, its OpenMP work on the calling thread only."""
        if self.delay_s:
            time.sleep(self.delay_s)  # injected fault: a slow model
        proba = self._predict_proba(np.vstack(rows))
        if all(row.ndim == 1 for row in rows):
            return list(proba)
        ends = np.cumsum([_rows_in(row) for row in rows])
        return [proba[end - 1] if row.ndim == 1 else proba[end - len(row):end]
                for row, end in zip(rows, ends, strict=True)]

    def _predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        """Probabilities of every row; a row whose values the model refuses (scikit-learn's
        'Input X contains infinity or a value too large', or NaN it cannot take) gets NaN
        probabilities, found row by row, so it fails only its own request (``refused``)."""
        _one_openmp_thread()
        try:
            return self._estimator_proba(matrix)
        except ValueError as exc:
            if not _refuses_values(exc):
                raise
        rows = []
        for row in matrix:
            try:
                rows.append(self._estimator_proba(row[np.newaxis, :])[0])
            except ValueError as exc:
                if not _refuses_values(exc):
                    raise
                rows.append(np.full(len(self.classes), np.nan))
        return np.vstack(rows)

    def _estimator_proba(self, matrix: np.ndarray) -> np.ndarray:
        if not self.frame_input:
            try:
                return np.asarray(self.estimator.predict_proba(matrix))
            except ValueError as exc:
                if _refuses_values(exc):
                    raise  # the values' fault, not the input's form
                self._needs_frames()
            except Exception:  # e.g. a ColumnTransformer that picks columns by name
                self._needs_frames()
        return np.asarray(self.estimator.predict_proba(
            pd.DataFrame(matrix, columns=self.feature_names)))

    def _needs_frames(self) -> None:
        logger.info("model %s version %s needs named columns: predicting on DataFrames",
                    self.model_id, self.version)
        self.frame_input = True

    def refused(self, row: np.ndarray) -> InvalidInput:
        """The error of a feature row the model refused (NaN probabilities), naming the
        features whose values are out of any model's range."""
        extreme = [f"{name}={value:.3g}" for name, value in zip(
            self.feature_names, row.tolist(), strict=True)
            if not math.isfinite(value) or abs(value) > EXTREME]
        named = f" ({', '.join(extreme[:5])})" if extreme else ""
        return InvalidInput(f"model {self.model_id} version {self.version} cannot score the "
                            f"request's values{named}: too large, or missing where it takes "
                            "no missing value")

    def features_of(self, request: _Request, *, check: bool = True) -> np.ndarray:
        """The model's feature row for a request (its own feature set's online transform,
        compiled into row functions by ``preparation.online`` where it can be); ``check``
        the request's fields against the schema unless the caller already has."""
        if check:
            self.schema.check(request.query.fields)
        return online_matrix(self.features, [self._record(request)], self.feature_names)[0]

    def block(self, requests: Sequence[_Request], *, check: bool = True) -> _Block:
        """The feature rows of several requests: in one pass of the compiled row plan
        where it models them all, else one by one, a request that cannot be transformed
        left out with its error. Raises when none can be."""
        try:
            if check:
                for request in requests:
                    self.schema.check(request.query.fields)
            matrix = self._plan_matrix([self._record(request) for request in requests])
        except ConveyorError:
            matrix = None  # find which request it is, below
        if matrix is not None:
            return _Block(matrix, list(range(len(requests))), {})
        rows, members, errors = [], [], {}
        for index, request in enumerate(requests):
            try:
                rows.append(self.features_of(request, check=check))
                members.append(index)
            except Exception as exc:
                if len(requests) == 1:
                    raise
                errors[index] = exc
        if not rows:
            raise next(iter(errors.values()))
        return _Block(np.vstack(rows), members, errors)

    def _plan_matrix(self, records: Sequence[dict[str, Any]]) -> np.ndarray | None:
        """The compiled row plan's rows of records, one pass per set of columns the
        records have (a record is transformed as it would be alone: one without a column
        another has must not get it as a missing value), or None (not modelled)."""
        plan = compile_online(self.features)
        alike: dict[frozenset[str], list[int]] = {}
        for index, record in enumerate(records):
            alike.setdefault(frozenset(record), []).append(index)
        if len(alike) == 1:
            return plan.matrix(records, self.feature_names)
        matrix = np.empty((len(records), len(self.feature_names)), dtype=np.float64)
        for places in alike.values():
            part = plan.matrix([records[i] for i in places], self.feature_names)
            if part is None:
                return None
            matrix[places] = part
        return matrix

    def _record(self, request: _Request) -> dict[str, Any]:
        query = request.query
        return self.schema.record(
            query.entity_id, query.fields, request.online.get(self.feature_set_id))

    def predict(self, request: _Request) -> tuple[np.ndarray, np.ndarray]:
        """The feature row and its probabilities for one request, predicted in a micro-batch."""
        row = self.features_of(request)
        return row, self.batcher.submit(row, deadline=request.deadline).result()

    def start_rows(self, matrix: np.ndarray, deadline: float | None, pool: Executor
                   ) -> Future[np.ndarray]:
        """Start predicting a feature matrix (rows x this model's features, its width
        checked): up to a full batch of rows as one item of the micro-batcher (batched with
        other requests), more in one call on ``pool``. The future holds rows x classes;
        cancelling it drops the rows if they are still queued."""
        if matrix.ndim != 2 or matrix.shape[1] != len(self.feature_names):
            raise InvalidInput(f"model {self.model_id} version {self.version} takes "
                               f"{len(self.feature_names)} features, got shape {matrix.shape}")
        if len(matrix) > self.batcher.batch_size.maximum:
            return pool.submit(self._predict_all, matrix)
        return self.batcher.submit(matrix, deadline=deadline)

    def matrix_of(self, rows: np.ndarray | list[dict[str, Any]]) -> np.ndarray:
        """This model's input rows: a feature matrix as it is, raw records through this
        model's own feature set (``start_rows`` checks the width)."""
        if isinstance(rows, np.ndarray):
            return rows
        return online_matrix(self.features, rows, self.feature_names)

    def _predict_all(self, matrix: np.ndarray) -> np.ndarray:
        if self.on_batch is not None:
            self.on_batch(len(matrix))
        return np.asarray(self.predict_batch(list(matrix)))

    def warm_up(self, calls: int) -> None:
        """Predict a few zero rows through the batcher, so the first request is not slow;
        first, a model fitted on DataFrames is checked for arrays (``_frame_input``). With
        no call (``warmup_calls`` 0) nothing is predicted, and such a model keeps them."""
        if calls > 0 and self.frame_input:
            self.frame_input = _frame_input(self.estimator, self.feature_names)
        zeros = np.zeros(len(self.feature_names), dtype=np.float64)
        for _ in range(calls):
            self.batcher.submit(zeros).result(timeout=30)


class ScoringCore:
    """Deployed models of one registry name, and scoring requests against them."""

    def __init__(
        self,
        models: ModelStore,
        pipelines: ModelStore,
        registry: ModelRegistry,
        online: OnlineFeatureStore,
        settings: CoreSettings | None = None,
        *,
        on_served: Callable[[ScoreQuery, ScoreResult], None] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
        state: EntityStateStore | None = None,
        on_observed: Callable[[ScoreQuery], None] | None = None,
        on_inferred: Callable[[InferResult], None] | None = None,
    ) -> None:
        self.models, self.pipelines, self.registry, self.online = (
            models, pipelines, registry, online)
        self.settings = settings or CoreSettings()
        self.router = ModelRouter(registry.name)
        self._loaded: dict[str, LoadedModel] = {}
        self._executor = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="link")
        self._inline = InlineStart(self._executor)
        self.on_served = on_served
        self.on_inferred = on_inferred
        """Called with each ``infer`` answer, for reporting; must return at once."""
        self.state = state
        """The entity state streamed aggregates are read from (None: latest rows only)."""
        self.on_observed = on_observed
        """Called with each ``observe`` query after its answer; must return at once."""
        self._ready_sets: set[str] = set()
        self._ready_asked: dict[str, float] = {}
        self.on_batch = on_batch
        """Called with (version, rows) after each predict call of a model (metrics)."""
        self._in_flight = InFlight()
        self._asks: MicroBatcher[_Ask, ScoreResult | Exception | _Share[ScoreResult]] = (
            self._request_batcher("score", self._score_asks))
        """Score calls in, batches of them to ``_score_asks``: what queued while the last
        batch was scored is the next batch; a call that finds it idle is scored inline."""
        self._infers: MicroBatcher[_InferAsk, InferResult | Exception | _Share[InferResult]] = (
            self._request_batcher("infer", self._infer_asks))
        """ModelInfer calls in, batches of them to ``_infer_asks``, as ``_asks``."""

    def _request_batcher(self, kind: str, run: Callable[[list[Ask]], Sequence[Any]]
                         ) -> MicroBatcher[Ask, Any]:
        """A batcher of whole calls: a call that finds it idle is answered on its own
        thread; under load, a batch waits up to ``max_wait_s`` while calls keep coming."""
        settings = self.settings
        return MicroBatcher(
            f"{self.registry.name}:{kind}", run, max_queue=settings.max_queue,
            batch_size=AdaptiveBatchSize(settings.latency_budget_s, initial=settings.max_batch,
                                         maximum=settings.max_batch),
            max_wait_s=settings.max_wait_s, quiet_s=settings.quiet_s, busy_only=True,
            inline=True)

    @property
    def ready(self) -> bool:
        """Whether at least one model is loaded, warmed up and in the serving chain."""
        return self.router.ready

    def load_chain(self) -> list[str]:
        """Load, verify and warm up the registry chain's first ``chain_depth`` versions;
        serve them, then retire the versions that fell out of the chain."""
        chain = self.registry.chain()[: self.settings.chain_depth]
        for entry in chain:
            self.deploy(entry.version, entry.model_id)
        versions = [entry.version for entry in chain]
        if versions:
            self.router.set_chain(versions)
            self._retire_all_but(versions)
        if self.settings.freeze_gc:
            _freeze_heap()
        return versions

    def on_model_ready(self, event: ModelReady) -> list[str]:
        """Hot swap: the new version is loaded and warmed, then put in front in one swap.

        Requests in flight keep the models they picked; versions beyond the chain depth
        are retired once those requests have finished.
        """
        self.deploy(event.version, event.model_id)
        self.router.restore(event.version)  # promoted again: no longer demoted
        return self.load_chain()

    def demote(self, version: str, reason: str) -> list[str]:
        """Revert a degraded version: the registry puts the previous champion back (so a
        restart keeps it) and the router stops asking the version first, so the next link
        answers, marked fallback, until the next chain. Returns the serving chain."""
        try:
            self.registry.revert(version, reason=reason)
        except ModelNotFound:
            logger.warning("cannot revert %s in the registry: no previous version", version)
        if version in self.router.versions():
            self.router.demote(version, reason)
        return [link.version for link in self.router.chain()]

    def deploy(self, version: str, model_id: str) -> LoadedModel:
        """Load a version (signatures verified), warm it up and make it routable."""
        if version in self._loaded:
            return self._loaded[version]
        loaded = self._load(version, model_id)
        loaded.warm_up(self.settings.warmup_calls)
        breaker = CircuitBreaker(self.settings.latency_budget_s)
        self._loaded = {**self._loaded, version: loaded}  # before the router can route to it
        self.router.deploy(DeployedModel(version, model_id, loaded.predict, breaker))
        logger.info("deployed model %s version %s", model_id, version)
        return loaded

    def score(self, query: ScoreQuery, deadline_s: float | None = None) -> ScoreResult:
        """Score one row; ``InvalidInput``, ``ModelNotFound``, ``NoAnswer``... otherwise.

        Concurrent calls are scored together: the call queues to the request batcher,
        which scores what is queued as one batch (``_score_asks``); a call that finds it
        idle is scored at once on its own thread, alone."""
        deadline_s = self.settings.deadline_s if deadline_s is None else deadline_s
        ask = _Ask(query, time.monotonic() + deadline_s, time.perf_counter())
        with self._in_flight.request():
            outcome = self._asks.submit(ask).result()
            if isinstance(outcome, _Share):
                outcome = outcome.outcome()
        if isinstance(outcome, Exception):
            raise outcome
        self._report([query], [outcome])
        self._observe([query])
        return outcome

    def score_many(
        self, queries: Sequence[ScoreQuery], deadline_s: float | None = None
    ) -> list[ScoreResult]:
        """Score rows in order as one batch, all within one deadline (default
        ``settings.deadline_s``); the first row that fails fails the call."""
        deadline_s = self.settings.deadline_s if deadline_s is None else deadline_s
        deadline, began = time.monotonic() + deadline_s, time.perf_counter()
        with self._in_flight.request():
            outcomes = [outcome.outcome() if isinstance(outcome, _Share) else outcome
                        for outcome in self._score_asks(
                            [_Ask(query, deadline, began) for query in queries])]
        results = []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
            results.append(outcome)
        self._report(queries, results)
        self._observe(queries)
        return results

    def features_for(self, query: ScoreQuery) -> dict[str, float]:
        """The feature row ``score`` would hand the model that answers first (the routed
        version's), by feature name, without predicting: what a request is scored on."""
        decision = self.router.route(query.model_version or None, request_key=query.entity_id)
        model = self._loaded[decision.primary.version]
        deadline = time.monotonic() + self.settings.deadline_s
        request = self._with_online([query], [model], deadline)[0]
        if isinstance(request, Exception):
            raise request
        row = model.features_of(request)
        return dict(zip(model.feature_names, row.tolist(), strict=True))

    def retire(self, version: str) -> None:
        """Route to a version no more; once the requests in flight have finished, stop its
        batcher (rows it holds are still predicted) and drop it, releasing its memory."""
        self.router.retire(version)
        if not self._in_flight.wait_for_earlier(self.settings.retire_wait_s):
            logger.warning("retiring %s: requests still in flight after %.0f s",
                           version, self.settings.retire_wait_s)
        loaded = self._loaded[version]
        self._loaded = {v: m for v, m in self._loaded.items() if v != version}
        loaded.batcher.close(drain=True)
        logger.info("retired model %s version %s", loaded.model_id, version)

    def infer(
        self, rows: np.ndarray | list[dict[str, Any]], version: str | None = None,
        deadline_s: float | None = None, request_id: str = "",
    ) -> InferResult:
        """Predict rows without reading Redis (the Open Inference Protocol's ModelInfer):
        a feature matrix (rows x the model's features) as it is, or raw records through
        the answering model's own ``transform_online``. Routed and answered like ``score``,
        and reported (``on_inferred``) under ``request_id``, or one made up (a uuid4, as
        MLServer does) that the result carries back to the caller.
        """
        deadline_s = self.settings.deadline_s if deadline_s is None else deadline_s
        ask = _InferAsk(rows, version, time.monotonic() + deadline_s, time.perf_counter(),
                        request_id or uuid.uuid4().hex)
        with self._in_flight.request():
            if _stackable(ask.rows, self.settings.max_batch):
                outcome = self._infers.submit(ask).result()
            else:  # raw records, or a batch of its own: predicted on this thread
                outcome = self._infer_asks([ask])[0]
            if isinstance(outcome, _Share):
                outcome = outcome.outcome()
        if isinstance(outcome, Exception):
            raise outcome
        self._report_inferred(outcome)
        return outcome

    def loaded(self, version: str | None = None) -> LoadedModel:
        """A deployed version (or alias), else the champion: its schema, features, classes."""
        chain = self.router.chain()
        if version is None and not chain:
            raise NoModelDeployed(self.router.name)
        chosen = chain[0] if version is None else self.router.get(version)
        return self._loaded[chosen.version]

    def health(self) -> list[ModelHealth]:
        """Every deployed version with its alias, circuit and recent latency."""
        return self.router.health()

    def close(self) -> None:
        """Stop the batchers and the link threads."""
        self._asks.close()
        self._infers.close()
        for loaded in self._loaded.values():
            loaded.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self, version: str, model_id: str) -> LoadedModel:
        metadata = self.models.metadata(model_id).metadata
        estimator = compiled_or_same(self.models.load(model_id))
        fitted = self.pipelines.load(metadata["feature_set_id"])
        names = list(metadata.get("features") or fitted.feature_names)
        injected = version == self.settings.inject_delay_version
        delay_s = self.settings.inject_delay_s if injected else 0.0
        if delay_s:
            logger.warning("fault injection: every predict of version %s sleeps %.0f ms",
                           version, delay_s * 1e3)
        loaded = LoadedModel(version, model_id, estimator, fitted, names, InputSchema.of(fitted),
                             on_batch=self._batch_observer(version), delay_s=delay_s,
                             frame_input=_fitted_on_frames(estimator),
                             stream=self._stream_plan(fitted))
        loaded.batcher = MicroBatcher(
            f"{self.registry.name}:{version}", loaded.predict_batch,
            max_queue=self.settings.max_queue,
            batch_size=AdaptiveBatchSize(self.settings.latency_budget_s,
                                         maximum=self.settings.max_batch),
            max_wait_s=self.settings.max_wait_s, quiet_s=self.settings.quiet_s,
            busy_only=True, rows_of=_rows_in, on_batch=loaded.on_batch, inline=True,
        )
        return loaded

    def _stream_plan(self, fitted: Any) -> StreamPlan | None:
        if self.state is None or not fitted.aggregate_columns:
            return None
        try:
            return StreamPlan(fitted)
        except NotStreamable:
            return None

    def _batch_observer(self, version: str) -> Callable[[int], None] | None:
        on_batch = self.on_batch
        return None if on_batch is None else lambda rows: on_batch(version, rows)

    def _retire_all_but(self, versions: Sequence[str]) -> None:
        for version in [v for v in self._loaded if v not in versions]:
            self.retire(version)

    def _score_asks(self, asks: Sequence[_Ask]
                    ) -> list[ScoreResult | Exception | _Share[ScoreResult]]:
        """Score calls that came together, each one's answer, error or share of a group in
        its place. Each group of calls routed alike is read from Redis in one round trip,
        then transformed and predicted as one block (``_group``)."""
        return self._grouped(asks, self._route, lambda decision, ask: _group_key(decision),
                             self._group)

    def _infer_asks(self, asks: Sequence[_InferAsk]
                    ) -> list[InferResult | Exception | _Share[InferResult]]:
        """ModelInfer calls that came together: the feature matrices of a group routed
        alike are stacked and predicted in one call (``_infer_group``); raw records, which
        each call's own transform may refuse, are predicted call by call."""
        return self._grouped(asks, self._route_infer, _infer_key, self._infer_group)

    def _grouped(self, asks: Sequence[Ask], route: Callable[[Ask, float], RouteDecision],
                 key: Callable[[RouteDecision, Ask], tuple[Any, ...]],
                 group: Callable[[RouteDecision, list[Ask], Mapping[str, LoadedModel]],
                                 _Group[Outcome]],
                 ) -> list[Outcome | Exception | _Share[Outcome]]:
        """Each call routed on its own, the calls of one ``key`` made one ``group``, each
        answered once (the group's earliest deadline is the group's): at once when its
        first link answers without waiting (its model idle and fast: the usual case), else
        by the first of its callers to ask, so a slow link holds only the calls sent to it."""
        outcomes: list[Outcome | Exception | _Share[Outcome] | None] = [None] * len(asks)
        groups: dict[tuple[Any, ...], tuple[RouteDecision, list[int]]] = {}
        now = time.monotonic()
        for index, ask in enumerate(asks):
            try:
                decision = route(ask, now)
            except ConveyorError as exc:
                outcomes[index] = exc
                continue
            groups.setdefault(key(decision, ask), (decision, []))[1].append(index)
        # Read after routing (a version is loaded before it is routed to, and unloaded
        # only once the requests in flight have ended), once: a deploy or a retirement
        # replaces the dict, never mutates it.
        models = self._loaded
        for decision, members in groups.values():
            answered = group(decision, [asks[i] for i in members], models)
            for share, place in enumerate(members):
                outcomes[place] = _Share(answered, share)
        return _every(outcomes)

    def _route_infer(self, ask: _InferAsk, now: float) -> RouteDecision:
        """The call's links; its deadline checked (spent waiting in a queue: no predict)."""
        decision = self.router.route(ask.version)
        if ask.deadline <= now:
            raise LateAnswer(["the deadline passed before predicting began"])
        return decision

    def _infer_group(self, decision: RouteDecision, asks: Sequence[_InferAsk],
                     models: Mapping[str, LoadedModel]) -> _Group[InferResult]:
        """Calls routed alike, predicted as one stacked matrix; answered here if the primary
        can answer at once."""
        deadline = min(ask.deadline for ask in asks)
        group = _Group(len(asks), lambda: self._answer_infer(decision, asks, models, deadline))
        if models[decision.primary.version].batcher.idle(deadline):
            group.outcomes()
        return group

    def _answer_infer(self, decision: RouteDecision, asks: Sequence[_InferAsk],
                      models: Mapping[str, LoadedModel], deadline: float
                      ) -> list[InferResult | Exception]:
        rows = asks[0].rows if len(asks) == 1 else np.vstack([np.asarray(ask.rows) for ask in asks])
        matrices: dict[str, np.ndarray] = {}  # each link's input: raw rows its own transform's

        def start(link: DeployedModel) -> Future[np.ndarray]:
            model = models[link.version]
            matrices[link.version] = matrix = model.matrix_of(rows)
            return model.start_rows(matrix, deadline, self._executor)

        try:
            reply = self._ask_links(decision, start, deadline - time.monotonic())
        except ConveyorError as exc:
            return [exc] * len(asks)
        model, matrix = models[reply.version], matrices[reply.version]
        if len(asks) == 1:
            return [_infer_result(asks[0], reply.value, model, reply, matrix)]
        ends = np.cumsum([len(ask.rows) for ask in asks])[:-1]
        return [_infer_result(ask, values, model, reply, inputs)
                for ask, values, inputs in zip(asks, np.split(reply.value, ends),
                                               np.split(matrix, ends), strict=True)]

    def _route(self, ask: _Ask, now: float) -> RouteDecision:
        """The call's links; its fields checked first (the request's fault before any
        model runs), then its deadline (spent waiting in a queue: no read, no predict)."""
        query = ask.query
        decision = self.router.route(query.model_version or None, request_key=query.entity_id)
        self._loaded[decision.primary.version].schema.check(query.fields)
        if ask.deadline <= now:
            raise LateAnswer(["the deadline passed before scoring began"])
        return decision

    def _group(self, decision: RouteDecision, asks: Sequence[_Ask],
               models: Mapping[str, LoadedModel]) -> _Group[ScoreResult]:
        """Calls routed alike with their online features read; answered here if the
        primary can answer at once."""
        primary = models[decision.primary.version]
        deadline = min(ask.deadline for ask in asks)
        # The primary's feature set only: a fallback of another set reads its own when it
        # is asked (_online_for), not on every call (after a retrain every version of the
        # chain has a set of its own).
        requests = self._with_online([ask.query for ask in asks], [primary], deadline)
        group = _Group(len(asks), lambda: self._answer_group(
            decision, asks, requests, models, deadline))
        if primary.batcher.idle(deadline):
            group.outcomes()
        return group

    def _answer_group(self, decision: RouteDecision, asks: Sequence[_Ask],
                      requests: Sequence[_Request | Exception],
                      models: Mapping[str, LoadedModel], deadline: float
                      ) -> list[ScoreResult | Exception]:
        outcomes: list[ScoreResult | Exception | None] = [
            request if isinstance(request, Exception) else None for request in requests]
        live = [request for request in requests if isinstance(request, _Request)]
        places = [i for i, request in enumerate(requests) if isinstance(request, _Request)]
        if not live:
            return [outcome for outcome in outcomes if outcome is not None]
        blocks: dict[str, tuple[_Block, list[_Request]]] = {}
        checked = models[decision.primary.version].schema

        def start(link: DeployedModel) -> Future[np.ndarray]:
            model = models[link.version]
            read, unread = self._online_for(model, live)
            block = _block_of(model, read, unread, check=model.schema is not checked)
            blocks[link.version] = block, read
            return model.start_rows(block.matrix, deadline, self._executor)

        try:
            reply = self._ask_links(decision, start, deadline - time.monotonic())
        except ConveyorError as exc:
            return [exc if outcome is None else outcome for outcome in outcomes]
        (block, read), model = blocks[reply.version], models[reply.version]
        for index, error in block.errors.items():
            outcomes[places[index]] = error
        for row, (index, proba) in enumerate(zip(block.members, reply.value, strict=True)):
            request = read[index]
            if np.isnan(proba).any():
                outcomes[places[index]] = model.refused(block.matrix[row])
                continue
            outcomes[places[index]] = _result(
                request.query, model, block.matrix[row], proba, reply, request.degraded,
                asks[places[index]].began, request.freshness)
        return [outcome for outcome in outcomes if outcome is not None]

    def _ask_links(self, decision: RouteDecision, start: Callable[[DeployedModel], Future[Any]],
                   deadline_s: float) -> Answer:
        """``answer`` over the decision's links, each begun by ``start`` on this thread (the
        request's own work; it returns the future of the batch its rows joined). What the
        links raised, at once or in their futures, tells overload from lateness when none
        answers (``_no_answer``)."""
        raised: list[Exception] = []

        def begin(link: DeployedModel) -> Future[Any]:
            try:
                future = start(link)
            except Exception as exc:
                raised.append(exc)
                raise
            future.add_done_callback(lambda done: _note_failure(done, raised))
            return future

        try:
            return answer(decision, Started(begin), deadline_s, executor=self._inline,
                          fallback_reserve_s=fallback_reserve(decision, deadline_s,
                                                              self.settings.deadline_s))
        except NoAnswer as exc:
            raise _no_answer(exc, raised, 1 + len(decision.fallbacks)) from None

    def _with_online(self, queries: Sequence[ScoreQuery], loaded: Sequence[LoadedModel],
                     deadline: float) -> list[_Request | Exception]:
        """Each query with its entity's aggregates for every feature set of ``loaded``
        (one round trip per set for all queries), or why it cannot be scored."""
        online: list[dict[str, Mapping[str, Any] | None]] = [{} for _ in queries]
        degraded = [False] * len(queries)
        freshness: list[Freshness | None] = [None] * len(queries)
        failed: dict[int, Exception] = {}
        first = loaded[0].feature_set_id
        for model in {m.feature_set_id: m for m in loaded if m.schema.aggregate_columns}.values():
            fsid = model.feature_set_id
            for index, read in enumerate(self._read_online(queries, model)):
                if isinstance(read, Exception):
                    failed.setdefault(index, read)
                    continue
                online[index][fsid], down, fresh = read
                degraded[index] = degraded[index] or down
                freshness[index] = fresh if fsid == first else freshness[index]
        limit = self.settings.max_feature_age_s
        return [failed.get(index) or _Request(
            query, online[index], deadline, degraded[index] or _stale(freshness[index], limit),
            freshness[index]) for index, query in enumerate(queries)]

    def _online_for(self, model: LoadedModel, requests: Sequence[_Request]
                    ) -> tuple[list[_Request], dict[int, Exception]]:
        """The requests with the model's own feature set's aggregates, read now if the
        primary's read did not bring them (a fallback of another set), and the requests
        whose read failed (by place)."""
        fsid = model.feature_set_id
        if not model.schema.aggregate_columns or fsid in requests[0].online:
            return list(requests), {}
        read: list[_Request] = []
        failed: dict[int, Exception] = {}
        for index, (request, got) in enumerate(zip(
                requests, self._read_online([r.query for r in requests], model), strict=True)):
            if isinstance(got, Exception):
                failed[index] = got
                got = (None, False, None)
            row, down, _ = got
            read.append(replace(request, online={**request.online, fsid: row},
                                degraded=request.degraded or down))
        return read, failed

    def _read_online(self, queries: Sequence[ScoreQuery], model: LoadedModel
                     ) -> list[tuple[Mapping[str, Any] | None, bool, Freshness | None] | Exception]:
        """Each entity's aggregates (None: no past), whether Redis was down, and how fresh
        they are: from the entity state at the request's time where the stream keeps one,
        else from the latest row the batch wrote (freshness unknown)."""
        try:
            reads = self._read_state(queries, model)
            missing = [i for i, read in enumerate(reads) if read is None]
            latest = self._read_latest([queries[i].entity_id for i in missing], model)
            for index, row in zip(missing, latest, strict=True):
                reads[index] = (row, False, None)
            return [read for read in reads if read is not None]
        except REDIS_DOWN as exc:
            logger.warning("online store unreachable (%s): scoring degraded", exc)
            return [_without_store(query, model) for query in queries]

    def _read_state(self, queries: Sequence[ScoreQuery], model: LoadedModel
                    ) -> list[tuple[Mapping[str, Any] | None, bool, Freshness | None]
                              | Exception | None]:
        """From the entity state, where the stream keeps one and it is ready (None: an
        entity to read from the latest rows)."""
        if model.stream is None or self.state is None or not self._state_ready(
                model.feature_set_id):
            return [None] * len(queries)
        held = self.state.read(model.feature_set_id, [query.entity_id for query in queries])
        return [None if entries is None else _stream_read(model.stream, entries, query)
                for entries, query in zip(held, queries, strict=True)]

    def _state_ready(self, feature_set_id: str) -> bool:
        """Whether the set's entity state has its batch written (until then the latest
        rows answer): asked of the store at most once a second, remembered once true."""
        if feature_set_id in self._ready_sets or self.state is None:
            return self.state is not None
        now = time.monotonic()
        if now - self._ready_asked.get(feature_set_id, -1.0) < 1.0:
            return False
        self._ready_asked[feature_set_id] = now
        if self.state.is_ready(feature_set_id):
            self._ready_sets.add(feature_set_id)
            return True
        return False

    def _read_latest(self, entity_ids: Sequence[str], model: LoadedModel
                     ) -> list[Mapping[str, Any] | None]:
        """The entities' latest online rows (None: no past)."""
        if not entity_ids:
            return []
        try:
            rows = self.online.read(model.feature_set_id, entity_ids)
        except NotFound:
            return [None] * len(entity_ids)  # nothing materialized yet: every entity is new
        columns = model.schema.aggregate_columns
        return [None if row is None else {c: row[c] for c in columns if c in row}
                for row in rows]

    def _observe(self, queries: Sequence[ScoreQuery]) -> None:
        _hand_each(self.on_observed, ((query,) for query in queries if query.observe),
                   "observing %d records", len(queries))

    def _report_inferred(self, result: InferResult) -> None:
        _hand_each(self.on_inferred, ((result,),),
                   "reporting an inference of %d rows", len(result.probabilities))

    def _report(self, queries: Sequence[ScoreQuery], results: Sequence[ScoreResult]) -> None:
        _hand_each(self.on_served, zip(queries, results, strict=True),
                   "reporting %d scores", len(results))


def _hand_each(callback: Callable[..., None] | None, calls: Iterable[tuple[Any, ...]],
               what: str, count: int) -> None:
    """``callback(*args)`` for each call's args; an error is logged (``what % count``
    failed) and never raised: the request it reports on was answered."""
    if callback is None:
        return
    try:
        for args in calls:
            callback(*args)
    except Exception:
        logger.exception(what + " failed", count)


@dataclass(frozen=True)
class Freshness:
    """How old an entity's online features are at a request's time, in seconds."""

    age_s: float | None
    """Of the entity's last record (None: none at or before the request's time)."""
    ages_s: Mapping[str, float]
    """Per aggregate, of the newest record its window counts (an empty window: absent)."""


def _stream_values(plan: StreamPlan, held: Sequence[Entry],
                   query: ScoreQuery) -> tuple[dict[str, float], bool, Freshness]:
    """The aggregates at the request's time (its timestamp field, else now), and their
    freshness then."""
    try:
        at = None if plan.timestamp is None else timestamp_us(query.fields.get(plan.timestamp))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"field {plan.timestamp}: not a timestamp ({exc})") from None
    at = time.time_ns() // 1_000 if at is None else at
    last = last_record_us(held, at)
    aggregates, ages_s = plan.read_at(held, at)
    values = {c: v for c, v in aggregates.items()
              if c not in query.fields}  # a value the request carries wins, as before
    ages = {c: age for c, age in ages_s.items() if age is not None}
    return values, False, Freshness(None if last is None else (at - last) / 1e6, ages)


def _stream_read(plan: StreamPlan, held: Sequence[Entry], query: ScoreQuery
                 ) -> tuple[dict[str, float], bool, Freshness] | Exception:
    try:
        return _stream_values(plan, held, query)
    except InvalidInput as exc:  # this request's timestamp: its own error, not the batch's
        return exc


def _without_store(query: ScoreQuery, model: LoadedModel
                   ) -> tuple[None, bool, None] | Exception:
    """With the online store down: scored degraded if the request carries its aggregates,
    else ``FeaturesUnavailable`` naming what it lacks."""
    schema = model.schema
    if schema.carries_aggregates(query.fields):
        return None, True, None
    missing = [c for c in schema.aggregate_columns if c not in query.fields]
    return FeaturesUnavailable(model.feature_set_id, missing)


def _block_of(model: LoadedModel, requests: Sequence[_Request],
              failed: Mapping[int, Exception], *, check: bool) -> _Block:
    """``model.block`` of the requests not in ``failed`` (places kept), those with their
    errors; raises when none is left."""
    if not failed:
        return model.block(requests, check=check)
    keep = [index for index in range(len(requests)) if index not in failed]
    if not keep:
        raise next(iter(failed.values()))
    inner = model.block([requests[index] for index in keep], check=check)
    return _Block(inner.matrix, [keep[member] for member in inner.members],
                  {**failed, **{keep[place]: error for place, error in inner.errors.items()}})


def _stale(freshness: Freshness | None, limit_s: float) -> bool:
    """Whether features are older than ``limit_s`` (0: no limit) at the request's time."""
    age = None if freshness is None else freshness.age_s
    return bool(limit_s) and age is not None and age > limit_s


def _every(outcomes: Sequence[Outcome | Exception | _Share[Outcome] | None]
           ) -> list[Outcome | Exception | _Share[Outcome]]:
    """The outcomes of a batch, every place of which has been given one."""
    assert all(outcome is not None for outcome in outcomes), "a call of the batch has no outcome"
    return [outcome for outcome in outcomes if outcome is not None]


def _stackable(rows: np.ndarray | list[dict[str, Any]], max_rows: int) -> bool:
    """Whether a ModelInfer call's rows may be stacked with other calls': a feature matrix
    of at most ``max_rows`` rows (raw records go through each call's own transform)."""
    return isinstance(rows, np.ndarray) and rows.ndim == 2 and len(rows) <= max_rows


def _infer_key(decision: RouteDecision, ask: _InferAsk) -> tuple[Any, ...]:
    """ModelInfer calls stacked together: routed alike, and matrices of one width (a call
    of raw records, or of another shape, is a group of its own)."""
    rows = ask.rows
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return (*_group_key(decision), rows.shape[1])
    return (*_group_key(decision), id(ask))


def _infer_result(ask: _InferAsk, values: np.ndarray, model: LoadedModel, reply: Any,
                  inputs: np.ndarray) -> InferResult | Exception:
    """One call's rows of a stacked answer (``inputs``: the rows the model was given), or
    which of them the model refused."""
    refused = np.flatnonzero(np.isnan(values).any(axis=1))
    if len(refused):
        return InvalidInput(f"rows {', '.join(map(str, refused[:10]))}: model version "
                            f"{reply.version} cannot score their values (too large, or "
                            "missing where it takes no missing value)")
    return InferResult(values, model.classes, reply.version, reply.fallback,
                       reply.fallback_reason, reply.fallback_kind, reply.role,
                       (time.perf_counter() - ask.began) * 1e3,
                       ask.request_id, inputs, model.feature_names)


def _group_key(decision: RouteDecision) -> tuple[Any, ...]:
    """What calls routed alike share: their links in order, why, and the shadow."""
    shadow = None if decision.shadow is None else decision.shadow.version
    return (decision.primary.version, *(link.version for link in decision.fallbacks),
            decision.fallback, decision.reason, shadow)


def fallback_reserve(decision: RouteDecision, deadline_s: float, default_s: float
                     ) -> float:
    """The time ``answer`` keeps back from the primary for the fallbacks. While one of
    them has a closed circuit, the primary gets half of the call's deadline, or half of
    the default deadline (``CoreSettings.deadline_s``) if the call's is longer: a client
    that can wait seconds still gets the previous model's answer when the champion is
    slow, not the champion's seconds later. None (0) when every fallback is a last resort
    (its circuit open) or there is none, so the primary may use the whole deadline
    instead of giving part of it to a link known to be failing."""
    healthy = any(link.breaker.state is CircuitState.CLOSED for link in decision.fallbacks)
    return deadline_s - min(deadline_s, default_s) / 2 if healthy else 0.0


class Started:
    """A link call in two halves: ``start(link)`` does the request's own work on the
    caller's thread and returns the future of the batch its row joined. Called whole (a
    shadow on the pool), it waits for that future."""

    def __init__(self, start: Callable[[DeployedModel], Future[Any]]) -> None:
        self.start = start

    def __call__(self, link: DeployedModel) -> Any:
        return self.start(link).result()


class InlineStart(Executor):
    """The executor ``answer`` runs links on: a ``Started`` call is started on the
    request's own thread and its batch's future handed back, so ``answer`` waits for the
    batch itself (its deadline cancels the queued row) with no thread in between. Anything
    else (a shadow) runs on ``pool``."""

    def __init__(self, pool: Executor) -> None:
        self.pool = pool

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if isinstance(fn, Started):
            return fn.start(*args, **kwargs)
        return self.pool.submit(fn, *args, **kwargs)


EXTREME = 1e100
"""A feature value beyond this is named when a model refuses a row (1e308 squared, or
scaled by a small deviation, overflows)."""
_REFUSED_VALUES = ("Input X contains", "Input contains", "Input y contains")


def _refuses_values(exc: ValueError) -> bool:
    """Whether scikit-learn's input check refused the values (infinity, too large, NaN)."""
    return str(exc).startswith(_REFUSED_VALUES)


ARRAY_CHECK_ROWS = 16
"""Rows a model fitted on DataFrames must answer identically as arrays (zeros, ones and
seeded normal values) to be given arrays."""


def _fitted_on_frames(estimator: Any) -> bool:
    """Whether a model learnt its features' names in fit (``feature_names_in_``). A
    compiled model takes arrays (its trees use positions) and answers
    ``feature_names_in_`` from the estimator it was built from."""
    return not isinstance(estimator, CompiledTrees) and hasattr(estimator, "feature_names_in_")


def _frame_input(estimator: Any, names: Sequence[str]) -> bool:
    """Whether a model is to be given DataFrames with the feature names: one that learnt
    them in fit (``feature_names_in_``, as every model Conveyor trains), unless it learnt
    exactly ``names`` in this order and answers plain arrays of ``ARRAY_CHECK_ROWS``
    exactly (bit for bit) as it answers them as DataFrames. Such a model gets arrays, and
    scikit-learn's warning that they have no names is silenced for it: the order was
    checked. Two predicts of those rows (part of the warm-up)."""
    if not _fitted_on_frames(estimator):
        return False
    if list(estimator.feature_names_in_) != list(names):
        return True
    _silence_unnamed_array_warning()
    rows = np.vstack([np.zeros(len(names)), np.ones(len(names)),
                      np.random.default_rng(0).normal(size=(ARRAY_CHECK_ROWS - 2, len(names)))])
    try:
        as_frames = estimator.predict_proba(pd.DataFrame(rows, columns=list(names)))
        as_arrays = estimator.predict_proba(rows)
    except Exception as exc:  # noqa: BLE001 - any refusal keeps the DataFrames
        logger.info("predicting on DataFrames: plain arrays were not checked (%s: %s)",
                    type(exc).__name__, exc)
        return True
    return not np.array_equal(np.asarray(as_frames), np.asarray(as_arrays), equal_nan=True)


def _silence_unnamed_array_warning() -> None:
    """scikit-learn warns on each plain array given to a model fitted on a DataFrame
    ('X does not have valid feature names'); process-wide, once, as ``warnings`` filters
    are not thread-safe to set around each call. Only ``_frame_input``'s checked models
    get arrays in a scoring process."""
    warnings.filterwarnings("ignore", message="X does not have valid feature names",
                            category=UserWarning, module=r"sklearn\.")


def _freeze_heap() -> None:
    """Collect what is garbage now (retired models: unfrozen first), freeze the rest."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _rows_in(item: np.ndarray) -> int:
    """Rows in a batcher item: a feature row, or a 2-D block of rows."""
    return len(item) if item.ndim == 2 else 1


def _note_failure(done: Future[Any], raised: list[Exception]) -> None:
    if not done.cancelled() and isinstance(error := done.exception(), Exception):
        raised.append(error)


_OPENMP = threading.local()


def _one_openmp_thread() -> None:
    """Predict on one OpenMP thread (set once per thread): HistGradientBoosting's default of
    one per core spins against the server's other threads, ~10x slower on a busy machine;
    throughput comes from batching and from concurrent requests instead."""
    if not getattr(_OPENMP, "limited", False):
        threadpool_limits(limits=1, user_api="openmp")
        _OPENMP.limited = True


class LateAnswer(NoAnswer):
    """No link answered before the deadline: every one was too slow or never asked."""

    status = Status.DEADLINE_EXCEEDED


def _no_answer(exc: NoAnswer, raised: Sequence[Exception], links: int) -> ConveyorError:
    """Every link overloaded: RESOURCE_EXHAUSTED; only too slow: DEADLINE_EXCEEDED."""
    overloads = [e for e in raised if isinstance(e, Overloaded)]
    if len(overloads) == links:
        return overloads[0]
    if all(isinstance(e, DeadlineExceeded) for e in raised):  # expired in a queue, or none
        return LateAnswer(exc.failures)
    return exc


class InFlight:
    """Requests in flight, counted by the epoch they began in, so that a retirement can
    wait for exactly the requests that might have picked the retired version."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._epoch = 0
        self._active: Counter[int] = Counter()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one request in flight for the block's length."""
        with self._cond:
            epoch = self._epoch
            self._active[epoch] += 1
        try:
            yield
        finally:
            with self._cond:
                self._active[epoch] -= 1
                if not self._active[epoch]:
                    del self._active[epoch]
                    self._cond.notify_all()

    def wait_for_earlier(self, timeout_s: float) -> bool:
        """Wait until every request that began before this call has ended (False: timeout)."""
        with self._cond:
            self._epoch += 1
            boundary = self._epoch
            return self._cond.wait_for(lambda: all(e >= boundary for e in self._active),
                                       timeout_s)


def _result(
    query: ScoreQuery, model: LoadedModel, row: np.ndarray, proba: np.ndarray, reply: Any,
    degraded: bool, began: float, freshness: Freshness | None = None,
) -> ScoreResult:
    classes = model.classes
    probabilities = {label: float(p) for label, p in zip(classes, proba, strict=True)}
    return ScoreResult(
        score=float(proba[-1]), label=classes[int(np.argmax(proba))],
        probabilities=probabilities, version=reply.version, fallback=reply.fallback,
        fallback_reason=reply.fallback_reason, fallback_kind=reply.fallback_kind, role=reply.role,
        latency_ms=(time.perf_counter() - began) * 1e3,
        request_id=query.request_id or uuid.uuid4().hex, degraded=degraded,
        feature_age_s=None if freshness is None else freshness.age_s,
        feature_ages_s={} if freshness is None else freshness.ages_s,
        features=dict(zip(model.feature_names, row.tolist(), strict=True)),
    )
