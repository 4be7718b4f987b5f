"""Served scores reported off the request path: to the score stream and as ScoreServed events.

The request path calls ``report(query, result)`` (a Score answer) or
``report_inferred(result)`` (a ModelInfer answer, one report per row): one append to a
bounded buffer under a lock, no I/O, never a wait. A background thread wakes every
``flush_interval_s``, or as soon as ``flush_size`` scores wait, turns them into
``ServedScore`` and hands them to each sink's outbox; each sink sends in batches of at
most ``flush_size`` from a thread of its own: the Redis score stream (one round trip per
batch) and the bus (one ``ScoreServed`` event per batch).

Each sink has its own bounded outbox and thread, so a slow or unreachable Redis never
holds the events back, nor the broker the stream. A batch a sink refuses goes back to
the front of its outbox and is tried again on the next cycle; the error is logged (at
most every ``warn_every_s``), never raised. When a
buffer or an outbox is full the oldest reports are dropped and counted (``dropped``,
exported as ``conveyor_scoring_reports_dropped_total``), with a rate-limited warning.
A ScoreServed event's id is derived from its scores, so a batch sent again after an
unconfirmed publish carries the same id and monitoring deduplicates it. Example::

    reporter = ScoreReporter([stream_sink(online_scores), event_sink(bus.publish_many)])
    core = ScoringCore(..., on_served=reporter.report, on_inferred=reporter.report_inferred)
    reporter.start()
    ...
    reporter.close()                     # flushes what is left
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from common.events import Event, ScoreServed, ServedScore
from common.stores import OnlineScoreStore
from scoring.core import InferResult, ScoreQuery, ScoreResult

logger = logging.getLogger(__name__)

ReportMaker = Callable[..., list[ServedScore]]
"""Turns an answer's parts and the time it was served into its reports."""
_Answer = tuple[ReportMaker, tuple[Any, ...], int, float]
"""An answer waiting in the intake: what makes its reports, its parts, how many reports it
makes (its rows), when it was served."""
Sink = Callable[[list[ServedScore]], object]
"""Takes one batch of scores, or raises; the batch is then offered again later."""
EVENT_IDS = uuid.UUID("5c0e5e2d-7f0a-4a8e-9a57-3d3c8c1a2b61")
"""uuid5 namespace of ScoreServed event ids."""


@dataclass(frozen=True)
class ReportSettings:
    """Buffer bound and flush rhythm of the reporter."""

    buffer_size: int = 10_000
    """Reports held per buffer (the intake and each sink's outbox); beyond, the oldest go."""
    flush_interval_s: float = 0.5
    """Longest time a report waits before it is handed to the sinks."""
    flush_size: int = 500
    """Reports that trigger a flush at once; also the most per stream write and event."""
    warn_every_s: float = 10.0
    """Shortest time between two warnings about drops or failing sinks."""

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.flush_size < 1 or self.flush_interval_s <= 0:
            raise ValueError(f"need buffer_size >= 1, flush_size >= 1 and "
                             f"flush_interval_s > 0, got {self}")


@dataclass(frozen=True)
class NamedSink:
    """A sink and the name its warnings give it."""

    name: str
    deliver: Sink


def stream_sink(store: OnlineScoreStore) -> NamedSink:
    """Scores appended to the Redis score stream, one round trip per batch."""
    return NamedSink("score stream", store.append_many)


def event_sink(
    publish_many: Callable[[Sequence[Event]], None], producer: str = "scoring"
) -> NamedSink:
    """Scores published as one ScoreServed event per batch (confirmed by the broker)."""

    def publish(scores: list[ServedScore]) -> None:
        publish_many([served_event(scores, producer)])

    return NamedSink("ScoreServed events", publish)


def served_event(scores: list[ServedScore], producer: str = "scoring") -> ScoreServed:
    """The ScoreServed event of a batch; its id derives from the scores (same batch, same id)."""
    digest = hashlib.sha256()
    for score in scores:
        digest.update(f"{score.request_id}|{score.served_at.isoformat()}\n".encode())
    event_id = uuid.uuid5(EVENT_IDS, digest.hexdigest())
    return ScoreServed(event_id=event_id, producer=producer, scores=scores)


