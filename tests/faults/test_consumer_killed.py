"""A consumer process SIGKILLed mid-handler: the event is redelivered, its work done once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.bus.idempotency import processed_key
from common.events import SourceDataAvailable
from tests.support.harness import BusNamespace, wait_until

pytestmark = pytest.mark.faults

SCRIPT = Path(__file__).resolve().parents[1] / "fixtures" / "consumer_process.py"
REPO = SCRIPT.parents[2]
SVC = "killable"
SOURCE = "SourceDataAvailable"


class ConsumerProcess:
    """tests/fixtures/consumer_process.py running in a subprocess, its log in a file."""

    def __init__(self, ns: BusNamespace, mode: str, log_path: Path) -> None:
        self.ns, self.log_path = ns, log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), ns.namespace, SVC, mode],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        key = f"{self.ns.namespace}:ready:{self.proc.pid}"
        wait_until(
            lambda: self.ns.redis.exists(key) or self.proc.poll() is not None,
            timeout=20, message="consumer process attached",
        )
        assert self.proc.poll() is None, f"consumer process died:\n{self.log()}"

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        assert code == 0, f"consumer exited with {code}:\n{self.log()}"


@pytest.fixture
def spawn(ns: BusNamespace, tmp_path: Path) -> Iterator[Callable[[str], ConsumerProcess]]:
    started: list[ConsumerProcess] = []

    def start(mode: str) -> ConsumerProcess:
        process = ConsumerProcess(ns, mode, tmp_path / f"consumer-{len(started)}.log")
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(10)


def counter(ns: BusNamespace, *parts: object) -> int:
    value = ns.redis.get(":".join((ns.namespace, *map(str, parts))))
    return int(value or 0)  # type: ignore[arg-type]  # redis-py types sync and async alike


def work_counters(ns: BusNamespace, kind: str) -> list[int]:
    keys = ns.redis.scan_iter(f"{ns.namespace}:{kind}:*", count=10_000)
    return [counter(ns, key.decode().removeprefix(f"{ns.namespace}:")) for key in keys]


@pytest.mark.parametrize(
    ("mode", "attempts"),
    [("before", 1), ("after", 2)],
    ids=["killed-before-work", "killed-after-work-before-ack"],
)
def test_killed_consumer_redelivers_and_work_is_done_once(
    ns: BusNamespace, spawn: Callable[[str], ConsumerProcess], mode: str, attempts: int
) -> None:
    ns.declare(SVC, [SOURCE])
    event = SourceDataAvailable(dataset="paysim", uri="tx.csv", producer="test")
    first = spawn(mode)
    ns.bus().publish(event)
    wait_until(lambda: counter(ns, "started", event.event_id) == 1, message="handler started")
    if mode == "after":
        wait_until(lambda: work_counters(ns, "work") == [1], message="work stored")
    first.kill()

    second = spawn(mode)
    ns.redis.rpush(f"{ns.namespace}:release", "go")
    done = processed_key(ns.namespace, SVC, event.event_id)
    wait_until(lambda: ns.redis.exists(done), timeout=20, message="event processed")
    second.terminate()

    assert counter(ns, "started", event.event_id) == 2, second.log()  # redelivered once
    assert work_counters(ns, "attempts") == [attempts]  # times the handler reached the work
    assert work_counters(ns, "work") == [1]  # ...and the work was done exactly once
    assert ns.redis.llen(f"{ns.namespace}:release") == 0
    depths = ns.depths(SVC)
    assert depths == {"ready": 0, "dead": 0, "retry_50ms": 0, "retry_100ms": 0}, second.log()
