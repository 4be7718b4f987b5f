"""Shared fixtures: one isolated broker and Redis namespace per integration test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.settings import Settings
from common.testing import BusNamespace, ServicesUnavailable, check_services


@pytest.fixture(scope="session")
def services_up() -> None:
    """RabbitMQ and Redis answer; setup guarantees them, so their absence is a failure."""
    try:
        check_services(Settings())
    except ServicesUnavailable as exc:
        pytest.fail(f"integration services are down: {exc}", pytrace=False)


@pytest.fixture
def ns(services_up: None) -> Iterator[BusNamespace]:
    """A fresh namespace (queues, exchange, Redis keys), deleted after the test."""
    namespace = BusNamespace()
    yield namespace
    namespace.close()
