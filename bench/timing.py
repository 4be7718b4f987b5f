"""How long calls take, for the benchmarks that time one function on many inputs.

Imported as ``timing`` (or ``bench.timing``), beside ``save``::

    from timing import times_ms
    statistics.median(times_ms(model.predict_proba, [matrix] * 200))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


def times_ms(call: Callable[[Any], Any], items: Sequence[Any], warm: int = 20) -> list[float]:
    """Milliseconds of ``call(item)`` for each item, after ``call`` has run on the first
    ``warm`` items untimed (caches, lazy imports, the allocator)."""
    for item in items[:warm]:
        call(item)
    samples = []
    for item in items:
        started = time.perf_counter()
        call(item)
        samples.append((time.perf_counter() - started) * 1e3)
    return samples
