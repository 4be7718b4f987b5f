"""The ``conveyor`` command line, where it needs no broker."""

from __future__ import annotations

import json

from click.testing import CliRunner

from app.cli import main
from common.events import EVENT_TYPES


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_events_schema_prints_every_event_type() -> None:
    code, output = invoke("events", "schema")
    schemas = json.loads(output)
    assert code == 0
    assert set(schemas) == set(EVENT_TYPES)
    assert "dataset" in schemas["SourceDataAvailable"]["required"]


def test_events_schema_of_one_type() -> None:
    code, output = invoke("events", "schema", "ModelReady")
    assert code == 0 and list(json.loads(output)) == ["ModelReady"]


def test_unknown_event_type_is_a_clear_error() -> None:
    code, output = invoke("events", "schema", "ModelReddy")
    assert code == 1
    assert "unknown event type 'ModelReddy'" in output


def test_publish_names_the_missing_field_before_touching_the_broker() -> None:
    code, output = invoke("publish", "SourceDataAvailable", "--json", '{"uri": "x.csv"}')
    assert code == 1
    assert "field 'dataset'" in output


def test_publish_rejects_text_that_is_not_json() -> None:
    code, output = invoke("publish", "SourceDataAvailable", "--json", "{dataset: x}")
    assert code == 2 and "not JSON" in output


def test_run_rejects_an_unknown_service() -> None:
    code, output = invoke("run", "nosuch")
    assert code == 2 and "unknown service 'nosuch'" in output
