"""Batch scoring runs as a role of its own (``conveyor run batch-scoring``), the batch-scoring
Deployment of deploy/k8s, so a large batch never runs in the pods answering Score calls."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from app.services import SERVICES, service_names
from common.events import BatchScoringRequested, ScoringCompleted
from scoring.batch_scoring import BatchScoring
from scoring.batch_service import BatchScoringService
from scoring.service import ScoringService, ScoringSettings


@dataclass
class FakeBatch:
    """A BatchScoring stand-in: records the requests, answers one run (``completed`` is
    BatchScoring's own, around this ``run``)."""

    asked: list[BatchScoringRequested] = field(default_factory=list)
    completed = BatchScoring.completed

    def run(self, event: BatchScoringRequested) -> tuple[str, str, int]:
        self.asked.append(event)
        return "v3", "file:///data/scores/batch-1.parquet", 1234


def test_batch_scoring_is_a_service_of_the_catalogue() -> None:
    assert "batch-scoring" in service_names()
    assert SERVICES["batch-scoring"] == "scoring.batch_service:build"


def test_it_handles_batch_requests_and_nothing_else() -> None:
    service = BatchScoringService(FakeBatch())  # type: ignore[arg-type]
    assert service.name == "batch-scoring"
    assert set(service.handler_specs()) == {"BatchScoringRequested"}
    assert service.prefetch == 1


def test_a_request_is_scored_and_answered_in_the_same_run() -> None:
    batch = FakeBatch()
    request = BatchScoringRequested(producer="test", batch_id="b1", model_version="v3")
    answer = BatchScoringService(batch).on_batch_scoring_requested(request)  # type: ignore[arg-type]
    assert batch.asked == [request]
    assert isinstance(answer, ScoringCompleted)
    assert (answer.model_version, answer.uri, answer.rows) == (
        "v3", "file:///data/scores/batch-1.parquet", 1234)
    assert (answer.correlation_id, answer.causation_id) == (request.correlation_id,
                                                           request.event_id)
    assert answer.producer == "batch-scoring"


def test_online_scoring_leaves_batches_to_it_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SCORING_BATCH", "false")
    assert ScoringSettings().scoring_batch is False
    monkeypatch.delenv("CONVEYOR_SCORING_BATCH")
    assert ScoringSettings().scoring_batch is True  # local runs: scoring does both
    without = ScoringService.__new__(ScoringService)
    without.batch = None
    assert "BatchScoringRequested" not in without.handler_specs()
    with_batch = ScoringService.__new__(ScoringService)
    with_batch.batch = FakeBatch()  # type: ignore[assignment]
    assert "BatchScoringRequested" in with_batch.handler_specs()
