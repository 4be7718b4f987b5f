"""ScoringCore on in-memory stores: no Redis, no broker, no gRPC.

The world is the integration tests' (``tests.fixtures.scoring``: a fitted PaySim feature
set, v1 and v2 signed in a model store on disk, champion v2), with its online rows in
``MemoryOnlineStore`` and, where the stream keeps a state, ``MemoryEntityState``. Every
expected score is recomputed here from the pandas transform and a plain ``predict_proba``.
The integration tests keep the real Redis (``tests/integration/test_scoring_*.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from common.errors import InvalidInput, ModelNotFound, Status
from common.events import ModelReady
from common.stores.entity_state import MemoryEntityState
from preparation import build_pipeline
from preparation.streaming import StreamPlan
from scoring.core import (
    CoreSettings,
    FeaturesUnavailable,
    ScoreQuery,
    ScoreResult,
    ScoringCore,
)
from scoring.router import NoModelDeployed
from tests.fixtures.pipeline import MemoryOnlineStore
from tests.fixtures.scoring import (
    SPEC,
    ScoringWorld,
    history,
    memory_fixtures,
    memory_world,
    query_of,
)

COUNT, MEAN = "nameOrig_amount_count_last3", "nameOrig_amount_mean_last3"
MINUTE_US = 60 * 1_000_000
HOUR_US = 60 * MINUTE_US


# One world for the module; tests that add a version or demote one build their own.
world, core = memory_fixtures(scope="module")


def expected(world: ScoringWorld, q: ScoreQuery, version: str = "v2",
             online: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the pandas online transform of the stored aggregates (or ``online``)
    merged with the request's fields, and the version's plain predict_proba."""
    if online is None:
        online = world.online.read(world.fitted.feature_set_id, [q.entity_id])[0] or {}
    record = {**online, **q.fields, "nameOrig": q.entity_id}
    names = list(world.fitted.feature_names)
    row = world.fitted.transform_online([record], fast=False)[names]
    return row.to_numpy(np.float64)[0], world.estimators[version].predict_proba(row)[0]


def features(result: ScoreResult, world: ScoringWorld) -> np.ndarray:
    return np.array([result.features[name] for name in world.fitted.feature_names])


def test_nothing_is_served_before_the_chain_is_loaded(world: ScoringWorld) -> None:
    core = world.core()
    try:
        assert not core.ready
        with pytest.raises(NoModelDeployed) as raised:
            core.score(query_of(world, 0))
        assert raised.value.status is Status.UNAVAILABLE
        assert core.load_chain() == ["v2", "v1"] and core.ready
    finally:
        core.close()


def test_a_row_is_scored_by_the_champion_on_its_entity_aggregates(
        world: ScoringWorld, core: ScoringCore) -> None:
    for position in (3, 101, 377):
        q = query_of(world, position)
        result = core.score(q)

        row, proba = expected(world, q)
        assert (result.version, result.role, result.fallback) == ("v2", "champion", False)
        assert (result.fallback_reason, result.degraded) == (None, False)
        np.testing.assert_allclose(features(result, world), row, rtol=1e-12, atol=1e-12)
        assert result.score == pytest.approx(proba[-1], rel=1e-9)
        assert result.probabilities == pytest.approx({"0": proba[0], "1": proba[1]}, rel=1e-9)
        assert result.label == ("1" if proba[1] > proba[0] else "0")
    stored = world.online.read(world.fitted.feature_set_id, [q.entity_id])[0]
    assert stored is not None and result.features[COUNT] == stored[COUNT] == 3.0


def test_an_entity_with_no_past_is_scored_on_empty_aggregates(
        world: ScoringWorld, core: ScoringCore) -> None:
    q = ScoreQuery("C-never-seen", query_of(world, 3).fields)
    result = core.score(q)

    row, proba = expected(world, q, online={})
    assert (result.features[COUNT], result.features[MEAN]) == (0.0, 0.0)  # mean imputed: 0
    np.testing.assert_allclose(features(result, world), row, rtol=1e-12, atol=1e-12)
    assert result.score == pytest.approx(proba[-1], rel=1e-9)
    known = core.score(query_of(world, 3))
    assert known.features[COUNT] == 3.0 and known.score != result.score


def test_a_field_the_request_carries_wins_over_the_stored_aggregate(
        world: ScoringWorld, core: ScoringCore) -> None:
    q = query_of(world, 3, **{COUNT: 1.0, MEAN: 10.0})
    result = core.score(q)

    assert (result.features[COUNT], result.features[MEAN]) == (1.0, 10.0)
    assert result.score == pytest.approx(expected(world, q)[1][-1], rel=1e-9)


