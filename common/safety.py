"""What a service checks before it starts: outside local development (``CONVEYOR_LOCAL_DEV``)
it refuses the broker's guest account and a published or short signing key. Each refusal
names the setting to change; the secret itself is never printed.

Example::

    check_start(settings)    # UnsafeSettings or WeakSigningKey, naming the setting
"""

from __future__ import annotations

from urllib.parse import urlparse

from common.errors import ConveyorError
from common.settings import Settings
from common.signing import Keyring


class UnsafeSettings(ConveyorError):
    """A setting that is fine for local development only."""

    def __init__(self, setting: str, problem: str):
        self.setting = setting
        super().__init__(f"{setting} {problem} (or CONVEYOR_LOCAL_DEV=true for local development)")


def check_start(settings: Settings) -> None:
    """Refuse, outside local development, what only local development may use."""
    if settings.local_dev:
        return
    if (urlparse(settings.amqp_url).username or "guest") == "guest":  # pika's default user
        raise UnsafeSettings("CONVEYOR_AMQP_URL", "logs in to RabbitMQ as guest: give the "
                             "service its own user (deploy/rabbitmq/definitions.json)")
    Keyring.from_settings(settings)  # WeakSigningKey naming the key's setting
