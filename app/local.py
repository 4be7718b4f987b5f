"""Local processes of the services: what ``conveyor up`` and ``conveyor demo`` start.

A service counts as running when its queue has a consumer, wherever that consumer runs;
only the missing ones are started, each as ``python -m app.cli run NAME`` with its
JSON log captured to a file and a Prometheus target file (``targets/NAME.json`` beside the
logs, for the file_sd of deploy/prometheus/prometheus.yml) while it runs.

Example::

    with ExitStack() as stack:
        start_missing_services(settings, bus, stack, Path("var/run"), print)
        ...   # the services stop with SIGTERM when the stack closes
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from common.bus.rabbitmq import RabbitMQBus
from common.settings import Settings

T = TypeVar("T")
PIPELINE_SERVICES = (
    "eventlog", "ingestion", "preparation", "online-preparation", "training", "evaluation",
    "scoring", "monitoring",
)
# Ready only once a model is loaded, so at start-up "alive" is what can be waited for.
STARTS_UNREADY = {"scoring"}


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    For outside state only (a process, a queue depth, a Redis key); raises
    ``TimeoutError`` naming what was awaited and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"{what} not met within {timeout}s (last value: {value!r})")
        time.sleep(interval)


class LocalService:
    """A service started as a local process, its JSON log captured to a file."""

    def __init__(
        self, name: str, settings: Settings, log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name, self.port, self.namespace = name, free_port(), settings.namespace
        self.env = dict(env or {})
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.process = self._spawn(self.env)
        self.target_path = write_scrape_target(log_dir / "targets", name, self.port)

    def _spawn(self, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        full = {**os.environ, "CONVEYOR_HTTP_PORT": str(self.port),
                "CONVEYOR_NAMESPACE": self.namespace, **env}
        cmd = [sys.executable, "-m", "app.cli", "run", self.name]
        # A session of its own: a Ctrl-C meant for the parent must not hit it mid-shutdown.
        return subprocess.Popen(cmd, env=full, stdout=self._log, stderr=self._log,
                                start_new_session=True)

    def restart(self, env: Mapping[str, str]) -> int:
        """Stop it (SIGTERM) and start it again on the same port with these settings added
        (the demo's fault injection); returns the old process's exit status."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.env = {**self.env, **env}
        self.process = self._spawn(self.env)
        return code

    def ready(self) -> bool:
        """Whether its /readyz answers 200."""
        return self.answers("/readyz")

    def started(self) -> bool:
        """Whether it is up: ready, or at least alive for services that start unready."""
        return self.answers("/healthz" if self.name in STARTS_UNREADY else "/readyz")

    def answers(self, path: str) -> bool:
        """Whether ``path`` answers 200; an exited process is an error naming its log."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int:
        """SIGTERM, then wait: the service finishes the message in hand and exits."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self._log.close()
        self.target_path.unlink(missing_ok=True)
        return code


def write_scrape_target(folder: Path, service: str, port: int) -> Path:
    """A Prometheus file_sd file naming a local service's /metrics address."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{service}.json"
    group = [{"targets": [f"127.0.0.1:{port}"], "labels": {"service": service}}]
    partial = folder / f".{service}.json.partial"
    partial.write_text(json.dumps(group))
    partial.replace(path)  # atomic: Prometheus never reads half a file
    return path


FIRST_PORT = 20_000
"""Ports handed out by ``free_port`` start here (above the usual services' ports)."""
_HANDED_OUT: set[int] = set()
_HANDING_OUT = threading.Lock()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, not handed out before by this process, and
    below the kernel's ephemeral range, so a client connection's own port cannot take it
    before the service it is for binds it: a port the kernel picked (bind to port 0) once
    did, and the evaluation service of a test run died with 'Address already in use'."""
    candidates = range(FIRST_PORT, _ephemeral_start())
    with _HANDING_OUT:
        for port in random.sample(candidates, k=min(256, len(candidates))):
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 in {candidates} (256 tried at most)")


def _ephemeral_start() -> int:
    """The first port of the kernel's range for client connections (Linux; else 32768)."""
    try:
        first = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return max(int(first), FIRST_PORT + 1_000)
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def consumers(bus: RabbitMQBus, service: str) -> int:
    """How many consumers the service's queue has (0 if it does not exist)."""
    with bus.channel() as channel:
        try:
            declared = channel.queue_declare(bus.settings.queue(service), passive=True)
        except Exception:  # noqa: BLE001 - no queue yet means no consumer
            return 0
        return int(declared.method.consumer_count)


class HostCluster:
    """One ``dask-local`` Dask cluster for every service started here (``python -m
    common.compute``, of the ``CONVEYOR_DASK_*`` settings), its output captured to a file.

    With ``CONVEYOR_COMPUTE=dask-local`` each service would start a LocalCluster of its
    own: on a 2-core host three computing services ran six workers and three schedulers,
    and the 1M-row bench-scale took 42.8-58.5 s against 27.7 s with one cluster for all.
    """

    def __init__(self, log_dir: Path, timeout_s: float = 120.0) -> None:
        self.address_file = log_dir / "dask-cluster.address"
        self.log_path = log_dir / "dask-cluster.log"
        self.address_file.unlink(missing_ok=True)  # a crashed run's, naming a dead port
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "common.compute", "--address-file",
                 str(self.address_file)], stdout=out, stderr=out, start_new_session=True)
        try:
            self.address = str(wait_until(self._address, timeout_s,
                                          message="the Dask cluster's address"))
        except BaseException:
            self.stop()
            raise

    def _address(self) -> str | None:
        from common.compute import read_address

        if self.process.poll() is not None:
            raise RuntimeError(f"the Dask cluster exited early; see {self.log_path}")
        return read_address(self.address_file)

    def stop(self) -> int:
        """SIGTERM, then wait: its workers stop with it."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def start_missing_services(
    settings: Settings, bus: RabbitMQBus, stack: ExitStack, log_dir: Path,
    say: Callable[[str], None], env: Mapping[str, Mapping[str, str]] | None = None,
) -> list[LocalService]:
    """Start, as local processes, the pipeline services that have no consumer yet
    (``env``: extra environment by service name); with ``CONVEYOR_COMPUTE=dask-local``,
    one Dask cluster first, whose address they are given instead."""
    from common.compute import compute_settings

    env = env or {}
    missing = [n for n in PIPELINE_SERVICES if consumers(bus, n) == 0]
    shared: dict[str, str] = {}
    if missing and compute_settings().mode == "dask-local":
        cluster = HostCluster(log_dir)
        stack.callback(lambda: say(f"  Dask cluster stopped (exit status {cluster.stop()})"))
        shared = {"CONVEYOR_COMPUTE": cluster.address}
        say(f"  started a Dask cluster for them at {cluster.address}, log {cluster.log_path}")
    started = [LocalService(n, settings, log_dir, {**shared, **env.get(n, {})})
               for n in missing]
    for service in started:
        stack.callback(_stopper(service, say))
    width = max((len(service.name) for service in started), default=0)
    for service in started:
        wait_until(service.started, 60, message=f"{service.name} started")
        say(f"  started {service.name:<{width}} pid {service.process.pid}, "
            f"http://127.0.0.1:{service.port}/metrics, log {service.log_path}")
    if len(started) < len(PIPELINE_SERVICES):
        say(f"  {len(PIPELINE_SERVICES) - len(started)} service(s) were already running")
    return started


def _stopper(service: LocalService, say: Callable[[str], None]) -> Callable[[], None]:
    return lambda: say(f"  {service.name} stopped on SIGTERM (exit status {service.stop()})")
