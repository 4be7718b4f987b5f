"""The events of the pipeline: one envelope, one pydantic model per event type.

Every event is published as JSON on one topic exchange with its ``event_type`` as the
routing key. ``parse_event`` turns bytes back into the right model, or raises
``InvalidEvent`` naming the field at fault. Example::

    source = SourceDataAvailable(dataset="paysim", uri="file:///data/tx.csv", producer="cli")
    raw = source.caused(RawDataExtracted, producer="ingestion", dataset="paysim", ...)
    assert raw.correlation_id == source.correlation_id and raw.causation_id == source.event_id
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from uuid import UUID, uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidEvent

SCHEMA_VERSION = 1
E = TypeVar("E", bound="Event")


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope every event carries; subclasses add their payload fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID = Field(default_factory=uuid4, description="Unique id of this event.")
    event_type: str = Field(description="The event's type, also its routing key.")
    occurred_at: AwareDatetime = Field(default_factory=utc_now, description="When it happened.")
    correlation_id: UUID = Field(default_factory=uuid4, description="One pipeline run, end to end.")
    causation_id: UUID | None = Field(default=None, description="The event that caused this one.")
    producer: str = Field(default="unknown", min_length=1, description="Who published it.")
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, description="Payload schema version.")

    def caused(self, event_cls: type[E], *, producer: str, **payload: Any) -> E:
        """The next event of the same run, caused by this one."""
        return event_cls(
            correlation_id=self.correlation_id,
            causation_id=self.event_id,
            producer=producer,
            **payload,
        )

    def to_json(self) -> bytes:
        """The wire form of the event."""
        return self.model_dump_json().encode()


class SourceDataAvailable(Event):
    """A data producer has a new source file for a dataset."""

    event_type: Literal["SourceDataAvailable"] = "SourceDataAvailable"
    dataset: str = Field(min_length=1, description="Dataset name, as in the pipeline config.")
    uri: str = Field(min_length=1, description="Local path, file:// URI or any fsspec URL.")
    format: Literal["csv", "parquet", "jsonl"] | None = Field(
        default=None, description="File format; inferred from the name when absent."
    )


class RawDataExtracted(Event):
    """A source was stored as an immutable raw batch."""

    event_type: Literal["RawDataExtracted"] = "RawDataExtracted"
    dataset: str
    batch_id: str = Field(description="Hash of the raw bytes.")
    source_uri: str
    rows: int = Field(ge=0)
    columns: list[str]


class IngestionFailed(Event):
    """A source could not be ingested; ``errors`` name the columns and rows at fault."""

    event_type: Literal["IngestionFailed"] = "IngestionFailed"
    dataset: str
    uri: str
    reason: str
    errors: list[str] = Field(default_factory=list)


class FeaturesGenerated(Event):
    """A fitted feature set was written offline and materialised online."""

    event_type: Literal["FeaturesGenerated"] = "FeaturesGenerated"
    feature_set_id: str = Field(description="Hash of the feature spec and the input batch ids.")
    datasets: list[str]
    batch_ids: list[str]
    rows: int = Field(ge=0)
    features: list[str]
    label: str | None = None
    entity_key: str | None = None


class CandidateFailure(BaseModel):
    """A candidate model that could not be trained."""

    name: str
    error: str


class CandidatesTrained(Event):
    """Candidate models were trained on a feature set and saved to the model store."""

    event_type: Literal["CandidatesTrained"] = "CandidatesTrained"
    feature_set_id: str
    model_ids: list[str]
    failures: list[CandidateFailure] = Field(default_factory=list)


class ModelReady(Event):
    """A model passed evaluation and is the new champion."""

    event_type: Literal["ModelReady"] = "ModelReady"
    model_id: str
    version: str
    previous_version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelRejected(Event):
    """No candidate passed the evaluation gate."""

    event_type: Literal["ModelRejected"] = "ModelRejected"
    feature_set_id: str
    model_ids: list[str]
    reasons: list[str]


class BatchScoringRequested(Event):
    """Score a feature set or a raw batch offline with a model version."""

    event_type: Literal["BatchScoringRequested"] = "BatchScoringRequested"
    model_version: str | None = Field(default=None, description="None means the champion.")
    feature_set_id: str | None = None
    batch_id: str | None = None

    @model_validator(mode="after")
    def _names_an_input(self) -> BatchScoringRequested:
        if not (self.feature_set_id or self.batch_id):
            raise ValueError("one of feature_set_id or batch_id is required")
        return self


class ScoringCompleted(Event):
    """Offline batch scores were written to the score store."""

    event_type: Literal["ScoringCompleted"] = "ScoringCompleted"
    model_version: str
    uri: str
    rows: int = Field(ge=0)


class ServedScore(BaseModel):
    """One online scoring answer, as reported to monitoring."""

    request_id: str
    entity_id: str
    model_version: str
    score: float
    label: str | None = None
    fallback: bool = False
    fallback_reason: str | None = None
    latency_ms: float = Field(ge=0)
    served_at: AwareDatetime = Field(default_factory=utc_now)
    features: dict[str, float] = Field(
        default_factory=dict,
        description="The model's input features after its feature set's transform (drift).",
    )


class ScoreServed(Event):
    """A batch of online scores, published off the request path."""

    event_type: Literal["ScoreServed"] = "ScoreServed"
    scores: list[ServedScore] = Field(min_length=1)


class OutcomeObserved(Event):
    """The application learned the true outcome of a scored entity."""

    event_type: Literal["OutcomeObserved"] = "OutcomeObserved"
    entity_id: str
    outcome: str | float
    request_id: str | None = None
    observed_at: AwareDatetime = Field(default_factory=utc_now)


MAX_RECORDS_PER_EVENT = 10_000


class RecordsObserved(Event):
    """Records of a dataset as they happen (the online path): each one a JSON object with
    the dataset contract's columns; the label may be absent (it is rarely known yet)."""

    event_type: Literal["RecordsObserved"] = "RecordsObserved"
    dataset: str = Field(min_length=1, description="Dataset name, as in the pipeline config.")
    records: list[dict[str, Any]] = Field(
        min_length=1, max_length=MAX_RECORDS_PER_EVENT,
        description="The records, oldest first; column name to JSON value.")


