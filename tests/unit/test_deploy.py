"""The Kubernetes base renders, and every Deployment runs a service of the catalogue."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import load_pipeline_config
from common.services import service_names

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"


def rendered() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed, so the kustomize base cannot be rendered")
    out = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True,
                         check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_every_deployment_runs_a_known_service_with_probes() -> None:
    deployments = [d for d in rendered() if d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == "run"
        assert container["args"][1] in service_names()
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_every_service_of_the_catalogue_is_deployed() -> None:
    deployed = {d["metadata"]["name"] for d in rendered() if d["kind"] == "Deployment"}
    assert set(service_names()) <= deployed


def test_the_pipeline_config_map_holds_a_valid_pipeline(tmp_path: Path) -> None:
    [config_map] = [d for d in rendered() if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"].startswith("conveyor-pipeline")]
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_map["data"]["pipeline.yaml"])
    assert load_pipeline_config(path).name == "fraud"
