"""deploy/rabbitmq/definitions.json: generated, in step with the code, least privilege."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from app.services import SERVICES
from common.events import EVENT_TYPES
from common.runtime import Service

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "deploy" / "rabbitmq"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rabbitmq_definitions",
                                                  FOLDER / "definitions.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


definitions = load()


def document() -> dict[str, Any]:
    return json.loads((FOLDER / "definitions.json").read_text())


def topic(user: str) -> dict[str, str]:
    return next(t for t in document()["topic_permissions"] if t["user"] == user)


def permission(user: str) -> dict[str, str]:
    return next(p for p in document()["permissions"] if p["user"] == user)


def test_the_file_is_what_the_generator_writes() -> None:
    assert document() == definitions.definitions(), "run python deploy/rabbitmq/definitions.py"


def test_it_knows_every_event_type_and_every_service() -> None:
    assert set(definitions.ALL) == set(EVENT_TYPES)
    assert set(definitions.SERVICES) == set(SERVICES)


def handled_by(service: str) -> set[str]:
    module = importlib.import_module(SERVICES[service].partition(":")[0])
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, Service) and getattr(c, "name", None) == service]
    marks = {getattr(fn, "__conveyor_handles__", None)
             for c in classes for _, fn in inspect.getmembers(c, inspect.isfunction)}
    found = {m[0] for m in marks if m}
    assert found or service == "eventlog", f"no handler found for {service}"
    return found


@pytest.mark.parametrize("service", sorted(set(SERVICES) - {"eventlog"}))
def test_each_service_may_bind_to_what_it_handles_and_nothing_else(service: str) -> None:
    handles, _ = definitions.SERVICES[service]
    assert handled_by(service) <= set(handles)
    allowed = re.compile(topic(f"conveyor-{service}")["read"])
    assert {t for t in EVENT_TYPES if allowed.match(t)} == set(handles)


def test_the_application_publishes_sources_records_and_outcomes_only() -> None:
    allowed = re.compile(topic("conveyor-app")["write"])
    assert {t for t in EVENT_TYPES if allowed.match(t)} == {
        "SourceDataAvailable", "RecordsObserved", "OutcomeObserved"}
    app = permission("conveyor-app")
    assert (app["configure"], app["read"]) == ("^$", "^$")
    assert re.fullmatch(app["write"], "conveyor.events")
    assert not re.match(app["write"], "amq.default")  # no writing straight into a queue


def test_model_ready_and_model_degraded_come_from_their_owners_only() -> None:
    for event_type, owners in (("ModelReady", {"conveyor-evaluation", "conveyor-operator"}),
                               ("ModelDegraded", {"conveyor-monitoring", "conveyor-operator"})):
        writers = {t["user"] for t in document()["topic_permissions"]
                   if re.match(t["write"], event_type)}
        assert writers == owners, event_type


def test_a_service_reads_only_its_own_queues() -> None:
    read = re.compile(permission("conveyor-ingestion")["read"])
    for name in ("conveyor.ingestion", "conveyor.ingestion.dlq", "conveyor.ingestion.retry.500ms"):
        assert read.match(name), name
    for name in ("conveyor.scoring", "conveyor.ingestion-x", "conveyor.ingestion.dlq2"):
        assert not read.match(name), name


def test_no_secret_and_no_guest_in_the_shipped_file() -> None:
    assert {u["password_hash"] for u in document()["users"]} == {""}
    assert "guest" not in json.dumps(document())


def test_local_mode_hashes_random_passwords_privately_and_keeps_them(tmp_path: Path) -> None:
    definitions.local(tmp_path)
    first = json.loads((tmp_path / "credentials.json").read_text())
    definitions.local(tmp_path)
    assert json.loads((tmp_path / "credentials.json").read_text()) == first  # kept
    local = json.loads((tmp_path / "definitions.local.json").read_text())
    for user in local["users"]:
        assert user["password_hash"] == definitions.password_hash(user["name"],
                                                                  first[user["name"]])
    assert {"user": "guest", "vhost": "conveyor", "configure": ".*", "write": ".*",
            "read": ".*"} in local["permissions"]
    for name in ("credentials.json", "definitions.local.json", "urls.env"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
    assert f"CONVEYOR_APP_AMQP_URL=amqp://conveyor-app:{first['conveyor-app']}@" in (
        tmp_path / "urls.env").read_text()


def test_setup_sees_whether_the_broker_holds_this_checkouts_passwords(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    definitions.local(mine)
    definitions.local(theirs)  # another checkout: passwords of its own
    exported = {"users": [*json.loads((mine / "definitions.local.json").read_text())["users"],
                          {"name": "guest", "password_hash": "x"}]}
    assert definitions.imported(mine, exported)
    assert not definitions.imported(theirs, exported)
    assert not definitions.imported(mine, {"users": exported["users"][1:]})  # one missing


def test_the_password_hash_is_rabbitmqs_sha256_scheme() -> None:
    import base64
    import hashlib

    raw = base64.b64decode(definitions.password_hash("u", "secret"))
    salt, digest = raw[:4], raw[4:]
    assert digest == hashlib.sha256(salt + b"secret").digest()


def test_nobody_writes_the_default_exchange_and_services_write_only_their_retry_exchange() -> None:
    # amq.default reaches every queue of the vhost by name: a service's retries and dead
    # letters go through its own retry exchange instead (common.bus.rabbitmq).
    for entry in document()["permissions"]:
        assert not re.match(entry["write"], "amq.default"), entry["user"]
    write = re.compile(permission("conveyor-ingestion")["write"])
    assert write.match("conveyor.retry.ingestion")
    assert not write.match("conveyor.retry.scoring")


def test_checkouts_of_one_machine_share_its_passwords(tmp_path: Path) -> None:
    machine = tmp_path / "home" / "rabbitmq-credentials.json"
    first, second = tmp_path / "first", tmp_path / "second"
    definitions.local(first, shared=machine)
    definitions.local(second, shared=machine)  # a fresh clone: takes the machine's
    assert (json.loads((second / "credentials.json").read_text())
            == json.loads((first / "credentials.json").read_text())
            == json.loads(machine.read_text()))
    assert (second / "definitions.local.json").read_text() == (
        first / "definitions.local.json").read_text()  # setup sees them imported already
    assert machine.stat().st_mode & 0o077 == 0


def test_a_checkouts_own_passwords_win_and_the_machine_learns_users_it_lacks(
        tmp_path: Path) -> None:
    machine, own = tmp_path / "machine.json", tmp_path / "own"
    definitions.local(tmp_path / "first", shared=machine)
    own.mkdir()
    (own / "credentials.json").write_text(json.dumps({"conveyor-app": "provided"}))
    definitions.local(own, shared=machine)
    mine = json.loads((own / "credentials.json").read_text())
    shared = json.loads(machine.read_text())
    assert mine["conveyor-app"] == "provided" != shared["conveyor-app"]
    assert mine["conveyor-scoring"] == shared["conveyor-scoring"]  # the rest: the machine's
    del shared["conveyor-scoring"]  # a user the machine's file does not know yet
    machine.write_text(json.dumps(shared))
    definitions.local(own, shared=machine)
    assert json.loads(machine.read_text())["conveyor-scoring"] == mine["conveyor-scoring"]
    assert json.loads((own / "credentials.json").read_text()) == mine  # unchanged
    assert json.loads(machine.read_text())["conveyor-app"] != "provided"
