"""Each overlay, alone and with the optional components, renders and validates strictly
(unknown fields fail) against the Kubernetes schemas of three recent versions.

The schemas are those kubernetes-validate ships (derived from each release's OpenAPI,
"standalone-strict"), installed by ``scripts/setup.sh k8s``: this project's machines reach
PyPI, not GitHub, where kubeconform and its schema repository live. Custom resources
(KEDA, the Prometheus Operator) have no schema there; their fields are checked in
test_k8s_manifests.py.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.fixtures.k8s import KUBERNETES_VERSIONS, OPTIONAL_COMPONENTS, OVERLAYS, render

CUSTOM = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
          ("monitoring.coreos.com/v1", "PodMonitor"),
          ("monitoring.coreos.com/v1", "PrometheusRule")}


def validate(docs: list[dict[str, Any]], version: str) -> list[str]:
    errors = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} "
                          f"at {'/'.join(map(str, exc.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: no schema for "
                          f"{doc['apiVersion']} in Kubernetes {version}")
    return errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_is_valid(overlay: str, version: str) -> None:
    assert validate(render(overlay), version) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_with_the_optional_components_is_valid(overlay: str, version: str) -> None:
    docs = render(overlay, *OPTIONAL_COMPONENTS)
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert kinds >= CUSTOM
    assert validate(docs, version) == []


def test_an_unknown_field_fails_validation() -> None:
    [deployment, *_] = [d for d in render("overlays/prod") if d["kind"] == "Deployment"]
    wrong = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    [error] = validate([wrong], KUBERNETES_VERSIONS[-1])
    assert "'replica' was unexpected" in error
