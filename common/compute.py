"""Where heavy data work runs: pandas in this process (the default) or a Dask cluster.

``CONVEYOR_COMPUTE`` chooses: ``local`` runs everything with pandas in process and never
imports Dask; ``dask-local`` starts a ``distributed.LocalCluster`` in this process
(``CONVEYOR_DASK_WORKERS`` worker processes of ``CONVEYOR_DASK_THREADS_PER_WORKER``
threads, each limited to ``CONVEYOR_DASK_MEMORY_LIMIT``); a scheduler address
(``tcp://scheduler:8786``) connects to an existing cluster. The services stay RabbitMQ
consumers either way: only their heavy data work moves.

A process holds at most one cluster (and one client) per compute target: every
``open_compute`` of the same target shares it, and it is shut down when the last
``Compute`` of it is closed. Example::

    with open_compute() as compute:           # CONVEYOR_COMPUTE from the environment
        if compute.distributed:
            frame = dd.read_parquet(path).map_partitions(work)
            result = compute.client.compute(frame).result()
        else:
            result = work(pd.read_parquet(path))
"""

from __future__ import annotations

import atexit
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import InvalidInput

if TYPE_CHECKING:
    from distributed import Client

Mode = Literal["local", "dask-local", "dask"]
SCHEDULER_SCHEMES = ("tcp", "tls", "inproc", "ws", "wss")
"""Schemes of a Dask scheduler address (distributed's comm backends)."""
_ADDRESS = re.compile(rf"^({'|'.join(SCHEDULER_SCHEMES)})://[^\s/:]+(:\d{{1,5}})?/?$")
_MEMORY = re.compile(r"^(auto|0|\d+(\.\d+)?\s*(B|[kKMGTP]i?B)?)$")
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20}
"""glibc settings of a ``dask-local`` worker, beside distributed's ``MALLOC_TRIM_THRESHOLD_``
(64 KiB: freed memory goes back to the system soon). Setting that threshold switches off
glibc's sliding mmap threshold, which stays at 128 KiB: every array of a partition (100,000
rows of float64 is 800 KB) was then mapped and unmapped afresh, page faults each time, and
a partition's transform took 0.8 s on a worker against 0.33 s in this process (1M rows,
bench-scale). Arrays under 32 MiB (glibc's own ceiling for that sliding threshold) now
come from the heap, whose top is still trimmed past 64 KiB: ~0.45 s."""

SHUFFLE_METHOD = "p2p"
"""How a Dask frame is shuffled here (each entity's rows moved into one partition, rows
put back in batch order). Dask picks its method by the process's *default* client, and a
service's client is not one (``set_as_default=False``: a process may hold several), so
it picked ``disk``: partd files on one machine's disk, behind a barrier of every task;
right only while every worker shares that disk (a LocalCluster), wrong on a cluster of
several machines. ``p2p`` (workers exchange Arrow batches and spill to their own disk)
holds a worker's memory to its share at any size."""


class ComputeSettings(BaseSettings):
    """Where heavy data work runs (prefix ``CONVEYOR_``)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    compute: str = "local"
    """``local`` (pandas in process), ``dask-local`` (a LocalCluster this process starts)
    or a Dask scheduler address such as ``tcp://scheduler:8786`` (an existing cluster)."""
    dask_workers: int = Field(default=2, ge=1)
    """Worker processes of a ``dask-local`` cluster."""
    dask_threads_per_worker: int = Field(default=1, ge=1)
    """Threads of each ``dask-local`` worker."""
    dask_memory_limit: str = "3GB"
    """Memory limit of each ``dask-local`` worker (``3GB``, ``512MiB``, ``auto``; ``0``:
    none); a worker past it spills to disk, then is restarted."""

    @field_validator("compute")
    @classmethod
    def _known_compute(cls, value: str) -> str:
        value = value.strip()
        if value in ("local", "dask-local") or _ADDRESS.match(value):
            return value
        raise ValueError(
            f"{value!r} is not 'local', 'dask-local' or a Dask scheduler "
            f"address such as 'tcp://scheduler:8786' (schemes: {', '.join(SCHEDULER_SCHEMES)})")

    @field_validator("dask_memory_limit")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        value = value.strip()
        if _MEMORY.match(value):
            return value
        raise ValueError(
            f"{value!r} is not a size such as '3GB' or '512MiB', "
            "'auto' or '0' (no limit)")

    @property
    def mode(self) -> Mode:
        """``local``, ``dask-local`` or ``dask`` (an existing cluster's scheduler)."""
        if self.compute in ("local", "dask-local"):
            return self.compute  # type: ignore[return-value]
        return "dask"


