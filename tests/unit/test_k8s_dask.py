"""components/dask, added to each overlay as an operator would (in its ``components:``):
the DaskCluster's pod specs and Service validate strictly and meet Pod Security
"restricted", its workers run the services' image with the shared volume, every service
is pointed at its scheduler through a known setting, and the NetworkPolicies let the
services and the cluster's pods reach each other."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.compute import ComputeSettings
from tests.fixtures.k8s import (
    K8S,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    ROOT,
    conveyor_containers,
    deployments,
    effective,
    named,
    of_kind,
    tool,
    unknown_env,
)
from tests.unit.test_k8s_manifests import assert_restricted, mebibytes
from training.sampling import TrainingSettings

Doc = dict[str, Any]
COMPONENT = "components/dask"
CUSTOM = {("kubernetes.dask.org/v1", "DaskCluster"), ("keda.sh/v1alpha1", "ScaledObject")}


@functools.cache
def _with_dask(overlay: str) -> tuple[Doc, ...]:
    """The overlay with the component in its own ``components:`` (so the overlay's image
    and label transformers see the DaskCluster), rendered from a copy of the overlay."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / overlay
        for shared in ("base", "components"):
            os.symlink(K8S / shared, Path(folder) / shared)
        shutil.copytree(K8S / overlay, copy)
        kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
        kustomization["components"] = [*kustomization.get("components", []),
                                       f"../../{COMPONENT}"]
        (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        done = subprocess.run([tool("kubectl"), "kustomize", str(copy)], capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return list(_with_dask(request.param))


def cluster(docs: list[Doc]) -> Doc:
    [found] = of_kind(docs, "DaskCluster")
    return found


def pod_specs(docs: list[Doc]) -> dict[str, Doc]:
    spec = cluster(docs)["spec"]
    return {"scheduler": spec["scheduler"]["spec"], "worker": spec["worker"]["spec"]}


def as_workload(name: str, spec: Doc) -> Doc:
    return {"metadata": {"name": name}, "spec": {"template": {"spec": spec}}}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_everything_validates_strictly(docs: list[Doc], version: str) -> None:
    # The DaskCluster's CRD keeps its spec open; its parts are a PodSpec and a ServiceSpec.
    wrapped = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": role}, "spec": spec}
               for role, spec in pod_specs(docs).items()]
    wrapped.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "scheduler"},
                    "spec": cluster(docs)["spec"]["scheduler"]["service"]})
    for doc in [d for d in docs if (d["apiVersion"], d["kind"]) not in CUSTOM] + wrapped:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_cluster_is_the_operator_s_v1_resource(docs: list[Doc]) -> None:
    found = cluster(docs)
    assert found["apiVersion"] == "kubernetes.dask.org/v1"
    assert found["spec"]["worker"]["replicas"] >= 1
    assert found["metadata"]["labels"]["app.kubernetes.io/part-of"] == "conveyor"


def test_its_pods_meet_pod_security_restricted(docs: list[Doc]) -> None:
    for role, spec in pod_specs(docs).items():
        assert_restricted(as_workload(role, spec))
        [container] = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        tmp = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"}
        assert any("emptyDir" in v for v in spec["volumes"] if v["name"] in tmp), role


def test_it_runs_the_services_image_through_tini(docs: list[Doc]) -> None:
    images = {c["image"] for _, c in conveyor_containers(docs)}
    for role, spec in pod_specs(docs).items():
        [container] = spec["containers"]
        assert {container["image"]} == images, role  # same code and libraries as the services
        assert container["command"] == ["tini", "--"]
        assert container["args"][:2] == ["dask", role]


def test_the_workers_see_the_data_root_and_stay_under_their_limit(docs: list[Doc]) -> None:
    spec = pod_specs(docs)["worker"]
    [container] = spec["containers"]
    [training] = [c for w, c in conveyor_containers(docs) if w["metadata"]["name"] == "training"]
    data_root = effective(docs, training, "CONVEYOR_DATA_ROOT")
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == data_root]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "conveyor-data"
    args = container["args"]
    dask_limit = args[args.index("--memory-limit") + 1]
    limits = container["resources"]["limits"]
    assert mebibytes(dask_limit.replace("GiB", "Gi")) < mebibytes(limits["memory"])
    assert args[args.index("--nthreads") + 1] == limits["cpu"]


def test_every_service_points_at_the_scheduler_through_known_settings(docs: list[Doc]) -> None:
    found = cluster(docs)
    service = found["spec"]["scheduler"]["service"]
    [comm] = [p for p in service["ports"] if p["port"] == 8786]
    [scheduler] = pod_specs(docs)["scheduler"]["containers"]
    assert comm["targetPort"] in {p["name"] for p in scheduler["ports"]}
    assert service["selector"] == {"dask.org/cluster-name": found["metadata"]["name"],
                                   "dask.org/component": "scheduler"}
    address = f"tcp://{found['metadata']['name']}-scheduler:{comm['port']}"
    for workload, container in conveyor_containers(docs):
        compute = effective(docs, container, "CONVEYOR_COMPUTE")
        assert compute == address, workload["metadata"]["name"]
        assert ComputeSettings(compute=compute).mode == "dask"
        cap = effective(docs, container, "CONVEYOR_TRAIN_MAX_ROWS")
        assert TrainingSettings(train_max_rows=cap).train_max_rows  # type: ignore[arg-type]
    assert unknown_env(docs) == []


def test_services_and_the_cluster_may_reach_each_other(docs: list[Doc]) -> None:
    name = cluster(docs)["metadata"]["name"]
    dask_pods = {"dask.org/cluster-name": name}
    ingress = named(docs, "NetworkPolicy", "dask-cluster-ingress")
    egress = named(docs, "NetworkPolicy", "dask-clients-egress")
    assert ingress["spec"]["podSelector"]["matchLabels"] == dask_pods
    assert egress["spec"]["egress"][0]["to"] == [{"podSelector": {"matchLabels": dask_pods}}]
    sources = [peer["podSelector"]["matchLabels"] for peer in ingress["spec"]["ingress"][0]["from"]]
    assert dask_pods in sources  # the workers and the scheduler, to each other
    for deployment in deployments(docs):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert egress["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert any(source.items() <= labels.items() for source in sources)


def test_the_readme_documents_the_component() -> None:
    readme = (ROOT / "README.md").read_text().split("## Deploy on Kubernetes", 1)[1]
    assert f"`{COMPONENT}`" in readme
    assert re.search(r"CONVEYOR_COMPUTE=tcp://conveyor-dask-scheduler:8786", readme)
    assert "CONVEYOR_TRAIN_MAX_ROWS" in readme
