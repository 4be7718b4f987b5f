"""Scale benchmark: PaySim from SourceDataAvailable to ModelReady at 1M, 5M and 20M rows,
with the heavy data work on Dask (``dask-local``) and in process with pandas (``local``).

Run with ``make bench-scale`` (``.venv/bin/python bench/scale.py``; ``--rows 1000000``
and ``--modes dask-local`` choose, each repeatable; default every size in both modes,
largest last). Results are merged into ``bench/results/scale.json`` (``--fresh``: replaced),
a list ``runs`` of ``{rows, mode, seconds, seconds_per_million_rows, peak_rss_gb:
{process: GB}}`` with the stage times, each process's CPU seconds per stage
(``cpu_s_by_stage``) and the champion beside them, and the targets checked.

Each run is bench/pipeline.py's (``run_services``, imported): the five services as local
processes of a fresh namespace, ready before the publish, timed from SourceDataAvailable
published to ModelReady received. ``dask-local`` starts one LocalCluster for the run's
services, as ``conveyor up`` does (``app.local.HostCluster``: 2 workers of 1 thread limited
to 3 GB each, ``CONVEYOR_DASK_WORKERS``, ``CONVEYOR_DASK_MEMORY_LIMIT``) and gives them its
``tcp://`` address as ``CONVEYOR_COMPUTE`` (``--cluster-per-service``: each computing
service starts its own, as a service run alone does), and sets
``CONVEYOR_TRAIN_MAX_ROWS`` (``--train-max-rows``, default 1,000,000) so a larger training
set trains on a seeded class-stratified sample; ``local`` runs the defaults (no cap).

Peak RSS: every process of each service's tree (the service, its Dask workers and
nannies' processes, its training workers) and of the host cluster's (``dask-cluster``) is
read from /proc (``VmHWM``, the kernel's high-water mark of the process's resident memory)
every 0.2 s from the publish to the final event, the largest value kept per process.
Names: the service, then ``service/<role>#n`` for its descendants in the order first seen
(role from the command line: ``dask-worker`` for a multiprocessing spawn child of a Dask
service, ``forkserver`` for the training pool's, else the executable).

The sources are written once and cached under ``bench/.work/``: ``rows`` of seeded PaySim
in chunks of 1M rows (bench/pipeline.py's ``source_csv`` for one chunk), chunk ``i``
shifted ``i`` months later, so a larger source is a longer history in time order and
no generator ever holds more than a million rows.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pandas as pd
from pipeline import ROOT, WORK, Fleet, _cpu_of, _tree, machine, run_services, source_csv

RESULTS = ROOT / "bench" / "results" / "scale.json"
SIZES = (1_000_000, 5_000_000, 20_000_000)
MODES = ("dask-local", "local")
CHUNK = 1_000_000
TARGETS = {"peak_rss_gb_at_20m": 3.5, "seconds_per_million_20m_over_1m": 1.3,
           "dask_over_local_at_1m": 1.5}
log = logging.getLogger("bench.scale")


# -- data ----------------------------------------------------------------------------------


def scaled_csv(rows: int, seed: int) -> Path:
    """``rows`` PaySim rows in time order, generated a million at a time, cached."""
    if rows <= CHUNK:
        return source_csv(rows, seed)
    from common.datasets import HOURS, paysim

    version = hashlib.sha256((ROOT / "common" / "datasets.py").read_bytes()).hexdigest()[:8]
    path = WORK / f"paysim-chunked-{rows}-{seed}-{version}.csv"
    if path.exists():
        return path
    log.warning("generating %s (untimed)", path.name)
    WORK.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.part")
    for chunk, start in enumerate(range(0, rows, CHUNK)):
        frame = paysim(min(CHUNK, rows - start), seed=seed * 1_000 + chunk)
        frame["step"] += chunk * HOURS  # chunk i is month i: later than every earlier one
        frame["timestamp"] += pd.Timedelta(hours=chunk * HOURS)
        frame.to_csv(partial, mode="a" if chunk else "w", header=chunk == 0, index=False)
    partial.rename(path)
    return path


# -- memory --------------------------------------------------------------------------------


class PeakRss:
    """The largest VmHWM of every process of the fleet's trees, by name, while entered."""

    def __init__(self, fleet: Fleet, every_s: float = 0.2,
                 others: dict[str, subprocess.Popen] | None = None) -> None:
        self.fleet, self.every_s = fleet, every_s
        self.others = dict(others or {})
        """Processes watched beside the services' (the host's Dask cluster), by name."""
        self.peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.cpu: list[tuple[float, dict[int, float]]] = []
        """(wall time, CPU seconds so far of every live process), at every sample."""
        self.started = 0.0
        self.redis_bytes: list[int] = []
        """Redis's used_memory at every fifth sample (every client's data, not only the
        run's: its growth from the first is the run's online rows and entity state)."""
        self._stop = threading.Event()

    @contextlib.contextmanager
    def watching(self) -> Iterator[PeakRss]:
        thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self.started = time.time()  # just before the publish: the first stage's start
        self.sample()
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.sample()  # the last word before the services stop

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        cpu: dict[int, float] = {}
        for service, proc in {**self.fleet.procs, **self.others}.items():
            for pid in _tree(proc.pid):
                peak = _vm_hwm_kb(pid)
                if peak is None:
                    continue
                if pid not in self.names:
                    self.names[pid] = self._name(service, pid, proc.pid)
                self.peaks[pid] = max(self.peaks.get(pid, 0), peak)
                cpu[pid] = _cpu_of(pid)
        self.cpu.append((time.time(), cpu))
        if len(self.cpu) % 5 == 1:
            self.redis_bytes.append(_redis_used_memory())

    def redis_growth_gb(self) -> float | None:
        """Redis's largest used memory less its first, in GB (None: never read)."""
        found = [b for b in self.redis_bytes if b >= 0]
        return round((max(found) - found[0]) / 1e9, 3) if found else None

    def cpu_by_stage(self, per_stage_s: dict[str, float | None]) -> dict[str, dict[str, float]]:
        """CPU seconds each process used in each stage (stages back to back from the
        publish, as their events' times give them), the busiest first: where the time
        of a stage goes, the service's own work or its workers'."""
        table: dict[str, dict[str, float]] = {}
        begin = self.started
        for stage, seconds in per_stage_s.items():
            if seconds is None:
                break
            end = begin + seconds
            before, after = self._cpu_at(begin), self._cpu_at(end)
            used = {self.names[pid]: after[pid] - before.get(pid, 0.0) for pid in after}
            table[stage] = {k: round(v, 2) for k, v in
                            sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05}
            begin = end
        return table

    def _cpu_at(self, when: float) -> dict[int, float]:
        """The CPU seconds of the last sample at or before ``when`` (the first if none)."""
        found = self.cpu[0][1]
        for at, cpu in self.cpu:
            if at > when:
                break
            found = cpu
        return found

    def _name(self, service: str, pid: int, root: int) -> str:
        if pid == root:
            return service
        role = _role(pid)
        siblings = sum(1 for name in self.names.values() if name.startswith(f"{service}/{role}#"))
        return f"{service}/{role}#{siblings + 1}"

    def gigabytes(self) -> dict[str, float]:
        """Each process's peak resident memory in GB (10^9 bytes), largest first."""
        named = {self.names[pid]: kb * 1024 / 1e9 for pid, kb in self.peaks.items()}
        return {k: round(v, 3) for k, v in sorted(named.items(), key=lambda kv: -kv[1])}


