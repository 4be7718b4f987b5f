"""Recent latency of one model version, and the circuit breaker that acts on it.

``LatencyTracker`` keeps the last ``window`` latencies (seconds) in a numpy ring buffer
and answers percentiles over it; it also counts the latencies over a threshold in O(1),
which is how the breaker checks its budget on every request (about 4 us) without sorting.
``CircuitBreaker`` watches one tracker against a latency budget: CLOSED while the tracked
percentile stays within budget; OPEN once it breaks the budget over at least
``min_samples`` requests (or after ``max_failures`` consecutive errors or abandoned
requests); HALF_OPEN after ``open_for_s``, when it lets one probe through. A probe within
budget closes it and clears the window; a slow, failing or abandoned probe opens it again.
Both are thread-safe; the clock is injected so tests never sleep. Example::

    breaker = CircuitBreaker(budget_s=0.005, percentile=0.99, min_samples=50, open_for_s=2.0)
    if breaker.allow():                 # False while OPEN, and for all but one probe
        breaker.record(0.0031)          # or breaker.record_failure("ValueError: ...")
    breaker.state, breaker.reason       # CircuitState.OPEN, "p99 12.3 ms over budget 5.0 ms"
    breaker.tracker.summary()           # LatencySummary(count=..., p50_s=..., ...)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import numpy as np

Clock = Callable[[], float]
QuantileMethod = Literal["linear", "inverted_cdf"]


def ms(seconds: float) -> str:
    """Seconds as a short millisecond label: ``0.0123`` -> ``"12.3 ms"``."""
    return f"{seconds * 1e3:.1f} ms"


def percentile_label(q: float) -> str:
    """A quantile as the usual label: ``0.99`` -> ``"p99"``, ``0.995`` -> ``"p99.5"``."""
    return f"p{q * 100:g}"


@dataclass(frozen=True)
class LatencySummary:
    """Count and usual percentiles of a window, in seconds (NaN when it is empty)."""

    count: int
    p50_s: float
    p95_s: float
    p99_s: float


class LatencyTracker:
    """The last ``window`` latencies (seconds) of one model version; thread-safe.

    With a ``threshold_s`` it also counts, in O(1) per sample, how many latencies of the
    window exceed it, so a breaker can test its budget without sorting on every request.
    """

    def __init__(self, window: int = 1024, threshold_s: float = math.inf) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window, self.threshold_s = window, threshold_s
        self._ring = np.empty(window, dtype=np.float64)
        self._next = self._count = self._over = 0
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        """Add one latency, dropping the oldest once the window is full."""
        with self._lock:
            if self._count == self.window:
                self._over -= bool(self._ring[self._next] > self.threshold_s)
            self._over += seconds > self.threshold_s
            self._ring[self._next] = seconds
            self._next = (self._next + 1) % self.window
            self._count = min(self._count + 1, self.window)

    def reset(self) -> None:
        """Forget every latency."""
        with self._lock:
            self._next = self._count = self._over = 0

    @property
    def count(self) -> int:
        """How many latencies the window holds."""
        return self._count

    @property
    def over_threshold(self) -> int:
        """How many latencies of the window exceed ``threshold_s``."""
        return self._over

    def percentile(self, q: float, method: QuantileMethod = "linear") -> float:
        """The ``q`` quantile (0 <= q <= 1) of the window in seconds; NaN when empty.

        ``method`` is numpy's; ``"inverted_cdf"`` is the nearest-rank percentile, always
        one of the recorded latencies.
        """
        return float(self._quantiles([q], method)[0])

    @property
    def p50(self) -> float:
        """Median latency of the window, seconds."""
        return self.percentile(0.50)

    @property
    def p95(self) -> float:
        """95th percentile latency of the window, seconds."""
        return self.percentile(0.95)

    @property
    def p99(self) -> float:
        """99th percentile latency of the window, seconds."""
        return self.percentile(0.99)

    def summary(self) -> LatencySummary:
        """Count, p50, p95 and p99 in one pass over the window."""
        count = self._count
        p50, p95, p99 = self._quantiles([0.50, 0.95, 0.99])
        return LatencySummary(count, float(p50), float(p95), float(p99))

    def _quantiles(self, qs: list[float], method: QuantileMethod = "linear") -> np.ndarray:
        with self._lock:  # copy under the lock, sort outside it
            values = self._ring[: self._count].copy()
        if not len(values):
            return np.full(len(qs), math.nan)
        return np.quantile(values, qs, method=method)


class CircuitState(StrEnum):
    """Whether a link takes traffic: all of it, none of it, or one probe."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens when a model's tail latency breaks its budget; probes it back to health."""

    def __init__(
        self,
        budget_s: float,
        percentile: float = 0.99,
        min_samples: int = 20,
        open_for_s: float = 5.0,
        clock: Clock = time.monotonic,
        *,
        window: int = 1024,
        max_failures: int = 5,
    ) -> None:
        _check_breaker_args(budget_s, percentile, min_samples, open_for_s, max_failures)
        self.budget_s, self.percentile, self.min_samples = budget_s, percentile, min_samples
        self.open_for_s, self.max_failures = open_for_s, max_failures
        self.tracker = LatencyTracker(window, threshold_s=budget_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._opened_at = 0.0
        self._probe_at: float | None = None
        self._reason: str | None = None
        self._failures = 0

    @property
    def state(self) -> CircuitState:
        """CLOSED, OPEN, or HALF_OPEN once ``open_for_s`` has passed since it opened."""
        with self._lock:
            return self._current()

    @property
    def reason(self) -> str | None:
        """Why it last opened (kept while HALF_OPEN); None while CLOSED."""
        return self._reason

    def describe(self) -> str:
        """The state and its reason: ``"open (p99 12.3 ms over budget 5.0 ms)"``."""
        state, reason = self.state, self._reason
        return state.value if state is CircuitState.CLOSED else f"{state.value} ({reason})"

    def allow(self) -> bool:
        """Whether a request may use this link now; HALF_OPEN admits one probe at a time.

        A probe whose outcome is never recorded is given up after ``open_for_s``, and
        another probe is admitted, so a lost request cannot wedge the circuit.
        """
        with self._lock:
            state = self._current()
            if state is CircuitState.HALF_OPEN:
                return self._take_probe()
            return state is CircuitState.CLOSED

    def record(self, latency_s: float) -> None:
        """Account one successful request's latency (HALF_OPEN: it settles the probe)."""
        with self._lock:
            state = self._current()
            if state is CircuitState.HALF_OPEN:
                self._settle_probe(latency_s)
            elif state is CircuitState.CLOSED:
                self._failures = 0
                self.tracker.record(latency_s)
                self._check_tail()
            # OPEN: late replies of requests routed before it opened tell nothing new

    def record_failure(self, error: str) -> None:
        """Account one failed request: a failed probe, or ``max_failures`` in a row, opens."""
        with self._lock:
            state = self._current()
            if state is CircuitState.HALF_OPEN:
                self._open(f"probe failed: {error}")
            elif state is CircuitState.CLOSED:
                self._count_failure(error)

    def record_timeout(self, waited_s: float) -> None:
        """Account a request abandoned after ``waited_s``: a latency of at least that, and
        a failure, so a model that hangs opens even when the deadline is under budget.

        A request abandoned sooner than the link's median answer (over ``min_samples`` at
        least) is not counted: it came with too little time left to tell anything of the
        link (a fallback asked late in a busy request), and counting it would open a
        healthy link exactly when the chain needs it."""
        error = f"no answer after {ms(waited_s)}"
        with self._lock:
            state = self._current()
            if state is CircuitState.CLOSED and self._sooner_than_usual(waited_s):
                return
            if state is CircuitState.HALF_OPEN:
                self._open(f"probe failed: {error}")
            elif state is CircuitState.CLOSED:
                self.tracker.record(waited_s)
                self._check_tail()
                if self._state is CircuitState.CLOSED:
                    self._count_failure(error)

    def _sooner_than_usual(self, waited_s: float) -> bool:
        tracker = self.tracker
        return tracker.count >= self.min_samples and waited_s < tracker.p50

    def _count_failure(self, error: str) -> None:
        self._failures += 1
        if self._failures >= self.max_failures:
            self._open(f"{self._failures} failures in a row, last: {error}")

    def _current(self) -> CircuitState:
        expired = self._clock() - self._opened_at >= self.open_for_s
        if self._state is CircuitState.OPEN and expired:
            return CircuitState.HALF_OPEN
        return self._state

    def _take_probe(self) -> bool:
        now = self._clock()
        if self._probe_at is not None and now - self._probe_at < self.open_for_s:
            return False
        self._probe_at = now
        return True

    def _settle_probe(self, latency_s: float) -> None:
        if latency_s > self.budget_s:
            self._open(f"probe took {ms(latency_s)}, over budget {ms(self.budget_s)}")
            return
        self._state, self._reason, self._probe_at = CircuitState.CLOSED, None, None
        self._failures = 0
        self.tracker.reset()  # the window that opened it must not open it again

    def _check_tail(self) -> None:
        """Open if the nearest-rank percentile is over budget, i.e. too many samples are.

        That percentile exceeds the budget exactly when more than ``n - ceil(q n)`` of the
        ``n`` samples do: a counter test on each request, a sort only when it opens.
        """
        count = self.tracker.count
        allowed_over = count - math.ceil(self.percentile * count - 1e-9)  # 0.07 * 100 > 7
        if count < self.min_samples or self.tracker.over_threshold <= allowed_over:
            return
        tail = self.tracker.percentile(self.percentile, method="inverted_cdf")
        label = percentile_label(self.percentile)
        self._open(f"{label} {ms(tail)} over budget {ms(self.budget_s)}")

    def _open(self, reason: str) -> None:
        self._state, self._reason = CircuitState.OPEN, reason
        self._opened_at, self._probe_at = self._clock(), None


def _check_breaker_args(
    budget_s: float, percentile: float, min_samples: int, open_for_s: float, max_failures: int
) -> None:
    if budget_s <= 0 or open_for_s < 0:
        raise ValueError(f"budget_s must be > 0 and open_for_s >= 0, got {budget_s}, {open_for_s}")
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    if min_samples < 1 or max_failures < 1:
        raise ValueError(
            f"min_samples and max_failures must be >= 1, got {min_samples}, {max_failures}"
        )
