"""The loop closes: training keeps a drift reference with each model, RetrainRequested
trains on the latest data of the dataset and goes on to evaluation, and a degraded
version is reverted (registry) and demoted (router)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ModelNotFound
from common.events import (
    CandidatesTrained,
    FeaturesGenerated,
    ModelReady,
    ModelRejected,
    RetrainRequested,
)
from common.reference import references_from
from common.stores import ModelRegistry
from monitoring.drift import PREDICTION
from scoring.latency import CircuitBreaker
from scoring.router import DeployedModel, ModelRouter
from tests.fixtures.pipeline import one_of, parsed, paysim_config, write_paysim
from tests.fixtures.warm import warm_training_workers
from tests.unit.test_pipeline_services import Pipeline, no_dead_letters, types

warm_training_workers()


def test_retraining_uses_the_latest_data_of_the_dataset_and_is_evaluated(
        tmp_path: Path) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data").start()
    pipeline.source(write_paysim(tmp_path / "old.csv", 3_000, seed=1))
    latest = one_of(FeaturesGenerated, pipeline.source(
        write_paysim(tmp_path / "new.csv", 3_000, seed=2)))

    events = pipeline.run(RetrainRequested(reason="drift", dataset="paysim",
                                           model_version="v1", producer="monitoring"))

    assert types(events)[:2] == ["RetrainRequested", "CandidatesTrained"]
    assert one_of(CandidatesTrained, events).feature_set_id == latest.feature_set_id
    assert types(events)[2] in {"ModelReady", "ModelRejected"}  # gated as usual
    assert [e for e in events if isinstance(e, ModelReady | ModelRejected)][0].causation_id \
        == one_of(CandidatesTrained, events).event_id
    no_dead_letters(pipeline.bus)

    trained = pipeline.models.metadata(one_of(CandidatesTrained, events).model_ids[0])
    references = references_from(trained.metadata)
    assert PREDICTION in references
    assert set(references) - {PREDICTION} == set(trained.metadata["features"])
    assert trained.metadata["datasets"] == ["paysim"]
    assert pipeline.models.load(trained.model_id) is not None  # the signature still holds


def test_retraining_on_a_dataset_without_features_is_refused_naming_it(
        tmp_path: Path) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data").start("training")
    pipeline.run(RetrainRequested(reason="drift", dataset="nosuch", producer="test"))
    [letter] = pipeline.bus.dead_letters("training")
    assert "no feature set of pipeline fraud reading dataset 'nosuch'" in letter.error


def test_revert_puts_the_previous_champion_back_once(tmp_path: Path) -> None:
    registry = ModelRegistry(str(tmp_path), "fraud")
    for model_id in ("m1", "m2"):
        registry.promote(model_id)
    assert registry.revert("v1", reason="not the champion") == "v2"  # nothing changes
    assert registry.revert("v2", reason="accuracy 0.4 < 0.9", by="scoring") == "v1"
    assert registry.revert("v2", reason="again") == "v1"  # a redelivery reverts nothing more
    assert [(h.action, h.from_version, h.to_version, h.reason) for h in registry.history()][-1] \
        == ("demote", "v2", "v1", "accuracy 0.4 < 0.9")
    assert [e.version for e in registry.chain()] == ["v1"]
    with pytest.raises(ModelNotFound):
        registry.revert("v1")  # no previous to put back
    with pytest.raises(ModelNotFound):
        registry.revert("v9")


def router_of(*versions: str) -> ModelRouter:
    router = ModelRouter("fraud")
    for version in versions:
        router.deploy(DeployedModel(version, f"m-{version}", lambda x, v=version: v,
                                    CircuitBreaker(1.0)))
    router.set_chain(list(versions))
    return router


def test_a_demoted_champion_is_skipped_and_every_answer_says_fallback() -> None:
    router = router_of("v2", "v1")
    router.demote("v2", "accuracy 0.41 against 0.97")
    decision = router.route(request_key="C1")
    assert (decision.primary.version, decision.fallback) == ("v1", True)
    assert [link.version for link in decision.fallbacks] == []
    assert "champion v2 skipped: demoted (accuracy 0.41 against 0.97)" in decision.reason
    assert router.route("v2").primary.version == "v2"  # named: the caller asked for it
    router.restore("v2")
    assert router.route(request_key="C1").primary.version == "v2"


def test_a_demoted_link_is_the_last_resort() -> None:
    router = router_of("v3", "v2", "v1")
    router.demote("v2", "latency")
    decision = router.route(request_key="C1")
    assert decision.primary.version == "v3" and not decision.fallback
    assert [link.version for link in decision.fallbacks] == ["v1", "v2"]
    with pytest.raises(ModelNotFound):
        router.demote("v9", "unknown")
    router.retire("v2")
    assert router.demoted() == {}
