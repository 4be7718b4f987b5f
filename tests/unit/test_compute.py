"""The compute setting: pandas in process by default (Dask never imported), a LocalCluster
shared by every user in the process, an existing scheduler by its address, and a clear
error naming the variable for a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.local import HostCluster
from common.compute import (
    Compute,
    ComputeSettings,
    compute_settings,
    open_compute,
    read_address,
)
from common.errors import InvalidInput

SMALL: dict[str, Any] = {"compute": "dask-local", "dask_workers": 1, "dask_memory_limit": "1GB"}


def test_the_default_is_pandas_in_process_without_importing_dask() -> None:
    # The services whose heavy work can move import Dask only on the Dask path.
    code = ("import sys; from common.compute import open_compute\n"
            "import ingestion.service, preparation.service, scoring.offline\n"
            "with open_compute() as c: assert (c.mode, c.client, c.distributed) == "
            "('local', None, False)\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]")
    env = {"PATH": "/usr/bin:/bin"}  # no CONVEYOR_COMPUTE from the caller's environment
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_the_defaults() -> None:
    settings = ComputeSettings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.compute, settings.dask_workers, settings.dask_threads_per_worker,
            settings.dask_memory_limit) == ("local", 2, 1, "3GB")


def test_the_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_COMPUTE", "tcp://scheduler:8786")
    monkeypatch.setenv("CONVEYOR_DASK_WORKERS", "4")
    monkeypatch.setenv("CONVEYOR_DASK_MEMORY_LIMIT", "512MiB")
    settings = compute_settings()
    assert (settings.mode, settings.dask_workers, settings.dask_memory_limit) == (
        "dask", 4, "512MiB")


@pytest.mark.parametrize(("values", "named"), [
    ({"compute": "spark"}, "CONVEYOR_COMPUTE: 'spark' is not 'local', 'dask-local' or a Dask"),
    ({"compute": "scheduler:8786"}, "CONVEYOR_COMPUTE: 'scheduler:8786'"),
    ({"dask_workers": 0}, "CONVEYOR_DASK_WORKERS: Input should be greater than or equal to 1"),
    ({"dask_threads_per_worker": "x"}, "CONVEYOR_DASK_THREADS_PER_WORKER: "),
    ({"dask_memory_limit": "lots"}, "CONVEYOR_DASK_MEMORY_LIMIT: 'lots' is not a size"),
])
def test_a_bad_value_names_its_variable(values: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidInput, match="invalid compute settings") as caught:
        compute_settings(**values)
    assert named in str(caught.value)


@pytest.mark.parametrize("address", ["tcp://scheduler:8786", "tls://10.0.0.1:8786",
                                     "tcp://dask-scheduler.conveyor.svc"])
def test_a_scheduler_address_is_the_dask_mode(address: str) -> None:
    assert ComputeSettings(compute=address).mode == "dask"


def test_dask_local_starts_one_cluster_per_process_shared_until_its_last_user() -> None:
    settings = ComputeSettings(**SMALL)
    first = open_compute(settings)
    try:
        second = open_compute(settings)
        assert (first.mode, first.distributed) == ("dask-local", True)
        assert second.client is first.client
        assert first.client is not None
        assert len(first.client.scheduler_info()["workers"]) == 1
        assert first.client.submit(sum, [1, 2, 3]).result() == 6
        second.close()
        second.close()  # a second close releases nothing more
        assert first.client.status == "running"
    finally:
        first.close()
    assert first.client.status == "closed"
    with open_compute(settings) as again:  # a new cluster once the last one is gone
        assert again.client is not first.client
        assert again.client is not None and again.client.status == "running"


def test_an_existing_scheduler_is_reached_by_its_address() -> None:
    with open_compute(ComputeSettings(**SMALL)) as local:
        assert local.client is not None
        address = local.client.scheduler.address
        with open_compute(ComputeSettings(compute=address)) as remote:
            assert (remote.mode, remote.distributed) == ("dask", True)
            assert remote.client is not local.client
            assert remote.client is not None
            assert remote.client.submit(len, "abc").result() == 3
        assert local.client.status == "running"  # its own client closed, not the cluster


def test_a_local_compute_has_nothing_to_close() -> None:
    compute = Compute("local")
    with compute:
        assert not compute.distributed
    compute.close()


def test_a_process_that_never_closes_its_cluster_still_exits() -> None:
    code = ("from common.compute import ComputeSettings, open_compute\n"
            "c = open_compute(ComputeSettings(compute='dask-local', dask_workers=1,"
            " dask_memory_limit='1GB'))\n"
            "assert c.client.submit(abs, -1).result() == 1\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin"}, capture_output=True)


def test_one_cluster_for_the_host_serves_every_process_by_its_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What conveyor up starts once for its services (python -m common.compute).
    monkeypatch.setenv("CONVEYOR_DASK_WORKERS", "1")
    monkeypatch.setenv("CONVEYOR_DASK_MEMORY_LIMIT", "1GB")
    cluster = HostCluster(tmp_path)
    try:
        assert cluster.address.startswith("tcp://127.0.0.1:")
        with open_compute(ComputeSettings(compute=cluster.address)) as first, \
                open_compute(ComputeSettings(compute=cluster.address)) as second:
            assert first.mode == "dask" and first.client is not None
            assert second.client is first.client  # one client per target in a process
            assert len(first.client.scheduler_info()["workers"]) == 1
            assert first.client.submit(sum, [1, 2, 3]).result() == 6
    finally:
        code = cluster.stop()
    assert code == 0, cluster.log_path.read_text()[-2000:]
    assert read_address(cluster.address_file) is None  # gone with the cluster


def test_a_shuffle_on_the_cluster_keeps_off_one_machines_disk() -> None:
    # Dask picks "disk" (partd files on one machine) when the process has no default
    # client, and a service's client is not one: wrong on a cluster of several machines.
    import dask.dataframe as dd
    import pandas as pd

    with open_compute(ComputeSettings(**SMALL)) as compute:
        assert compute.client is not None
        frame = dd.from_pandas(pd.DataFrame({"k": [3, 1, 2, 1] * 5, "v": range(20)}),
                               npartitions=3)
        moved = frame.shuffle(on="k", npartitions=3)
        names = {str(key[0] if isinstance(key, tuple) else key).lower()
                 for key in dict(moved.__dask_graph__())}
        assert not [n for n in names if "disk" in n or "partd" in n], sorted(names)
        assert sorted(compute.client.compute(moved, sync=True)["v"]) == list(range(20))


class _Worker:
    """What ReleaseFreeMemory reads of a worker: its memory limit and process memory."""

    def __init__(self, limit: int | None, memory: int) -> None:
        self.memory_manager = type("Manager", (), {"memory_limit": limit})()
        self.monitor = type("Monitor", (), {"get_process_memory": lambda _: memory})()


@pytest.mark.parametrize(("limit", "memory", "released"), [
    (1000, 400, False),   # under half the limit: nothing to do
    (1000, 600, True),    # over it: freed memory goes back before Dask would pause
    (None, 10**12, False),  # no limit, no pause to avoid
])
def test_a_worker_over_its_mark_releases_free_memory(
        limit: int | None, memory: int, released: bool) -> None:
    from common.dask_memory import ReleaseFreeMemory

    calls: list[int] = []
    plugin = ReleaseFreeMemory(above=0.5, release=lambda: calls.append(1))
    assert plugin.check(_Worker(limit, memory)) is released
    assert len(calls) == int(released)


def test_every_worker_of_an_opened_cluster_watches_its_memory() -> None:
    from app.local import wait_until
    from common.dask_memory import PLUGIN_NAME, ReleaseFreeMemory

    def releases(dask_worker: Any) -> int:
        return int(dask_worker.plugins[PLUGIN_NAME].releases)

    with open_compute(ComputeSettings(**SMALL)) as compute:
        assert compute.client is not None
        assert all(PLUGIN_NAME in names for names in compute.client.run(
            lambda dask_worker: list(dask_worker.plugins)).values())
        # a mark any worker is over (1% of 1 GB), checked often: its callback runs there
        compute.client.register_plugin(ReleaseFreeMemory(above=0.01, every_s=0.05))
        wait_until(lambda: all(n > 0 for n in compute.client.run(releases).values()),
                   timeout=30, message="a release on every worker")
