"""Give the memory a large piece of work freed back to the operating system.

Two allocators keep what a batch freed: glibc's malloc (Python objects, numpy, pandas)
and Arrow's memory pool (mimalloc here: every Parquet read and write). In one process,
three rounds of a 1,000,000 x 13 frame written to Parquet and read back left RSS at
566 MB from 112; ``malloc_trim(0)`` gave back 32 MB of it, Arrow's ``release_unused()``
270 MB more. ``release_free_memory`` asks both.

A pipeline stage that handles a batch of 100,000 rows allocates and frees hundreds of
MB. What is freed stays in the allocators, so the process's RSS keeps the high-water
mark of its biggest batch (and somewhat more after each, chunks of several sizes lying
between live objects): in the soak, ingestion +10 %, preparation +8 % and evaluation
+18 % over two more pipeline runs. On the five pipeline services after five 100,000-row
runs, ``malloc_trim(0)`` alone (through gdb) gave back 33 MB of ingestion's 352, 63 MB
of preparation's 423 and 14 MB of evaluation's 359. The dispatcher calls
``release_free_memory`` after a handler that ran ``RELEASE_AFTER_S`` (0.2 s) or longer:
both took 2.5-7 ms after a few hundred MB of pandas and Parquet work (a few % of such a
handler; a 100,000-row ingestion runs ~0.3 s here), too much after every short handler.

Example::

    from common.allocator import release_free_memory
    release_free_memory()   # True where glibc's malloc_trim exists, False elsewhere
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from functools import cache
from typing import Any

log = logging.getLogger(__name__)
RELEASE_AFTER_S = 0.2
"""Handlers that ran this long or longer are followed by a trim."""


@cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (musl, macOS...)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return malloc's free memory to the system (every arena, whole free pages within
    the heap too), and Arrow's pool's if pyarrow is loaded; whether malloc could be asked."""
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
