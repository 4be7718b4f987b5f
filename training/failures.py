"""How a candidate's training fails: the errors worth a retry, and a failure's record.

Shared by the local worker pool (``training.trainer``) and the Dask scheduler
(``training.distributed``), which the trainer calls; kept here so neither imports the
other for them.

Example::

    try:
        fit()
    except TRANSIENT as exc:
        Failure("gbm", describe(exc))   # Failure(name='gbm', error='OSError: ...')
"""

from __future__ import annotations

from dataclasses import dataclass

from pebble import ProcessExpired

TRANSIENT = (ProcessExpired, OSError, MemoryError, ConnectionError)
"""Errors of the machinery, not of the candidate: the candidate is trained again."""


@dataclass(frozen=True)
class Failure:
    """A candidate that could not be trained, and why."""

    name: str
    error: str


def describe(exc: BaseException) -> str:
    """An error as its type and message."""
    return f"{type(exc).__name__}: {exc}"
