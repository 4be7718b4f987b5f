"""``conveyor demo``: the story so far, told on the real RabbitMQ and Redis.

It starts the services that are not running yet as local processes, writes a seeded
PaySim-style data set, publishes ``SourceDataAvailable`` and shows the event being
routed, consumed and acknowledged; then an invalid event going to the dead-letter queue
with the field at fault named. The stages of the pipeline extend it as they land.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from common.bus.rabbitmq import RabbitMQBus
from common.cli import broker_reachable, format_log_entry, queue_table, redis_reachable
from common.datasets import paysim
from common.eventlog import EventLog
from common.events import SourceDataAvailable
from common.settings import Settings

DEMO_ROWS = 2_000


def say(text: str = "") -> None:
    """Print a line of the demo's story."""
    print(text, flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll an outside condition (a process, a queue) until it holds; fail clearly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class LocalService:
    """A service started as a local process, its JSON log captured to a file."""

    def __init__(self, name: str, settings: Settings, log_dir: Path) -> None:
        self.name, self.port = name, _free_port()
        self.log_path = log_dir / f"{name}.log"
        env = {**os.environ, "CONVEYOR_HTTP_PORT": str(self.port), "CONVEYOR_LOG_LEVEL": "DEBUG",
               "CONVEYOR_NAMESPACE": settings.namespace}
        self._log = self.log_path.open("w")
        cmd = [sys.executable, "-m", "common.cli", "run", name]
        self.process = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=self._log)

    def ready(self) -> bool:
        """Whether its /readyz answers 200."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_lines(self, needle: str) -> list[dict[str, Any]]:
        """Its JSON log records that mention ``needle`` (or all with an empty needle)."""
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if needle in line and line.startswith("{")]

    def stop(self) -> int:
        """SIGTERM, then wait: the service finishes the message in hand and exits."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self._log.close()
        return code


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(settings: Settings, timeout: float = 60.0) -> int:
    """Run the demo; returns the process exit status."""
    say("== Conveyor demo ==")
    if not (broker_reachable(settings) and redis_reachable(settings)):
        say("RabbitMQ or Redis is not reachable: run `make setup` (scripts/setup.sh) first.")
        return 1
    work = Path("var/demo")
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        service = LocalService("eventlog", settings, work)
        stack.callback(lambda: say(f"eventlog stopped on SIGTERM, exit status {service.stop()}"))
        wait_for("the eventlog service to be ready", service.ready, timeout)
        say(f"started service eventlog (pid {service.process.pid}, /metrics on :{service.port})")
        bus = RabbitMQBus(settings, name="demo")
        stack.callback(bus.close)
        _happy_path(settings, bus, service, work, timeout)
        _dead_letter_path(settings, bus, timeout)
        say("\nQueues now:")
        say(queue_table(bus))
    say("\nDone. Try: conveyor status | conveyor events log | conveyor dlq list eventlog")
    return 0


def _happy_path(
    settings: Settings, bus: RabbitMQBus, service: LocalService, work: Path, timeout: float
) -> None:
    source = work / "transactions.csv"
    paysim(DEMO_ROWS, seed=int(time.time()) % 1000).to_csv(source, index=False)
    say(f"\n1. wrote {DEMO_ROWS} PaySim-style transactions to {source}")
    event = SourceDataAvailable(dataset="paysim", uri=str(source.resolve()), producer="demo")
    bus.publish(event)
    say(f"2. published {event.event_type} {event.event_id}")
    say(f"   confirmed by the broker; routed by key {event.event_type} on {settings.exchange}")
    log = EventLog(redis.Redis.from_url(settings.redis_url), settings.namespace)
    wait_for("the event to be recorded", lambda: log.get(event.event_id), timeout)
    wait_for("the ack", lambda: service.log_lines("acked delivery"), timeout)
    say("3. consumed, handled and acknowledged by eventlog; its log says:")
    for record in service.log_lines(str(event.event_id)) + service.log_lines("acked delivery")[-1:]:
        say(f"   {record['ts']} {record['level']:<7} {record['msg']}")
    say("4. the event log (conveyor events log):")
    say("   " + format_log_entry(log.recent(1)[-1]))


def _dead_letter_path(settings: Settings, bus: RabbitMQBus, timeout: float) -> None:
    before = bus.queue_depths("eventlog")["dead"]
    bad = {"event_type": "SourceDataAvailable", "uri": "s3://bucket/missing-dataset.csv"}
    bus.publish_raw("SourceDataAvailable", json.dumps(bad).encode())
    say("\n5. published an invalid SourceDataAvailable (no 'dataset' field)")
    wait_for("the dead letter", lambda: bus.queue_depths("eventlog")["dead"] > before, timeout)
    letter = bus.dead_letters("eventlog", limit=before + 1)[-1]
    say(f"6. dead-lettered at once to {settings.dead_letter_queue('eventlog')}: {letter.error}")
    say("   the service keeps consuming; `conveyor dlq list eventlog` shows it")
