"""Shared fixtures: one isolated broker and Redis namespace per integration test."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator

import pytest

from common.settings import Settings
from tests.support.harness import BusNamespace, ServicesUnavailable, check_services

# The suite is local development (set before any Settings is read, and inherited by the
# service processes tests start): the published signing key is allowed, and sources may
# come from pytest's temporary folders. Outside local development both are refused.
os.environ.setdefault("CONVEYOR_LOCAL_DEV", "true")
os.environ.setdefault("CONVEYOR_SOURCE_ROOTS", json.dumps([tempfile.gettempdir(), "var/demo"]))


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
