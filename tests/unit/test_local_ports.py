"""The ports local services are started on (``app.local.free_port``)."""

from __future__ import annotations

import socket

import pytest

from app import local
from app.local import FIRST_PORT, _ephemeral_start, free_port


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)  # never the same one twice in a process
    assert all(FIRST_PORT <= port < _ephemeral_start() for port in ports)
    for port in ports[:8]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: nobody took it meanwhile


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = taken.getsockname()[1]
        monkeypatch.setattr(local, "FIRST_PORT", in_use)  # the range: in_use and the next
        monkeypatch.setattr(local, "_ephemeral_start", lambda: in_use + 2)
        monkeypatch.setattr(local, "_HANDED_OUT", set())
        assert free_port() == in_use + 1
        with pytest.raises(RuntimeError, match="no free TCP port"):
            free_port()  # in_use is taken, in_use + 1 handed out
