"""The offline pipeline's services on the in-process bus: what each does with its events.

The services get file stores under ``tmp_path`` and an in-memory online store, so these
tests need no broker and no Redis; training still forks its real worker processes.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from app.config import PipelineConfig
from common.bus.idempotency import MemoryProcessedEvents
from common.bus.memory import InMemoryBus
from common.errors import ModelNotFound
from common.events import (
    CandidatesTrained,
    Event,
    FeaturesGenerated,
    IngestionFailed,
    ModelReady,
    ModelRejected,
    RawDataExtracted,
    SourceDataAvailable,
)
from common.runtime import Service, ServiceRunner
from common.settings import Settings
from common.stores import ModelRegistry, ModelStore, OfflineFeatureStore, RawBatchStore
from common.stores.entity_state import MemoryEntityState, MemoryStreamTargets
from common.wiring import feature_pipeline_root
from evaluation.service import EvaluationService
from ingestion.service import IngestionService
from preparation.service import PreparationService
from tests.fixtures.models import attempts
from tests.fixtures.pipeline import (
    MemoryOnlineStore,
    one_of,
    parsed,
    paysim_config,
    write_paysim,
)
from tests.fixtures.warm import warm_training_workers
from training.service import TrainingService

warm_training_workers()

KEY = b"unit-test-signing-key"
ROWS = 3_000
OBSERVED = ["IngestionFailed", "RawDataExtracted", "FeaturesGenerated", "CandidatesTrained",
            "ModelReady", "ModelRejected"]
STAGES = ("ingestion", "preparation", "training", "evaluation")


@dataclasses.dataclass
class Pipeline:
    """The four stage services of one config on an in-process bus, over shared stores."""

    config: PipelineConfig
    root: Path
    bus: InMemoryBus = dataclasses.field(default_factory=InMemoryBus)
    online: MemoryOnlineStore = dataclasses.field(default_factory=MemoryOnlineStore)
    state: MemoryEntityState = dataclasses.field(default_factory=MemoryEntityState)
    targets: MemoryStreamTargets = dataclasses.field(default_factory=MemoryStreamTargets)

    def __post_init__(self) -> None:
        root = str(self.root)
        self.raw, self.offline = RawBatchStore(root), OfflineFeatureStore(root)
        self.models = ModelStore(root, KEY)
        self.pipelines = ModelStore(feature_pipeline_root(root), KEY)
        self.registry = ModelRegistry(root, self.config.name)
        self.bus.declare("observer", OBSERVED)  # outcomes are routable, and kept

    def start(self, *stages: str) -> Pipeline:
        """Register the named stage services (all four by default) on the bus."""
        for stage in stages or STAGES:
            service = getattr(self, stage)()
            runner = ServiceRunner(service, self.bus, Settings(), processed=MemoryProcessedEvents())
            self.bus.register(runner.dispatcher())
        return self

    def ingestion(self) -> Service:
        return IngestionService(self.config, self.raw)

    def preparation(self) -> Service:
        return PreparationService(self.config, self.raw, self.offline, self.online, self.pipelines,
                                  state=self.state, targets=self.targets)

    def training(self) -> Service:
        return TrainingService(self.config, self.offline, self.models)

    def evaluation(self) -> Service:
        return EvaluationService(
            self.config, self.offline, self.models, self.pipelines, self.registry, self.raw,
            online=self.online, online_wait_s=1.0,
        )

    def run(self, event: Event) -> list[Event]:
        """Publish an event, handle everything it leads to; returns what was published."""
        before = len(self.bus.published)
        self.bus.publish(event)
        self.bus.run_until_idle()
        return self.bus.published[before:]

    def source(self, path: Path, dataset: str = "paysim") -> list[Event]:
        """Announce a source file and run the pipeline on it."""
        return self.run(SourceDataAvailable(dataset=dataset, uri=str(path), producer="test"))


def types(events: list[Event]) -> list[str]:
    return [event.event_type for event in events]


def no_dead_letters(bus: InMemoryBus) -> None:
    letters = {service: [d.error for d in dead] for service, dead in bus.dlq.items() if dead}
    assert not letters, letters


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_paysim(tmp_path / "tx.csv", ROWS, seed=1)


def test_happy_path_events_follow_each_other_in_one_run(tmp_path: Path, source: Path) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data").start()
    events = pipeline.source(source)

    assert types(events) == ["SourceDataAvailable", "RawDataExtracted", "FeaturesGenerated",
                             "CandidatesTrained", "ModelReady"]
    for cause, effect in zip(events, events[1:], strict=False):
        assert effect.causation_id == cause.event_id
        assert effect.correlation_id == events[0].correlation_id
    raw, features = one_of(RawDataExtracted, events), one_of(FeaturesGenerated, events)
    trained, ready = one_of(CandidatesTrained, events), one_of(ModelReady, events)
    assert raw.rows == ROWS and raw.batch_id == pipeline.raw.list()[0].batch_id
    assert features.batch_ids == [raw.batch_id] and features.rows == ROWS
    assert len(trained.model_ids) == 2 and trained.failures == []
    assert ready.model_id in trained.model_ids and ready.version == "v1"
    assert pipeline.registry.champion().model_id == ready.model_id
    entity = pd.read_csv(source)["nameOrig"].iloc[-1]
    assert pipeline.online.read(features.feature_set_id, [entity])[0]
    # The entity state the stream continues from: written from the batch, kept, ready.
    assert pipeline.state.is_ready(features.feature_set_id)
    assert pipeline.targets.of("paysim") == [features.feature_set_id]
    [held] = pipeline.state.read(features.feature_set_id, [entity])
    last = pd.read_csv(source).query("nameOrig == @entity").iloc[-1]
    assert held and held[-1].values == (last["amount"],)
    no_dead_letters(pipeline.bus)


def test_unknown_dataset_is_refused_with_ingestion_failed(tmp_path: Path, source: Path) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data").start("ingestion")
    events = pipeline.source(source, dataset="payslim")

    failed = one_of(IngestionFailed, events)
    assert failed.reason == "unknown dataset 'payslim'; the pipeline config has: paysim"
    assert failed.dataset == "payslim" and failed.uri == str(source)
    assert types(events) == ["SourceDataAvailable", "IngestionFailed"]
    assert pipeline.raw.list() == []
    no_dead_letters(pipeline.bus)


def with_bad_amounts(tmp_path: Path, source: Path, rows: list[int]) -> Path:
    frame = pd.read_csv(source).astype({"amount": object})
    frame.loc[rows, "amount"] = "lots"
    path = tmp_path / "bad-amounts.csv"
    frame.to_csv(path, index=False)
    return path


def paysim_contract(**changes: Any) -> dict[str, Any]:
    config = paysim_config()
    config["datasets"]["paysim"].update(changes)
    return config


def test_a_batch_is_typed_as_it_is_stored_and_quarantined_rows_are_not_counted(
    tmp_path: Path, source: Path
) -> None:
    config = paysim_contract(bad_rows="quarantine", max_bad_share=0.01)
    pipeline = Pipeline(parsed(config), tmp_path / "data").start("ingestion", "preparation")
    events = pipeline.source(with_bad_amounts(tmp_path, source, [5, 77, 2_000]))

    raw = one_of(RawDataExtracted, events)
    batch = pipeline.raw.manifest(raw.batch_id)
    assert batch.typed_by is not None and batch.rows_set_aside == 3
    assert raw.rows == ROWS - 3 == one_of(FeaturesGenerated, events).rows
    assert pipeline.raw.is_accepted(raw.batch_id)
    no_dead_letters(pipeline.bus)


def test_a_refused_batch_stays_stored_as_read_but_is_not_accepted(
    tmp_path: Path, source: Path
) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data").start("ingestion")
    bad = with_bad_amounts(tmp_path, source, [5, 77])
    failed = one_of(IngestionFailed, pipeline.source(bad))

    assert failed.reason == (
        f"{bad} breaks the dataset contract: 2 of {ROWS} row(s) with mistyped values in "
        "['amount']; first: row 5: amount='lots' is not float, row 77: amount='lots' is not float")
    [batch] = pipeline.raw.list()
    assert batch.typed_by is None and batch.rows == ROWS  # as read, for inspection
    assert not pipeline.raw.is_accepted(batch.batch_id)
    assert pipeline.raw.read_frame(batch.batch_id)["amount"].iloc[5] == "lots"


def test_a_batch_stored_under_another_contract_is_checked_again(
    tmp_path: Path, source: Path
) -> None:
    bad = with_bad_amounts(tmp_path, source, [9])
    loose = Pipeline(parsed(paysim_contract(bad_rows="quarantine")), tmp_path / "data")
    one_of(RawDataExtracted, loose.start("ingestion").source(bad))  # typed, one row aside

    strict = Pipeline(parsed(paysim_config()), tmp_path / "data").start("ingestion")
    failed = one_of(IngestionFailed, strict.source(bad))  # the same bytes, another contract

    assert "1 of 2999 row(s) with mistyped values" not in failed.reason  # not the old typing
    assert "row 9: amount='lots' is not float" in failed.reason


def accounts_contract() -> dict[str, Any]:
    return {"columns": {"nameOrig": "string", "risk": "float"}, "entity_key": "nameOrig"}


def write_accounts(path: Path, transactions: Path) -> Path:
    names = pd.read_csv(transactions)["nameOrig"].drop_duplicates()
    frame = pd.DataFrame({"nameOrig": names, "risk": range(len(names))})
    frame["risk"] = frame["risk"] % 7 / 7
    frame.to_csv(path, index=False)
    return path


def test_preparation_ignores_a_dataset_its_features_do_not_read(
    tmp_path: Path, source: Path
) -> None:
    config = paysim_config()
    config["datasets"]["accounts"] = accounts_contract()
    pipeline = Pipeline(parsed(config), tmp_path / "data").start("ingestion", "preparation")
    events = pipeline.source(write_accounts(tmp_path / "accounts.csv", source), "accounts")

    assert types(events) == ["SourceDataAvailable", "RawDataExtracted"]
    assert pipeline.offline.list() == []
    no_dead_letters(pipeline.bus)


def joined_config() -> dict[str, Any]:
    config = paysim_config()
    config["datasets"]["accounts"] = accounts_contract()
    config["features"].update(inputs=["paysim", "accounts"], join={"on": ["nameOrig"],
                                                                  "how": "left"})
    return config


def test_join_waits_for_the_missing_input_then_uses_both_batches(
    tmp_path: Path, source: Path
) -> None:
    pipeline = Pipeline(parsed(joined_config()), tmp_path / "data")
    pipeline.start("ingestion", "preparation")
    accounts = pipeline.source(write_accounts(tmp_path / "accounts.csv", source), "accounts")
    assert types(accounts) == ["SourceDataAvailable", "RawDataExtracted"]  # waits

    events = pipeline.source(source)
    features = one_of(FeaturesGenerated, events)
    batches = {b.dataset: b.batch_id for b in pipeline.raw.list()}
    assert features.datasets == ["accounts", "paysim"]
    assert features.batch_ids == sorted(batches.values())
    assert features.causation_id == one_of(RawDataExtracted, events).event_id
    assert features.rows == ROWS  # a left join keeps every transaction
    assert pipeline.offline.metadata(features.feature_set_id).metadata["batch_ids"] == batches
    no_dead_letters(pipeline.bus)


def test_join_skips_a_batch_that_ingestion_refused(tmp_path: Path, source: Path) -> None:
    pipeline = Pipeline(parsed(joined_config()), tmp_path / "data")
    pipeline.start("ingestion", "preparation")
    accounts = write_accounts(tmp_path / "accounts.csv", source)
    good = one_of(RawDataExtracted, pipeline.source(accounts, "accounts"))
    broken = pd.read_csv(accounts).astype({"risk": object})
    broken.loc[3, "risk"] = "high"
    broken.to_csv(tmp_path / "accounts-broken.csv", index=False)
    one_of(IngestionFailed, pipeline.source(tmp_path / "accounts-broken.csv", "accounts"))

    events = pipeline.source(source)

    no_dead_letters(pipeline.bus)
    assert good.batch_id in one_of(FeaturesGenerated, events).batch_ids


def counting_config(fits_dir: Path, *extra: dict[str, Any]) -> dict[str, Any]:
    counting = {"name": "counting", "estimator": "tests.fixtures.models.CountingClassifier",
                "params": {"fits_dir": str(fits_dir)}}
    return paysim_config(training={"candidates": [counting, *extra]})


def test_training_skips_candidates_already_stored(tmp_path: Path, source: Path) -> None:
    fits = tmp_path / "fits"
    first = Pipeline(parsed(counting_config(fits)), tmp_path / "data").start(
        "ingestion", "preparation", "training")
    features = one_of(FeaturesGenerated, first.source(source))
    [counted] = one_of(CandidatesTrained, first.bus.published).model_ids
    assert attempts(fits) == 1

    logreg = {"name": "logreg", "estimator": "LogisticRegression", "params": {"max_iter": 300}}
    second = Pipeline(parsed(counting_config(fits, logreg)), tmp_path / "data").start("training")
    again = features.model_copy(update={"event_id": uuid.uuid4()})
    trained = one_of(CandidatesTrained, second.run(again))

    assert attempts(fits) == 1  # the stored candidate was not fitted again
    assert counted in trained.model_ids and len(trained.model_ids) == 2
    assert trained.failures == []
    assert {second.models.metadata(m).metadata["name"] for m in trained.model_ids} == {
        "counting", "logreg"}
    no_dead_letters(second.bus)


def test_evaluation_rejects_a_candidate_below_the_minimum(tmp_path: Path, source: Path) -> None:
    config = paysim_config(evaluation={"minimum": 1.01})
    pipeline = Pipeline(parsed(config), tmp_path / "data").start()
    events = pipeline.source(source)

    rejected = one_of(ModelRejected, events)
    trained = one_of(CandidatesTrained, events)
    assert rejected.model_ids == trained.model_ids
    assert any("average_precision" in r and "below the minimum 1.01" in r
               for r in rejected.reasons), rejected.reasons
    with pytest.raises(ModelNotFound):
        pipeline.registry.champion()
    statuses = {pipeline.models.metadata(m).status for m in trained.model_ids}
    assert statuses == {"rejected"}
    no_dead_letters(pipeline.bus)


def test_second_run_promotes_a_challenger_gated_against_the_champion(
    tmp_path: Path, source: Path
) -> None:
    config = parsed(paysim_config(evaluation={"max_regression": 1.0}))
    pipeline = Pipeline(config, tmp_path / "data").start()
    first = one_of(ModelReady, pipeline.source(source))
    fresh = write_paysim(tmp_path / "tx2.csv", ROWS, seed=2)
    second = one_of(ModelReady, pipeline.source(fresh))

    assert (first.version, second.version, second.previous_version) == ("v1", "v2", "v1")
    assert second.model_id != first.model_id
    evaluation = pipeline.models.metadata(second.model_id).metadata["evaluation"]
    assert "average_precision" in evaluation["champion_metrics"]  # the champion was scored
    assert pipeline.models.metadata(first.model_id).status == "previous"
    assert pipeline.registry.previous().version == "v1"
    no_dead_letters(pipeline.bus)


def test_second_run_rejects_a_challenger_worse_than_the_champion(
    tmp_path: Path, source: Path
) -> None:
    champion = Pipeline(parsed(paysim_config()), tmp_path / "data").start()
    first = one_of(ModelReady, champion.source(source))
    dummy = {"name": "dummy", "estimator": "DummyClassifier", "params": {"strategy": "prior"}}
    weak = paysim_config(training={"candidates": [dummy]}, evaluation={"minimum": None})
    challenger = Pipeline(parsed(weak), tmp_path / "data").start()
    events = challenger.source(write_paysim(tmp_path / "tx2.csv", ROWS, seed=2))

    rejected = one_of(ModelRejected, events)
    [reason] = rejected.reasons
    assert "regresses" in reason and "from the champion's" in reason, reason
    assert challenger.registry.champion().model_id == first.model_id
    assert challenger.registry.versions() == {"v1": first.model_id}
    no_dead_letters(challenger.bus)


class NeverCompleteStore(MemoryOnlineStore):
    """Takes the rows but never records the set complete (a materialisation cut short)."""

    def mark_complete(self, feature_set_id: str, rows: int) -> None:
        pass


def test_online_rows_are_written_by_preparation_s_own_features_generated_handler(
    tmp_path: Path, source: Path
) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data").start("ingestion",
                                                                            "preparation")
    features = one_of(FeaturesGenerated, pipeline.source(source))

    entities = pd.read_csv(source)["nameOrig"].drop_duplicates()
    assert pipeline.online.complete == {features.feature_set_id: len(entities)}
    assert all(pipeline.online.read(features.feature_set_id, entities.tolist()))
    written = dict(pipeline.online.rows)
    pipeline.run(features)  # redelivered: the set is complete, nothing is written again
    assert pipeline.online.rows == written


def test_evaluation_promotes_nothing_until_the_set_is_online(
    tmp_path: Path, source: Path
) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data",
                        online=NeverCompleteStore()).start()
    events = pipeline.source(source)

    assert "ModelReady" not in types(events)
    assert pipeline.registry.history() == []
    features = one_of(FeaturesGenerated, events)
    [letter] = pipeline.bus.dlq["evaluation"]
    assert letter.error == (f"NotReady: online features of feature set "
                            f"{features.feature_set_id} not ready after 1 s")


def test_superseded_sets_are_pruned_after_a_set_is_materialised_and_a_failure_is_only_logged(
    tmp_path: Path, source: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = Pipeline(parsed(paysim_config()), tmp_path / "data")
    calls: list[bool] = []

    def prune() -> list[str]:
        calls.append(bool(pipeline.online.is_complete(fsid)) if (fsid := last_set()) else False)
        if len(calls) == 2:
            raise ConnectionError("Redis went away")
        return ["old-set"]

    def last_set() -> str | None:
        generated = [e for e in pipeline.bus.published if isinstance(e, FeaturesGenerated)]
        return generated[-1].feature_set_id if generated else None

    service = PreparationService(pipeline.config, pipeline.raw, pipeline.offline,
                                 pipeline.online, pipeline.pipelines, prune_superseded=prune)
    runner = ServiceRunner(service, pipeline.bus, Settings(), processed=MemoryProcessedEvents())
    pipeline.bus.register(runner.dispatcher())
    pipeline.start("ingestion")
    pipeline.source(source)
    pipeline.source(write_paysim(tmp_path / "tx2.csv", ROWS, seed=2))
    assert calls == [True, True]  # once per new set, after its online rows were marked
    assert "pruning superseded feature sets failed" in caplog.text
    no_dead_letters(pipeline.bus)