def test_a_named_version_or_alias_answers_and_an_unknown_one_is_not_found(
        world: ScoringWorld, core: ScoringCore) -> None:
    q = query_of(world, 42)
    for asked in ("v1", "previous"):
        result = core.score(ScoreQuery(q.entity_id, q.fields, model_version=asked))
        assert (result.version, result.fallback) == ("v1", False)
        assert result.score == pytest.approx(expected(world, q, "v1")[1][-1], rel=1e-9)

    with pytest.raises(ModelNotFound) as raised:
        core.score(ScoreQuery(q.entity_id, q.fields, model_version="v9"))
    assert raised.value.status is Status.NOT_FOUND
    assert str(raised.value) == "model fraud with version v9 not found"


def test_a_bad_field_is_refused_naming_it_before_any_model_runs(
        world: ScoringWorld, core: ScoringCore) -> None:
    before = core.loaded("v2").batcher.stats().predicted
    fields = dict(query_of(world, 3).fields)
    with pytest.raises(InvalidInput, match="field 'amount' must be a number, got str 'lots'"):
        core.score(ScoreQuery("C1", {**fields, "amount": "lots"}))
    del fields["type"]
    with pytest.raises(InvalidInput, match="field 'type' is missing"):
        core.score(ScoreQuery("C1", fields))
    assert core.loaded("v2").batcher.stats().predicted == before


def test_score_many_answers_every_row_in_order_as_one_at_a_time_would(
        world: ScoringWorld, core: ScoringCore) -> None:
    queries = [query_of(world, p) for p in (7, 8, 9, 250, 7)]
    together = core.score_many(queries)

    assert [r.score for r in together] == pytest.approx(
        [core.score(q).score for q in queries], rel=1e-12)
    assert [r.score for r in together] == pytest.approx(
        [expected(world, q)[1][-1] for q in queries], rel=1e-9)


def test_an_entity_with_no_past_is_scored_alike_in_a_block_with_known_ones(
        world: ScoringWorld, core: ScoringCore) -> None:
    new = ScoreQuery("C-new", query_of(world, 10).fields)
    results = core.score_many([query_of(world, 7), new])

    assert (results[1].features[COUNT], results[1].features[MEAN]) == (0.0, 0.0)
    assert results[1].score == pytest.approx(core.score(new).score, rel=1e-12)


def test_every_answer_is_reported_and_observed_records_after_it(world: ScoringWorld) -> None:
    served: list[tuple[str, str]] = []
    observed: list[str] = []
    core = world.core(deadline_s=5.0, latency_budget_s=5.0)
    core.on_served = lambda q, r: served.append((q.entity_id, r.version))
    core.on_observed = lambda q: observed.append(q.entity_id)
    core.load_chain()
    try:
        first, second = query_of(world, 3), query_of(world, 4)
        core.score(first)
        core.score(ScoreQuery(second.entity_id, second.fields, observe=True))
        core.score_many([first, ScoreQuery(first.entity_id, first.fields, "v1")])
    finally:
        core.close()
    assert served == [(first.entity_id, "v2"), (second.entity_id, "v2"),
                      (first.entity_id, "v2"), (first.entity_id, "v1")]
    assert observed == [second.entity_id]


