"""A service with several consumers handles events of different datasets side by side."""

from __future__ import annotations

import threading

import pytest

from common.events import SourceDataAvailable
from common.runtime import Service, ServiceRunner, handles
from tests.support.harness import BusNamespace

pytestmark = pytest.mark.integration


class Blocking(Service):
    """Dataset 'a' is held until dataset 'b' has been handled: only parallel consumers pass."""

    name = "blocking"
    concurrency = 2
    prefetch = 1

    def __init__(self) -> None:
        self.b_handled = threading.Event()
        self.a_released = threading.Event()
        self.a_started = threading.Event()

    @handles(SourceDataAvailable)
    def on_source(self, event: SourceDataAvailable) -> None:
        if event.dataset == "a":
            self.a_started.set()
            self.a_released.set() if self.b_handled.wait(timeout=20) else None
        else:
            self.b_handled.set()


def test_two_datasets_are_handled_concurrently(ns: BusNamespace) -> None:
    service = Blocking()
    ns.declare(service.name, ["SourceDataAvailable"])
    runner = ServiceRunner(service, ns.bus("runner"), ns.settings)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        ns.bus().publish(SourceDataAvailable(dataset="a", uri="a.csv", producer="test"))
        assert service.a_started.wait(timeout=20)
        ns.bus().publish(SourceDataAvailable(dataset="b", uri="b.csv", producer="test"))
        assert service.a_released.wait(timeout=20), "b waited behind a: no concurrency"
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert ns.depths(service.name)["ready"] == 0
