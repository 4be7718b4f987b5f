"""Observability on the cluster: the scrape config, rules and dashboards the ConfigMaps
carry are those of deploy/prometheus and deploy/grafana, the PodMonitor and the
PrometheusRule say the same, and scrape interval and datasource interval agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.k8s import K8S, OPTIONAL_COMPONENTS, OVERLAYS, ROOT, data_of, render

COMPONENT = K8S / "components" / "observability"
COPIES = {  # the component's file -> the repository's
    COMPONENT / "prometheus" / "prometheus.yml": ROOT / "deploy/prometheus/prometheus-k8s.yml",
    **{COMPONENT / "prometheus" / "rules" / p.name: p
       for p in (ROOT / "deploy/prometheus/rules").glob("*.yml")},
    **{COMPONENT / "grafana" / "dashboards" / p.name: p
       for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")},
}


@pytest.mark.parametrize("copy", sorted(COPIES), ids=lambda p: p.name)
def test_the_component_carries_the_repository_s_files(copy: Path) -> None:
    source = COPIES[copy]
    assert copy.exists(), "run: python deploy/k8s/sync.py"
    assert copy.read_text() == source.read_text(), "run: python deploy/k8s/sync.py"


def test_every_rule_file_and_dashboard_is_copied() -> None:
    copied = {p.name for p in COPIES}
    assert {p.name for p in (COMPONENT / "prometheus" / "rules").glob("*.yml")} <= copied
    assert {p.name for p in (COMPONENT / "grafana" / "dashboards").glob("*.json")} <= copied


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_ships_the_config_maps(overlay: str) -> None:
    docs = render(overlay)
    prometheus = yaml.safe_load(data_of(docs, "conveyor-prometheus-config")["prometheus.yml"])
    assert prometheus["rule_files"] == ["rules/*.yml"]  # mounted at /etc/prometheus/rules
    rules = data_of(docs, "conveyor-prometheus-rules")
    assert set(rules) == {p.name for p in (ROOT / "deploy/prometheus/rules").glob("*.yml")}
    dashboards = [d for d in docs if d["metadata"]["name"] == "conveyor-grafana-dashboards"]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(data_of(docs, "conveyor-grafana-dashboards")) == {
        p.name for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")}


def provisioning() -> dict[str, Any]:
    return {name: yaml.safe_load(text) for name, text in
            data_of(render("overlays/prod"), "conveyor-grafana-provisioning").items()}


def test_scrape_and_datasource_intervals_agree() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus-k8s.yml").read_text())
    scrape = config["global"]["scrape_interval"]
    [datasource] = provisioning()["datasource.yaml"]["datasources"]
    assert datasource["jsonData"]["timeInterval"] == scrape
    assert datasource["uid"] == "conveyor-prometheus"  # the uid every panel names
    docs = render("overlays/prod", *OPTIONAL_COMPONENTS)
    [monitor] = [d for d in docs if d["kind"] == "PodMonitor"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["interval"] == scrape
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def test_the_pod_monitor_labels_targets_as_the_rules_expect() -> None:
    docs = render("overlays/prod", *OPTIONAL_COMPONENTS)
    [monitor] = [d for d in docs if d["kind"] == "PodMonitor"]
    targets = {r["targetLabel"]: r for r in monitor["spec"]["podMetricsEndpoints"][0]
               ["relabelings"]}
    assert targets["job"]["replacement"] == "conveyor"  # up{job="conveyor"} in the rules
    assert targets["service"]["sourceLabels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    pods = [d for d in docs if d["kind"] == "Deployment"]
    for pod in pods:
        labels = pod["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_prometheus_rule_has_the_repository_s_groups() -> None:
    docs = render("overlays/prod", *OPTIONAL_COMPONENTS)
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    groups = [g for p in sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
              for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups, (
        "run: python deploy/k8s/sync.py")


def test_the_dashboard_provider_reads_where_the_dashboards_are_mounted() -> None:
    [provider] = provisioning()["dashboards.yaml"]["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/conveyor"
