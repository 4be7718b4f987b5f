"""Offline batch scoring through the real scoring service, RabbitMQ and Redis.

The service is built by ``scoring.service.build`` and run as ``conveyor run scoring`` runs
it; requests are published on the real broker and ``ScoringCompleted`` is awaited by a
consumer of its own. Expected scores are computed apart: the fitted feature set's offline
transform over the whole batch at once, then the estimator.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest

from common.bus.dispatch import ERROR_MESSAGE, ERROR_TYPE, Dispatcher
from common.events import BatchScoringRequested, Event, ScoringCompleted
from common.stores import BatchScoreStore
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring.server import field_value
from scoring.service import ScoringService
from tests.fixtures.pipeline import as_event, watcher
from tests.fixtures.scoring_service import (
    GatedClassifier,
    ServiceWorld,
    gate_is_waiting,
    namespace_fixture,
    world_fixture,
)
from tests.support.harness import (
    BusNamespace,
    running_consumer,
    running_services,
    wait_for_handler,
    wait_until,
)

pytestmark = pytest.mark.integration
CHUNK_ROWS = 97  # several chunks per batch, cut across entities


ns = namespace_fixture(CONVEYOR_GRPC_PORT="0", CONVEYOR_BATCH_SCORING_CHUNK_ROWS=str(CHUNK_ROWS))
world = world_fixture()


@dataclass
class Running:
    """The scoring service as ``conveyor run scoring`` runs it, and a watcher of its events."""

    service: ScoringService
    watch: Dispatcher

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.server.port}"


@pytest.fixture
def scoring(ns: BusNamespace, world: ServiceWorld) -> Iterator[Running]:
    watch = watcher(ns, ("ScoringCompleted", "ScoreServed"))  # bound before anything runs
    with running_consumer(ns.bus(), watch), running_services(ns, ["scoring"]) as running:
        service = running["scoring"].runner.service
        assert isinstance(service, ScoringService)
        yield Running(service, watch)


def request(scoring: Running, ns: BusNamespace, event: Event,
            timeout: float = 60) -> ScoringCompleted:
    """Publish a request and return the ScoringCompleted it caused."""
    with wait_for_handler(scoring.watch, "ScoringCompleted", timeout,
                          match=lambda e: e.causation_id == event.event_id) as waited:
        ns.bus().publish(event)
    return as_event(ScoringCompleted, waited.event)


def expected_scores(world: ServiceWorld, frame: pd.DataFrame, version: str) -> np.ndarray:
    """The offline transform of the whole frame at once, then the estimator."""
    features = world.fitted.transform(frame)[list(world.fitted.feature_names)]
    return world.estimators[version].predict_proba(features)[:, 1]


def stored(world: ServiceWorld, uri: str) -> pd.DataFrame:
    run_id = uri.rstrip("/").split("/")[-2]
    return BatchScoreStore(world.settings.data_root).read(run_id)


def release(gate: Path) -> None:
    """Let a predict waiting at the gate go on, if one is."""
    held = gate_is_waiting(gate)
    if held is not None:
        os.close(held)


def again(event: Event) -> Event:
    """The same request under a new event id, as a replay or a second producer sends it."""
    return event.model_copy(update={"event_id": uuid.uuid4()})


def test_a_raw_batch_is_scored_to_parquet_and_announced(
        ns: BusNamespace, world: ServiceWorld, scoring: Running) -> None:
    event = BatchScoringRequested(batch_id=world.batch_id, model_version="v1", producer="test")
    done = request(scoring, ns, event)
    assert (done.model_version, done.rows) == ("v1", len(world.typed))
    scores = stored(world, done.uri)
    assert list(scores.columns) == ["row_id", "entity_id", "score", "label",
                                    "probability_0.0", "probability_1.0", "model_version"]
    assert scores["row_id"].tolist() == list(range(len(world.typed)))
    assert scores["entity_id"].tolist() == world.typed["nameOrig"].tolist()
    np.testing.assert_allclose(scores["score"], expected_scores(world, world.typed, "v1"),
                               rtol=1e-12, atol=1e-15)
    assert set(scores["model_version"]) == {"v1"}
    assert (scores["label"] == np.where(scores["probability_1.0"] > 0.5, "1.0", "0.0")).all()


def test_a_feature_set_is_scored_by_the_champion_when_no_version_is_named(
        ns: BusNamespace, world: ServiceWorld, scoring: Running) -> None:
    event = BatchScoringRequested(feature_set_id=world.fitted.feature_set_id, producer="test")
    done = request(scoring, ns, event)
    assert (done.model_version, done.rows) == ("v2", len(world.typed))
    scores = stored(world, done.uri)
    np.testing.assert_allclose(scores["score"], expected_scores(world, world.typed, "v2"),
                               rtol=1e-12, atol=1e-15)


def test_a_redelivered_request_writes_the_same_file_once(
        ns: BusNamespace, world: ServiceWorld, scoring: Running) -> None:
    event = BatchScoringRequested(batch_id=world.batch_id, model_version="v2", producer="test")
    first = request(scoring, ns, event)
    path = Path(first.uri.removeprefix("file://"))
    written = path.stat().st_mtime_ns
    second = request(scoring, ns, again(event))
    assert (second.uri, second.rows, second.model_version) == (
        first.uri, first.rows, first.model_version)
    assert path.stat().st_mtime_ns == written  # not scored nor written again
    runs = list((Path(world.settings.data_root) / "scores").iterdir())
    assert runs == [path.parent]


@pytest.mark.parametrize(("fields", "message"), [
    ({"model_version": "v9"}, "ModelNotFound: model fraud with version v9 not found"),
    ({"batch_id": "0" * 24}, f"NotFound: raw batch {'0' * 24} not found"),
    ({"feature_set_id": "f" * 16}, f"NotFound: feature set {'f' * 16} not found"),
])
def test_an_unknown_version_batch_or_feature_set_is_dead_lettered_naming_it(
        ns: BusNamespace, world: ServiceWorld, scoring: Running,
        fields: dict[str, Any], message: str) -> None:
    payload = {"batch_id": world.batch_id, **fields}
    if "feature_set_id" in fields:
        del payload["batch_id"]
    bad = BatchScoringRequested(producer="test", **payload)
    ns.bus().publish(bad)
    wait_until(lambda: ns.depths("scoring")["dead"] == 1, timeout=30, interval=0.25)
    [letter] = ns.bus().dead_letters("scoring")
    assert letter.error == message
    assert letter.headers[ERROR_TYPE] in ("ModelNotFound", "NotFound")
    assert message.split(": ", 1)[1] == letter.headers[ERROR_MESSAGE]
    good = BatchScoringRequested(batch_id=world.batch_id, producer="test")
    assert request(scoring, ns, good).rows == len(world.typed)  # still consuming


def test_a_feature_set_of_another_model_is_refused_naming_both(
        ns: BusNamespace, world: ServiceWorld, scoring: Running, tmp_path: Path) -> None:
    other = "0123456789abcdef"
    world.stores.offline.write(other, world.fitted.transform(world.typed), {})
    ns.bus().publish(BatchScoringRequested(feature_set_id=other, producer="test"))
    wait_until(lambda: ns.depths("scoring")["dead"] == 1, timeout=30, interval=0.25)
    [letter] = ns.bus().dead_letters("scoring")
    assert letter.error == (
        f"InvalidInput: model version v2 was trained on feature set "
        f"{world.fitted.feature_set_id}, not {other}: score a raw batch instead")


def test_scoring_keeps_answering_while_a_batch_runs(
        ns: BusNamespace, world: ServiceWorld, scoring: Running, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    slow = GatedClassifier(world.estimators["v1"], str(gate))
    world.stores.models.save("m-gated", slow, world.stores.models.metadata("m-v1").metadata)
    version = world.stores.registry(world.settings, "fraud").register("m-gated")
    event = BatchScoringRequested(batch_id=world.batch_id, model_version=version,
                                  producer="test")
    row = world.typed.iloc[7]
    call = pb.ScoreRequest(entity_id=row["nameOrig"], fields={
        k: field_value(v) for k, v in world.fields(row).items()})
    with wait_for_handler(scoring.watch, "ScoringCompleted", 60) as waited:
        ns.bus().publish(event)
        held = wait_until(lambda: gate_is_waiting(gate), timeout=30)  # the batch is predicting
        try:
            with grpc.insecure_channel(scoring.target) as channel:
                stub = pb_grpc.ScoringStub(channel)
                replies = [stub.Score(call, timeout=5) for _ in range(20)]
            assert not waited.calls  # the batch was still running all along
        finally:
            os.close(held)  # lets this chunk's predict go on
        wait_until(lambda: release(gate) or waited.calls, timeout=60)  # and the next chunks'
    assert {r.model_version for r in replies} == {"v2"}
    assert as_event(ScoringCompleted, waited.event).model_version == version


def test_online_and_offline_scores_agree(
        ns: BusNamespace, world: ServiceWorld, scoring: Running, tmp_path: Path) -> None:
    """What parity covers: rows whose past in the batch is what the online store holds.

    Offline, each row's entity aggregates come from its entity's earlier rows in the batch
    (point in time). Online, they come from Redis, which holds each entity's values after
    the whole history. So the batch is the history followed by one new transaction per
    known entity, and transactions of brand-new entities (no past on either side); those
    rows are scored online through a real stub, with the aggregates from Redis and again
    with the aggregates carried in the request, and compared with the offline scores of
    the same rows. The history's own rows cannot agree by design (Redis holds only the
    latest values) and are not compared. Count windows only: a time-window aggregate in
    Redis is exact only at the moment it was materialised.
    """
    history = world.typed
    latest = history["timestamp"].max()
    known = sorted(history["nameOrig"].unique())[:10]
    sample = history.sample(len(known) + 4, random_state=3).reset_index(drop=True)
    new = sample.assign(
        nameOrig=known + [f"NEW{i}" for i in range(4)],
        timestamp=[latest + pd.Timedelta(minutes=i + 1) for i in range(len(sample))])
    batch_id, typed = world.put_batch(pd.concat([history, new], ignore_index=True),
                                      tmp_path / "batch.csv")
    done = request(scoring, ns, BatchScoringRequested(batch_id=batch_id, producer="test"))
    offline = stored(world, done.uri).set_index("row_id").loc[
        range(len(history), len(typed)), "score"].to_numpy()

    online_rows = world.stores.online.read(world.fitted.feature_set_id, new["nameOrig"].tolist())
    with grpc.insecure_channel(scoring.target) as channel:
        stub = pb_grpc.ScoringStub(channel)

        def score(row: pd.Series, extra: dict[str, Any]) -> float:
            fields = {**world.fields(row), **extra}
            return float(stub.Score(pb.ScoreRequest(entity_id=row["nameOrig"], fields={
                k: field_value(v) for k, v in fields.items()}), timeout=5).score)

        from_redis = [score(row, {}) for _, row in new.iterrows()]
        carried = [score(row, {k: float(v) for k, v in (found or {}).items()
                               if k in world.fitted.aggregate_columns})
                   for (_, row), found in zip(new.iterrows(), online_rows, strict=True)]
    assert [r is None for r in online_rows] == [False] * len(known) + [True] * 4
    np.testing.assert_allclose(from_redis, offline, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(carried, offline, rtol=1e-9, atol=1e-12)


def test_batch_scoring_is_requested_from_the_command_line(
        ns: BusNamespace, world: ServiceWorld, scoring: Running,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from app.cli import main

    monkeypatch.setenv("CONVEYOR_NAMESPACE", ns.namespace)
    payload = json.dumps({"batch_id": world.batch_id, "model_version": "previous"})
    with wait_for_handler(scoring.watch, "ScoringCompleted", 60) as waited:
        result = CliRunner().invoke(main, ["publish", "BatchScoringRequested", "--json", payload])
        assert result.exit_code == 0, result.output
    done = as_event(ScoringCompleted, waited.event)
    assert (done.model_version, done.rows) == ("v1", len(world.typed))
    assert f"published BatchScoringRequested {done.causation_id}" in result.output
