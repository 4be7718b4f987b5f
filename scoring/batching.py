"""Micro-batching of predict calls per model, with an adaptive batch size (Clipper's AIMD).

One ``MicroBatcher`` serves one deployed model version. Callers on any thread ``submit`` a
row and get a ``concurrent.futures.Future``; one collector thread per batcher takes up to
the current batch size from a bounded queue (waiting at most ``max_wait_s`` for more after
the first row), calls ``predict_batch`` once, and resolves each future with its own result.
The latency of every batch feeds ``AdaptiveBatchSize``: the size grows additively while
batches stay within the latency budget and halves when one breaks it.

Concurrency model: threads. A thread-pool gRPC server blocks on ``future.result()``; a
``grpc.aio`` servicer awaits ``submit_async`` (``asyncio.wrap_future``), so predict runs on
the collector thread and never blocks the event loop. Cancelling the future (or the
awaiting task) before its batch runs drops the row from the batch. With ``inline`` (the
thread-pool server's choice, never an event loop's), a row that finds the model idle,
whose last batch was fast against the row's deadline, is predicted on the caller's own
thread: a lone request saves the two thread hand-offs; rows arriving meanwhile queue and
are batched by the collector as soon as it is done.

Overload fails fast: a full queue makes ``submit`` raise ``Overloaded``
(RESOURCE_EXHAUSTED). A row whose deadline (on the batcher's clock) has passed when its
batch is formed fails with ``DeadlineExceeded`` and is never predicted::

    size = AdaptiveBatchSize(latency_budget_s=0.005, maximum=64)
    batcher = MicroBatcher("fraud:v3", model.predict_rows, max_queue=1024,
                           batch_size=size, max_wait_s=0.002)
    future = batcher.submit(row, deadline=time.monotonic() + 0.020)
    score = future.result()                      # or: await batcher.submit_async(row)
    batcher.close()                              # fails what is still queued
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

from common.errors import ConveyorError, Status

logger = logging.getLogger(__name__)

Row = TypeVar("Row")
Result = TypeVar("Result")


class Overloaded(ConveyorError):
    """The model's request queue is full: refused at once rather than answered late."""

    status = Status.RESOURCE_EXHAUSTED

    def __init__(self, model: str, max_queue: int):
        self.model, self.max_queue = model, max_queue
        super().__init__(f"model {model} is overloaded: its queue of {max_queue} requests is full")


class DeadlineExceeded(ConveyorError):
    """The request's deadline passed before its batch ran, so it was never predicted."""

    status = Status.DEADLINE_EXCEEDED

    def __init__(self, model: str, late_by_s: float):
        self.model, self.late_by_s = model, late_by_s
        super().__init__(
            f"deadline exceeded for model {model}: {late_by_s * 1000:.1f} ms late, not predicted"
        )


class BatcherClosed(ConveyorError):
    """The model's batcher is shut down (undeployed or swapped out)."""

    status = Status.UNAVAILABLE

    def __init__(self, model: str):
        self.model = model
        super().__init__(f"model {model} is shutting down: request not predicted")


class BatchResultMismatch(ConveyorError):
    """predict_batch returned a different number of results than rows: a model bug."""

    status = Status.INTERNAL

    def __init__(self, model: str, rows: int, results: int):
        self.model, self.rows, self.results = model, rows, results
        super().__init__(f"model {model} returned {results} results for a batch of {rows} rows")


class AdaptiveBatchSize:
    """Additive-increase / multiplicative-decrease batch size, as in Clipper. Pure.

    >>> size = AdaptiveBatchSize(latency_budget_s=0.01, initial=4, maximum=8)
    >>> size.observe(batch_size=4, latency_s=0.002)   # a full batch within budget: grow
    5
    >>> size.observe(batch_size=5, latency_s=0.050)   # over budget: halve
    2
    """

    def __init__(
        self,
        latency_budget_s: float,
        *,
        initial: int = 1,
        minimum: int = 1,
        maximum: int = 256,
        increase: int = 1,
        decrease_factor: float = 0.5,
    ):
        _check_limits(latency_budget_s, initial, minimum, maximum, increase, decrease_factor)
        self.latency_budget_s, self.minimum, self.maximum = latency_budget_s, minimum, maximum
        self.increase, self.decrease_factor = increase, decrease_factor
        self._size = initial

    @property
    def size(self) -> int:
        """The largest batch the collector takes next."""
        return self._size

    def observe(self, batch_size: int, latency_s: float) -> int:
        """Feed one batch's size and latency; return the new size."""
        if latency_s > self.latency_budget_s:
            self._size = self._clamp(int(self._size * self.decrease_factor))
        elif batch_size >= self._size:
            # Grow only on a full batch: a small batch under light load says nothing about
            # whether a larger one would hold the budget (it would drift up to maximum).
            self._size = self._clamp(self._size + self.increase)
        return self._size

    def _clamp(self, size: int) -> int:
        return max(self.minimum, min(self.maximum, size))