def served_score(query: ScoreQuery, result: ScoreResult, served_at: float) -> ServedScore:
    """The report of one answer (``served_at`` in seconds since the epoch)."""
    return ServedScore(
        request_id=result.request_id, entity_id=query.entity_id, model_version=result.version,
        score=result.score, label=result.label, fallback=result.fallback,
        fallback_reason=result.fallback_reason, latency_ms=result.latency_ms,
        served_at=datetime.fromtimestamp(served_at, UTC), features=dict(result.features),
    )


def _served_scores(query: ScoreQuery, result: ScoreResult, served_at: float
                   ) -> list[ServedScore]:
    return [served_score(query, result, served_at)]


def inferred_scores(result: InferResult, served_at: float) -> list[ServedScore]:
    """The reports of a ModelInfer answer, one per row, as Score's are (score: the last
    class's probability; label: the likeliest class), with no entity: the call's id, and
    for several rows ``<id>/<row>``, is what an outcome names to be joined to one."""
    at = datetime.fromtimestamp(served_at, UTC)
    rows = len(result.probabilities)
    call = result.request_id
    inputs = [] if result.features is None else result.features.tolist()
    return [ServedScore(
        request_id=call if rows == 1 else f"{call}/{row}",
        entity_id="", model_version=result.version, score=float(proba[-1]),
        label=result.classes[int(proba.argmax())], fallback=result.fallback,
        fallback_reason=result.fallback_reason, latency_ms=result.latency_ms, served_at=at,
        features=dict(zip(result.feature_names, inputs[row], strict=True)) if inputs else {},
    ) for row, proba in enumerate(result.probabilities)]


class _Warnings:
    """At most one warning per ``every_s`` for each topic; what came between is summed."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def due(self, topic: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(topic, -self.every_s) < self.every_s:
            return False
        self._last[topic] = now
        return True


class _Outbox:
    """One sink's undelivered scores: bounded (the oldest dropped), delivered in order by
    a thread of its own, so a slow sink never delays another."""

    def __init__(self, sink: NamedSink, settings: ReportSettings) -> None:
        self.sink, self.settings = sink, settings
        self._queue: deque[ServedScore] = deque()
        self._lock = threading.Lock()  # the queue and the drop count
        self._sending = threading.Lock()  # one delivery at a time
        self._wake, self._stop = threading.Event(), threading.Event()
        self.dropped = 0
        self.last_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"score-reports-{sink.name}",
                                        daemon=True)

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, scores: Sequence[ServedScore]) -> None:
        """Queue scores (the oldest dropped beyond the bound) and wake the thread."""
        with self._lock:
            self._queue.extend(scores)
            self._trim()
        self._wake.set()

    def deliver(self) -> bool:
        """Send every waiting score in batches; a refused batch goes back to the front."""
        with self._sending:
            while batch := self._take():
                try:
                    self.sink.deliver(batch)
                except Exception as exc:  # a down sink must never disturb scoring
                    self.last_error = exc
                    self._put_back(batch)
                    return False
            self.last_error = None
            return True

    def discard(self) -> None:
        """Drop (and count) everything waiting."""
        with self._lock:
            self.dropped += len(self._queue)
            self._queue.clear()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Deliver what is left and stop; False if the sink still hangs after the timeout."""
        self._stop.set()
        self._wake.set()
        if not self._thread.is_alive():
            self.deliver()
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.flush_interval_s)  # a refused batch: next cycle
            self._wake.clear()
            self.deliver()
        self.deliver()  # what is left at close

    def _take(self) -> list[ServedScore]:
        with self._lock:
            size = min(self.settings.flush_size, len(self._queue))
            return [self._queue.popleft() for _ in range(size)]

    def _put_back(self, batch: list[ServedScore]) -> None:
        with self._lock:
            self._queue.extendleft(reversed(batch))
            self._trim()

    def _trim(self) -> None:
        overflow = len(self._queue) - self.settings.buffer_size
        for _ in range(overflow):
            self._queue.popleft()
        self.dropped += max(0, overflow)


