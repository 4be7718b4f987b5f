"""Concurrent Score calls are scored together (ScoringCore's request batcher), on the
in-memory stores: what queued while a call was being scored is the next batch, one predict
for all of it, and every call gets the answer it gets alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from app.local import wait_until
from common.errors import InvalidInput
from scoring.core import ScoreQuery, ScoringCore
from tests.fixtures.scoring import ScoringWorld, memory_fixtures, query_of

CALLS = 12


class GatedModel:
    """The champion's estimator, held at a gate on every predict; counts rows per call."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.classes_ = inner, inner.classes_
        self.gate, self.rows_per_call = threading.Event(), list[int]()

    def predict_proba(self, matrix: np.ndarray) -> np.ndarray:
        self.rows_per_call.append(len(matrix))
        self.gate.wait(30)  # the test opens it once every call is queued
        return np.asarray(self.inner.predict_proba(matrix))


world, core = memory_fixtures()


def queries(world: ScoringWorld) -> list[ScoreQuery]:
    return [query_of(world, position) for position in range(CALLS)]


def test_calls_that_queue_behind_one_are_predicted_as_one_batch(
        world: ScoringWorld, core: ScoringCore) -> None:
    asked = queries(world)
    alone = [core.score(query) for query in asked]
    champion = core.loaded()
    gated = champion.estimator = GatedModel(champion.estimator)
    with ThreadPoolExecutor(CALLS) as pool:
        first = pool.submit(core.score, asked[0])
        wait_until(lambda: gated.rows_per_call, message="the first call predicting")
        rest = [pool.submit(core.score, query) for query in asked[1:]]
        # The core's own queue (private): every other call waits behind the first.
        wait_until(lambda: core._asks.stats().queue_depth == CALLS - 1,
                   message="the other calls queued")
        gated.gate.set()
        together = [first.result(30), *(call.result(30) for call in rest)]

    assert gated.rows_per_call == [1, CALLS - 1]
    assert [r.score for r in together] == pytest.approx([r.score for r in alone], rel=1e-12)
    assert [r.features for r in together] == [r.features for r in alone]
    assert {r.version for r in together} == {alone[0].version}


def test_a_call_that_finds_the_core_idle_is_scored_alone_at_once(
        world: ScoringWorld, core: ScoringCore) -> None:
    before = core.loaded().batcher.stats()
    core.score(queries(world)[0])
    after = core.loaded().batcher.stats()
    assert (after.batches - before.batches, after.predicted - before.predicted) == (1, 1)


# -- ModelInfer ---------------------------------------------------------------------------


def matrices(world: ScoringWorld, core: ScoringCore) -> list[np.ndarray]:
    """Two feature rows per call, CALLS calls: the rows Score would predict."""
    rows = [list(core.features_for(query).values()) for query in queries(world)]
    return [np.asarray([rows[i], rows[(i + 1) % CALLS]], dtype=np.float64)
            for i in range(CALLS)]


def infer_behind_a_gate(core: ScoringCore, calls: list[np.ndarray]) -> list[Any]:
    """The calls' outcomes (results or exceptions) when every call after the first queues
    while the first predicts; the gated model's rows per predict call after it."""
    champion = core.loaded()
    gated = champion.estimator = GatedModel(champion.estimator)

    def outcome(matrix: np.ndarray) -> Any:
        try:
            return core.infer(matrix)
        except Exception as exc:  # the test looks at which calls failed, and how
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        first = pool.submit(outcome, calls[0])
        wait_until(lambda: gated.rows_per_call, message="the first call predicting")
        rest = [pool.submit(outcome, matrix) for matrix in calls[1:]]
        wait_until(lambda: core._infers.stats().queue_depth == len(calls) - 1,
                   message="the other calls queued")
        gated.gate.set()
        return [first.result(30), *(call.result(30) for call in rest), gated.rows_per_call]


def test_infer_calls_that_queue_behind_one_are_predicted_as_one_stacked_matrix(
        world: ScoringWorld, core: ScoringCore) -> None:
    calls = matrices(world, core)
    alone = [core.infer(matrix).probabilities for matrix in calls]
    *together, rows_per_call = infer_behind_a_gate(core, calls)
    assert rows_per_call == [2, 2 * (CALLS - 1)]
    for result, expected, matrix in zip(together, alone, calls, strict=True):
        np.testing.assert_allclose(result.probabilities, expected, rtol=0, atol=1e-12)
        assert result.version == core.loaded().version
        np.testing.assert_array_equal(result.features, matrix)  # its own rows, reported


def test_a_stacked_infer_call_with_a_refused_row_fails_alone(
        world: ScoringWorld, core: ScoringCore) -> None:
    calls = matrices(world, core)
    calls[3] = calls[3].copy()
    calls[3][1, 0] = np.inf  # scikit-learn refuses infinity: found row by row
    *together, _ = infer_behind_a_gate(core, calls)
    failed = together.pop(3)
    assert isinstance(failed, InvalidInput) and "rows 1:" in str(failed)
    assert not any(isinstance(outcome, Exception) for outcome in together)


def test_an_infer_call_of_another_width_is_its_own_group(
        world: ScoringWorld, core: ScoringCore) -> None:
    calls = matrices(world, core)
    calls[5] = calls[5][:, :-1]  # one feature short
    *together, rows_per_call = infer_behind_a_gate(core, calls)
    failed = together.pop(5)
    assert isinstance(failed, InvalidInput) and "features" in str(failed)
    assert not any(isinstance(outcome, Exception) for outcome in together)
    assert rows_per_call == [2, 2 * (CALLS - 2)]
