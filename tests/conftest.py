"""Shared fixtures: one isolated broker and Redis namespace per integration test."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator

import hypothesis  # noqa: F401 - imported here, early: see below
import pytest

from common.settings import Settings
from tests.support.harness import (
    BusNamespace,
    ServicesUnavailable,
    check_services,
    redis_client,
)

# The suite is local development (set before any Settings is read, and inherited by the
# service processes tests start): the published signing key is allowed, and sources may
# come from pytest's temporary folders. Outside local development both are refused.
os.environ.setdefault("CONVEYOR_LOCAL_DEV", "true")
os.environ.setdefault("CONVEYOR_SOURCE_ROOTS", json.dumps([tempfile.gettempdir(), "var/demo"]))
# The suite's keys live in a Redis database of their own: every test's clean-up SCANs its
# database, and a demo, `conveyor up` or a benchmark killed mid-run can leave millions of
# keys in database 0 (a 20M-row bench-scale run left 21M), which once made each clean-up
# take minutes and the suite run past CI's limit.
TEST_REDIS_URL = "redis://127.0.0.1:6379/15"
os.environ.setdefault("CONVEYOR_REDIS_URL", TEST_REDIS_URL)
# hypothesis is imported above so that pytest rewrites it now, not in hypothesis's
# terminal summary when a run that used no hypothesis test ends: that late ast.parse, with
# the run's garbage about, crashed 3 of 11 runs of tests/integration/test_bus_rabbitmq.py
# after the passes ("SystemError: AST constructor recursion depth mismatch", CPython
# 3.11.7's bug gh-106905, fixed in later releases).


@pytest.fixture(scope="session")
def services_up() -> None:
    """RabbitMQ and Redis answer; setup guarantees them, so their absence is a failure."""
    settings = Settings()
    try:
        check_services(settings)
    except ServicesUnavailable as exc:
        pytest.fail(f"integration services are down: {exc}", pytrace=False)
    warn_of_leftover_keys(settings)


def warn_of_leftover_keys(settings: Settings, many: int = 100_000) -> None:
    """Warn when the suite's Redis database already holds many keys (runs killed before
    their clean-up): each test's clean-up SCANs all of them."""
    client = redis_client(settings, call_timeout_s=10)
    try:
        size = int(client.dbsize())
    finally:
        client.close()
    if size > many:
        warnings.warn(f"{settings.redis_url} already holds {size:,} keys, which slows every "
                      "test's clean-up; if no other suite is running, clear it with "
                      f"`redis-cli -u {settings.redis_url} flushdb`", stacklevel=1)


@pytest.fixture
def ns(services_up: None) -> Iterator[BusNamespace]:
    """A fresh namespace (queues, exchange, Redis keys), deleted after the test."""
    namespace = BusNamespace()
    yield namespace
    namespace.close()