class RecordProblem(BaseModel):
    """Why one record of a RecordsObserved was not applied."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0, description="Position of the record in its event.")
    field: str | None = Field(default=None, description="The field at fault, if one is.")
    reason: str
    record_id: str | None = None


class RecordsRefused(Event):
    """Records of a RecordsObserved that were refused (invalid) or came too late; the
    others were applied. Kept by the event log, for inspection."""

    event_type: Literal["RecordsRefused"] = "RecordsRefused"
    dataset: str
    problems: list[RecordProblem] = Field(min_length=1)
    applied: int = Field(ge=0, description="Records of the event that were applied.")


class DriftDetected(Event):
    """Live inputs or predictions drifted from the model's training reference."""

    event_type: Literal["DriftDetected"] = "DriftDetected"
    model_version: str
    level: Literal["warn", "alert"]
    psi: dict[str, float] = Field(description="Population stability index per feature.")


class ModelDegraded(Event):
    """A serving model's accuracy or latency broke its bound."""

    event_type: Literal["ModelDegraded"] = "ModelDegraded"
    model_version: str
    reason: Literal["accuracy", "latency"]
    observed: float
    expected: float


class RetrainRequested(Event):
    """Monitoring (or an operator) asks for a model trained on the latest data."""

    event_type: Literal["RetrainRequested"] = "RetrainRequested"
    reason: str
    dataset: str | None = None
    model_version: str | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["event_type"].default: cls for cls in Event.__subclasses__()
}


def event_class(event_type: str) -> type[Event]:
    """The model of an event type, or ``InvalidEvent`` for an unknown one."""
    try:
        return EVENT_TYPES[event_type]
    except KeyError:
        known = ", ".join(sorted(EVENT_TYPES))
        raise InvalidEvent(
            f"unknown event type {event_type!r} (known: {known})", field="event_type"
        ) from None


def parse_event(body: bytes | str | dict[str, Any], *, hint: str | None = None) -> Event:
    """Decode and validate an event; ``InvalidEvent`` names the first field at fault.

    ``hint`` is the type the body probably has (its routing key): a body of that type is
    validated in one pass, about three times faster; anything else takes the full path.
    """
    hinted = EVENT_TYPES.get(hint) if hint else None
    if hinted is not None and not isinstance(body, dict):
        try:
            event = hinted.model_validate_json(body)
        except ValidationError:
            event = None  # not that type, or invalid: the full path names the field at fault
        if event is not None and "event_type" in event.model_fields_set:
            return event  # (without its event_type the body is invalid, not defaulted)
    data = _decode(body) if not isinstance(body, dict) else body
    if "event_type" not in data:
        raise InvalidEvent("field required", field="event_type")
    cls = event_class(str(data["event_type"]))
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc, cls) from None


def _decode(body: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"body is a JSON {type(data).__name__}, expected an object")
    return data


def _invalid(exc: ValidationError, cls: type[Event]) -> InvalidEvent:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    more = exc.error_count() - 1
    problem = first["msg"] + (f" (and {more} more error(s))" if more else "")
    return InvalidEvent(problem, field=field, event_type=cls.model_fields["event_type"].default)


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every event type, for producers in other languages."""
    return {name: cls.model_json_schema() for name, cls in sorted(EVENT_TYPES.items())}
