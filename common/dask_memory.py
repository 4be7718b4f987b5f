"""Dask workers give freed memory back to the system before it pauses them.

A Dask worker pauses at 80% of its memory limit (``distributed.worker.memory.pause``)
and stays paused until its process memory falls, whether that memory holds data or is
only freed memory the allocators kept. After preparation's two shuffles at 20M rows
(bench-scale, dask-local, 2 workers of 3 GB) each worker sat at 2.41 GB of RSS with no
task running, both paused, and training's compute waited on them for twelve minutes
until ``release_free_memory`` was run on them by hand: 2.41 -> 1.53 and 1.44 GB, both
resumed at once and the run completed. Dask's own remedy, ``MALLOC_TRIM_THRESHOLD_``,
covers glibc's heap, not Arrow's pool (every Parquet read and write on a worker).

``ReleaseFreeMemory`` is a worker plugin: every ``every_s`` it compares the worker's
process memory with ``above`` times its limit and, over it, releases free memory
(``common.allocator.release_free_memory``: ``malloc_trim`` and Arrow's pool, a few ms).
``open_compute`` registers it on every cluster it opens or joins. Example::

    client.register_plugin(ReleaseFreeMemory(above=0.5, every_s=1.0))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from common.allocator import release_free_memory

PLUGIN_NAME = "conveyor-release-free-memory"


class ReleaseFreeMemory(WorkerPlugin):
    """Release a worker's free memory whenever its process memory is over ``above`` of
    its limit (checked every ``every_s``); nothing on a worker without a limit."""

    name = PLUGIN_NAME

    def __init__(self, above: float = 0.5, every_s: float = 1.0,
                 release: Callable[[], Any] = release_free_memory) -> None:
        if not 0 < above < 1 or every_s <= 0:
            raise ValueError(f"above must be in (0, 1) and every_s > 0, got {above}, {every_s}")
        self.above, self.every_s, self.release = above, every_s, release
        self.releases = 0
        self._callback: Any = None

    def setup(self, worker: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        def tick() -> None:
            self.check(worker)

        self._callback = PeriodicCallback(tick, self.every_s * 1e3)
        self._callback.start()

    def teardown(self, worker: Any) -> None:
        if self._callback is not None:
            self._callback.stop()

    def check(self, worker: Any) -> bool:
        """Release now if the worker's memory is over the mark; whether it did."""
        limit = worker.memory_manager.memory_limit
        if not limit or worker.monitor.get_process_memory() <= self.above * limit:
            return False
        self.release()
        self.releases += 1
        return True
