"""JSON-lines logging whose records carry the event id and correlation id in hand.

Example::

    configure_logging("INFO")
    with event_context(event):
        log.info("stored batch")   # {"msg": "stored batch", "event_id": "...", ...}
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_EMPTY: dict[str, str] = {}  # never mutated: log_context always sets a new dict
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "conveyor_log_context", default=_EMPTY  # noqa: B039
)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields to every log record emitted inside the block (thread- and task-local)."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items()}})
    try:
        yield
    finally:
        _context.reset(token)


def event_context(event: Any) -> Any:
    """Log context of an event: its id, type and correlation id."""
    return log_context(
        event_id=event.event_id, event_type=event.event_type, correlation_id=event.correlation_id
    )


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_context.get(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    """Send JSON lines to ``stream`` (stderr by default) at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pika").setLevel(logging.WARNING)
