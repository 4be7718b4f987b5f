"""The online preparation service's handler on the in-memory entity state: applied,
deduplicated, refused by name. (The real broker and Redis: tests/integration/
test_online_path.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidInput
from common.events import RecordsObserved, RecordsRefused
from common.stores import ModelStore
from common.stores.entity_state import MemoryEntityState, MemoryStreamTargets
from preparation import build_pipeline
from preparation.service import OnlinePreparationService
from tests.fixtures.pipeline import parsed, paysim_config
from tests.fixtures.streaming import KEY, as_records, stream_frame

CONFIG = parsed(paysim_config())


@pytest.fixture
def world(tmp_path: Path) -> tuple[OnlinePreparationService, str, list[dict]]:
    frame = stream_frame(400, accounts=8)
    fitted = build_pipeline(CONFIG.features).fit(frame, batch_ids=["b1"])
    pipelines = ModelStore(str(tmp_path / "pipelines"), KEY)
    pipelines.save(fitted.feature_set_id, fitted)
    targets = MemoryStreamTargets()
    targets.add("paysim", fitted.feature_set_id)
    service = OnlinePreparationService(CONFIG, pipelines, MemoryEntityState(), targets)
    return service, fitted.feature_set_id, as_records(frame)


def held(service: OnlinePreparationService, fsid: str, entity: str) -> int:
    """How many entries the entity's state holds."""
    return len(service.state.read(fsid, [entity])[0] or [])


def test_records_are_applied_and_a_redelivery_changes_nothing(world) -> None:
    service, fsid, records = world
    event = RecordsObserved(dataset="paysim", records=records[:50])
    assert service.on_records_observed(event) is None
    entities = sorted({r["nameOrig"] for r in records[:50]})
    before = service.state.read(fsid, entities)
    assert all(before) and service.metrics.applied.labels("paysim")._value.get() == 50
    again = service.on_records_observed(event)  # redelivered
    assert service.state.read(fsid, entities) == before
    assert service.metrics.applied.labels("paysim")._value.get() == 50
    # Records the state still holds are duplicates; older ones, pruned since (beyond
    # every window), cannot be told from late records and are refused as such.
    late = [] if again is None else again.problems
    assert all("later than the tolerance" in p.reason for p in late)
    assert service.metrics.duplicates.labels("paysim")._value.get() + len(late) == 50


def test_a_bad_record_is_refused_by_name_and_the_rest_applied(world) -> None:
    service, fsid, records = world
    bad = {**records[1], "amount": "twelve"}
    event = RecordsObserved(dataset="paysim", records=[records[0], bad, records[2]])
    refused = service.on_records_observed(event)
    assert isinstance(refused, RecordsRefused) and refused.applied == 2
    [problem] = refused.problems
    assert (problem.index, problem.field) == (1, "amount") and "'twelve'" in problem.reason
    assert refused.causation_id == event.event_id


def test_a_record_too_late_is_refused_as_late(world) -> None:
    service, fsid, records = world
    entity = records[-1]["nameOrig"]
    service.on_records_observed(RecordsObserved(dataset="paysim", records=records[-1:]))
    old = next(r for r in records if r["nameOrig"] == entity)
    refused = service.on_records_observed(RecordsObserved(dataset="paysim", records=[old]))
    assert isinstance(refused, RecordsRefused) and refused.applied == 0
    assert "later than the tolerance" in refused.problems[0].reason
    assert service.metrics.refused.labels("paysim", "late")._value.get() == 1


def test_an_unknown_dataset_is_the_input_s_fault(world) -> None:
    service, _, records = world
    with pytest.raises(InvalidInput, match="dataset 'nope' is not in the pipeline config"):
        service.on_records_observed(RecordsObserved(dataset="nope", records=records[:1]))


def test_records_of_a_dataset_no_set_keeps_are_checked_but_go_nowhere(world) -> None:
    service, fsid, records = world
    service.targets.remove("paysim", [fsid])
    assert service.on_records_observed(RecordsObserved(dataset="paysim",
                                                       records=records[:3])) is None
    assert held(service, fsid, records[0]["nameOrig"]) == 0
