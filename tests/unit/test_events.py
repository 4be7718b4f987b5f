"""Event envelope, causation, parsing errors that name the field, JSON schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from common.errors import InvalidEvent, InvalidInput
from common.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    BatchScoringRequested,
    Event,
    RawDataExtracted,
    SourceDataAvailable,
    event_class,
    json_schemas,
    parse_event,
)

ALL_TYPES = {
    "SourceDataAvailable", "RawDataExtracted", "IngestionFailed", "FeaturesGenerated",
    "CandidatesTrained", "ModelReady", "ModelRejected", "BatchScoringRequested",
    "ScoringCompleted", "ScoreServed", "OutcomeObserved", "DriftDetected", "ModelDegraded",
    "RetrainRequested", "RecordsObserved", "RecordsRefused",
}


def source(**overrides: Any) -> SourceDataAvailable:
    fields = {"dataset": "paysim", "uri": "tx.csv", "producer": "t", **overrides}
    return SourceDataAvailable(**fields)


def wire(event: Event, **changes: Any) -> bytes:
    data = json.loads(event.to_json())
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def test_envelope_defaults() -> None:
    before = datetime.now(UTC)
    a, b = source(), source()
    assert a.event_type == "SourceDataAvailable"
    assert isinstance(a.event_id, UUID) and a.event_id != b.event_id
    assert a.correlation_id != b.correlation_id  # each event starts its own run
    assert a.causation_id is None
    assert a.schema_version == SCHEMA_VERSION
    assert a.occurred_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= a.occurred_at <= datetime.now(UTC)
    assert SourceDataAvailable(dataset="d", uri="u").producer == "unknown"


def test_caused_copies_correlation_and_sets_causation() -> None:
    cause = source()
    effect = cause.caused(
        RawDataExtracted, producer="ingestion", dataset="paysim", batch_id="b1",
        source_uri="tx.csv", rows=3, columns=["a"],
    )
    assert isinstance(effect, RawDataExtracted)
    assert effect.correlation_id == cause.correlation_id
    assert effect.causation_id == cause.event_id
    assert effect.event_id != cause.event_id
    assert effect.producer == "ingestion"


def test_events_are_frozen_and_reject_unknown_fields() -> None:
    event = source()
    with pytest.raises(ValueError):
        event.dataset = "other"  # type: ignore[misc]
    with pytest.raises(InvalidEvent) as err:
        parse_event(wire(event, surprise=1))
    assert err.value.field == "surprise"


def test_round_trip_through_json_is_identity() -> None:
    event = source(format="csv")
    assert parse_event(event.to_json()) == event
    assert parse_event(event.to_json().decode()) == event
    assert parse_event(json.loads(event.to_json())) == event


def test_missing_field_is_named() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(wire(source(), dataset=...))
    assert err.value.field == "dataset"
    assert err.value.event_type == "SourceDataAvailable"
    assert "in field 'dataset'" in str(err.value) and "required" in str(err.value).lower()


def test_wrong_type_is_named() -> None:
    raw = source().caused(
        RawDataExtracted, producer="p", dataset="d", batch_id="b", source_uri="u", rows=1,
        columns=["c"],
    )
    with pytest.raises(InvalidEvent) as err:
        parse_event(wire(raw, rows="many"))
    assert err.value.field == "rows"
    assert "integer" in err.value.problem


def test_nested_field_path_is_named() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(wire(source(), event_id="not-a-uuid"))
    assert err.value.field == "event_id"


def test_missing_event_type_is_named() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(wire(source(), event_type=...))
    assert err.value.field == "event_type"


def test_unknown_event_type_is_named_with_the_known_ones() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(wire(source(), event_type="Nope"))
    assert err.value.field == "event_type"
    assert "'Nope'" in str(err.value) and "SourceDataAvailable" in str(err.value)
    with pytest.raises(InvalidEvent):
        event_class("Event")  # the envelope itself is not an event type


def test_non_json_body_is_refused() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(b"\xff not json")
    assert err.value.field is None
    assert "not JSON" in str(err.value)


def test_json_array_is_refused() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(b'[{"event_type": "SourceDataAvailable"}]')
    assert "JSON list, expected an object" in str(err.value)


def test_model_level_rule_is_reported() -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event({"event_type": "BatchScoringRequested"})
    assert "feature_set_id or batch_id" in str(err.value)
    assert BatchScoringRequested(batch_id="b").feature_set_id is None


def test_type_hint_parses_the_same_and_never_changes_the_errors() -> None:
    event = source()
    assert parse_event(event.to_json(), hint="SourceDataAvailable") == event
    assert parse_event(event.to_json(), hint="ModelReady") == event  # a wrong hint is harmless
    assert parse_event(event.to_json(), hint="Nope") == event
    bad = wire(event, dataset=...)
    for hint in ("SourceDataAvailable", "ModelReady", None):
        with pytest.raises(InvalidEvent) as err:
            parse_event(bad, hint=hint)
        assert (err.value.field, err.value.event_type) == ("dataset", "SourceDataAvailable")
    with pytest.raises(InvalidEvent, match="not JSON"):
        parse_event(b"{", hint="SourceDataAvailable")
    with pytest.raises(InvalidEvent) as err:  # the hint never stands in for the type
        parse_event(wire(event, event_type=...), hint="SourceDataAvailable")
    assert err.value.field == "event_type"


def test_invalid_event_is_invalid_input() -> None:
    assert issubclass(InvalidEvent, InvalidInput)  # so the dispatcher never retries it


def test_json_schemas_cover_all_event_types() -> None:
    schemas = json_schemas()
    assert set(schemas) == ALL_TYPES == set(EVENT_TYPES)
    assert len(schemas) == 16
    for name, schema in schemas.items():
        assert schema["properties"]["event_type"]["const"] == name
        assert {"event_id", "correlation_id", "occurred_at"} <= set(schema["properties"])
    assert "dataset" in schemas["SourceDataAvailable"]["required"]
