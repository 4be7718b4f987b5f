"""A service refuses to start, outside local development, on guest or a weak signing key."""

from __future__ import annotations

import pytest

from app.services import build_service
from common.safety import UnsafeSettings, check_start
from common.settings import Settings
from common.signing import WeakSigningKey

STRONG = "k" * 32
OWN_USER = "amqp://conveyor-ingestion:s3cret@rabbitmq:5672/conveyor"


def test_guest_is_refused_naming_the_setting_and_never_the_password() -> None:
    for url in ("amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://rabbitmq:5672/conveyor"):
        settings = Settings(local_dev=False, amqp_url=url, model_signing_key=STRONG)
        with pytest.raises(UnsafeSettings, match="CONVEYOR_AMQP_URL logs in to RabbitMQ as "
                           "guest") as refused:
            check_start(settings)
        assert "guest:guest" not in str(refused.value)


def test_a_weak_key_is_refused_after_the_broker_user() -> None:
    settings = Settings(local_dev=False, amqp_url=OWN_USER)
    with pytest.raises(WeakSigningKey, match="CONVEYOR_MODEL_SIGNING_KEY is the published"):
        check_start(settings)


def test_own_user_and_real_key_start() -> None:
    check_start(Settings(local_dev=False, amqp_url=OWN_USER, model_signing_key=STRONG))


def test_local_development_allows_both() -> None:
    check_start(Settings(local_dev=True))


def test_building_a_service_checks_first() -> None:
    with pytest.raises(UnsafeSettings):
        build_service("eventlog", Settings(local_dev=False))