def _redis_used_memory() -> int:
    """Redis's used_memory in bytes (-1 if it does not answer)."""
    import redis

    from common.settings import Settings

    try:
        client = redis.Redis.from_url(Settings().redis_url, socket_timeout=2)
        try:
            return int(client.info("memory")["used_memory"])  # type: ignore[index]
        finally:
            client.close()
    except (redis.RedisError, OSError, KeyError, ValueError):
        return -1


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _role(pid: int) -> str:
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv).decode(errors="replace")
    for marker, role in (("forkserver", "forkserver"), ("resource_tracker", "resource-tracker"),
                         ("spawn_main", "spawned")):
        if marker in text:
            return "dask-worker" if role == "spawned" and _dask_local(pid) else role
    return Path(argv[0].decode(errors="replace")).name or "process"


def _dask_local(pid: int) -> bool:
    """Whether a spawned process runs with CONVEYOR_COMPUTE=dask-local (a LocalCluster's
    worker: the service's nanny spawns it with the service's environment)."""
    try:
        return b"CONVEYOR_COMPUTE=dask-local" in (Path("/proc") / str(pid) / "environ").read_bytes()
    except OSError:
        return False


# -- runs ----------------------------------------------------------------------------------


MODE_ENV = {
    "local": {"CONVEYOR_COMPUTE": "local"},
    "dask-local": {"CONVEYOR_COMPUTE": "dask-local", "CONVEYOR_DASK_WORKERS": "2",
                   "CONVEYOR_DASK_THREADS_PER_WORKER": "1", "CONVEYOR_DASK_MEMORY_LIMIT": "3GB"},
}


