"""Conveyor's stores: raw batches, feature sets (offline and online), models, scores.

Each store takes its root (a folder or fsspec URL) or its Redis client in its constructor;
nothing here opens a connection or reads settings by itself. Example::

    settings = Settings()
    raw = RawBatchStore(settings.data_root)
    online = RedisOnlineStore(redis.Redis.from_url(settings.redis_url), settings.namespace,
                              default_ttl_s=settings.online_ttl_s)
    models = ModelStore.from_settings(settings)
    registry = ModelRegistry(settings.data_root)
"""

from common.stores._parquet import ChunkTyping, KeepAsRead
from common.stores.features import (
    FeatureSetRecord,
    OfflineFeatureStore,
    OnlineFeatureStore,
    RedisOnlineStore,
    latest_rows,
    online_key,
    online_schema_key,
)
from common.stores.models import (
    HistoryEntry,
    ModelRecord,
    ModelRegistry,
    ModelStore,
    RegistryEntry,
)
from common.stores.raw import RawBatch, RawBatchStore, RawPiece, infer_format
from common.stores.scores import BatchScoreStore, OnlineScoreStore, score_stream_key

__all__ = [
    "BatchScoreStore",
    "ChunkTyping",
    "FeatureSetRecord",
    "HistoryEntry",
    "KeepAsRead",
    "ModelRecord",
    "ModelRegistry",
    "ModelStore",
    "OfflineFeatureStore",
    "OnlineFeatureStore",
    "OnlineScoreStore",
    "RawBatch",
    "RawBatchStore",
    "RawPiece",
    "RedisOnlineStore",
    "RegistryEntry",
    "infer_format",
    "latest_rows",
    "online_key",
    "online_schema_key",
    "score_stream_key",
]