def _check_limits(
    budget: float, initial: int, minimum: int, maximum: int, increase: int, factor: float
) -> None:
    if budget <= 0:
        raise ValueError(f"latency_budget_s must be positive, got {budget}")
    if not 1 <= minimum <= initial <= maximum:
        raise ValueError(
            f"need 1 <= minimum <= initial <= maximum, got {minimum}/{initial}/{maximum}"
        )
    if increase < 1 or not 0 < factor < 1:
        raise ValueError(f"need increase >= 1 and 0 < decrease_factor < 1, got {increase}/{factor}")


def linger_target(busy_only: bool, last_items: int, size: int) -> int:
    """How many queued items the collector waits for (up to ``max_wait_s``) before it
    takes a batch: a full batch (``size``); with ``busy_only``, none more after a batch of
    one (a lone caller never waits for company that is not coming).

    >>> linger_target(False, 1, 8), linger_target(True, 1, 8), linger_target(True, 5, 8)
    (8, 1, 8)
    """
    return 1 if busy_only and last_items <= 1 else size


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot for metrics."""

    batches: int
    """Batches passed to predict_batch."""
    predicted: int
    """Rows passed to predict_batch."""
    failed_batches: int
    """Batches whose predict raised or returned the wrong number of results."""
    expired: int
    """Rows failed with DeadlineExceeded without being predicted."""
    rejected: int
    """Submits refused with Overloaded."""
    current_batch_size: int
    queue_depth: int

    @property
    def mean_batch_size(self) -> float:
        """Rows per batch over the batcher's life; 0.0 before the first batch."""
        return self.predicted / self.batches if self.batches else 0.0


@dataclass
class _Counters:
    batches: int = 0
    predicted: int = 0
    failed_batches: int = 0
    expired: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class _Pending(Generic[Row, Result]):
    row: Row
    future: Future[Result]
    deadline: float | None


_Taken = tuple[list[_Pending[Row, Result]], list[_Pending[Row, Result]]]
"""Rows to predict, and rows whose deadline passed in the queue."""
INLINE_MARGIN = 4
"""An inline predict needs this many times the last batch's latency left before the
row's deadline (the router gives the primary link about half of the deadline)."""


