"""Builds the stores a service needs from its settings.

This is the composition root of the stage services' stores: the only place that turns
settings into clients. Services receive what it builds through their constructors (the
pipeline config they get from the application layer, ``app.services``).

Example::

    stores = Stores.from_settings(settings)
    IngestionService(config, stores.raw)
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from common.settings import Settings
from common.signing import FEATURE_PIPELINE, MODEL, Keyring
from common.stores import (
    ModelRegistry,
    ModelStore,
    OfflineFeatureStore,
    RawBatchStore,
    RedisOnlineStore,
)


def feature_pipeline_root(data_root: str) -> str:
    """Where fitted feature pipelines are kept (signed, like models)."""
    return f"{data_root.rstrip('/')}/feature-pipelines"


@dataclass(frozen=True)
class Stores:
    """Every store of one namespace and data root."""

    raw: RawBatchStore
    offline: OfflineFeatureStore
    online: RedisOnlineStore
    models: ModelStore
    feature_pipelines: ModelStore
    redis: redis.Redis

    @classmethod
    def from_settings(cls, settings: Settings) -> Stores:
        """The stores the settings point at; ``WeakSigningKey`` (naming the setting) if
        the signing key is the published default or short outside local development."""
        keys = Keyring.from_settings(settings)
        client = redis.Redis.from_url(settings.redis_url)
        return cls(
            raw=RawBatchStore(settings.data_root),
            offline=OfflineFeatureStore(settings.data_root),
            online=RedisOnlineStore(client, settings.namespace, settings.online_ttl_s),
            models=ModelStore(settings.data_root, keys, context=MODEL),
            feature_pipelines=ModelStore(feature_pipeline_root(settings.data_root), keys,
                                         context=FEATURE_PIPELINE),
            redis=client,
        )

    def registry(self, settings: Settings, name: str) -> ModelRegistry:
        """The registry of one model name."""
        return ModelRegistry(settings.data_root, name)
