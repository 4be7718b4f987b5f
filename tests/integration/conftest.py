"""Fixtures shared by the scoring integration tests: a scoring world in the test's own
namespace, a loaded core, an in-process gRPC server and an insecure channel to it.

A test module that needs something else (a secure server, a slow champion) defines a
fixture of the same name, which takes precedence over these for that module. The broker
and Redis namespace (``ns``) come from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from scoring.core import ScoringCore
from scoring.server import GrpcSettings, ScoringServer
from tests.fixtures.scoring import ScoringWorld, loaded_core, scoring_world
from tests.support.harness import BusNamespace


@pytest.fixture
def world(tmp_path: Path, ns: BusNamespace) -> ScoringWorld:
    """Two models (champion v2, previous v1) and their entities' rows in Redis."""
    return scoring_world(tmp_path, ns.namespace)


@pytest.fixture
def core(world: ScoringWorld) -> Iterator[ScoringCore]:
    """The world's chain loaded, with limits loose enough that circuits never open."""
    with loaded_core(world, deadline_s=2.0, latency_budget_s=1.0) as core:
        yield core


@pytest.fixture
def server(core: ScoringCore) -> Iterator[ScoringServer]:
    """A plain (no TLS, no tokens) server on a free port."""
    server = ScoringServer(core, GrpcSettings(host="127.0.0.1", port=0)).start()
    yield server
    server.stop(0)


@pytest.fixture
def channel(server: ScoringServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
