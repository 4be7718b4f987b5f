"""The fast scoring path gives the reference answers: the compiled row transform and the
batched 2-D predict against the pandas transform and a plain predict_proba, with the real
Redis; a request whose deadline is already spent costs no Redis read."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.errors import Status
from common.events import ModelReady
from scoring.core import ScoreQuery, ScoringCore
from scoring.inputs import InputSchema
from tests.fixtures.scoring import ScoringWorld, fields_of, loaded_core, scoring_world
from tests.support.harness import delete_redis_keys, isolated_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def world(tmp_path: Path) -> Iterator[ScoringWorld]:
    settings = isolated_settings()  # a namespace of its own; only Redis is used here
    yield scoring_world(tmp_path, settings.namespace)
    delete_redis_keys(settings)


@pytest.fixture
def core(world: ScoringWorld) -> Iterator[ScoringCore]:
    # limits loose enough that circuits never open: they are not under test
    with loaded_core(world, deadline_s=2.0, latency_budget_s=1.0) as core:
        yield core


def query(world: ScoringWorld, position: int) -> ScoreQuery:
    row = world.frame.iloc[position]
    return ScoreQuery(row["nameOrig"], fields_of(row, InputSchema.of(world.fitted)))


def test_scores_match_the_pandas_transform_and_a_plain_predict(
        world: ScoringWorld, core: ScoringCore) -> None:
    names = list(world.fitted.feature_names)
    for position in range(0, 600, 37):
        q = query(world, position)
        result = core.score(q)
        online = world.online.read(world.fitted.feature_set_id, [q.entity_id])[0] or {}
        record = {**{c: online[c] for c in world.fitted.aggregate_columns if c in online},
                  **q.fields, "nameOrig": q.entity_id}
        expected = world.fitted.transform_online([record], fast=False)[names]
        np.testing.assert_allclose([result.features[n] for n in names],
                                   expected.to_numpy(np.float64)[0], rtol=1e-12, atol=1e-12)
        proba = world.estimators["v2"].predict_proba(expected)[0]
        assert result.score == pytest.approx(proba[-1], rel=1e-9)


def test_a_few_rows_of_infer_are_one_batch_item(world: ScoringWorld, core: ScoringCore) -> None:
    names = list(world.fitted.feature_names)
    frame = world.fitted.transform(world.frame.iloc[:3])[names]
    matrix = frame.to_numpy(np.float64)
    before = core.loaded("v2").batcher.stats()

    result = core.infer(matrix)

    after = core.loaded("v2").batcher.stats()
    assert (after.batches - before.batches, after.predicted - before.predicted) == (1, 3)
    np.testing.assert_allclose(result.probabilities,
                               world.estimators["v2"].predict_proba(frame), rtol=1e-9)


def test_a_spent_deadline_fails_before_reading_redis(
        world: ScoringWorld, core: ScoringCore, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Any] = []
    read = world.online.read
    monkeypatch.setattr(world.online, "read", lambda *a, **k: reads.append(a) or read(*a, **k))

    with pytest.raises(Exception) as raised:
        core.score(query(world, 5), deadline_s=0.0)

    assert raised.value.status is Status.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert reads == []
    assert core.score(query(world, 5)).version == "v2" and len(reads) == 1


def test_the_primary_gets_half_of_the_shorter_deadline_and_all_of_it_without_fallbacks(
        ) -> None:
    from scoring.core import fallback_reserve
    from scoring.latency import CircuitBreaker
    from scoring.router import DeployedModel, RouteDecision

    def link(version: str, failing: bool) -> DeployedModel:
        breaker = CircuitBreaker(budget_s=1.0, max_failures=1)
        if failing:
            breaker.record_failure("ValueError: broken")  # one failure opens this one
        return DeployedModel(version, f"m-{version}", lambda rows: rows, breaker)

    primary = link("v2", failing=False)
    healthy = RouteDecision(primary, [link("v1", failing=False)])
    assert fallback_reserve(healthy, 0.2, 0.25) == pytest.approx(0.1)  # half of the call's
    assert fallback_reserve(healthy, 5.0, 0.25) == pytest.approx(4.875)  # half the default
    assert fallback_reserve(RouteDecision(primary, [link("v3", failing=True)]), 5.0, 0.25) == 0
    assert fallback_reserve(RouteDecision(primary, []), 5.0, 0.25) == 0
    mixed = [link("v3", failing=True), link("v1", failing=False)]
    assert fallback_reserve(RouteDecision(primary, mixed), 0.2, 0.25) == pytest.approx(0.1)


def test_freeze_gc_freezes_what_is_loaded_and_still_frees_a_retired_model(
        world: ScoringWorld) -> None:
    core = world.core(freeze_gc=True, chain_depth=2)
    try:
        assert core.load_chain() == ["v2", "v1"]
        assert gc.get_freeze_count() > 0
        retired = weakref.ref(core.loaded("v1"))
        version = world.add_model(world.estimators["v1"], "m-v3")
        core.on_model_ready(ModelReady(producer="test", model_id="m-v3", version=version))
        assert {model.version for model in core.health()} == {version, "v2"}
        assert retired() is None  # its cycles were collected before the heap was frozen again
    finally:
        core.close()
        gc.unfreeze()  # the rest of the test session collects as usual