@dataclass
class _Shared:
    """One process's cluster (``dask-local`` only) and client for one compute target."""

    client: Client
    cluster: Any
    users: int = 0

    def shut_down(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class Compute:
    """The compute target of a service: pandas in process, or a Dask client.

    ``client`` is None on the ``local`` path. Closing releases this handle; the shared
    cluster and client go when the last handle of them is closed.
    """

    def __init__(self, mode: Mode, client: Client | None = None, *,
                 release: Any = None) -> None:
        self.mode: Mode = mode
        self.client: Client | None = client
        self._release = release
        self._closed = False

    @property
    def distributed(self) -> bool:
        """Whether work goes to a Dask cluster (``client`` is then set)."""
        return self.client is not None

    def close(self) -> None:
        """Release the cluster (shut down with its last user); closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        if self._release is not None:
            self._release()

    def __enter__(self) -> Compute:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" {self.client.scheduler.address}" if self.client is not None else ""
        return f"<Compute {self.mode}{where}>"


class _Clusters:
    """The clusters and clients of this process, one per compute target, counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shared: dict[tuple[Any, ...], _Shared] = {}

    def acquire(self, settings: ComputeSettings) -> Compute:
        key = _key(settings)
        with self._lock:
            shared = self._shared.get(key)
            if shared is None or shared.client.status in ("closed", "closing"):
                shared = self._shared[key] = _start(settings)
            shared.users += 1
        return Compute(settings.mode, shared.client, release=lambda: self._release(key))

    def shut_down_all(self) -> None:
        """At exit: every cluster still held (a service that never closed its compute)."""
        with self._lock:
            held, self._shared = list(self._shared.values()), {}
        for shared in held:
            shared.shut_down()

    def _release(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            shared = self._shared[key]
            shared.users -= 1
            if shared.users > 0:
                return
            del self._shared[key]
        shared.shut_down()


# Process-wide on purpose: a cluster is worker processes, not a value to build per call;
# every service (and every handler thread) of one process shares it.
_CLUSTERS = _Clusters()
atexit.register(_CLUSTERS.shut_down_all)  # workers left running would hold the exit up


def open_compute(settings: ComputeSettings | None = None) -> Compute:
    """The compute target ``settings`` name (from the environment when None).

    ``local`` imports nothing; a Dask target starts (``dask-local``) or connects to its
    cluster once per process and shares it.
    """
    settings = settings if settings is not None else compute_settings()
    if settings.mode == "local":
        return Compute("local")
    return _CLUSTERS.acquire(settings)


def compute_settings(**values: Any) -> ComputeSettings:
    """The compute settings from the environment (``values`` override it);
    ``InvalidInput`` names each bad variable (``CONVEYOR_DASK_WORKERS: ...``)."""
    try:
        return ComputeSettings(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"CONVEYOR_{'_'.join(map(str, e['loc'])).upper()}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors())
        raise InvalidInput(f"invalid compute settings: {problems}") from None


def _key(settings: ComputeSettings) -> tuple[Any, ...]:
    if settings.mode == "dask":
        return (settings.compute,)
    return (settings.compute, settings.dask_workers, settings.dask_threads_per_worker,
            settings.dask_memory_limit)


def _start(settings: ComputeSettings) -> _Shared:
    from distributed import Client  # only a Dask target needs Dask

    _choose_shuffle()
    if settings.mode == "dask":
        return _Shared(_with_plugins(Client(settings.compute, set_as_default=False)), None)
    cluster = local_cluster(settings)
    return _Shared(_with_plugins(Client(cluster, set_as_default=False)), cluster)


def _with_plugins(client: Client) -> Client:
    """The client, its cluster's workers releasing free memory before Dask would pause
    them (``common.dask_memory``; registered by name: a second client replaces it)."""
    from common.dask_memory import ReleaseFreeMemory

    client.register_plugin(ReleaseFreeMemory())
    return client


def _choose_shuffle() -> None:
    """Dask's shuffle method for this process's Dask frames, unless configured already
    (``DASK_DATAFRAME__SHUFFLE__METHOD``, a Dask config file)."""
    import dask

    if dask.config.get("dataframe.shuffle.method", None) is None:
        dask.config.set({"dataframe.shuffle.method": SHUFFLE_METHOD})


def local_cluster(settings: ComputeSettings, **options: Any) -> Any:
    """A ``distributed.LocalCluster`` of the settings' workers (``options``: more of
    LocalCluster's arguments, such as ``host`` and ``scheduler_port``)."""
    import dask
    from distributed import LocalCluster

    spawn_environ = {f"distributed.nanny.pre-spawn-environ.{k}": v
                     for k, v in WORKER_MALLOC.items()}
    with dask.config.set(spawn_environ):  # read by each nanny as it is made, kept for restarts
        return LocalCluster(
            n_workers=settings.dask_workers,
            threads_per_worker=settings.dask_threads_per_worker,
            memory_limit=settings.dask_memory_limit,
            processes=True,
            dashboard_address=":0",  # a free port: never one a service or another holds
            **options,
        )


# -- one cluster for the services of a host ------------------------------------------------


def serve_cluster(settings: ComputeSettings, address_file: Path, stop: threading.Event,
                  host: str = "127.0.0.1", port: int = 0) -> None:
    """Run one ``dask-local`` cluster of the settings for every service of this host until
    ``stop`` is set; its scheduler's address (``tcp://127.0.0.1:PORT``) is written to
    ``address_file`` once it takes work, and removed when it stops.

    What a launcher runs (``python -m common.compute``) and hands to its services as
    ``CONVEYOR_COMPUTE``: with a cluster per service, three services of one 2-core host
    ran six workers (and three schedulers) competing for two cores.
    """
    with local_cluster(settings, host=host, scheduler_port=port) as cluster:
        partial = address_file.with_name(address_file.name + ".part")
        partial.write_text(cluster.scheduler_address + "\n")
        partial.replace(address_file)  # whole or absent: a reader never sees half of it
        try:
            stop.wait()
        finally:
            address_file.unlink(missing_ok=True)


def read_address(address_file: Path) -> str | None:
    """The scheduler address ``serve_cluster`` wrote (None before it has)."""
    try:
        return address_file.read_text().strip() or None
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    """``python -m common.compute --address-file PATH``: one host cluster until SIGTERM or
    SIGINT, of the ``CONVEYOR_DASK_*`` settings."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--address-file", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="the scheduler's (0: a free one)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    serve_cluster(compute_settings(compute="dask-local"), args.address_file, stop,
                  args.host, args.port)


if __name__ == "__main__":
    main()