@contextlib.contextmanager
def host_cluster(work: Path) -> Iterator[subprocess.Popen]:
    """One ``dask-local`` cluster for every service of the run, as ``conveyor up`` starts
    it (``app.local.HostCluster``, of this process's ``CONVEYOR_DASK_*``); its scheduler's
    address is this process's ``CONVEYOR_COMPUTE`` meanwhile, so the services get it."""
    from app.local import HostCluster

    cluster = HostCluster(work)
    try:
        with environment({"CONVEYOR_COMPUTE": cluster.address}):
            yield cluster.process
    finally:
        cluster.stop()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """The services inherit this process's environment (Fleet.env): set it for one run."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def one_run(args: argparse.Namespace, rows: int, mode: str) -> dict[str, Any]:
    """One pipeline run of ``rows`` rows in ``mode``, with its peak memory per process."""
    csv = scaled_csv(rows, args.seed)
    work = WORK / f"scale-{uuid4().hex[:8]}"
    work.mkdir(parents=True)
    env = dict(MODE_ENV[mode])
    if mode != "local" and args.train_max_rows:
        env["CONVEYOR_TRAIN_MAX_ROWS"] = str(args.train_max_rows)
    shared = mode == "dask-local" and not args.cluster_per_service
    watchers: list[PeakRss] = []
    others: dict[str, subprocess.Popen] = {}

    def watch(fleet: Fleet) -> contextlib.AbstractContextManager[Any]:
        watchers.append(PeakRss(fleet, others=others))
        return watchers[-1].watching()

    log.warning("%s rows on %s%s (work folder %s)", f"{rows:,}", mode,
                " (one cluster for the host)" if shared else "", work)
    run_args = argparse.Namespace(timeout=args.timeout, profile=False)
    with environment(env), host_cluster(work) if shared else contextlib.nullcontext() as cluster:
        if cluster is not None:
            others["dask-cluster"] = cluster
        result = run_services(run_args, csv, work, watch=watch)
    shutil.rmtree(work, ignore_errors=True)
    if method := os.environ.get("DASK_DATAFRAME__SHUFFLE__METHOD"):
        env["DASK_DATAFRAME__SHUFFLE__METHOD"] = method  # an A/B of Dask's shuffle
    env["cluster"] = ("one for the host (python -m common.compute), the services on its "
                      "tcp:// address" if shared else
                      "each computing service its own" if mode == "dask-local" else "none")
    seconds = result["pipeline_s"]
    return {
        "rows": rows, "mode": mode, "seconds": seconds,
        "seconds_per_million_rows": round(seconds / (rows / 1e6), 3),
        "peak_rss_gb": watchers[-1].gigabytes() if watchers else {},
        "outcome": result["outcome"], "per_stage_s": result["per_stage_s"],
        "cpu_s_by_stage": watchers[-1].cpu_by_stage(result["per_stage_s"]) if watchers else {},
        "redis_growth_gb": watchers[-1].redis_growth_gb() if watchers else None,
        "settings": env, "champion": result.get("champion"),
        "candidates_fit_s": {name: c["fit_s"] for name, c in
                             (result.get("candidates") or {}).items()},
        "service_cpu_s": result.get("service_cpu_s"), "source_bytes": csv.stat().st_size,
        **({"cleanup_error": result["cleanup_error"]} if "cleanup_error" in result else {}),
    }


def checks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, from the runs there are (None where one is missing)."""
    by = {(r["rows"], r["mode"]): r for r in runs if r["outcome"] == "ModelReady"}
    big, small, local = (by.get((20_000_000, "dask-local")), by.get((1_000_000, "dask-local")),
                         by.get((1_000_000, "local")))
    peak = max(big["peak_rss_gb"].values()) if big and big["peak_rss_gb"] else None
    growth = (round(big["seconds_per_million_rows"] / small["seconds_per_million_rows"], 3)
              if big and small else None)
    ratio = round(small["seconds"] / local["seconds"], 3) if small and local else None
    return {
        "dask_local_20m_completes": big is not None,  # peak None: completed, not measured
        "dask_local_20m_max_peak_rss_gb": peak,
        "dask_local_20m_peak_rss_met": None if peak is None else peak <= 3.5,
        "dask_local_seconds_per_million_20m_over_1m": growth,
        "linear_met": None if growth is None else growth <= 1.3,
        "dask_local_over_local_at_1m": ratio,
        "overhead_met": None if ratio is None else ratio <= 1.5,
        "targets": TARGETS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="repeatable; default: "
                        + ", ".join(f"{s:,}" for s in SIZES))
    parser.add_argument("--modes", action="append", choices=MODES,
                        help="repeatable; default: both")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--train-max-rows", type=int, default=1_000_000,
                        help="CONVEYOR_TRAIN_MAX_ROWS of the dask-local runs (0: none)")
    parser.add_argument("--cluster-per-service", action="store_true",
                        help="dask-local as a service run alone has it: each computing "
                        "service starts its own LocalCluster (default: one for the host)")
    parser.add_argument("--timeout", type=float, default=3_600.0,
                        help="seconds to wait for the final event of a run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="(the default, kept for old command lines) keep the output's "
                        "earlier runs of other sizes and modes")
    parser.add_argument("--fresh", action="store_true",
                        help="drop the output's earlier runs: only this command's are kept")
    parser.add_argument("--generate-only", action="store_true",
                        help="write the sources (cached) and run nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.generate_only:
        for rows in sorted(args.rows or SIZES):
            log.warning("%s", scaled_csv(rows, args.seed))
        return
    runs = earlier(args)
    for rows in sorted(args.rows or SIZES):
        for mode in args.modes or MODES:
            run = attempt(args, rows, mode)
            if run["seconds"] is not None or not _completed(runs, rows, mode):
                runs = [r for r in runs if (r["rows"], r["mode"]) != (rows, mode)] + [run]
            else:  # a failed attempt does not replace a completed run: it is kept beside it
                log.warning("keeping the earlier completed run of %s rows on %s", rows, mode)
                runs = [r | {"later_attempt": run["outcome"]}
                        if (r["rows"], r["mode"]) == (rows, mode) else r for r in runs]
            log.warning("%s", json.dumps({k: run[k] for k in ("rows", "mode", "seconds")}))
            write(args, runs)
    print(json.dumps(write(args, runs), indent=2))


def attempt(args: argparse.Namespace, rows: int, mode: str) -> dict[str, Any]:
    """One run's record; a failed run is a record too, saying why."""
    try:
        return one_run(args, rows, mode)
    except Exception as exc:  # noqa: BLE001 - a failed run is a result too
        log.exception("%s rows on %s failed", f"{rows:,}", mode)
        return {"rows": rows, "mode": mode, "seconds": None, "seconds_per_million_rows": None,
                "peak_rss_gb": {}, "outcome": f"failed: {type(exc).__name__}: {exc}"[:2000]}


def _completed(runs: list[dict[str, Any]], rows: int, mode: str) -> bool:
    return any((r["rows"], r["mode"]) == (rows, mode) and r["seconds"] is not None for r in runs)


def earlier(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs already in the output, unless --fresh: a run of 1M is not lost to a later
    command that runs 5M (a run of the same size and mode is replaced by the new one)."""
    if args.fresh or not args.output.exists():
        return []
    runs: list[dict[str, Any]] = json.loads(args.output.read_text())["runs"]
    return runs


def write(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The results so far (written after every run: a later failure keeps them)."""
    result = {
        "runs": sorted(runs, key=lambda r: (r["rows"], r["mode"])), "checks": checks(runs),
        "method": (
            "seconds: SourceDataAvailable published -> ModelReady received (bench/pipeline.py "
            "run_services; services started and ready beforehand, not timed); "
            "seconds_per_million_rows = seconds / (rows / 1e6); peak_rss_gb: per process of "
            "each service's tree, the largest /proc VmHWM seen every 0.2 s from the publish "
            "to the final event, GB = 1e9 bytes; cpu_s_by_stage: each process's CPU seconds "
            "from /proc between the stage's events (sampled every 0.2 s); dask-local: one "
            "LocalCluster for the host (python -m common.compute, 2 workers of 1 thread, "
            "3GB each), the services connect to its tcp:// address (settings.cluster says "
            "which; --cluster-per-service: each computing service starts its own)"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