class ScoreReporter:
    """A bounded buffer of answers, the thread that turns them into reports, and one
    outbox (with its thread) per sink."""

    def __init__(
        self, sinks: Sequence[NamedSink], settings: ReportSettings | None = None, *,
        on_close: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings or ReportSettings()
        self._on_close = on_close
        self._outboxes = [_Outbox(sink, self.settings) for sink in sinks]
        self._intake: deque[_Answer] = deque()
        self._lock = threading.Lock()  # guards the intake; held for O(1) only
        self._wake, self._stop = threading.Event(), threading.Event()
        self._intake_rows = 0  # reports the intake holds: a Score one, a ModelInfer its rows
        self._intake_dropped = 0
        self._warned_drops = 0
        self._warnings = _Warnings(self.settings.warn_every_s)
        self._thread = threading.Thread(target=self._run, name="score-reporter", daemon=True)

    # -- request path ----------------------------------------------------------------------

    def report(self, query: ScoreQuery, result: ScoreResult) -> None:
        """Queue one answer for reporting: O(1), no I/O; drops the oldest when full."""
        self._take_in(_served_scores, (query, result), 1)

    def report_inferred(self, result: InferResult) -> None:
        """Queue a ModelInfer answer as ``report`` does; its rows become reports off the
        request path, and count one each in the intake's bound."""
        self._take_in(inferred_scores, (result,), len(result.probabilities))

    def _take_in(self, to_reports: ReportMaker, answer: tuple[Any, ...], rows: int) -> None:
        with self._lock:
            while self._intake and self._intake_rows + rows > self.settings.buffer_size:
                dropped = self._intake.popleft()[2]
                self._intake_rows -= dropped
                self._intake_dropped += dropped
            self._intake.append((to_reports, answer, rows, time.time()))
            before, self._intake_rows = self._intake_rows, self._intake_rows + rows
        if before < self.settings.flush_size <= before + rows:
            self._wake.set()

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> ScoreReporter:
        """Start the threads: one that hands reports out, one per sink that sends them."""
        for outbox in self._outboxes:
            outbox.start()
        self._thread.start()
        return self

    def close(self, timeout_s: float = 35.0) -> None:
        """Hand out and send what is left, then stop; what no sink took is dropped.

        Waits at most about ``timeout_s`` per sink: a sink that hangs is left behind (its
        thread is a daemon), with a warning.
        """
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._hand_out()
        for outbox in self._outboxes:
            if not outbox.stop(timeout_s):
                logger.warning("closing: score reports to %s still hang after %.1f s; "
                               "%d wait for it", outbox.sink.name, timeout_s, len(outbox))
            elif len(outbox):
                logger.warning("closing: %d score reports to %s are lost (%s)",
                               len(outbox), outbox.sink.name, outbox.last_error)
                outbox.discard()
        if self._on_close is not None:
            self._on_close()

    @property
    def dropped(self) -> int:
        """Reports dropped so far (buffers full, or lost at close), over every sink."""
        with self._lock:
            intake = self._intake_dropped
        return intake + sum(outbox.dropped for outbox in self._outboxes)

    @property
    def pending(self) -> int:
        """Reports waiting: in the intake, and in the fullest sink outbox."""
        with self._lock:
            intake = self._intake_rows
        return intake + max((len(outbox) for outbox in self._outboxes), default=0)

    def flush(self) -> bool:
        """Hand out every waiting report and send it now, in the calling thread; True when
        every sink took everything."""
        self._hand_out()
        delivered = [outbox.deliver() for outbox in self._outboxes]
        self._warn()
        return all(delivered)

    def _hand_out(self) -> None:
        """The intake, as ``ServedScore`` reports, to every sink's outbox."""
        with self._lock:
            taken, self._intake, self._intake_rows = self._intake, deque(), 0
        if taken:
            scores: list[ServedScore] = []
            for to_reports, answer, _, at in taken:
                scores += to_reports(*answer, at)
            for outbox in self._outboxes:
                outbox.add(scores)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            try:
                self._hand_out()
                self._warn()
            except Exception:  # a bug here must not kill the thread: the next cycle retries
                logger.exception("handing out score reports failed")

    def _warn(self) -> None:
        for outbox in self._outboxes:
            error = outbox.last_error
            if error is not None and self._warnings.due(outbox.sink.name):
                logger.warning("score reports to %s failed (%d waiting, retried): %s",
                               outbox.sink.name, len(outbox), error)
        dropped = self.dropped
        if dropped > self._warned_drops and self._warnings.due("dropped"):
            logger.warning("%d score reports dropped since the last warning (%d in all): "
                           "a sink is slow or down", dropped - self._warned_drops, dropped)
            self._warned_drops = dropped


class ReportsDroppedCollector(Collector):
    """``conveyor_scoring_reports_dropped_total``, read from a reporter at scrape time."""

    def __init__(self, reporter: ScoreReporter) -> None:
        self.reporter = reporter

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "conveyor_scoring_reports_dropped",
            "ScoreServed reports dropped (a buffer full, or lost at shutdown)",
            value=self.reporter.dropped,
        )