class MicroBatcher(Generic[Row, Result]):
    """One model's bounded request queue and the collector thread that batches it.

    ``predict_batch`` gets a list of rows and returns one result per row, in order (wrap a
    DataFrame model as ``lambda rows: list(model.predict(pd.DataFrame(rows)))``).
    ``deadline`` values and ``max_wait_s`` are read on ``clock``, so a custom clock must
    tick in seconds; ``clock`` also times each batch for ``batch_size``. ``on_batch`` is
    called with the number of rows of each predict call (metrics); it must be quick.
    With ``busy_only`` the collector lingers only while other callers are about (the last
    batch had several items, see ``linger_target``): a lone caller never waits.
    ``rows_of`` counts the rows of an item that holds several (default: one each), for
    ``on_batch`` and the stats; the batch size counts items. With ``inline`` a row that
    finds the model idle and fast is predicted on its caller's thread (``_runs_inline``).
    With ``quiet_s`` the collector lingers only while rows keep coming: it takes the batch
    as soon as ``quiet_s`` passes with no new row (still at most ``max_wait_s`` in all).
    """

    def __init__(
        self,
        model: str,
        predict_batch: Callable[[list[Row]], Sequence[Result]],
        *,
        max_queue: int,
        batch_size: AdaptiveBatchSize,
        max_wait_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int], None] | None = None,
        busy_only: bool = False,
        rows_of: Callable[[Row], int] | None = None,
        inline: bool = False,
        quiet_s: float | None = None,
    ):
        if max_queue < 1 or max_wait_s < 0 or (quiet_s is not None and quiet_s <= 0):
            raise ValueError(f"need max_queue >= 1, max_wait_s >= 0 and quiet_s > 0 for "
                             f"model {model}")
        self.model, self.max_queue, self.max_wait_s = model, max_queue, max_wait_s
        self.quiet_s = quiet_s
        self.busy_only, self._last_items, self._rows_of = busy_only, 0, rows_of
        self.inline = inline
        self._busy = False  # a batch is predicting (on the collector or a caller)
        self._recent_s: float | None = None  # how long the last batch took
        self._wanted = batch_size.maximum  # rows the lingering collector waits for
        self.batch_size, self._predict, self._clock = batch_size, predict_batch, clock
        self._on_batch = on_batch
        self._queue: deque[_Pending[Row, Result]] = deque()
        self._cond = threading.Condition()
        self._closed, self._counters = False, _Counters()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{model}", daemon=True)
        self._thread.start()

    # -- callers -------------------------------------------------------------------------

    def submit(self, row: Row, *, deadline: float | None = None) -> Future[Result]:
        """Queue one row; raise ``Overloaded`` at once if the queue is full. With
        ``inline``, a row that finds the model idle is predicted here, on the caller's
        thread, and its future comes back done (see ``_runs_inline``)."""
        pending: _Pending[Row, Result] = _Pending(row, Future(), deadline)
        with self._cond:
            self._admit()
            inline = self._runs_inline(deadline)
            self._busy = self._busy or inline
            if not inline:
                self._queue.append(pending)
                if len(self._queue) == 1 or len(self._queue) >= self._wanted:
                    self._cond.notify()  # the collector waits for a first row, or for _wanted
        if inline:
            pending.future.set_running_or_notify_cancel()
            self._run_batch([pending])
        return pending.future

    def submit_async(self, row: Row, *, deadline: float | None = None) -> asyncio.Future[Result]:
        """``submit`` for asyncio callers (grpc.aio); call it from inside the event loop."""
        return asyncio.wrap_future(self.submit(row, deadline=deadline))

    def idle(self, deadline: float | None = None) -> bool:
        """Whether a row submitted now, with this deadline, would be predicted at once on
        the caller's thread (``inline``, see ``_runs_inline``): the caller would not wait."""
        with self._cond:
            return self._runs_inline(deadline)

    def stats(self) -> BatcherStats:
        """Counters, current batch size and queue depth, read consistently."""
        with self._cond:
            size, depth = self.batch_size.size, len(self._queue)
            return BatcherStats(
                **asdict(self._counters), current_batch_size=size, queue_depth=depth
            )

    def close(self, *, drain: bool = False, timeout_s: float | None = None) -> None:
        """Stop taking rows; fail queued ones with ``BatcherClosed`` (or, with ``drain``,
        predict them first); wait for the batch in flight and the collector to end."""
        with self._cond:
            self._closed = True
            dropped = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        _fail_queued(dropped, BatcherClosed(self.model))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def __enter__(self) -> MicroBatcher[Row, Result]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _runs_inline(self, deadline: float | None) -> bool:
        """Whether a row is predicted on its caller's thread: the model is idle (nothing
        queued, no batch predicting) and its last batch took at most 1/``INLINE_MARGIN``
        of the row's time left, so the caller can afford to wait for it rather than be
        able to give up. The two thread hand-offs of a lone request (to the collector and
        back) cost about half a predict of one row; a model with no batch yet, or slow,
        goes through the collector, whose queued rows a deadline can abandon."""
        if not self.inline or self._busy or self._queue or self._recent_s is None:
            return False
        return deadline is None or self._recent_s * INLINE_MARGIN <= deadline - self._clock()

    def _admit(self) -> None:
        if self._closed:
            raise BatcherClosed(self.model)
        if len(self._queue) >= self.max_queue:
            self._counters.rejected += 1
            raise Overloaded(self.model, self.max_queue)

    # -- collector -----------------------------------------------------------------------

    def _run(self) -> None:
        while (taken := self._next_batch()) is not None:
            self._run_taken(*taken)
            taken = None  # nothing of this batch is held while waiting for the next

    def _run_taken(self, live: list[_Pending[Row, Result]],
                   expired: list[_Pending[Row, Result]]) -> None:
        self._expire(expired)
        if live:
            self._run_batch(live)

    def _next_batch(self) -> _Taken[Row, Result] | None:
        """Block for a first row, linger up to max_wait_s for a full batch, take it."""
        with self._cond:
            while (not self._queue or self._busy) and not self._closed:
                self._cond.wait()  # a batch predicting inline: queued rows wait for it
            if not self._queue:
                return None
            self._linger(linger_target(self.busy_only, self._last_items, self.batch_size.size))
            live, expired = self._take(self.batch_size.size)
            self._busy = bool(live)
            return live, expired

    def _linger(self, target: int) -> None:
        """Wait for ``target`` queued rows, up to ``max_wait_s``; with ``quiet_s``, only
        while each slice of ``quiet_s`` brings at least one more row."""
        until = self._clock() + self.max_wait_s
        self._wanted = target
        while len(self._queue) < target and not self._closed:
            remaining = until - self._clock()
            if remaining <= 0:
                break
            before = len(self._queue)
            self._cond.wait(remaining if self.quiet_s is None else min(self.quiet_s, remaining))
            if self.quiet_s is not None and len(self._queue) == before:
                break  # nobody came for quiet_s: take what is here
        self._wanted = self.batch_size.maximum

    def _take(self, size: int) -> _Taken[Row, Result]:
        """Up to ``size`` live rows; rows past their deadline are set aside, not counted;
        rows whose caller cancelled are dropped."""
        now = self._clock()
        live: list[_Pending[Row, Result]] = []
        expired: list[_Pending[Row, Result]] = []
        while self._queue and len(live) < size:
            pending = self._queue.popleft()
            if not pending.future.set_running_or_notify_cancel():
                continue
            late = pending.deadline is not None and pending.deadline <= now
            (expired if late else live).append(pending)
        return live, expired

    def _expire(self, expired: list[_Pending[Row, Result]]) -> None:
        now = self._clock()
        for pending in expired:
            late_by = now - pending.deadline if pending.deadline is not None else 0.0
            pending.future.set_exception(DeadlineExceeded(self.model, late_by))
        with self._cond:
            self._counters.expired += len(expired)

    def _run_batch(self, batch: list[_Pending[Row, Result]]) -> None:
        started = self._clock()
        try:
            results = self._predict([pending.row for pending in batch])
            if len(results) != len(batch):
                raise BatchResultMismatch(self.model, len(batch), len(results))
        except Exception as exc:  # a model fault fails this batch, never the collector
            logger.warning(
                "predict failed for model %s (batch of %d)", self.model, len(batch), exc_info=True
            )
            self._record(batch, failed=True)
            _fail_all(batch, exc)
            return
        self._record(batch, failed=False, latency_s=self._clock() - started)
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)

    def _record(self, batch: list[_Pending[Row, Result]], *, failed: bool,
                latency_s: float | None = None) -> None:
        count = self._rows_of
        rows = len(batch) if count is None else sum(count(pending.row) for pending in batch)
        if self._on_batch is not None:
            try:
                self._on_batch(rows)
            except Exception:  # metrics must never stop the collector
                logger.exception("on_batch failed for model %s", self.model)
        with self._cond:
            self._last_items, self._busy = len(batch), False
            self._counters.batches += 1
            self._counters.predicted += rows
            self._counters.failed_batches += failed
            if latency_s is not None:
                self._recent_s = latency_s
                self.batch_size.observe(len(batch), latency_s)
            if self._queue:
                self._cond.notify()  # rows queued behind an inline batch: the collector


def _fail_all(batch: Sequence[_Pending[Row, Result]], exc: BaseException) -> None:
    """Fail rows of a batch in flight: their futures are running, so none can be cancelled."""
    for pending in batch:
        pending.future.set_exception(exc)


def _fail_queued(queued: Sequence[_Pending[Row, Result]], exc: BaseException) -> None:
    """Fail rows never taken, skipping those their caller has cancelled meanwhile."""
    for pending in queued:
        if pending.future.set_running_or_notify_cancel():
            pending.future.set_exception(exc)
