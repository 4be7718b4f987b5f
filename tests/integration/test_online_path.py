"""The online path on the real RabbitMQ and Redis: records streamed through RecordsObserved
into the entity state, read back by the scoring core as Score reads them.

Parity: before each record of a 50,000-row PaySim stream of 400 accounts is applied, the
features Score uses for it (``ScoringCore.features_for``, the row ``score`` predicts on)
equal the offline transform's row within 1e-9. The stream is cut into runs in which no
account appears twice, so every record of a run depends only on records of earlier runs:
the run's records are read, then published (one RecordsObserved per run, its records
applied in order), then the test waits for the handler to have taken them.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest

from common.bus.dispatch import Dispatcher
from common.events import RecordsObserved, RecordsRefused
from common.runtime import ServiceRunner
from common.stores.entity_state import MemoryEntityState, state_ready_key
from ingestion.records import check_records
from preparation.service import OnlinePreparationService
from protos.conveyor.scoring.v1 import scoring_pb2 as pb
from protos.conveyor.scoring.v1 import scoring_pb2_grpc as pb_grpc
from scoring.core import ScoringCore
from scoring.observing import RecordObserver
from scoring.server import GrpcSettings, ScoringServer, field_value
from tests.fixtures.streaming import (
    StreamWorld,
    as_records,
    chunks_without_repeats,
    stream_frame,
    stream_world,
)
from tests.support.harness import BusNamespace, running_consumer, wait_for_handler

pytestmark = pytest.mark.integration
TOLERANCE = 1e-9


@contextlib.contextmanager
def consuming(ns: BusNamespace, service: OnlinePreparationService) -> Iterator[Dispatcher]:
    """The service consuming its queue as ``conveyor run`` runs it (idempotency on)."""
    ns.declare(service.name, ["RecordsObserved"])
    bus = ns.bus(f"{ns.namespace}-{service.name}")
    dispatcher = ServiceRunner(service, bus, ns.settings, processed=ns.processed()).dispatcher()
    with running_consumer(bus, dispatcher):
        yield dispatcher


def publish_run(ns: BusNamespace, dispatcher: Dispatcher,
                records: list[dict[str, Any]]) -> None:
    """The records in one event; back once the handler has applied them."""
    with wait_for_handler(dispatcher, "RecordsObserved", timeout=60):
        ns.bus().publish(RecordsObserved(dataset="paysim", records=records, producer="test"))


def used_features(core: ScoringCore, world: StreamWorld, record: dict[str, Any]) -> list[float]:
    """The features Score uses for ``record``, in the feature set's order."""
    used = core.features_for(world.query(record))
    return [used[name] for name in world.fitted.feature_names]


