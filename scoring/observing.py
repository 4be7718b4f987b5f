"""Score-then-record: the records of ``observe`` Score calls published as RecordsObserved.

The request path calls ``observe(query)`` after its answer: one append to a bounded
buffer, no I/O. A background thread publishes what waits as one RecordsObserved event
per ``batch_size`` records (confirmed by the broker), every ``interval_s`` or as soon
as a batch is full; the online preparation service then applies them to the entities'
state, so the next Score of the entity counts the record and this one did not. A
publish that fails is tried again on the next cycle; when the buffer is full the oldest
records are dropped and counted (``dropped``). Example::

    observer = RecordObserver(bus.publish_many, dataset="paysim", entity_key="nameOrig")
    core = ScoringCore(..., on_observed=observer.observe)
    observer.start()
    ...
    observer.close()                  # publishes what is left
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from common.events import Event, RecordsObserved
from scoring.core import ScoreQuery

logger = logging.getLogger(__name__)
RETRY_S = 1.0


class RecordObserver:
    """Buffers observed records and publishes them in batches from its own thread."""

    def __init__(self, publish_many: Callable[[Sequence[Event]], Any], *, dataset: str,
                 entity_key: str, batch_size: int = 500, interval_s: float = 0.005,
                 buffer_size: int = 100_000, producer: str = "scoring",
                 on_close: Callable[[], Any] | None = None) -> None:
        self._publish, self.dataset, self.entity_key = publish_many, dataset, entity_key
        self.batch_size, self.interval_s, self.producer = batch_size, interval_s, producer
        self._buffer: deque[dict[str, Any]] = deque(maxlen=buffer_size)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="record-observer", daemon=True)
        self._on_close = on_close
        self.dropped = 0
        self.published = 0

    def observe(self, query: ScoreQuery) -> None:
        """Queue the query's record (its fields, with the entity id as the entity key)."""
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1  # the deque drops the oldest
        self._buffer.append({**query.fields, self.entity_key: query.entity_id})
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    def start(self) -> RecordObserver:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Publish what waits (within ``timeout_s``), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._on_close is not None:
            self._on_close()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self.batch_size,
                                                                len(self._buffer)))]
            event = RecordsObserved(dataset=self.dataset, records=batch, producer=self.producer)
            try:
                self._publish([event])
            except Exception as exc:  # the broker is away: keep them, try next cycle
                self._buffer.extendleft(reversed(batch))
                logger.warning("publishing %d observed records failed (%s); retrying in %.0f s",
                               len(batch), exc, RETRY_S)
                self._stop.wait(RETRY_S)
                return
            self.published += len(batch)
