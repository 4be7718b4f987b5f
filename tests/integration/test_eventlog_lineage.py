"""The event log and lineage on the real Redis; a service process on the real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from app.local import free_port
from common.eventlog import EventLog, artifact_ids
from common.events import (
    CandidatesTrained,
    FeaturesGenerated,
    ModelReady,
    RawDataExtracted,
    SourceDataAvailable,
)
from common.lineage import trace
from tests.support.harness import BusNamespace, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def a_run() -> list:
    source = SourceDataAvailable(dataset="d", uri="d.csv", producer="test")
    raw = source.caused(RawDataExtracted, producer="ingestion", dataset="d", batch_id="b1",
                        source_uri="d.csv", rows=3, columns=["a"])
    features = raw.caused(FeaturesGenerated, producer="preparation", feature_set_id="fs1",
                          datasets=["d"], batch_ids=["b1"], rows=3, features=["a"])
    trained = features.caused(CandidatesTrained, producer="training", feature_set_id="fs1",
                              model_ids=["m1", "m2"])
    ready = trained.caused(ModelReady, producer="evaluation", model_id="m1", version="v1")
    return [source, raw, features, trained, ready]


def test_artifact_ids_are_read_from_payloads() -> None:
    _, raw, features, trained, ready = a_run()
    assert artifact_ids(raw) == {"b1"}
    assert artifact_ids(features) == {"fs1", "b1"}
    assert artifact_ids(trained) == {"fs1", "m1", "m2"}
    assert artifact_ids(ready) == {"m1"}


def test_lineage_of_a_model_walks_back_to_the_source_and_forward(ns: BusNamespace) -> None:
    log = EventLog(ns.redis, ns.namespace)
    run = a_run()
    for event in reversed(run):  # arrival order must not matter
        log.record(event)
    found = trace(log, "m1")
    assert found.subject.event_type == "CandidatesTrained"
    assert [e.event_type for e in found.ancestors] == [
        "SourceDataAvailable", "RawDataExtracted", "FeaturesGenerated"]
    assert [(d, e.event_type) for d, e in found.descendants] == [(1, "ModelReady")]
    assert trace(log, "b1").subject.event_id == run[1].event_id
    assert trace(log, str(run[0].event_id)).descendants[-1][1].event_id == run[-1].event_id


def test_lineage_of_an_unknown_id_is_not_found(ns: BusNamespace) -> None:
    with pytest.raises(Exception, match="nope not found"):
        trace(EventLog(ns.redis, ns.namespace), "nope")


def test_recording_twice_keeps_one_body_and_one_child(ns: BusNamespace) -> None:
    log = EventLog(ns.redis, ns.namespace)
    source, raw, *_ = a_run()
    for _ in range(2):
        log.record(source)
        log.record(raw)
    assert [e.event_id for e in log.caused_by(source.event_id)] == [raw.event_id]
    assert log.get(raw.event_id) == raw


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return 0


def test_eventlog_service_process_records_events_and_stops_cleanly_on_sigterm(
    ns: BusNamespace, tmp_path: Path
) -> None:
    port = free_port()
    env = {**os.environ, "CONVEYOR_NAMESPACE": ns.namespace, "CONVEYOR_HTTP_PORT": str(port),
           "CONVEYOR_DATA_ROOT": str(tmp_path),
           "CONVEYOR_RETRY_DELAYS_S": json.dumps(list(ns.settings.retry_delays_s))}
    ns.services.add("eventlog")
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "eventlog"],
                               cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: get(f"http://127.0.0.1:{port}/readyz") == 200, timeout=30)
        run = a_run()
        ns.bus().publish_many(run)
        log = EventLog(ns.redis, ns.namespace)
        wait_until(lambda: all(log.get(e.event_id) for e in run), timeout=30)
        assert get(f"http://127.0.0.1:{port}/healthz") == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'conveyor_events_handled_total{event_type="ModelReady",service="eventlog"} 1.0' \
            in metrics
        assert 'conveyor_queue_depth{queue="dead",service="eventlog"} 0.0' in metrics
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-2000:]
    assert "received SIGTERM" in stderr and "service eventlog stopped" in stderr
    assert ns.depths("eventlog")["ready"] == 0
