"""Writes the dev overlay's RabbitMQ definitions and broker URLs from the repository's
``deploy/rabbitmq/definitions.json`` (the vhost, a user per service and their permissions;
no passwords): each user gets the DEV-ONLY password ``dev-<user>-password``, hashed, and a
``conveyor-keda`` user (monitoring tag, read-only) is added for components/keda. Run it
again whenever that file changes (tests/unit/test_k8s_manifests.py says so)::

    python deploy/k8s/overlays/dev/rabbitmq/dev_definitions.py
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[4] / "deploy" / "rabbitmq" / "definitions.json"
KEDA = "conveyor-keda"
NOT_DEPLOYED = {"conveyor-app", "conveyor-operator"}  # applications and people, not pods
HOST = "rabbitmq:5672"


def password(user: str) -> str:
    """The dev password of a user (committed on purpose: a dev cluster's only)."""
    return f"dev-{user}-password"


def password_hash(user: str, secret: str) -> str:
    """rabbit_password_hashing_sha256, salted as deploy/rabbitmq/definitions.py does."""
    salt = hashlib.sha256(f"{user}\0{secret}".encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + secret.encode()).digest()).decode()


def dev_definitions(shared: dict[str, Any]) -> dict[str, Any]:
    """The shared definitions with dev passwords and the KEDA user."""
    dev = copy.deepcopy(shared)
    [vhost] = [v["name"] for v in dev["vhosts"]]
    dev["users"].append({"name": KEDA, "password_hash": "", "hashing_algorithm":
                         "rabbit_password_hashing_sha256", "tags": "monitoring"})
    dev["permissions"].append({"user": KEDA, "vhost": vhost, "configure": "^$",
                               "write": "^$", "read": ".*"})
    for user in dev["users"]:
        user["password_hash"] = password_hash(user["name"], password(user["name"]))
    return dev


def amqp_urls(dev: dict[str, Any]) -> dict[str, str]:
    """Each service's CONVEYOR_AMQP_URL, by service name (users are conveyor-<service>)."""
    [vhost] = [v["name"] for v in dev["vhosts"]]
    return {u["name"].removeprefix("conveyor-"): f"amqp://{u['name']}:{password(u['name'])}"
            f"@{HOST}/{vhost}" for u in dev["users"] if u["name"] not in {KEDA, *NOT_DEPLOYED}}


def main() -> None:
    dev = dev_definitions(json.loads(SHARED.read_text()))
    (HERE / "definitions.json").write_text(json.dumps(dev, indent=2) + "\n")
    lines = ["# DEV ONLY (overlays/dev), written by rabbitmq/dev_definitions.py: each service's",
             "# broker URL, as its own user. Never reuse these passwords outside a dev cluster."]
    lines += [f"{service}={url}" for service, url in amqp_urls(dev).items()]
    (HERE.parent / "secrets" / "amqp.env").write_text("\n".join(lines) + "\n")
    [vhost] = [v["name"] for v in dev["vhosts"]]
    (HERE.parent / "secrets" / "keda.env").write_text(
        "# DEV ONLY (overlays/dev, for components/keda): the management API as the read-only\n"
        f"# {KEDA} user of rabbitmq/definitions.json (monitoring tag).\n"
        f"host=http://{KEDA}:{password(KEDA)}@rabbitmq.conveyor.svc:15672/{vhost}\n")


if __name__ == "__main__":
    main()
