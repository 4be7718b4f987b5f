"""``conveyor publish outcome`` and the models and queues parts of ``conveyor status``, where
they need no broker (the published outcome itself is checked end to end)."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from app.cli import main, outcome_value
from app.console import model_table, queue_table
from app.services import service_names
from monitoring.outcomes import outcome_event


@pytest.mark.parametrize(("text", "value"), [
    ("1", 1.0), ("0.0", 0.0), ("fraud", "fraud"), ("nan", "nan"), ("inf", "inf"),
])
def test_an_outcome_is_a_number_where_it_reads_as_one(text: str, value: object) -> None:
    assert outcome_value(text) == value


def test_publish_outcome_names_what_is_missing() -> None:
    result = CliRunner().invoke(main, ["publish", "outcome", "--outcome", "1"])
    assert result.exit_code == 2 and "--entity or --request-id" in result.output


def test_the_generic_publish_still_takes_any_event_type() -> None:
    result = CliRunner().invoke(main, ["publish", "ModelReddy", "--json", "{}"])
    assert result.exit_code == 1 and "unknown event type 'ModelReddy'" in result.output


def test_the_outcome_event_carries_what_was_given() -> None:
    event = outcome_event("C42", 1.0, "", producer="shop")
    assert (event.entity_id, event.outcome, event.request_id, event.producer) == (
        "C42", 1.0, None, "shop")


def test_the_model_table_shows_each_versions_figures() -> None:
    table = model_table({
        "v2": {"served": 1200, "latency_p50_ms": 1.25, "latency_p95_ms": 3.0,
               "latency_p99_ms": 9.5, "fallback_share": 0.25,
               "quality": {"accuracy": 0.41}, "quality_expected": {"accuracy": 0.97},
               "outcomes": 200, "drift_level": "alert", "degraded": "accuracy"},
        "v1": {"served": 3, "latency_p50_ms": math.nan, "fallback_share": 1.0},
    })
    header, v2, v1 = table.splitlines()
    assert "served" in header and "drift" in header
    assert v2.split()[:4] == ["v2", "1200", "1.2/3.0/9.5", "25.0%"]
    assert "0.410 (0.970)" in v2 and v2.endswith("alert, degraded: accuracy")
    assert v1.split()[:4] == ["v1", "3", "-/-/-", "100.0%"] and v1.endswith("-")
    assert "nothing served yet" in model_table({})


class DepthsOf:
    """What ``queue_table`` asks of the bus: each service's queue depths (-1: undeclared)."""

    def queue_depths(self, service: str) -> dict[str, int]:
        if service == "batch-scoring":
            return {"ready": -1}
        return {"ready": len(service), "retry.500ms": 2, "retry.5000ms": 0, "dead": 1}


def test_the_queue_table_keeps_its_columns_under_the_longest_service_name() -> None:
    lines = queue_table(DepthsOf()).splitlines()  # type: ignore[arg-type]
    assert "online-preparation" in service_names()
    header, rows = lines[0], lines[1:]
    assert [row.split()[0] for row in rows] == service_names()
    for row in rows:
        if "(queue not declared yet)" in row:
            continue
        assert len(row) == len(header), row  # every number right-aligned under its title
        assert row.split()[1:] == [str(len(row.split()[0])), "2", "1"]