def test_a_failing_report_or_observer_is_logged_and_the_call_still_answered(
        world: ScoringWorld, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("sink is gone")

    core = world.core(deadline_s=5.0, latency_budget_s=5.0)
    core.on_served = core.on_observed = core.on_inferred = broken
    core.load_chain()
    try:
        query = query_of(world, 3)
        scored = core.score(ScoreQuery(query.entity_id, query.fields, observe=True))
        inferred = core.infer(np.zeros((2, len(core.loaded().feature_names))))
    finally:
        core.close()
    assert scored.version == inferred.version == "v2" and len(inferred.probabilities) == 2
    failures = [(r.getMessage(), r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert [message for message, _ in failures] == [
        "reporting 1 scores failed", "observing 1 records failed",
        "reporting an inference of 2 rows failed"]
    assert all(str(error) == "sink is gone" for _, error in failures)


def test_a_hot_swap_puts_the_new_version_in_front(tmp_path: Path) -> None:
    world = memory_world(tmp_path)
    core = world.core(deadline_s=5.0, latency_budget_s=5.0, chain_depth=2)
    core.load_chain()
    try:
        q = query_of(world, 3)
        assert core.score(q).version == "v2"
        world.estimators["v3"] = world.estimators["v1"]  # v1's estimator, a new version
        version = world.add_model(world.estimators["v1"], "m-v3")

        assert core.on_model_ready(ModelReady(producer="test", model_id="m-v3",
                                              version=version)) == ["v3", "v2"]
        result = core.score(q)
        assert (version, result.version, result.fallback) == ("v3", "v3", False)
        assert result.score == pytest.approx(expected(world, q, "v1")[1][-1], rel=1e-9)
        assert {h.version for h in core.health()} == {"v3", "v2"}  # v1 retired
        with pytest.raises(ModelNotFound):
            core.score(ScoreQuery(q.entity_id, q.fields, model_version="v1"))
    finally:
        core.close()


class Broken:
    """A model that loads and then fails every predict (a bug, not the request's fault)."""

    classes_ = np.array([0, 1])

    def predict_proba(self, rows: Any) -> np.ndarray:
        raise RuntimeError("model file is corrupt")


def test_a_failing_champion_is_answered_by_the_previous_version(tmp_path: Path) -> None:
    world = memory_world(tmp_path)
    version = world.add_model(Broken(), "m-broken")
    core = world.core(deadline_s=5.0, latency_budget_s=5.0, warmup_calls=0)
    assert core.load_chain() == [version, "v2", "v1"]
    try:
        q = query_of(world, 3)
        result = core.score(q)
        assert (result.version, result.role, result.fallback) == ("v2", "previous", True)
        assert result.fallback_reason is not None
        assert "RuntimeError: model file is corrupt" in result.fallback_reason
        assert result.fallback_kind is not None and result.fallback_kind.value == "error"
        assert result.score == pytest.approx(expected(world, q, "v2")[1][-1], rel=1e-9)
    finally:
        core.close()


def with_champion_of_another_set(world: ScoringWorld, estimator: Any) -> tuple[str, str]:
    """A new champion on a feature set of its own (fitted on other rows), its online rows
    written with amounts doubled, so a row read from the wrong set scores differently;
    its version and its set's id."""
    other = build_pipeline(SPEC).fit(history(seed=9), batch_ids=["b9"])
    doubled = world.frame.assign(amount=world.frame["amount"] * 2)
    world.online.write_batch(other.feature_set_id,
                             other.latest_aggregates(doubled).reset_index(), "nameOrig")
    world.pipelines.save(other.feature_set_id, other)
    world.models.save("m-other", estimator, {"feature_set_id": other.feature_set_id,
                                             "features": list(other.feature_names)})
    world.registry.register("m-other")
    return world.registry.promote("m-other"), other.feature_set_id


def recording_reads(world: ScoringWorld) -> list[str]:
    """The feature set of every online read from now on, in order."""
    reads: list[str] = []
    read = world.online.read

    def recorded(feature_set_id: str, *args: Any, **kwargs: Any) -> Any:
        reads.append(feature_set_id)
        return read(feature_set_id, *args, **kwargs)

    world.online.read = recorded  # type: ignore[method-assign]
    return reads


@pytest.mark.parametrize("champion_fails", [False, True])
def test_a_fallback_of_another_feature_set_reads_its_own_rows_only_when_asked(
        tmp_path: Path, champion_fails: bool) -> None:
    world = memory_world(tmp_path)
    v2 = world.estimators["v2"]
    version, other = with_champion_of_another_set(world, Broken() if champion_fails else v2)
    core = world.core(deadline_s=5.0, latency_budget_s=5.0, warmup_calls=0)
    assert core.load_chain() == [version, "v2", "v1"]
    try:
        reads = recording_reads(world)
        q = query_of(world, 3)
        result = core.score(q)
    finally:
        core.close()
    if champion_fails:  # v2 answers with the rows of its own set, read after v3 failed
        assert reads == [other, world.fitted.feature_set_id]
        assert (result.version, result.fallback) == ("v2", True)
        assert result.score == pytest.approx(expected(world, q, "v2")[1][-1], rel=1e-9)
    else:  # the champion answers: its set is the only one read
        assert reads == [other]
        assert (result.version, result.fallback) == (version, False)
        assert result.score != pytest.approx(expected(world, q, "v2")[1][-1], rel=1e-6)


def test_a_demoted_champion_is_reverted_and_the_previous_answers(tmp_path: Path) -> None:
    world = memory_world(tmp_path)
    core = world.core(deadline_s=5.0, latency_budget_s=5.0)
    core.load_chain()
    try:
        # the router keeps v2 in its chain, asked last, until the next chain is loaded
        assert core.demote("v2", "p99 over budget") == ["v2", "v1"]
        assert world.registry.champion().version == "v1"  # a restart keeps the revert
        q = query_of(world, 3)
        result = core.score(q)
        assert (result.version, result.fallback) == ("v1", True)
        assert result.score == pytest.approx(expected(world, q, "v1")[1][-1], rel=1e-9)
    finally:
        core.close()


class DownStore(MemoryOnlineStore):
    """An online store whose reads fail as an unreachable Redis's do."""

    def read(self, feature_set_id: str, entity_ids: Sequence[Any],
             features: Sequence[str] | None = None) -> list[dict[str, Any] | None]:
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379.")


def test_with_the_online_store_down_a_request_carrying_its_aggregates_is_degraded(
        world: ScoringWorld) -> None:
    down = ScoringWorld(world.models, world.pipelines, world.registry, DownStore(),
                        world.fitted, world.frame, world.estimators)
    core = down.core(deadline_s=5.0, latency_budget_s=5.0)
    core.load_chain()
    try:
        carried = query_of(world, 3, **{COUNT: 2.0, MEAN: 50.0})
        result = core.score(carried)
        assert (result.version, result.degraded) == ("v2", True)
        assert (result.features[COUNT], result.features[MEAN]) == (2.0, 50.0)
        assert result.score == pytest.approx(expected(world, carried, online={})[1][-1],
                                             rel=1e-9)

        with pytest.raises(FeaturesUnavailable) as raised:
            core.score(query_of(world, 3))
        assert raised.value.status is Status.UNAVAILABLE
        assert raised.value.missing == [COUNT, MEAN]
    finally:
        core.close()


def state_of(world: ScoringWorld, entity: str, amounts: Sequence[float],
             start: pd.Timestamp) -> tuple[MemoryEntityState, int]:
    """An entity state holding one record per amount, an hour apart from ``start``; the
    last record's time in epoch microseconds."""
    plan = StreamPlan(world.fitted)
    records = [{"nameOrig": entity, "amount": amount,
                "timestamp": start + pd.Timedelta(hours=i)} for i, amount in enumerate(amounts)]
    state = MemoryEntityState()
    state.apply(world.fitted.feature_set_id,
                plan.record_entries(records, [f"r{i}" for i in range(len(records))]),
                plan.retention)
    state.mark_ready(world.fitted.feature_set_id)
    return state, int(records[-1]["timestamp"].value // 1_000)


def test_streamed_aggregates_are_read_at_the_request_time_and_stale_ones_degrade(
        world: ScoringWorld) -> None:
    start = pd.Timestamp("2026-02-01T00:00:00Z")
    state, last_us = state_of(world, "C-stream", [10.0, 20.0, 30.0, 40.0], start)
    settings = CoreSettings(deadline_s=5.0, latency_budget_s=5.0, max_feature_age_s=3_600)
    core = ScoringCore(world.models, world.pipelines, world.registry, world.online, settings,
                       state=state)
    core.load_chain()
    try:
        fields = query_of(world, 3).fields

        def at(time_us: int) -> ScoreResult:
            when = pd.Timestamp(time_us * 1_000, tz="UTC").isoformat()
            return core.score(ScoreQuery("C-stream", {**fields, "timestamp": when}))

        fresh = at(last_us + 10 * MINUTE_US)
        assert (fresh.features[COUNT], fresh.features[MEAN]) == (3.0, 30.0)  # the last 3
        assert (fresh.feature_age_s, fresh.degraded) == (600.0, False)
        assert fresh.feature_ages_s == {COUNT: 600.0, MEAN: 600.0}

        stale = at(last_us + 2 * HOUR_US)
        assert (stale.feature_age_s, stale.degraded) == (7_200.0, True)
        assert (stale.features[COUNT], stale.features[MEAN]) == (3.0, 30.0)

        earlier = at(last_us - HOUR_US // 2)
        assert (earlier.features[COUNT], earlier.features[MEAN]) == (3.0, 20.0)  # 10, 20, 30
        assert (earlier.feature_age_s, earlier.degraded) == (1_800.0, False)
    finally:
        core.close()
