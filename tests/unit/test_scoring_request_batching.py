"""Concurrent Score calls are scored together (ScoringCore's request batcher), on the
in-memory stores: what queued while a call was being scored is the next batch, one predict
for all of it, and every call gets the answer it gets alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.local import wait_until
from scoring.core import ScoreQuery, ScoringCore
from scoring.inputs import InputSchema
from tests.fixtures.pipeline import MemoryOnlineStore
from tests.fixtures.scoring import ScoringWorld, fields_of, loaded_core, scoring_world

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


@pytest.fixture
def world(tmp_path: Path) -> ScoringWorld:
    return scoring_world(tmp_path, online=MemoryOnlineStore())


@pytest.fixture
def core(world: ScoringWorld) -> Iterator[ScoringCore]:
    with loaded_core(world, deadline_s=30.0, latency_budget_s=30.0) as core:
        yield core


def queries(world: ScoringWorld) -> list[ScoreQuery]:
    schema = InputSchema.of(world.fitted)
    return [ScoreQuery(str(row["nameOrig"]), fields_of(row, schema))
            for _, row in world.frame.iloc[:CALLS].iterrows()]


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
