"""Online keys of superseded feature sets, expired once the serving chain no longer needs them.

Every pipeline run materialises a new feature set online: one hash per entity
(``fs:<set>:<entity>``), with the online path one state per entity (``st:<set>:<entity>``),
and the set's marks (``fsmeta:``, ``fsdone:``, ``stready:``); about 30 MB per 100,000-row
PaySim run. Nothing removed them, so Redis grew with every run. ``OnlineRetention.prune``
gives every key of a superseded set a TTL of ``grace_s`` (requests still in flight on a
retired version have that long), drops its completion marks (a set that comes back, its
FeaturesGenerated seen again, is materialised again) and stops the stream keeping it. A
set is superseded when it is neither

- the feature set of one of the registry chain's first ``keep_versions`` versions (the
  versions scoring serves, and those a demotion would bring back: ``chain_feature_sets``),
- nor one of the ``keep_recent`` sets completed last (a set being trained and evaluated
  is not in the chain yet; a rejected one drops out after ``keep_recent`` more runs).

Completed sets are listed in ``<namespace>:fssets`` (a sorted set by completion time,
``RedisOnlineStore.mark_complete`` lists them); before the list exists, sets are found by
their ``fsdone:`` mark. Finding a set's keys is a SCAN of the keyspace per prefix: a few
seconds for millions of keys, once per pipeline run, off the request path. Example::

    retention = OnlineRetention(redis.Redis(), "conveyor", grace_s=86_400, keep_recent=3)
    retention.mark_completed("fs9")                     # the writer, with its fsdone mark
    retention.prune(chain_feature_sets(registry, models, keep_versions=5))  # ["fs1"]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import redis

from common.stores.entity_state import state_key, state_ready_key
from common.stores.features import (
    completed_sets_key,
    key_prefix,
    online_complete_key,
    online_schema_key,
)
from common.stores.models import ModelRegistry, ModelStore

log = logging.getLogger(__name__)
BATCH = 1_000
"""Keys given their TTL per round trip."""


class OnlineRetention:
    """Finds the superseded feature sets of a namespace and lets their online keys expire."""

    def __init__(self, client: redis.Redis, namespace: str, *, grace_s: int = 86_400,
                 keep_recent: int = 3) -> None:
        self.client, self.namespace = client, namespace
        self.grace_s, self.keep_recent = max(1, grace_s), max(1, keep_recent)

    def mark_completed(self, feature_set_id: str, at: float | None = None) -> None:
        """List a set as completed now (idempotent: the first time counts)."""
        self.client.zadd(completed_sets_key(self.namespace),
                         {feature_set_id: time.time() if at is None else at}, nx=True)

    def completed(self) -> list[str]:
        """The completed sets, oldest first. Before the list exists (sets written by an
        older version), the sets with an ``fsdone:`` mark are listed, as older than any
        set listed since (their time is unknown)."""
        key = completed_sets_key(self.namespace)
        if not self.client.exists(key):
            for mark in self.client.scan_iter(match=f"{self.namespace}:fsdone:*", count=BATCH):
                self.mark_completed(_text(mark).rsplit(":", 1)[1], at=0.0)
        return [_text(m) for m in cast(list[Any], self.client.zrange(key, 0, -1))]

    def superseded(self, needed: Iterable[str]) -> list[str]:
        """The completed sets neither ``needed`` nor among the ``keep_recent`` newest."""
        sets, keep = self.completed(), set(needed)
        keep.update(sets[-self.keep_recent:])
        return [fsid for fsid in sets if fsid not in keep]

    def prune(self, needed: Iterable[str]) -> list[str]:
        """Let every superseded set's keys expire in ``grace_s``; the sets pruned."""
        stale = self.superseded(needed)
        for fsid in stale:
            keys = self.expire(fsid)
            log.info("feature set %s superseded: its %d online keys expire in %d s", fsid,
                     keys, self.grace_s)
        return stale

    def expire(self, feature_set_id: str) -> int:
        """Give the set's keys a TTL of ``grace_s`` (a shorter one is kept), drop its
        completion marks (a set that comes back is materialised again), unlist it and stop
        the stream keeping it; how many keys."""
        ns, fsid = self.namespace, feature_set_id
        count = self._expire_all([online_schema_key(ns, fsid)])
        for prefix in (key_prefix(ns, fsid), state_key(ns, fsid, "").decode()):
            count += self._expire_all(self.client.scan_iter(match=f"{prefix}*", count=BATCH))
        pipe = self.client.pipeline(transaction=False)
        for targets in self.client.scan_iter(match=f"{ns}:stream:*", count=BATCH):
            pipe.zrem(targets, fsid)
        pipe.delete(online_complete_key(ns, fsid), state_ready_key(ns, fsid))
        pipe.zrem(completed_sets_key(ns), fsid)
        pipe.execute()
        return count

    def _expire_all(self, keys: Iterable[Any]) -> int:
        count, pipe = 0, self.client.pipeline(transaction=False)
        for key in keys:
            pipe.expire(key, self.grace_s, lt=True)  # lt: no TTL counts as infinite
            count += 1
            if count % BATCH == 0:
                pipe.execute()
        pipe.execute()
        return count


def chain_feature_sets(registry: ModelRegistry, models: ModelStore,
                       keep_versions: int) -> set[str]:
    """The feature sets of the registry chain's first ``keep_versions`` versions."""
    return {str(models.metadata(entry.model_id).metadata.get("feature_set_id"))
            for entry in registry.chain()[:keep_versions]}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

