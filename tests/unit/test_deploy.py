"""deploy/k8s runs the code as it is: every Deployment runs a service of the catalogue on
the ports and paths it serves, every variable is a setting, every key is read.

The checks of the pods' security, resources and scaling are in test_k8s_manifests.py; the
schema validation in test_k8s_schemas.py. Tools: ``scripts/setup.sh k8s`` (never skipped).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from app.config import load_pipeline_config
from app.services import service_names
from tests.fixtures.k8s import (
    LIBRARY_ENV,
    OVERLAYS,
    container_env,
    conveyor_containers,
    data_of,
    deployments,
    effective,
    is_conveyor_image,
    named,
    of_kind,
    pod_spec,
    render,
    served_http_paths,
    settings_classes,
    settings_env_names,
    unknown_env,
)

ALL = ("base", *OVERLAYS)


@pytest.fixture(params=ALL)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_every_deployment_runs_a_known_service(docs: list[dict[str, Any]]) -> None:
    assert deployments(docs)
    for deployment in deployments(docs):
        [container] = pod_spec(deployment)["containers"]
        assert container["args"][:1] == ["run"], deployment["metadata"]["name"]
        assert container["args"][1] in service_names()
        assert container["args"][1] == deployment["metadata"]["name"]


def test_every_service_of_the_catalogue_is_deployed(docs: list[dict[str, Any]]) -> None:
    deployed = {d["metadata"]["name"] for d in deployments(docs)}
    assert set(service_names()) <= deployed


def test_every_variable_is_a_field_of_a_settings_class(docs: list[dict[str, Any]]) -> None:
    assert unknown_env(docs) == []


def test_a_misspelled_variable_fails_the_check() -> None:
    docs = copy.deepcopy(render("overlays/dev"))
    [scoring] = [d for d in deployments(docs) if d["metadata"]["name"] == "scoring"]
    pod_spec(scoring)["containers"][0]["env"].append(
        {"name": "CONVEYOR_SCORING_CHAIN_DEPHT", "value": "3"})
    assert unknown_env(docs) == ["scoring: CONVEYOR_SCORING_CHAIN_DEPHT"]


def test_every_value_parses_as_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = render("overlays/dev")  # its Secrets are rendered, so every value is known
    for _, container in conveyor_containers(docs):
        env = {k: v for k, v in container_values(docs, container).items()
               if k not in LIBRARY_ENV}
        for name in settings_env_names():
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for cls in settings_classes():
            cls()  # a value of the wrong type fails here, naming the field


def container_values(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in container_env(docs, container).items() if v is not None}


def test_every_port_and_probe_is_one_the_code_serves(docs: list[dict[str, Any]]) -> None:
    for workload, container in conveyor_containers(docs):
        name = workload["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"http": int(effective(docs, container, "CONVEYOR_HTTP_PORT"))}
        if name == "scoring":
            expected["grpc"] = int(effective(docs, container, "CONVEYOR_GRPC_PORT"))
        assert ports == expected, name
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == ports["http"], name
        assert annotations["prometheus.io/path"] in served_http_paths(), name
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in served_http_paths(), (name, kind)
                assert probe["httpGet"]["port"] in ports, (name, kind)
            else:  # gRPC health: the standard service on scoring's gRPC port
                assert probe["grpc"]["port"] == ports["grpc"], (name, kind)
                assert probe["grpc"].get("service", "") == "", (name, kind)


def test_probes_check_what_each_endpoint_means(docs: list[dict[str, Any]]) -> None:
    for workload, container in conveyor_containers(docs):
        name = workload["metadata"]["name"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        if name == "scoring":  # a warmed model, not the broker connection /readyz includes
            assert "grpc" in container["readinessProbe"], name
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        else:
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name


def test_every_config_map_and_secret_key_is_read(docs: list[dict[str, Any]]) -> None:
    used = keys_used(docs)
    for doc in of_kind(docs, "ConfigMap") + of_kind(docs, "Secret"):
        name = doc["metadata"]["name"]
        if name.startswith(("conveyor-prometheus-", "conveyor-grafana-")):
            continue  # read by the cluster's Prometheus and Grafana: test_k8s_observability
        if name.startswith("conveyor-keda-"):
            continue  # read by components/keda's TriggerAuthentication: test_k8s_manifests
        for key in doc.get("data", {}):
            assert (name, key) in used, f"{doc['kind']} {name}: key {key} is read by nothing"


def keys_used(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(ConfigMap or Secret, key) pairs that a container reads: variables whose name is a
    setting (Conveyor's image) or the program's own, and mounted files."""
    known = settings_env_names().keys() | LIBRARY_ENV
    used: set[tuple[str, str]] = set()
    for workload in deployments(docs) + of_kind(docs, "StatefulSet"):
        spec = pod_spec(workload)
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                conveyor = is_conveyor_image(container["image"])
                used |= {(ref["name"], key) for key in data_if_rendered(docs, ref["name"])
                         if key in known or not conveyor}
            for var in container.get("env", []):
                ref = var.get("valueFrom", {})
                ref = ref.get("secretKeyRef") or ref.get("configMapKeyRef")
                if ref:
                    used.add((ref["name"], ref["key"]))
        for volume in spec.get("volumes", []):
            ref = volume.get("configMap") or volume.get("secret")
            if ref:
                name = ref.get("name") or ref.get("secretName")
                used |= {(name, key) for key in data_if_rendered(docs, name)}
    return used


def data_if_rendered(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    rendered = {d["metadata"]["name"] for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    return data_of(docs, name) if name in rendered else {}


def test_the_pipeline_config_map_is_where_the_setting_points(tmp_path: Path) -> None:
    docs = render("base")
    [config_map] = [d for d in of_kind(docs, "ConfigMap")
                    if d["metadata"]["name"].startswith("conveyor-pipeline")]
    for workload, container in conveyor_containers(docs):
        path = Path(effective(docs, container, "CONVEYOR_PIPELINE_CONFIG"))
        [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
        [volume] = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == config_map["metadata"]["name"]
        assert path.name in config_map["data"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(config_map["data"]["pipeline.yaml"])
    assert load_pipeline_config(path).name == "fraud"


def test_the_data_root_is_the_shared_volume(docs: list[dict[str, Any]]) -> None:
    for workload, container in conveyor_containers(docs):
        root = effective(docs, container, "CONVEYOR_DATA_ROOT")
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == root]
        [volume] = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert named(docs, "PersistentVolumeClaim", claim), workload["metadata"]["name"]
