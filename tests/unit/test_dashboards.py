"""Grafana dashboards and provisioning: well-formed, every panel queried with valid PromQL
on known metrics, and the committed JSON is what deploy/grafana/build.py generates.

That every query returns data from the running services is the job of
tests/e2e/test_observability_e2e.py (a real Prometheus).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.grafana import (
    DASHBOARDS,
    GRAFANA_VALUES,
    REPO,
    dashboards,
    panel_queries,
    panels,
    prometheus_expr,
)

PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
RULES = REPO / "deploy" / "prometheus" / "rules" / "conveyor.rules.yml"
DATASOURCE_UID = "conveyor-prometheus"
CONTRACT = {  # the project's metric names (README, "Observability")
    "conveyor_events_handled_total", "conveyor_events_failed_total",
    "conveyor_events_retried_total", "conveyor_events_dead_lettered_total",
    "conveyor_events_duplicate_total", "conveyor_events_published_total",
    "conveyor_handler_duration_seconds", "conveyor_queue_depth",
    "conveyor_pipeline_stage_duration_seconds",
    "conveyor_scoring_requests_total", "conveyor_scoring_rpc_duration_seconds",
    "conveyor_scoring_answers_total", "conveyor_scoring_latency_seconds",
    "conveyor_scoring_fallbacks_total", "conveyor_scoring_batch_size",
    "conveyor_scoring_degraded_total", "conveyor_scoring_reports_dropped_total",
    "conveyor_model_served_total", "conveyor_model_quality", "conveyor_model_quality_expected",
    "conveyor_feature_drift_psi", "conveyor_feature_drift_ks", "conveyor_prediction_drift_psi",
    "conveyor_drift_detected_total", "conveyor_model_degraded_total", "conveyor_model_champion",
    "conveyor_model_serving_latency_seconds", "up",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def test_the_three_dashboards_have_uid_title_tags_and_the_conveyor_datasource() -> None:
    boards = dashboards()
    assert set(boards) == {"scoring", "pipeline", "models"}
    for stem, board in boards.items():
        assert board["uid"] == f"conveyor-{stem}"
        assert board["title"] == f"Conveyor / {stem.capitalize()}"
        assert "conveyor" in board["tags"]
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


def test_scoring_and_models_can_be_narrowed_to_a_model_version() -> None:
    for stem in ("scoring", "models"):
        names = [v["name"] for v in dashboards()[stem]["templating"]["list"]]
        assert "model_version" in names, stem


def test_every_panel_queries_the_conveyor_prometheus() -> None:
    for stem, board in dashboards().items():
        for panel in panels(board):
            where = f"{stem} / {panel['title']}"
            assert panel["datasource"]["uid"] == DATASOURCE_UID, where
            assert panel["targets"], f"{where} has no query"
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{where} has an empty query"
                assert target["datasource"]["uid"] == DATASOURCE_UID, where
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), where


def test_panel_ids_are_unique_within_a_dashboard() -> None:
    for stem, board in dashboards().items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), stem


def test_every_variable_a_query_uses_is_defined_or_builtin() -> None:
    for stem, board in dashboards().items():
        defined = {f"${v['name']}" for v in board["templating"]["list"]}
        for query in (q for q in panel_queries() if q.dashboard == stem):
            for used in re.findall(r"\$\w+", query.expr):
                assert used in defined or used.startswith("$__"), f"{query.name}: {used}"
                assert used in GRAFANA_VALUES, f"{query.name}: tests cannot fill in {used}"


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (contract metrics and recording rules)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(?:conveyor_\w+|\w+:\w+:\w+|up)\b(?=\s*[{\[)])",
                          without_strings))


def test_every_query_reads_metrics_of_the_contract_or_recording_rules() -> None:
    known = CONTRACT | recorded()
    for query in panel_queries():
        names = metric_names(query.expr)
        assert names, f"{query.name} reads no metric: {query.expr}"
        for name in names:
            base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)
                         and name.removesuffix(s) in known), name)
            assert base in known, f"{query.name} reads unknown metric {name}"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, variables filled in, as a recording rule's expression."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; "
                    "run `bash scripts/setup.sh prometheus`)")
    queries = panel_queries()
    rules = [{"record": f"dashboard:query:{i}", "expr": prometheus_expr(q.expr)}
             for i, q in enumerate(queries)]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n" + "\n".join(
        f"dashboard:query:{i} = {q.name}" for i, q in enumerate(queries))


def test_provisioning_points_grafana_at_the_datasource_and_the_dashboards() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    [source] = datasources["datasources"]
    assert (source["uid"], source["type"]) == (DATASOURCE_UID, "prometheus")
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "conveyor.yaml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        pytest.skip("grafana-foundation-sdk is not installed (a dev dependency: make setup)")
    build = _load_build()
    for name in build.DASHBOARDS:
        committed = (DASHBOARDS / f"{name}.json").read_text()
        assert committed == build.render(name), (
            f"{name}.json differs: run .venv/bin/python deploy/grafana/build.py")


def _load_build() -> Any:
    spec = importlib.util.spec_from_file_location(
        "grafana_build", REPO / "deploy" / "grafana" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
