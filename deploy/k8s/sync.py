"""Brings deploy/k8s up to date with the files it copies (kustomize reads nothing above a
kustomization's folder): the Kubernetes scrape config, the rules and the dashboards into
components/observability, the rules as components/prometheus-operator's PrometheusRule,
and the dev overlay's RabbitMQ definitions and broker URLs. The tests of deploy/k8s fail,
naming this script, when a copy is stale::

    python deploy/k8s/sync.py
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parent
DEPLOY = K8S.parent
OBSERVABILITY = K8S / "components" / "observability"
RULE = K8S / "components" / "prometheus-operator" / "prometheusrule.yaml"
RULE_HEADER = ("# The rules of deploy/prometheus/rules/*.yml as a PrometheusRule, written by\n"
               "# deploy/k8s/sync.py (tests/unit/test_k8s_observability.py checks it).\n")


def copy_files() -> None:
    """The scrape config, rules and dashboards, as they are in deploy/."""
    shutil.copyfile(DEPLOY / "prometheus" / "prometheus-k8s.yml",
                    OBSERVABILITY / "prometheus" / "prometheus.yml")
    for folder, pattern in (("prometheus/rules", "*.yml"), ("grafana/dashboards", "*.json")):
        target = OBSERVABILITY / folder
        for stale in target.glob(pattern):
            stale.unlink()
        for source in sorted((DEPLOY / folder).glob(pattern)):
            shutil.copyfile(source, target / source.name)


def prometheus_rule() -> None:
    """Every rule group of deploy/prometheus/rules as one PrometheusRule."""
    groups = [group for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
              for group in yaml.safe_load(path.read_text())["groups"]]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "conveyor"}, "spec": {"groups": groups}}
    RULE.write_text(RULE_HEADER + yaml.safe_dump(rule, sort_keys=False, width=100))


def main() -> None:
    copy_files()
    prometheus_rule()
    runpy.run_path(str(K8S / "overlays" / "dev" / "rabbitmq" / "dev_definitions.py"),
                   run_name="__main__")


if __name__ == "__main__":
    main()
