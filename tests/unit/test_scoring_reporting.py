"""ScoreReporter with the in-process bus: batches, bounded buffers, failing sinks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from common.bus.memory import InMemoryBus
from common.events import ScoreServed, ServedScore
from scoring.core import InferResult, ScoreQuery, ScoreResult
from scoring.reporting import (
    NamedSink,
    ReportsDroppedCollector,
    ReportSettings,
    ScoreReporter,
    event_sink,
    served_event,
)
from tests.support.harness import wait_until


def answer(i: int) -> tuple[ScoreQuery, ScoreResult]:
    query = ScoreQuery(f"C{i}", {"amount": float(i)}, request_id=f"r{i}")
    result = ScoreResult(
        score=i / 100, label="0", probabilities={"0": 1 - i / 100, "1": i / 100},
        version="v2", fallback=i % 2 == 1, fallback_reason="v3 passed its deadline" if i % 2
        else None, latency_ms=1.5, request_id=f"r{i}", features={"amount": i * 2.0, "hour": 3.0})
    return query, result


def inference(rows: int, request_id: str = "call-7") -> InferResult:
    """A ModelInfer answer of ``rows`` rows: probabilities of classes 0 and 1, its inputs."""
    positive = np.linspace(0.1, 0.9, rows)
    return InferResult(np.column_stack([1 - positive, positive]), ["0", "1"], "v3",
                       False, None, None, "champion", 2.5, request_id,
                       np.arange(rows * 2, dtype=float).reshape(rows, 2), ["amount", "hour"])


def report(reporter: ScoreReporter, ids: range) -> None:
    for i in ids:
        reporter.report(*answer(i))


class Collecting:
    """A sink that keeps every batch it is given, failing the first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[ServedScore]] = []
        self.calls = 0
        self.failures = failures

    def __call__(self, scores: list[ServedScore]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("Redis is down")
        self.batches.append(scores)

    @property
    def ids(self) -> list[str]:
        return [s.request_id for batch in self.batches for s in batch]


@pytest.fixture
def bus() -> InMemoryBus:
    bus = InMemoryBus()
    bus.declare("monitoring", ["ScoreServed"])
    return bus


def events(bus: InMemoryBus) -> list[ScoreServed]:
    return [e for e in bus.published if isinstance(e, ScoreServed)]


@pytest.fixture
def closing() -> Iterator[list[ScoreReporter]]:
    reporters: list[ScoreReporter] = []
    yield reporters
    for reporter in reporters:
        reporter.close(timeout_s=5)


def test_scores_are_flushed_in_batches_to_every_sink(bus: InMemoryBus) -> None:
    stream = Collecting()
    reporter = ScoreReporter([NamedSink("stream", stream), event_sink(bus.publish_many)],
                             ReportSettings(flush_size=3))
    report(reporter, range(7))
    assert reporter.flush()
    assert [len(b) for b in stream.batches] == [3, 3, 1]
    assert [len(e.scores) for e in events(bus)] == [3, 3, 1]
    served = [s for e in events(bus) for s in e.scores]
    assert [s.request_id for s in served] == [f"r{i}" for i in range(7)]
    first, second = served[0], served[1]
    assert (first.entity_id, first.model_version, first.score, first.label) == (
        "C0", "v2", 0.0, "0")
    assert first.features == {"amount": 0.0, "hour": 3.0}
    assert (second.fallback, second.fallback_reason) == (True, "v3 passed its deadline")
    assert {e.producer for e in events(bus)} == {"scoring"} and reporter.pending == 0


def test_the_thread_flushes_once_flush_size_scores_wait(
        bus: InMemoryBus, closing: list[ScoreReporter]) -> None:
    reporter = ScoreReporter([event_sink(bus.publish_many)],
                             ReportSettings(flush_size=5, flush_interval_s=3600))
    closing.append(reporter.start())
    report(reporter, range(4))
    report(reporter, range(4, 5))  # the fifth wakes the thread; the interval is an hour
    wait_until(lambda: len(events(bus)) == 1, timeout=10)
    assert [s.request_id for s in events(bus)[0].scores] == [f"r{i}" for i in range(5)]


def test_the_thread_flushes_every_interval(bus: InMemoryBus, closing: list[ScoreReporter]) -> None:
    reporter = ScoreReporter([event_sink(bus.publish_many)],
                             ReportSettings(flush_size=1000, flush_interval_s=0.05))
    closing.append(reporter.start())
    report(reporter, range(2))
    wait_until(lambda: sum(len(e.scores) for e in events(bus)) == 2, timeout=10)


def test_close_flushes_what_is_left(bus: InMemoryBus) -> None:
    closed = threading.Event()
    reporter = ScoreReporter([event_sink(bus.publish_many)],
                             ReportSettings(flush_size=1000, flush_interval_s=3600),
                             on_close=closed.set).start()
    report(reporter, range(3))
    reporter.close(timeout_s=10)
    assert [len(e.scores) for e in events(bus)] == [3]
    assert closed.is_set() and reporter.dropped == 0


def test_a_full_buffer_drops_the_oldest_and_counts_them(
        bus: InMemoryBus, caplog: pytest.LogCaptureFixture) -> None:
    reporter = ScoreReporter([event_sink(bus.publish_many)],
                             ReportSettings(buffer_size=5, flush_size=100))
    report(reporter, range(8))
    assert reporter.dropped == 3
    with caplog.at_level(logging.WARNING, logger="scoring.reporting"):
        assert reporter.flush()
    assert [s.request_id for s in events(bus)[0].scores] == [f"r{i}" for i in range(3, 8)]
    assert "3 score reports dropped" in caplog.text


def test_drop_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    reporter = ScoreReporter([NamedSink("stream", Collecting())],
                             ReportSettings(buffer_size=1, warn_every_s=3600))
    with caplog.at_level(logging.WARNING, logger="scoring.reporting"):
        for _ in range(5):
            report(reporter, range(3))
            reporter.flush()
    assert reporter.dropped == 10
    assert caplog.text.count("score reports dropped") == 1


def test_a_failing_sink_does_not_raise_and_is_retried_with_the_same_event(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = InMemoryBus()  # no queue bound to ScoreServed yet: every publish is Unroutable
    attempts: list[ScoreServed] = []

    def publish_many(sent: list) -> None:
        attempts.extend(sent)
        bus.publish_many(sent)

    reporter = ScoreReporter([event_sink(publish_many)], ReportSettings(flush_size=10))
    report(reporter, range(4))
    with caplog.at_level(logging.WARNING, logger="scoring.reporting"):
        assert reporter.flush() is False  # refused, not raised
    assert "ScoreServed events failed (4 waiting, retried)" in caplog.text
    assert "unroutable" in caplog.text
    bus.declare("monitoring", ["ScoreServed"])
    assert reporter.flush() is True
    assert [s.request_id for s in events(bus)[0].scores] == ["r0", "r1", "r2", "r3"]
    assert attempts[0].event_id == attempts[1].event_id  # monitoring deduplicates a resend
    assert reporter.dropped == 0


def test_one_failing_sink_does_not_hold_back_the_other(bus: InMemoryBus) -> None:
    stream = Collecting(failures=2)
    reporter = ScoreReporter([NamedSink("stream", stream), event_sink(bus.publish_many)],
                             ReportSettings(flush_size=10))
    report(reporter, range(2))
    assert reporter.flush() is False
    report(reporter, range(2, 3))
    assert reporter.flush() is False
    assert sum(len(e.scores) for e in events(bus)) == 3  # events went out meanwhile
    assert reporter.flush() is True
    assert stream.ids == ["r0", "r1", "r2"]  # the stream got them once, in order


def test_a_down_sink_keeps_only_the_newest_within_its_bound() -> None:
    stream = Collecting(failures=10**6)
    reporter = ScoreReporter([NamedSink("stream", stream)], ReportSettings(buffer_size=5))
    report(reporter, range(4))
    reporter.flush()
    report(reporter, range(4, 8))
    reporter.flush()
    assert (reporter.dropped, reporter.pending) == (3, 5)
    stream.failures = 0
    assert reporter.flush()
    assert stream.ids == [f"r{i}" for i in range(3, 8)]


def test_reporting_never_waits_for_a_blocked_sink(closing: list[ScoreReporter]) -> None:
    entered, release = threading.Event(), threading.Event()

    def blocked(scores: list[ServedScore]) -> None:
        entered.set()
        release.wait(30)

    reporter = ScoreReporter([NamedSink("stream", blocked)],
                             ReportSettings(buffer_size=100, flush_size=1))
    closing.append(reporter.start())
    report(reporter, range(1))
    assert entered.wait(10)  # the thread is stuck in the sink...
    report(reporter, range(1, 1001))  # ...and reporting still returns at once, dropping
    assert reporter.dropped >= 800  # at most 100 wait in the intake and 100 in the outbox
    release.set()


def test_the_metric_counts_the_drops() -> None:
    reporter = ScoreReporter([NamedSink("stream", Collecting())], ReportSettings(buffer_size=2))
    registry = CollectorRegistry()
    registry.register(ReportsDroppedCollector(reporter))
    assert registry.get_sample_value("conveyor_scoring_reports_dropped_total") == 0
    report(reporter, range(5))
    assert registry.get_sample_value("conveyor_scoring_reports_dropped_total") == 3


def test_the_event_id_is_derived_from_the_scores() -> None:
    scores = [ServedScore(request_id=f"r{i}", entity_id="C1", model_version="v1", score=0.5,
                          latency_ms=1.0) for i in range(3)]
    assert served_event(scores).event_id == served_event(list(scores)).event_id
    assert served_event(scores).event_id != served_event(scores[:2]).event_id


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="flush_size"):
        ReportSettings(flush_size=0)



def test_close_does_not_wait_forever_for_a_hung_sink(caplog: pytest.LogCaptureFixture) -> None:
    entered, release = threading.Event(), threading.Event()

    def hung(scores: list[ServedScore]) -> None:
        entered.set()
        release.wait(60)

    reporter = ScoreReporter([NamedSink("stream", hung)], ReportSettings(flush_size=1)).start()
    report(reporter, range(1))
    assert entered.wait(10)
    with caplog.at_level(logging.WARNING, logger="scoring.reporting"):
        reporter.close(timeout_s=0.1)  # returns although the sink never does
    release.set()
    assert "score reports to stream still hang after 0.1 s" in caplog.text


def test_a_hung_sink_does_not_hold_back_the_other(
        bus: InMemoryBus, closing: list[ScoreReporter]) -> None:
    entered, release = threading.Event(), threading.Event()

    def hung(scores: list[ServedScore]) -> None:
        entered.set()
        release.wait(60)

    reporter = ScoreReporter([NamedSink("stream", hung), event_sink(bus.publish_many)],
                             ReportSettings(flush_size=2, flush_interval_s=0.05))
    closing.append(reporter.start())
    report(reporter, range(2))
    assert entered.wait(10)  # the stream's thread is stuck...
    report(reporter, range(2, 6))
    wait_until(lambda: sum(len(e.scores) for e in events(bus)) == 6, timeout=10)  # ...events go
    release.set()


def test_a_model_infer_answer_is_reported_row_by_row_named_by_the_call(
        bus: InMemoryBus) -> None:
    reporter = ScoreReporter([event_sink(bus.publish_many)], ReportSettings(flush_size=100))
    reporter.report_inferred(inference(3))
    reporter.report_inferred(inference(1, request_id="alone"))
    assert reporter.pending == 4
    assert reporter.flush()
    served = events(bus)[0].scores
    assert [s.request_id for s in served] == ["call-7/0", "call-7/1", "call-7/2", "alone"]
    assert {(s.entity_id, s.model_version, s.latency_ms) for s in served} == {("", "v3", 2.5)}
    assert [s.score for s in served[:3]] == pytest.approx([0.1, 0.5, 0.9])
    assert [s.label for s in served[:3]] == ["0", "0", "1"]  # 0.5: the first of the two
    assert served[2].features == {"amount": 4.0, "hour": 5.0}


def test_the_bound_counts_a_model_infer_answer_by_its_rows(bus: InMemoryBus) -> None:
    reporter = ScoreReporter([event_sink(bus.publish_many)],
                             ReportSettings(buffer_size=5, flush_size=100))
    report(reporter, range(2))
    reporter.report_inferred(inference(4))  # 6 rows for 5 places: the oldest answer goes
    assert (reporter.dropped, reporter.pending) == (1, 5)
    reporter.report_inferred(inference(5, request_id="big"))  # everything before it goes
    assert (reporter.dropped, reporter.pending) == (6, 5)
    assert reporter.flush()
    assert [s.request_id for s in events(bus)[0].scores] == [f"big/{i}" for i in range(5)]


def test_the_thread_is_woken_when_model_infer_rows_reach_flush_size(
        bus: InMemoryBus, closing: list[ScoreReporter]) -> None:
    reporter = ScoreReporter([event_sink(bus.publish_many)],
                             ReportSettings(flush_size=5, flush_interval_s=3600))
    closing.append(reporter.start())
    report(reporter, range(2))
    reporter.report_inferred(inference(4))  # 2 + 4 >= 5: the interval is an hour
    wait_until(lambda: sum(len(e.scores) for e in events(bus)) == 6, timeout=10)
