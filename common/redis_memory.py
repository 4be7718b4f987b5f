"""Redis memory, for operators: a Prometheus collector and the figures ``conveyor status``
prints. Every Conveyor structure in Redis is bounded by size or TTL; this is how to see
that it stays so (alert ``ConveyorRedisMemoryHigh`` in deploy/prometheus/rules).

Example::

    memory = redis_memory(client)          # RedisMemory(used_bytes=..., max_bytes=0, ...)
    registry.register(RedisMemoryCollector(client))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisMemory:
    """Redis's memory figures (``INFO memory``); ``max_bytes`` 0 means no maxmemory."""

    used_bytes: int
    peak_bytes: int
    max_bytes: int

    @property
    def used_share(self) -> float | None:
        """Used memory as a share of maxmemory, None without a maxmemory."""
        return self.used_bytes / self.max_bytes if self.max_bytes else None

    def describe(self) -> str:
        """'12.0 MiB used (peak 20.0 MiB) of 1.0 GiB maxmemory (1%)', for ``conveyor status``."""
        used = f"{human_bytes(self.used_bytes)} used (peak {human_bytes(self.peak_bytes)})"
        if self.used_share is None:
            return f"{used}, no maxmemory"
        return f"{used} of {human_bytes(self.max_bytes)} maxmemory ({self.used_share:.0%})"


def redis_memory(client: redis.Redis) -> RedisMemory:
    """The memory figures of the Redis the client talks to."""
    info = cast(dict[str, Any], client.info("memory"))
    return RedisMemory(int(info["used_memory"]), int(info.get("used_memory_peak", 0)),
                       int(info.get("maxmemory", 0)))


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, index = float(count), 0
    while value >= 1024 and index < len(units) - 1:
        value, index = value / 1024, index + 1
    return f"{value:.1f} {units[index]}" if index else f"{count} B"


class RedisMemoryCollector(Collector):
    """``conveyor_redis_used_memory_bytes`` and ``conveyor_redis_maxmemory_bytes``, read
    at each scrape; nothing when Redis does not answer (``up`` and the other alerts tell)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            memory = redis_memory(self.client)
        except redis.RedisError as exc:
            log.warning("Redis memory not read: %s", exc)
            return
        yield GaugeMetricFamily("conveyor_redis_used_memory_bytes",
                                "Memory Redis uses (INFO memory used_memory).",
                                value=memory.used_bytes)
        yield GaugeMetricFamily("conveyor_redis_maxmemory_bytes",
                                "Redis's maxmemory setting (0: none).", value=memory.max_bytes)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected at scrape time only: Redis is not asked at registration