def mismatches(used: list[list[float]], expected: pd.DataFrame) -> list[tuple[int, str]]:
    """(row, feature) of every value off by more than the tolerance."""
    close = np.isclose(np.array(used), expected.to_numpy(dtype=float), rtol=TOLERANCE,
                       atol=TOLERANCE, equal_nan=True)
    return [(int(r), expected.columns[c]) for r, c in zip(*np.nonzero(~close), strict=True)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_score_sees_every_record_before_it_exactly_as_offline(
        tmp_path: Path, ns: BusNamespace) -> None:
    world = stream_world(tmp_path, ns.namespace, stream_frame(50_000, accounts=400))
    records, expected = as_records(world.frame), world.offline_features()
    core, used = world.core(), []
    with consuming(ns, world.service()) as dispatcher:
        for run in chunks_without_repeats(records):
            used += [used_features(core, world, records[i]) for i in run]
            publish_run(ns, dispatcher, [records[i] for i in run])
        last = core.score(world.query(records[-1]))
    world.close()
    assert len(used) == 50_000 and mismatches(used, expected) == []
    aggregates = [c for c in expected.columns if c.startswith("nameOrig_amount_")]
    assert aggregates and expected[aggregates].nunique().min() > 5  # histories matter
    assert last.feature_age_s is not None and last.feature_age_s >= 0


def test_records_out_of_order_within_the_tolerance_are_applied_where_they_belong(
        tmp_path: Path, ns: BusNamespace) -> None:
    frame = stream_frame(2_000, accounts=40, spread_s=10.0)  # a record every 10 s
    world = stream_world(tmp_path, ns.namespace, frame)
    records, full = as_records(frame), world.offline_features()
    arrival = list(range(len(records)))
    rng = random.Random(7)
    for start in range(0, len(arrival), 8):  # shuffled within 80 s, under the 120 s tolerance
        block = arrival[start:start + 8]
        rng.shuffle(block)
        arrival[start:start + 8] = block
    core, seen, partial = world.core(), set[int](), 0
    used, expected_rows = [], []
    with consuming(ns, world.service(tolerance_s=120)) as dispatcher:
        for run in chunks_without_repeats([records[i] for i in arrival]):
            positions = [arrival[j] for j in run]
            for i in positions:
                expected, whole = expected_for(world, full, seen, i)
                partial += not whole
                used.append(used_features(core, world, records[i]))
                expected_rows.append(expected)
            publish_run(ns, dispatcher, [records[i] for i in positions])
            seen.update(positions)
    world.close()
    assert mismatches(used, pd.DataFrame(expected_rows)) == []
    assert partial > 10  # some were read before an earlier record of theirs came


def expected_for(world: StreamWorld, full: pd.DataFrame, seen: set[int],
                 i: int) -> tuple[pd.Series, bool]:
    """The offline row of record ``i`` over the records applied so far, and whether that
    is the full transform's (every earlier record of its entity is in); else it is the
    transform of the entity's applied rows and ``i``."""
    frame = world.frame
    entity = frame["nameOrig"].iloc[i]
    earlier = [j for j in np.flatnonzero(frame["nameOrig"].to_numpy() == entity) if j < i]
    if all(j in seen for j in earlier):
        return full.iloc[i], True
    rows = sorted([j for j in earlier if j in seen] + [i])
    return world.offline_features(frame.iloc[rows]).loc[i], False


def test_duplicates_and_a_bad_record_change_nothing_but_what_they_should(
        tmp_path: Path, ns: BusNamespace) -> None:
    world = stream_world(tmp_path, ns.namespace, stream_frame(1_000, accounts=20))
    records = as_records(world.frame)
    good = RecordsObserved(dataset="paysim", records=records[:300], producer="test")
    bad_record = {**records[300], "amount": "lots"}
    mixed = RecordsObserved(dataset="paysim", records=[bad_record, *records[301:400]],
                            producer="test")
    entities = sorted({r["nameOrig"] for r in records[:400]})
    service = world.service()
    with consuming(ns, service) as dispatcher:
        with wait_for_handler(dispatcher, "RecordsObserved", count=1):
            ns.bus().publish(good)
        first = world.state.read(world.fitted.feature_set_id, entities)
        again = RecordsObserved(dataset="paysim", records=records[:300], producer="test")
        with wait_for_handler(dispatcher, "RecordsObserved", count=1):
            ns.bus().publish(again)
        assert world.state.read(world.fitted.feature_set_id, entities) == first
        with wait_for_handler(dispatcher, "RecordsObserved", count=1) as waited:
            ns.bus().publish(mixed)
    refused = waited.result
    assert isinstance(refused, RecordsRefused) and refused.applied == 99
    assert [(p.index, p.field) for p in refused.problems] == [(0, "amount")]
    assert "amount='lots' is not float" in refused.problems[0].reason
    replay = MemoryEntityState()
    plan = service.plan(world.fitted.feature_set_id)
    ok = check_records(records[:300] + records[301:400], world.config.datasets["paysim"])
    replay.apply("fs", plan.record_entries(ok.records, ok.ids), plan.retention)
    assert world.state.read(world.fitted.feature_set_id, entities) == replay.read("fs", entities)
    world.close()


def test_score_then_record_never_counts_the_record_itself_and_the_next_score_does(
        tmp_path: Path, ns: BusNamespace) -> None:
    frame = stream_frame(400, accounts=4, spread_s=60.0)
    world = stream_world(tmp_path, ns.namespace, frame)
    records, expected = as_records(frame), world.offline_features()
    service = world.service()
    service.on_records_observed(RecordsObserved(dataset="paysim", records=records[:300]))
    core = world.core()
    observer = RecordObserver(ns.bus().publish_many, dataset="paysim",
                              entity_key="nameOrig").start()
    core.on_observed = observer.observe
    entity = records[300]["nameOrig"]
    a, b = [i for i in range(300, len(records)) if records[i]["nameOrig"] == entity][:2]
    previous = max(i for i in range(300) if records[i]["nameOrig"] == entity)
    server = ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0)).start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, \
            consuming(ns, service) as dispatcher:
        stub = pb_grpc.ScoringStub(channel)
        with wait_for_handler(dispatcher, "RecordsObserved") as waited:
            first = stub.Score(score_request(records[a], observe=True), timeout=5)
        second = stub.Score(score_request(records[b]), timeout=5)
    server.stop(0)
    observer.close()
    world.close()
    assert waited.event.records[0]["amount"] == records[a]["amount"]
    minutes = 60_000.0
    assert first.feature_age_ms == (a - previous) * minutes  # the last record before a
    assert second.feature_age_ms == (b - a) * minutes  # a itself, observed after its answer
    assert dict(second.feature_ages_ms) == dict.fromkeys(  # every window's newest is a
        world.fitted.aggregate_columns, (b - a) * minutes)
    for response, row in ((first, a), (second, b)):
        offline = world.estimator_score(expected.iloc[[row]])
        assert response.score == pytest.approx(offline, rel=1e-9, abs=1e-12)


def score_request(record: dict[str, Any], **options: Any) -> pb.ScoreRequest:
    fields = {k: field_value(v) for k, v in record.items() if k != "nameOrig" and v is not None}
    return pb.ScoreRequest(entity_id=record["nameOrig"], fields=fields, **options)


def test_scoring_reads_the_entity_state_only_once_its_batch_is_written(
        tmp_path: Path, ns: BusNamespace) -> None:
    world = stream_world(tmp_path, ns.namespace, stream_frame(300, accounts=3, spread_s=60.0))
    records = as_records(world.frame)
    world.service().on_records_observed(RecordsObserved(dataset="paysim", records=records[:-1]))
    fsid, name = world.fitted.feature_set_id, "nameOrig_amount_count_24h"
    ns.redis.delete(state_ready_key(ns.namespace, fsid))  # as while preparation writes it
    before = world.core().features_for(world.query(records[-1]))
    world.state.mark_ready(fsid)
    after = world.core().features_for(world.query(records[-1]))
    world.close()
    assert before[name] == 0.0  # the batch's latest rows (none here), not a partial state
    assert after[name] == world.offline_features().iloc[-1][name] > 0
