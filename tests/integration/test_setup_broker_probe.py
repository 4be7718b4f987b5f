"""scripts/setup.sh's AMQP probe, and the test suite's check of the services: a broker with
its port open that does not answer the handshake (a wedged RabbitMQ) is told apart from one
that answers, so set-up restarts it and the suite stops at once naming it, instead of tests
timing out one by one."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

from common.settings import Settings
from tests.support.harness import ServicesUnavailable, check_services

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"
PROBE_S = 2


def probe(port: int) -> bool:
    """``amqp_answers PORT`` of the sourced set-up script (its functions only)."""
    script = (f'source "{SETUP}"; AMQP_PROBE_S={PROBE_S}; '
              f'if amqp_answers {port}; then echo answers; else echo silent; fi')
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=PROBE_S * 10, check=True)
    return done.stdout.strip() == "answers"


@contextmanager
def listener(reply: bytes | None) -> Iterator[int]:
    """A TCP port on loopback that accepts connections and sends ``reply`` once it has
    read the client's first bytes, or (None) never says anything: a wedged broker."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)
            if reply is not None:
                conn.recv(8)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_the_running_broker_answers_the_probe() -> None:
    amqp = urlparse(Settings().amqp_url)
    assert amqp.hostname == "127.0.0.1", "the probe is set-up's, for the local broker"
    assert probe(amqp.port or 5672)


def test_a_port_that_accepts_and_never_answers_is_not_a_broker_that_answers() -> None:
    with listener(reply=None) as port:
        assert not probe(port)


def test_a_server_answering_something_else_is_not_a_broker_that_answers() -> None:
    with listener(reply=b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        assert not probe(port)


def test_a_closed_port_is_not_a_broker_that_answers() -> None:
    with listener(reply=None) as port:
        pass
    assert not probe(port)


def test_the_suite_stops_naming_a_broker_that_accepts_and_never_answers() -> None:
    with listener(reply=None) as port:
        settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/")
        with pytest.raises(ServicesUnavailable, match=f"127.0.0.1:{port} accepts connections "
                           "but does not answer the AMQP handshake"):
            check_services(settings, timeout=0.5)


def test_the_suite_goes_on_when_both_services_answer() -> None:
    check_services(Settings())
