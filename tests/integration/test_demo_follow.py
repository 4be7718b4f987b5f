"""How the demo follows a run through the event log: each entry once, as what it is, even
where the log keeps no body (a ScoreServed that started a drift retraining)."""

from __future__ import annotations

import pytest

from app.demo import _follow
from common.eventlog import EventLog
from common.events import ModelReady, RetrainRequested, ScoreServed, ServedScore
from tests.support.harness import BusNamespace

pytestmark = pytest.mark.integration


def served() -> ScoreServed:
    scores = [ServedScore(request_id=f"r{i}", entity_id=f"C{i}", model_version="v2", score=0.5,
                          latency_ms=1.0) for i in range(3)]
    return ScoreServed(scores=scores, producer="scoring")


def test_a_run_started_by_served_scores_shows_each_entry_once_as_what_it_is(
        ns: BusNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    log = EventLog(ns.redis, ns.namespace)
    cursor = log.last_entry_id()
    scores = served()  # its body is not kept (only its summary, in the stream)
    retrain = scores.caused(RetrainRequested, producer="monitoring", reason="drift alert")
    ready = retrain.caused(ModelReady, producer="evaluation", model_id="m1", version="v3")
    for event in (scores, served(), retrain, ready):  # the second: another run's
        log.record(event)
    assert log.get(scores.event_id) is None

    final = _follow(log, cursor, retrain, timeout=30.0)

    assert final.event_id == ready.event_id
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["ScoreServed", "RetrainRequested",
                                                   "ModelReady"]
    assert lines[0].endswith('{"scores": 3}')
    assert '"reason": "drift alert"' in lines[1]
