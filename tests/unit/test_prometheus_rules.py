"""Prometheus configuration and rules: promtool checks them and runs the rules' unit tests.

The alert rules' behaviour is tested in ``deploy/prometheus/tests/*.yml`` (promtool's
own unit-test format: input series, expected alerts); this module runs them and checks
that every alert is tested both firing and silent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
K8S_BASE = ROOT / "deploy" / "k8s" / "base"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; skip (naming the binary) only where it is not installed."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus; "
                    "run `bash scripts/setup.sh prometheus`)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def assert_ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"{' '.join(done.args)} failed:\n{done.stdout}{done.stderr}"


def alerts() -> list[dict[str, Any]]:
    return [rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def alert_tests() -> list[dict[str, Any]]:
    return [check for path in RULE_TESTS for test in yaml.safe_load(path.read_text())["tests"]
            for check in test.get("alert_rule_test", [])]


def test_rule_files_are_valid() -> None:
    assert RULES
    assert_ok(promtool("check", "rules", *map(str, RULES)))


def test_local_scrape_config_and_the_rules_it_loads_are_valid() -> None:
    assert_ok(promtool("check", "config", str(PROMETHEUS / "prometheus.yml")))


def test_kubernetes_scrape_config_is_valid(tmp_path: Path) -> None:
    config = PROMETHEUS / "prometheus-k8s.yml"
    done = promtool("check", "config", str(config))
    if "field kubernetes_sd_configs not found" in done.stdout + done.stderr:
        # Debian's promtool is built without Kubernetes discovery: check everything else
        # (relabelling, rule files) with the discovery block swapped for static targets.
        done = promtool("check", "config", str(without_kubernetes_sd(config, tmp_path)))
    assert_ok(done)


def without_kubernetes_sd(config: Path, folder: Path) -> Path:
    """A copy of ``config`` whose kubernetes_sd_configs are empty static_configs."""
    data = yaml.safe_load(config.read_text())
    for job in data["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs", None), f"{job['job_name']} discovers no pods"
        job["static_configs"] = [{"targets": []}]
    shutil.copytree(PROMETHEUS / "rules", folder / "rules")
    copy = folder / config.name
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    assert RULE_TESTS
    assert_ok(promtool("test", "rules", *map(str, RULE_TESTS)))


def test_every_alert_has_a_duration_a_severity_and_annotations() -> None:
    assert alerts()
    for alert in alerts():
        name = alert["alert"]
        assert "for" in alert, f"{name} has no for:"
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(alert["annotations"]), name


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = alert_tests()
    for name in (alert["alert"] for alert in alerts()):
        outcomes = [bool(t["exp_alerts"]) for t in tests if t["alertname"] == name]
        assert True in outcomes, f"no test shows {name} firing"
        assert False in outcomes, f"no test shows {name} silent"


def deployments() -> list[dict[str, Any]]:
    docs = [doc for path in sorted(K8S_BASE.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]
    return [doc for doc in docs if doc.get("kind") == "Deployment"]


def test_every_deployment_asks_to_be_scraped_on_its_http_port() -> None:
    assert deployments()
    for deployment in deployments():
        template = deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        [container] = template["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        name = deployment["metadata"]["name"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == "/metrics", name
        assert int(annotations["prometheus.io/port"]) == ports["http"], name
