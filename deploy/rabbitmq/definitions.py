"""Conveyor's RabbitMQ vhost, users and permissions: writes ``definitions.json`` beside it,
and the local copy with passwords that ``scripts/setup.sh`` imports.

Each service logs in as its own user (``conveyor-<service>``) that may publish only the
event types it produces (topic permissions on ``conveyor.events``, by routing key), bind
its queue only to the types it handles, and read only its own queues. Applications log
in as ``conveyor-app``: they may publish SourceDataAvailable, RecordsObserved and
OutcomeObserved, and read nothing. Operators (the CLI: status, dead letters, replays,
any event) log in as ``conveyor-operator``. Everything is in the vhost ``conveyor`` for the
namespace ``conveyor`` (queues ``conveyor.<service>``, ``.dlq``, ``.retry.<ms>ms``, and
the exchange ``conveyor.retry.<service>`` through which a service's retries, dead letters
and replays reach those queues: nobody writes the default exchange).

``definitions.json`` carries no secret: its password hashes are empty (no password login)
until a deployment fills them. ``--local DIR`` does that for one machine: it keeps a
random password per user in ``DIR/credentials.json`` (created once, mode 0600), writes
``DIR/definitions.local.json`` (the definitions with those passwords hashed, plus guest's
permissions on the vhost: local development only) and ``DIR/urls.env`` (each service's
CONVEYOR_AMQP_URL). A deployment may provide its own ``credentials.json``. ``--shared FILE``
(set-up gives ``~/.config/conveyor/rabbitmq-credentials.json``) keeps one set of passwords
per machine, so several checkouts on one broker do not replace each other's.

Usage::

    python deploy/rabbitmq/definitions.py                   # rewrite definitions.json
    python deploy/rabbitmq/definitions.py --local var/rabbitmq \\
        --shared ~/.config/conveyor/rabbitmq-credentials.json
    rabbitmqctl import_definitions var/rabbitmq/definitions.local.json
    rabbitmqctl -q export_definitions - \\
        | python deploy/rabbitmq/definitions.py --imported var/rabbitmq  # 0: in place
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFINITIONS = HERE / "definitions.json"
VHOST = "conveyor"
NAMESPACE = "conveyor"
EXCHANGE = f"{NAMESPACE}.events"
HASHING = "rabbit_password_hashing_sha256"
ALL = ("BatchScoringRequested", "CandidatesTrained", "DriftDetected", "FeaturesGenerated",
       "IngestionFailed", "ModelDegraded", "ModelReady", "ModelRejected", "OutcomeObserved",
       "RawDataExtracted", "RecordsObserved", "RecordsRefused", "RetrainRequested",
       "ScoreServed", "ScoringCompleted", "SourceDataAvailable")
"""Every event type (common.events.EVENT_TYPES; a unit test keeps the two equal)."""

# service -> (event types it handles, event types it publishes)
SERVICES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "eventlog": (ALL, ()),
    "ingestion": (("SourceDataAvailable",), ("RawDataExtracted", "IngestionFailed")),
    "preparation": (("RawDataExtracted", "FeaturesGenerated"), ("FeaturesGenerated",)),
    "online-preparation": (("RecordsObserved",), ("RecordsRefused",)),
    "training": (("FeaturesGenerated", "RetrainRequested"), ("CandidatesTrained",)),
    "evaluation": (("CandidatesTrained",), ("ModelReady", "ModelRejected")),
    # scoring may also run batch scoring itself (ScoringSettings): it may bind to that too
    "scoring": (("ModelReady", "ModelDegraded", "BatchScoringRequested"),
                ("ScoreServed", "RecordsObserved", "ScoringCompleted")),
    "batch-scoring": (("BatchScoringRequested",), ("ScoringCompleted",)),
    "monitoring": (("ScoreServed", "OutcomeObserved"),
                   ("DriftDetected", "ModelDegraded", "RetrainRequested")),
}
APPLICATION = ("SourceDataAvailable", "RecordsObserved", "OutcomeObserved")
"""What an application (a data producer, a scoring client's outcomes) may publish."""
NOTHING = "^$"


def user_of(service: str) -> str:
    """The broker user of a service."""
    return f"{NAMESPACE}-{service}"


def one_of(names: tuple[str, ...] | list[str]) -> str:
    """A regex matching exactly these names."""
    return f"^({'|'.join(re.escape(n) for n in names)})$" if names else NOTHING


def retry_exchange(service: str) -> str:
    """The service's own direct exchange (common.bus.rabbitmq.retry_exchange): retries,
    dead letters and replays go through it to the service's queues, the only ones bound."""
    return f"{NAMESPACE}.retry.{service}"


def service_resources(service: str) -> str:
    """The events exchange, the service's retry exchange, its own queues (main, dlq,
    delays) and its broadcast queues (server-named, exclusive to their connection)."""
    own = re.escape(f"{NAMESPACE}.{service}")
    exchanges = f"{re.escape(EXCHANGE)}|{re.escape(retry_exchange(service))}"
    return f"^({exchanges}|{own}|{own}\\.dlq|{own}\\.retry\\.[0-9]+ms|amq\\.gen-.*)$"


def service_entries(service: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(permissions, topic permissions) of a service's user.

    Declaring an exchange and binding need configure and read on it. Retries and dead
    letters go through the service's retry exchange, so no service may write the default
    exchange (``amq.default``), which reaches every queue of the vhost.
    """
    handles, publishes = SERVICES[service]
    resources = service_resources(service)
    user = user_of(service)
    return (
        {"user": user, "vhost": VHOST, "configure": resources, "write": resources,
         "read": resources},
        {"user": user, "vhost": VHOST, "exchange": EXCHANGE, "write": one_of(publishes),
         "read": one_of(sorted(handles))},
    )


def definitions() -> dict[str, Any]:
    """The definitions document (users without passwords)."""
    users = [*map(user_of, SERVICES), user_of("app"), user_of("operator")]
    permissions, topics = zip(*map(service_entries, SERVICES), strict=True)
    app, operator = user_of("app"), user_of("operator")
    return {
        "rabbit_version": "3.10.8",
        "vhosts": [{"name": VHOST}],
        "users": [{"name": u, "password_hash": "", "hashing_algorithm": HASHING, "tags": ""}
                  for u in users],
        "permissions": [
            *permissions,
            {"user": app, "vhost": VHOST, "configure": NOTHING,
             "write": one_of([EXCHANGE]), "read": NOTHING},
            {"user": operator, "vhost": VHOST, "configure": NOTHING,
             "write": f"^({re.escape(EXCHANGE)}|{re.escape(NAMESPACE)}\\.retry\\..*)$",
             "read": f"^{re.escape(NAMESPACE)}\\..*$"},
        ],
        "topic_permissions": [
            *topics,
            {"user": app, "vhost": VHOST, "exchange": EXCHANGE, "write": one_of(APPLICATION),
             "read": NOTHING},
            {"user": operator, "vhost": VHOST, "exchange": EXCHANGE, "write": ".*",
             "read": NOTHING},
        ],
    }


def password_hash(user: str, password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)).
    The salt is derived from the user and password, so the same input gives the same file
    and setup re-imports only on a change."""
    salt = hashlib.sha256(f"{user}\0{password}".encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def credentials(folder: Path, users: list[str], shared: Path | None = None) -> dict[str, str]:
    """Each user's password, created at random once and kept in ``credentials.json``.

    With ``shared`` (one file for the machine), a user the folder has no password for
    takes the machine's, and one the machine's file lacks gets the folder's: every
    checkout on one broker then imports the same passwords instead of replacing each
    other's. A password in the folder's own ``credentials.json`` always wins."""
    path = folder / "credentials.json"
    own, machine = _read(path), _read(shared)
    known = machine | own
    known |= {u: secrets.token_urlsafe(24) for u in users if u not in known}
    if any(u not in own for u in users):
        write_private(path, json.dumps(known, indent=2) + "\n")
    if shared is not None and any(u not in machine for u in users):
        shared.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        machine |= {u: known[u] for u in users if u not in machine}
        write_private(shared, json.dumps(machine, indent=2) + "\n")
    return known


def _read(path: Path | None) -> dict[str, str]:
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def local(folder: Path, host: str = "127.0.0.1:5672", shared: Path | None = None) -> None:
    """Write the local definitions (passwords hashed, guest allowed) and service URLs."""
    folder.mkdir(parents=True, exist_ok=True)
    document = definitions()
    passwords = credentials(folder, [u["name"] for u in document["users"]], shared)
    for user in document["users"]:
        user["password_hash"] = password_hash(user["name"], passwords[user["name"]])
    # Local development only: the test suite and the demo log in as guest.
    document["permissions"].append({"user": "guest", "vhost": VHOST, "configure": ".*",
                                    "write": ".*", "read": ".*"})
    write_private(folder / "definitions.local.json", json.dumps(document, indent=2) + "\n")
    urls = [f"{u.upper().replace('-', '_')}_AMQP_URL=amqp://{u}:{p}@{host}/{VHOST}"
            for u, p in passwords.items()]
    write_private(folder / "urls.env", "\n".join(urls) + "\n")


def imported(folder: Path, broker: dict[str, Any]) -> bool:
    """Whether the broker's definitions (``rabbitmqctl export_definitions -``) hold every
    user of ``folder``'s local definitions with its password: another checkout's set-up
    on the same broker imports passwords of its own."""
    local_users = json.loads((folder / "definitions.local.json").read_text())["users"]
    hashes = {u["name"]: u.get("password_hash") for u in broker.get("users", [])}
    return all(hashes.get(u["name"]) == u["password_hash"] for u in local_users)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds passwords)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=Path, help="folder of the local passwords and copy")
    parser.add_argument("--shared", type=Path, metavar="FILE",
                        help="with --local: the machine's passwords, taken by a folder that "
                             "has none, written from the first one")
    parser.add_argument("--imported", type=Path, metavar="DIR",
                        help="exit 0 if the broker's definitions on stdin hold DIR's users "
                             "with their passwords, else 1")
    args = parser.parse_args()
    if args.imported:
        sys.exit(0 if imported(args.imported, json.load(sys.stdin)) else 1)
    if args.local:
        local(args.local, shared=args.shared)
    else:
        DEFINITIONS.write_text(json.dumps(definitions(), indent=2) + "\n")


if __name__ == "__main__":
    main()
