"""The one image of deploy/k8s: multi-stage, hadolint-clean, library versions pinned by
constraints.txt to those the tests ran with, grpcio-tools only in the build stage, tini as
PID 1, the user the pods run as, and a build context without .git, .venv or var/."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from common.settings import Settings
from tests.fixtures.k8s import K8S, ROOT, tool

DOCKERFILE = (ROOT / "Dockerfile").read_text()
STAGES = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_build_stage_has_grpcio_tools_and_the_runtime_stage_does_not() -> None:
    build, runtime = STAGES
    assert "grpc_tools.protoc" in build and "pip uninstall --yes grpcio-tools" in build
    assert "grpcio-tools" not in runtime and "pip install" not in runtime
    assert "COPY --from=build /opt/conveyor /opt/conveyor" in runtime


def test_every_proto_is_compiled() -> None:
    for proto in sorted(ROOT.glob("protos/**/*.proto")):
        assert str(proto.relative_to(ROOT)) in STAGES[0], proto


def test_every_package_is_copied_and_in_the_build_context() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for package in (p.rstrip("*") for p in packages):
        assert f"COPY {package} {package}" in STAGES[0], package
        assert f"!{package}/" in ignore, package
    assert "*" in ignore  # everything else stays out: .git, .venv, var/


def test_tini_runs_conveyor_as_the_pods_user() -> None:
    runtime = STAGES[1]
    assert 'ENTRYPOINT ["tini", "--", "conveyor"]' in runtime
    [user] = re.findall(r"^USER (\d+):(\d+)$", runtime, flags=re.M)
    patch = (K8S / "base" / "patches" / "pod-security.yaml").read_text()
    assert f"runAsUser: {user[0]}" in patch and f"runAsGroup: {user[1]}" in patch
    assert "PYTHONDONTWRITEBYTECODE=1" in runtime  # a read-only root filesystem


def test_the_default_pipeline_config_is_in_the_image() -> None:
    runtime = STAGES[1]
    [workdir] = re.findall(r"^WORKDIR (\S+)$", runtime, flags=re.M)
    target = f"{workdir}/{Settings.model_fields['pipeline_config'].default}"
    assert f"COPY deploy/k8s/base/pipeline.yaml {target}" in runtime


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(name): version for name, version in
            (line.split("==") for line in lines if line and not line.startswith("#"))}


def runtime_requirements() -> dict[str, list[Requirement]]:
    """Every distribution the installed project needs at run time, transitively, with the
    requirements that ask for it."""
    todo = ["conveyor"]
    seen: dict[str, list[Requirement]] = {}
    while todo:
        for text in metadata.requires(todo.pop()) or []:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            if name not in seen:
                todo.append(name)
            seen.setdefault(name, []).append(requirement)
    return seen


def test_constraints_pin_every_runtime_library_within_its_requirements() -> None:
    # What the image installs, and scripts/setup.sh into the tests' .venv (regenerate the
    # file, as its header says, to move both along).
    pinned = pins()
    for name, requirements in sorted(runtime_requirements().items()):
        assert name in pinned, f"{name} is not pinned in constraints.txt (see its header)"
        for requirement in requirements:
            assert requirement.specifier.contains(pinned[name], prereleases=True), (
                f"constraints.txt pins {name}=={pinned[name]}, outside {requirement}")
    assert "conveyor" not in pinned
