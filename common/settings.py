"""Settings shared by every service, read from the environment (prefix ``CONVEYOR_``).

Example::

    settings = Settings()                      # local defaults
    settings = Settings(namespace="test-42")   # isolated exchange, queues and Redis keys
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.events import EVENT_TYPES

RECORD_EVENT_PROCESSED_TTL_S = 3_600
"""Retention of a processed record event's id: an already handled event comes back (a lost
acknowledgement redelivered, a confirm-less publish resent, a retry parked in a delay
queue) within minutes, and at ~100 such events/s 7 days of ids would hold ~6.8 GB."""
PROCESSED_TTL_BY_EVENT: dict[str, int] = {
    "OutcomeObserved": RECORD_EVENT_PROCESSED_TTL_S,
    "ScoreServed": RECORD_EVENT_PROCESSED_TTL_S,
    "RecordsObserved": RECORD_EVENT_PROCESSED_TTL_S,
}
"""The high-volume record events (the applications' outcomes and streamed records,
scoring's served-score batches) and how long their processed ids are kept by default."""


class Settings(BaseSettings):
    """Connection, messaging and storage settings common to all services."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="forbid")

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    """RabbitMQ URL (pika URLParameters syntax)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL for the online stores, idempotency records and score stream."""
    pipeline_config: str = "config/pipeline.yaml"
    """The pipeline YAML (datasets, features, split, training, evaluation)."""
    data_root: str = "./var/data"
    """Folder or fsspec URL under which raw batches, feature sets, models and scores live."""
    namespace: str = "conveyor"
    """Prefix of the exchange, queues and Redis keys; tests use one namespace each."""
    heartbeat_s: int = 30
    """AMQP heartbeat interval in seconds."""
    prefetch: int = 100
    """Messages a consumer may hold unacknowledged."""
    max_attempts: int = 5
    """Handler attempts before a message goes to the dead-letter queue."""
    retry_delays_s: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)
    """Back-off before each retry; the last value repeats for later attempts."""
    reconnect_max_delay_s: float = 30.0
    """Upper bound of the exponential back-off between reconnection attempts."""
    processed_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    """How long a processed event id is remembered for idempotency (seconds), unless its
    event type has a ``processed_ttl_by_event``."""
    processed_ttl_by_event: dict[str, int] = Field(
        default_factory=lambda: dict(PROCESSED_TTL_BY_EVENT))
    """Retention of processed ids by event type, seconds (JSON object): OutcomeObserved,
    ScoreServed and RecordsObserved 3,600 by default; a type named here replaces its
    default, the types not named keep theirs."""
    http_host: str = "0.0.0.0"
    """Interface of the /metrics, /healthz and /readyz server."""
    http_port: int = 9100
    """Port of the /metrics, /healthz and /readyz server (0 = pick a free port)."""
    model_signing_key: SecretStr = SecretStr("conveyor-local-dev-key-change-me")
    """HMAC-SHA256 key that signs model artifacts; set a real secret outside local runs."""
    log_level: str = "INFO"
    """Root log level."""
    online_ttl_s: int = Field(default=0, ge=0)
    """TTL of online feature hashes in seconds (0 = keep forever)."""
    online_keep_versions: int = Field(default=5, ge=1)
    """The registry chain's first versions whose feature sets keep their online keys: the
    3 scoring serves and 2 a demotion or two would bring back. Other sets, once not among
    the ``stream_recent_sets`` completed last, are superseded (``online_superseded_ttl_s``)."""
    online_superseded_ttl_s: int = Field(default=86_400, ge=1)
    """How long a superseded feature set's online keys live on (requests still in flight
    on a retired version, an operator's second thoughts) before Redis drops them."""
    online_wait_s: float = Field(default=600.0, gt=0)
    """How long evaluation waits for a feature set's online rows before it promotes a
    model of it; past that the event is retried (see retry settings)."""
    score_stream_maxlen: int = 100_000
    """Approximate bound of the online score stream."""
    grpc_token: SecretStr = SecretStr("")
    """Bearer token Conveyor's own scoring clients send (``conveyor score``, the demo's
    Score calls): one of the service's CONVEYOR_GRPC_AUTH_TOKENS; empty: none is sent."""
    grpc_tls_ca: str = ""
    """PEM CA of the scoring service's certificate: with it those clients connect with TLS."""
    # -- safe by default (issue 12): sources, signing keys, Redis retention ----------------
    local_dev: bool = False
    """Local development (the demo and the test suite set it): allows the published default
    CONVEYOR_MODEL_SIGNING_KEY and short keys. Never set it in production."""
    model_signing_key_id: str = Field(default="local", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """Id of CONVEYOR_MODEL_SIGNING_KEY, written beside every signature it makes."""
    model_verify_keys: dict[str, SecretStr] = Field(default_factory=dict)
    """Earlier keys that still verify, by key id (JSON object): keys rotate without
    re-signing what they signed."""
    source_schemes: tuple[str, ...] = ("file",)
    """fsspec schemes a SourceDataAvailable URI may use (default: local files only)."""
    source_roots: tuple[str, ...] = ("var/demo",)
    """Folders (or URL prefixes) a source must lie in; the data root's inbox/ always is one."""
    eventlog_retention_days: float = Field(default=30.0, gt=0)
    """How long the event log keeps an event and its lineage links."""
    eventlog_score_served_ttl_s: int = Field(default=0, ge=0)
    """How long the event log keeps a ScoreServed body (0: not kept, its summary only)."""
    eventlog_observed_ttl_s: int = Field(default=0, ge=0)
    """How long the event log keeps an OutcomeObserved or RecordsObserved body (0: not
    kept; an outcome's stream summary holds its payload, a batch of records' its count)."""
    eventlog_maxlen: int = Field(default=100_000, gt=0)
    """Approximate bound of the event log's stream of event summaries."""
    idempotency_retry_s: float = Field(default=30.0, ge=0)
    """How long a Redis error in the idempotency check is retried with back-off before the
    message goes to a delay queue (its attempt count untouched)."""
    stream_state: bool = True
    """Keep each feature set's entity state for the online path (false: no state is
    written at materialisation and Score reads the batch's latest rows only)."""
    stream_late_tolerance_s: float = Field(default=300.0, ge=0)
    """How far behind its entity's newest record a streamed record may arrive and still
    count; a later one is refused as late (counted, logged, in RecordsRefused)."""
    stream_count_ttl_s: int = Field(default=90 * 86_400, ge=0)
    """How long an idle entity's last-N history stays online (time windows bound their
    own state: the widest window plus the tolerance)."""
    stream_recent_sets: int = Field(default=3, ge=1)
    """Newest materialised feature sets the stream keeps up to date beside the registry
    chain's (a set being trained and evaluated is not in the chain yet)."""
    max_feature_age_s: float = Field(default=0.0, ge=0)
    """A Score whose entity's last record is older than this is answered degraded
    (0: never)."""

    @field_validator("processed_ttl_by_event")
    @classmethod
    def _over_the_defaults(cls, value: dict[str, int]) -> dict[str, int]:
        """Named event types override the defaults; an unknown type or a retention under
        1 s fails at start (a typo would silently keep ids 7 days)."""
        unknown = sorted(set(value) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type(s) {unknown} (known: {sorted(EVENT_TYPES)})")
        too_short = sorted(kind for kind, seconds in value.items() if seconds < 1)
        if too_short:
            raise ValueError(f"retention under 1 s for {too_short}")
        return {**PROCESSED_TTL_BY_EVENT, **value}

    @property
    def exchange(self) -> str:
        """Name of the durable topic exchange every event is published on."""
        return f"{self.namespace}.events"

    def queue(self, service: str) -> str:
        """Name of a service's durable quorum queue."""
        return f"{self.namespace}.{service}"

    def dead_letter_queue(self, service: str) -> str:
        """Name of a service's dead-letter queue."""
        return f"{self.namespace}.{service}.dlq"

    def redis_key(self, *parts: str) -> str:
        """A Redis key inside this namespace."""
        return ":".join((self.namespace, *parts))
