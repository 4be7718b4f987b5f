"""Micro-batcher and AIMD batch size: batches form under concurrency, overload, deadlines.

The fake model blocks on an Event so requests pile up behind a batch in flight; tests wait
on events and futures, never on the clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from common.errors import Status
from scoring.batching import (
    AdaptiveBatchSize,
    BatcherClosed,
    BatchResultMismatch,
    DeadlineExceeded,
    MicroBatcher,
    Overloaded,
    linger_target,
)

WAIT_S = 5.0


class FakeModel:
    """Records each batch; holds every predict call until ``gate`` is set."""

    def __init__(self, on_predict: Callable[[list[int]], Sequence[int]] | None = None):
        self.batches: list[list[int]] = []
        self.entered, self.gate = threading.Event(), threading.Event()
        self.on_predict = on_predict or (lambda rows: [row * 10 for row in rows])

    def __call__(self, rows: list[int]) -> Sequence[int]:
        self.batches.append(list(rows))
        self.entered.set()
        assert self.gate.wait(WAIT_S), "test never opened the gate"
        return self.on_predict(rows)

    def hold_first(self, batcher: MicroBatcher[int, int], row: int = 0) -> Future[int]:
        """Submit ``row`` and wait until its batch is in predict, so later rows queue."""
        future = batcher.submit(row)
        assert self.entered.wait(WAIT_S)
        return future


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def model() -> Iterator[FakeModel]:
    fake = FakeModel()
    yield fake
    fake.gate.set()


@pytest.fixture
def make_batcher(model: FakeModel) -> Iterator[Callable[..., MicroBatcher[int, int]]]:
    made: list[MicroBatcher[int, int]] = []

    def make(**overrides: Any) -> MicroBatcher[int, int]:
        options: dict[str, Any] = {
            "max_queue": 64,
            "batch_size": AdaptiveBatchSize(1.0, initial=8, maximum=8),
            "max_wait_s": 0.0,
        }
        made.append(MicroBatcher("fraud:v3", model, **(options | overrides)))
        return made[-1]

    yield make
    model.gate.set()
    for batcher in made:
        batcher.close(timeout_s=WAIT_S)


def results(futures: Sequence[Future[int]]) -> list[int]:
    return [future.result(WAIT_S) for future in futures]


# -- AdaptiveBatchSize -------------------------------------------------------------------


def test_aimd_grows_additively_on_full_batches_within_budget() -> None:
    size = AdaptiveBatchSize(0.010, initial=4, increase=2)
    assert size.observe(batch_size=4, latency_s=0.005) == 6
    assert size.observe(batch_size=6, latency_s=0.010) == 8


def test_aimd_does_not_grow_on_a_partial_batch() -> None:
    size = AdaptiveBatchSize(0.010, initial=4)
    assert size.observe(batch_size=2, latency_s=0.001) == 4


def test_aimd_halves_over_budget() -> None:
    size = AdaptiveBatchSize(0.010, initial=9)
    assert size.observe(batch_size=9, latency_s=0.011) == 4
    assert size.observe(batch_size=1, latency_s=0.050) == 2


def test_aimd_is_clamped_to_its_limits() -> None:
    size = AdaptiveBatchSize(0.010, initial=3, minimum=2, maximum=4, increase=5)
    assert size.observe(batch_size=3, latency_s=0.0) == 4
    assert size.observe(batch_size=4, latency_s=0.0) == 4
    assert size.observe(batch_size=4, latency_s=1.0) == 2
    assert size.observe(batch_size=2, latency_s=1.0) == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latency_budget_s": 0.0},
        {"latency_budget_s": 0.01, "initial": 0, "minimum": 0},
        {"latency_budget_s": 0.01, "initial": 300},
        {"latency_budget_s": 0.01, "decrease_factor": 1.0},
        {"latency_budget_s": 0.01, "increase": 0},
    ],
)
def test_aimd_rejects_bad_limits(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AdaptiveBatchSize(**kwargs)


# -- MicroBatcher ------------------------------------------------------------------------


def test_concurrent_submits_behind_a_busy_model_form_one_batch(make_batcher, model) -> None:
    batcher = make_batcher()
    first = model.hold_first(batcher)
    with ThreadPoolExecutor(max_workers=6) as pool:
        submitted = list(pool.map(batcher.submit, range(1, 7)))
    model.gate.set()
    assert results([first, *submitted]) == [0, 10, 20, 30, 40, 50, 60]
    assert model.batches[0] == [0]
    assert sorted(model.batches[1]) == [1, 2, 3, 4, 5, 6]


def test_many_threads_each_get_their_own_result(make_batcher, model) -> None:
    model.gate.set()
    batcher = make_batcher(max_queue=2000, batch_size=AdaptiveBatchSize(1.0, maximum=32))
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda row: batcher.submit(row).result(WAIT_S), range(1000)))
    assert answers == [row * 10 for row in range(1000)]
    assert sorted(row for batch in model.batches for row in batch) == list(range(1000))
    assert batcher.stats().predicted == 1000


def test_each_request_gets_its_own_result_in_order(make_batcher, model) -> None:
    batcher = make_batcher()
    first = model.hold_first(batcher)
    futures = [batcher.submit(row) for row in range(1, 6)]
    model.gate.set()
    assert results([first, *futures]) == [0, 10, 20, 30, 40, 50]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]


def test_batches_never_exceed_the_current_size(make_batcher, model) -> None:
    batcher = make_batcher(batch_size=AdaptiveBatchSize(1.0, initial=2, maximum=2))
    first = model.hold_first(batcher)
    futures = [batcher.submit(row) for row in range(1, 6)]
    model.gate.set()
    results([first, *futures])
    assert model.batches == [[0], [1, 2], [3, 4], [5]]


def test_collector_lingers_up_to_max_wait_for_a_full_batch(make_batcher, model) -> None:
    model.gate.set()
    size = AdaptiveBatchSize(1.0, initial=4, minimum=4, maximum=4)
    batcher = make_batcher(batch_size=size, max_wait_s=60.0)
    assert results([batcher.submit(row) for row in range(4)]) == [0, 10, 20, 30]
    assert model.batches == [[0, 1, 2, 3]]


def test_a_lone_request_goes_after_max_wait(make_batcher, model) -> None:
    model.gate.set()
    batcher = make_batcher(max_wait_s=0.01)
    assert batcher.submit(7).result(WAIT_S) == 70
    assert model.batches == [[7]]


def test_slow_batches_shrink_the_size() -> None:
    clock = FakeClock()

    def slow_then_fast(rows: list[int]) -> list[int]:
        clock.now += 2.0 if rows[0] == 0 else 0.0
        return rows

    slow = FakeModel(slow_then_fast)
    slow.gate.set()
    size = AdaptiveBatchSize(1.0, initial=8, maximum=16)
    batcher = MicroBatcher("fraud:v3", slow, max_queue=8, batch_size=size, clock=clock)
    assert batcher.submit(0).result(WAIT_S) == 0
    assert batcher.stats().current_batch_size == 4
    batcher.close()


def test_fast_full_batches_grow_the_size(make_batcher, model) -> None:
    batcher = make_batcher(batch_size=AdaptiveBatchSize(1.0, initial=1, maximum=8))
    first = model.hold_first(batcher)
    queued = [batcher.submit(1), batcher.submit(2)]
    model.gate.set()
    results([first, *queued])
    assert model.batches == [[0], [1, 2]]
    assert batcher.stats().current_batch_size == 3


def test_a_full_queue_fails_fast_with_resource_exhausted(make_batcher, model) -> None:
    batcher = make_batcher(max_queue=2)
    model.hold_first(batcher)
    queued = [batcher.submit(1), batcher.submit(2)]
    with pytest.raises(Overloaded) as refused:
        batcher.submit(3)
    assert refused.value.status is Status.RESOURCE_EXHAUSTED
    assert str(refused.value) == "model fraud:v3 is overloaded: its queue of 2 requests is full"
    stats = batcher.stats()
    assert (stats.rejected, stats.queue_depth) == (1, 2)
    model.gate.set()
    assert results(queued) == [10, 20]


def test_a_request_past_its_deadline_is_failed_and_not_predicted(model) -> None:
    clock = FakeClock(100.0)
    size = AdaptiveBatchSize(1000.0, initial=8)
    batcher = MicroBatcher("fraud:v3", model, max_queue=8, batch_size=size, clock=clock)
    model.hold_first(batcher)
    late = batcher.submit(1, deadline=101.0)
    on_time = batcher.submit(2, deadline=200.0)
    clock.now = 150.0
    model.gate.set()
    with pytest.raises(DeadlineExceeded, match="fraud:v3: 49000.0 ms late") as exc:
        late.result(WAIT_S)
    assert exc.value.status is Status.DEADLINE_EXCEEDED
    assert on_time.result(WAIT_S) == 20
    assert model.batches == [[0], [2]]
    assert batcher.stats().expired == 1
    batcher.close()


def test_a_cancelled_request_is_not_predicted(make_batcher, model) -> None:
    batcher = make_batcher()
    model.hold_first(batcher)
    cancelled, kept = batcher.submit(1), batcher.submit(2)
    assert cancelled.cancel()
    model.gate.set()
    assert kept.result(WAIT_S) == 20
    assert model.batches == [[0], [2]]


def test_a_failing_batch_fails_each_request_and_the_collector_goes_on() -> None:
    def explode(rows: list[int]) -> list[int]:
        if 1 in rows:
            raise ValueError("model blew up")
        return rows

    model = FakeModel(explode)
    batcher = MicroBatcher("fraud:v3", model, max_queue=8, batch_size=AdaptiveBatchSize(1.0))
    first = model.hold_first(batcher, row=1)
    model.gate.set()
    with pytest.raises(ValueError, match="model blew up"):
        first.result(WAIT_S)
    assert batcher.submit(5).result(WAIT_S) == 5
    assert batcher.stats().failed_batches == 1
    batcher.close()


def test_a_batch_with_the_wrong_number_of_results_fails_each_request() -> None:
    model = FakeModel(lambda rows: rows[:1])
    batcher = MicroBatcher(
        "fraud:v3", model, max_queue=8, batch_size=AdaptiveBatchSize(1.0, initial=4)
    )
    first = model.hold_first(batcher)
    queued = [batcher.submit(1), batcher.submit(2)]
    model.gate.set()
    assert first.result(WAIT_S) == 0
    for future in queued:
        error = future.exception(WAIT_S)
        assert isinstance(error, BatchResultMismatch)
        assert error.status is Status.INTERNAL
        assert str(error) == "model fraud:v3 returned 1 results for a batch of 2 rows"
    batcher.close()


def test_close_fails_queued_requests_and_lets_the_batch_in_flight_finish(
    make_batcher, model
) -> None:
    batcher = make_batcher()
    in_flight = model.hold_first(batcher)
    queued = [batcher.submit(1), batcher.submit(2)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    for future in queued:
        error = future.exception(WAIT_S)
        assert isinstance(error, BatcherClosed)
        assert str(error) == "model fraud:v3 is shutting down: request not predicted"
    model.gate.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert in_flight.result(WAIT_S) == 0
    assert model.batches == [[0]]
    with pytest.raises(BatcherClosed):
        batcher.submit(3)


def test_close_with_drain_predicts_what_is_queued(make_batcher, model) -> None:
    batcher = make_batcher()
    in_flight = model.hold_first(batcher)
    queued = [batcher.submit(1), batcher.submit(2)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": True})
    closer.start()
    model.gate.set()
    closer.join(WAIT_S)
    assert results([in_flight, *queued]) == [0, 10, 20]
    assert model.batches == [[0], [1, 2]]


def test_stats_count_batches_and_mean_size(make_batcher, model) -> None:
    batcher = make_batcher()
    first = model.hold_first(batcher)
    futures = [batcher.submit(row) for row in range(1, 4)]
    model.gate.set()
    results([first, *futures])
    stats = batcher.stats()
    assert (stats.batches, stats.predicted, stats.mean_batch_size) == (2, 4, 2.0)
    assert (stats.queue_depth, stats.current_batch_size) == (0, 8)


def test_asyncio_callers_await_their_own_results(make_batcher, model) -> None:
    batcher = make_batcher()
    model.gate.set()

    async def score_all() -> list[int]:
        return list(await asyncio.gather(*(batcher.submit_async(row) for row in range(5))))

    assert asyncio.run(score_all()) == [0, 10, 20, 30, 40]


# -- lingering only when busy, items of several rows ---------------------------------------


def test_busy_only_a_lone_caller_never_waits(make_batcher, model) -> None:
    model.gate.set()
    size = AdaptiveBatchSize(1.0, initial=4, minimum=4, maximum=4)
    batcher = make_batcher(batch_size=size, max_wait_s=60.0, busy_only=True)
    assert batcher.submit(7).result(WAIT_S) == 70  # lingering would take 60 s
    assert model.batches == [[7]]


def test_busy_only_lingers_for_a_full_batch_unless_the_last_had_one_item() -> None:
    assert linger_target(busy_only=False, last_items=1, size=8) == 8
    assert linger_target(busy_only=True, last_items=0, size=8) == 1
    assert linger_target(busy_only=True, last_items=1, size=8) == 1
    assert linger_target(busy_only=True, last_items=2, size=8) == 8


def test_busy_only_lingers_after_a_batch_of_several(make_batcher, model) -> None:
    size = AdaptiveBatchSize(1.0, initial=4, minimum=4, maximum=4)
    batcher = make_batcher(batch_size=size, max_wait_s=60.0, busy_only=True)
    first = model.hold_first(batcher)
    queued = [batcher.submit(row) for row in (1, 2)]
    model.gate.set()
    assert results([first, *queued]) == [0, 10, 20]  # batches [0] then [1, 2]
    later = [batcher.submit(row) for row in (3, 4, 5, 6)]
    assert results(later) == [30, 40, 50, 60]
    assert model.batches == [[0], [1, 2], [3, 4, 5, 6]]  # it waited for the fourth


def test_quiet_s_stops_lingering_when_no_row_comes(make_batcher, model) -> None:
    size = AdaptiveBatchSize(1.0, initial=4, minimum=4, maximum=4)
    batcher = make_batcher(batch_size=size, max_wait_s=60.0, busy_only=True, quiet_s=0.01)
    first = model.hold_first(batcher)
    queued = [batcher.submit(row) for row in (1, 2)]
    model.gate.set()
    assert results([first, *queued]) == [0, 10, 20]  # batches [0] then [1, 2]
    # After a batch of several the collector lingers for four, but only while rows keep
    # coming: a lone row is taken after 10 ms of quiet, not after max_wait_s (60 s).
    assert batcher.submit(3).result(WAIT_S) == 30
    assert model.batches == [[0], [1, 2], [3]]


def test_quiet_s_must_be_positive(model) -> None:
    with pytest.raises(ValueError, match="quiet_s"):
        MicroBatcher("fraud:v3", model, max_queue=8, batch_size=AdaptiveBatchSize(1.0),
                     quiet_s=0.0)


def test_rows_of_counts_the_rows_an_item_holds(make_batcher, model) -> None:
    model.gate.set()
    seen: list[int] = []
    batcher = make_batcher(rows_of=lambda item: item, on_batch=seen.append)
    assert batcher.submit(3).result(WAIT_S) == 30
    assert seen == [3]
    assert batcher.stats().predicted == 3 and batcher.stats().batches == 1


def test_a_model_predicts_rows_and_blocks_of_rows_in_one_call() -> None:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from scoring.core import LoadedModel

    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    estimator = LogisticRegression().fit(X, (X[:, 0] > 0).astype(int))
    calls: list[int] = []
    predict = estimator.predict_proba
    estimator.predict_proba = lambda rows: calls.append(len(rows)) or predict(rows)  # type: ignore[method-assign]
    model = LoadedModel("v1", "m-1", estimator, None, ["a", "b", "c"], None)  # type: ignore[arg-type]

    out = model.predict_batch([X[0], X[1:4], X[4]])

    assert calls == [5]
    together = predict(X[:5])  # what one call on the five rows gives, split back per item
    np.testing.assert_array_equal(out[0], together[0])
    np.testing.assert_array_equal(out[1], together[1:4])
    np.testing.assert_array_equal(out[2], together[4])


# -- inline: a lone row predicted on its caller's thread --------------------------------


class ThreadRecorder:
    """A model that notes the thread of each predict call, and advances ``clock`` by
    ``latency_s`` per call (how long the batch took, on the batcher's clock)."""

    def __init__(self, clock: FakeClock, latency_s: float = 0.001) -> None:
        self.clock, self.latency_s = clock, latency_s
        self.threads: list[threading.Thread] = []

    def __call__(self, rows: list[int]) -> list[int]:
        self.threads.append(threading.current_thread())
        self.clock.now += self.latency_s
        return [row * 10 for row in rows]


def inline_batcher(model: Callable[[list[int]], Sequence[int]], clock: FakeClock
                   ) -> MicroBatcher[int, int]:
    return MicroBatcher("fraud:v3", model, max_queue=8, clock=clock, inline=True,
                        batch_size=AdaptiveBatchSize(1.0, initial=8, maximum=8))


def test_inline_a_lone_row_of_a_fast_model_is_predicted_on_the_callers_thread() -> None:
    clock = FakeClock()
    model = ThreadRecorder(clock)
    batcher = inline_batcher(model, clock)
    assert batcher.submit(1).result(WAIT_S) == 10  # no batch yet: through the collector
    second = batcher.submit(2, deadline=clock.now + 1.0)
    assert second.done() and second.result() == 20
    assert model.threads[0] is not threading.current_thread()
    assert model.threads[1] is threading.current_thread()
    assert batcher.stats().batches == 2
    batcher.close()


def test_inline_a_model_slow_for_the_rows_deadline_goes_through_the_collector() -> None:
    clock = FakeClock()
    model = ThreadRecorder(clock, latency_s=0.5)
    batcher = inline_batcher(model, clock)
    assert batcher.submit(1).result(WAIT_S) == 10
    # The last batch took 0.5 s: a row with 1 s left cannot afford to wait for one here.
    assert batcher.submit(2, deadline=clock.now + 1.0).result(WAIT_S) == 20
    assert threading.current_thread() not in model.threads
    batcher.close()


def test_inline_rows_arriving_during_an_inline_batch_are_batched_after_it(model) -> None:
    clock = FakeClock()
    batcher = inline_batcher(model, clock)
    model.gate.set()
    assert batcher.submit(0).result(WAIT_S) == 0
    model.gate.clear()
    model.entered.clear()
    with ThreadPoolExecutor(1) as pool:
        inline = pool.submit(batcher.submit, 1)  # predicts on the pool's thread, held
        assert model.entered.wait(WAIT_S)
        queued = [batcher.submit(2), batcher.submit(3)]
        assert not any(f.done() for f in queued)  # the collector waits for the inline batch
        model.gate.set()
        assert inline.result(WAIT_S).result(WAIT_S) == 10
    assert results(queued) == [20, 30]
    assert model.batches == [[0], [1], [2, 3]]
    batcher.close()
