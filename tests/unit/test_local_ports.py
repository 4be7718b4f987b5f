"""The ports local services are started on (``app.local.free_port``)."""

from __future__ import annotations

import random
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


def port_in_use_beside_a_free_one() -> tuple[socket.socket, int]:
    """A listening socket on a port below the ephemeral range whose next port is free (a
    port the kernel picks for us is among the client connections' ports, so its neighbour
    may be one of theirs: on a fresh machine it was)."""
    for port in random.sample(range(FIRST_PORT, _ephemeral_start() - 1), 200):
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", port))
        except OSError:
            taken.close()
            continue
        if local._bindable(port + 1):
            taken.listen()
            return taken, port
        taken.close()
    pytest.fail("no two neighbouring ports free below the ephemeral range")


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    taken, in_use = port_in_use_beside_a_free_one()
    with taken:
        monkeypatch.setattr(local, "FIRST_PORT", in_use)  # the range: in_use and the next
        monkeypatch.setattr(local, "_ephemeral_start", lambda: in_use + 2)
        monkeypatch.setattr(local, "_HANDED_OUT", set())
        assert free_port() == in_use + 1
        with pytest.raises(RuntimeError, match="no free TCP port"):
            free_port()  # in_use is taken, in_use + 1 handed out
