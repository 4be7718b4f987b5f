"""Benchmark: Conveyor's Redis online feature store side by side with Feast's, in one run.

Run it with ``make bench-features``. The workload is 100,000 entities × 20 float features
with event timestamps, written once as an offline Parquet feature set that both stores
read from:

- materialisation: offline Parquet → Redis online store, rows per second (Conveyor:
  ``OfflineFeatureStore.read`` + ``RedisOnlineStore.materialize``, median of 3 runs of
  about a second; Feast: ``FeatureStore.materialize`` from a ``FileSource`` with the
  file/dask offline store, one run of about 20 s);
- online reads of 1 and of 100 random entities per call, all 20 features decoded into
  Python numbers, p50 and p99 in milliseconds (Conveyor: ``RedisOnlineStore.read``;
  Feast: ``get_online_features(...).to_dict()``).

Feast 0.67.0 is installed by this script into ``bench/.feast-venv`` (once) and runs there as
a subprocess that prints its figures as JSON. Both use the Redis of ``Settings().redis_url``,
which must be on the loopback interface: Conveyor under a fresh key namespace, Feast in
Redis database ``CONVEYOR_BENCH_FEAST_DB`` (default 12) under a fresh project name; both
sets of keys are deleted at the end. Results go to ``bench/results/features.json``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse
from uuid import uuid4

import numpy as np
import pandas as pd
import redis

from common.settings import Settings
from common.stores.features import OfflineFeatureStore, RedisOnlineStore

FEAST_VERSION = "0.67.0"
HERE = Path(__file__).resolve().parent
FEAST_VENV = HERE / ".feast-venv"
WORK = HERE / ".work"
RESULTS = HERE / "results" / "features.json"
ENTITIES, FEATURES = 100_000, 20
READS_1, READS_100, WARMUP = 2_000, 500, 50
MATERIALIZE_RUNS = 3
SEED = 7
FEATURE_SET = "bench-features"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def main() -> None:
    settings = Settings()
    url = urlparse(settings.redis_url)
    if url.hostname not in LOOPBACK:
        sys.exit(f"bench-features only talks to a local Redis, not {url.hostname}")
    ensure_feast()
    run = f"{uuid4().hex[:8]}"
    with work_dir(run) as work:
        parquet = write_offline(work)
        conveyor = bench_conveyor(settings, work, run)
        feast = bench_feast(url, work, parquet, run)
    results = report(conveyor, feast, settings)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)  # not save_results: bench/streaming.py
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # imports this as bench.features
    print_summary(results)


def say(message: str) -> None:
    print(f"[bench-features] {message}", file=sys.stderr, flush=True)


# --- Feast's own environment ----------------------------------------------------------


def ensure_feast() -> None:
    """Install Feast into bench/.feast-venv unless that exact version is already there."""
    if installed_feast() == FEAST_VERSION:
        return
    say(f"installing feast[redis]=={FEAST_VERSION} into {FEAST_VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(FEAST_VENV)], check=True)
    pip = [str(FEAST_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, f"feast[redis]=={FEAST_VERSION}"], check=True)
    if installed_feast() != FEAST_VERSION:
        sys.exit(f"feast {FEAST_VERSION} did not install into {FEAST_VENV}")


def installed_feast() -> str | None:
    python = FEAST_VENV / "bin" / "python"
    if not python.exists():
        return None
    probe = "import importlib.metadata as m; print(m.version('feast'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


# --- the shared data ------------------------------------------------------------------


@contextmanager
def work_dir(run: str) -> Iterator[Path]:
    work = WORK / f"features-{run}"
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def feature_names() -> list[str]:
    return [f"f{i}" for i in range(FEATURES)]


def make_frame() -> pd.DataFrame:
    rng = np.random.default_rng(SEED)
    frame = pd.DataFrame(rng.normal(size=(ENTITIES, FEATURES)) * 100, columns=feature_names())
    frame.insert(0, "entity_id", np.arange(ENTITIES, dtype=np.int64))
    offsets = pd.to_timedelta(rng.integers(0, 30 * 86_400, ENTITIES), unit="s")
    frame["event_timestamp"] = pd.Timestamp("2024-01-01", tz="UTC") + offsets
    return frame


def write_offline(work: Path) -> Path:
    """The feature set, written once by Conveyor's offline store; Feast reads the same file."""
    say(f"writing {ENTITIES:,} entities × {FEATURES} features as an offline feature set")
    OfflineFeatureStore(str(work / "data")).write(FEATURE_SET, make_frame(), {"bench": True})
    return work / "data" / "features" / FEATURE_SET / "features.parquet"


def sample_ids(rng: np.random.Generator, size: int) -> list[int]:
    return rng.integers(0, ENTITIES, size).tolist()


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


# --- Conveyor -------------------------------------------------------------------------


def bench_conveyor(settings: Settings, work: Path, run: str) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.redis_url)
    namespace = f"bench-{run}"
    try:
        online = RedisOnlineStore(client, namespace)
        figures = conveyor_materialize(online, work)
        figures |= conveyor_reads(online)
        return figures
    finally:
        delete_keys(client, f"{namespace}:*".encode())


def conveyor_materialize(online: RedisOnlineStore, work: Path) -> dict[str, Any]:
    """The median of a few runs: one run lasts about a second, so a noisy neighbour on the
    machine can halve it, where Feast's single run of about 20 s averages such noise out.
    Later runs rewrite every row with its own event time, which is the same work."""
    say(f"conveyor: materialising ({MATERIALIZE_RUNS} runs)")
    runs = [materialize_once(online, work) for _ in range(MATERIALIZE_RUNS)]
    elapsed = statistics.median(runs)
    return {
        "materialize_rows_per_s": ENTITIES / elapsed,
        "materialize_s": elapsed,
        "materialize_runs_s": [round(run, 4) for run in runs],
    }


def materialize_once(online: RedisOnlineStore, work: Path) -> float:
    offline = OfflineFeatureStore(str(work / "data"))
    started = time.perf_counter()
    frame = offline.read(FEATURE_SET)
    written = online.materialize(FEATURE_SET, frame, "entity_id", "event_timestamp")
    elapsed = time.perf_counter() - started
    assert written == ENTITIES, f"conveyor wrote {written} rows, expected {ENTITIES}"
    return elapsed


def conveyor_reads(online: RedisOnlineStore) -> dict[str, float]:
    say("conveyor: reading")
    rng = np.random.default_rng(SEED + 1)

    def read(size: int) -> Callable[[], Any]:
        return lambda: check_rows(online.read(FEATURE_SET, sample_ids(rng, size)), size)

    timed(read(1), WARMUP)
    return latency_figures(timed(read(1), READS_1), timed(read(100), READS_100))


def check_rows(rows: list[dict[str, Any] | None], size: int) -> None:
    assert len(rows) == size and all(r is not None and len(r) == FEATURES for r in rows)


def timed(call: Callable[[], Any], iterations: int) -> list[float]:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def latency_figures(read1: list[float], read100: list[float]) -> dict[str, float]:
    (p50_1, p99_1), (p50_100, p99_100) = percentiles(read1), percentiles(read100)
    return {
        "read1_p50_ms": p50_1,
        "read1_p99_ms": p99_1,
        "read100_p50_ms": p50_100,
        "read100_p99_ms": p99_100,
    }


def delete_keys(client: redis.Redis, pattern: bytes) -> None:
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


# --- Feast ----------------------------------------------------------------------------


def bench_feast(url: Any, work: Path, parquet: Path, run: str) -> dict[str, float]:
    db = int(os.environ.get("CONVEYOR_BENCH_FEAST_DB", "12"))
    project = f"bench_{run}"
    config = feast_config(url, db, work, parquet, project)
    client = redis.Redis(host=url.hostname, port=url.port or 6379, db=db)
    try:
        return run_feast_side(work, config)
    finally:
        delete_keys(client, b"*" + project.encode())  # Feast keys end with the project


def feast_config(url: Any, db: int, work: Path, parquet: Path, project: str) -> dict[str, Any]:
    return {
        "project": project,
        "repo": str(work / "feast"),
        "redis": f"{url.hostname}:{url.port or 6379},db={db}",
        "parquet": str(parquet),
        "features": feature_names(),
        "entities": ENTITIES,
        "reads1": READS_1,
        "reads100": READS_100,
        "warmup": WARMUP,
        "seed": SEED + 1,
    }


def run_feast_side(work: Path, config: dict[str, Any]) -> dict[str, float]:
    say("feast: materialising and reading (in bench/.feast-venv)")
    script = work / "feast_side.py"
    script.write_text(FEAST_SIDE)
    (work / "feast").mkdir()
    python = str(FEAST_VENV / "bin" / "python")
    done = subprocess.run(
        [python, str(script), json.dumps(config)], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        sys.exit(f"the feast side failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


FEAST_SIDE = r'''
"""Feast side of bench/features.py: runs in bench/.feast-venv, prints one JSON line."""
import contextlib, json, random, statistics, sys, time, warnings
from datetime import datetime, timedelta, timezone


def store_for(cfg):
    from feast import FeatureStore, RepoConfig
    from feast.infra.offline_stores.dask import DaskOfflineStoreConfig
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig

    config = RepoConfig(
        project=cfg["project"], provider="local", registry=cfg["repo"] + "/registry.db",
        offline_store=DaskOfflineStoreConfig(type="file"),
        online_store=RedisOnlineStoreConfig(connection_string=cfg["redis"]),
        entity_key_serialization_version=3,
    )
    return FeatureStore(config=config, repo_path=cfg["repo"])


def apply(store, cfg):
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64

    entity = Entity(name="entity", join_keys=["entity_id"], value_type=ValueType.INT64)
    source = FileSource(path=cfg["parquet"], timestamp_field="event_timestamp")
    schema = [Field(name=name, dtype=Float64) for name in cfg["features"]]
    view = FeatureView(name="bench", entities=[entity], ttl=timedelta(days=3650),
                       schema=schema, source=source, online=True)
    store.apply([entity, view])


def materialize(store, cfg):
    end = datetime.now(timezone.utc) + timedelta(days=1)
    started = time.perf_counter()
    store.materialize(end - timedelta(days=3650), end)
    elapsed = time.perf_counter() - started
    return {"materialize_rows_per_s": cfg["entities"] / elapsed, "materialize_s": elapsed}


def reads(store, cfg):
    refs = ["bench:" + name for name in cfg["features"]]
    rng = random.Random(cfg["seed"])

    def read(size):
        rows = [{"entity_id": rng.randrange(cfg["entities"])} for _ in range(size)]
        started = time.perf_counter()
        values = store.get_online_features(features=refs, entity_rows=rows).to_dict()
        elapsed = (time.perf_counter() - started) * 1000
        assert all(v is not None for v in values[cfg["features"][0]]), "a row is missing"
        return elapsed

    for _ in range(cfg["warmup"]):
        read(1)
    return figures([read(1) for _ in range(cfg["reads1"])],
                   [read(100) for _ in range(cfg["reads100"])])


def figures(read1, read100):
    def p99(xs):
        return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]

    return {"read1_p50_ms": statistics.median(read1), "read1_p99_ms": p99(read1),
            "read100_p50_ms": statistics.median(read100), "read100_p99_ms": p99(read100)}


def main(cfg):
    warnings.filterwarnings("ignore")
    store = store_for(cfg)
    apply(store, cfg)
    result = materialize(store, cfg)
    result.update(reads(store, cfg))
    return result


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # Feast prints progress on stdout
        outcome = main(json.loads(sys.argv[1]))
    print(json.dumps(outcome))
'''


# --- the report -----------------------------------------------------------------------


def report(conveyor: dict[str, Any], feast: dict[str, Any], settings: Settings) -> dict:
    ratios = {
        "materialize_rows_per_s": conveyor["materialize_rows_per_s"]
        / feast["materialize_rows_per_s"],
        **{key: feast[key] / conveyor[key] for key in latency_keys()},
    }
    return {
        "conveyor": rounded(conveyor),
        "feast": rounded(feast),
        "ratios": rounded(ratios),
        "targets": targets(ratios),
        "workload": workload(),
        "machine": machine(settings),
        "command": "make bench-features",
    }


def latency_keys() -> list[str]:
    return ["read1_p50_ms", "read1_p99_ms", "read100_p50_ms", "read100_p99_ms"]


def rounded(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def targets(ratios: dict[str, float]) -> dict[str, bool]:
    return {
        "materialize_at_least_10x_feast": ratios["materialize_rows_per_s"] >= 10,
        "read1_p50_at_least_3x_faster": ratios["read1_p50_ms"] >= 3,
        "read100_p50_at_least_3x_faster": ratios["read100_p50_ms"] >= 3,
    }


def workload() -> dict[str, Any]:
    return {
        "entities": ENTITIES,
        "features": FEATURES,
        "feature_type": "float64",
        "reads_of_1": READS_1,
        "reads_of_100": READS_100,
        "conveyor_materialize_runs": MATERIALIZE_RUNS,
        "feast_materialize_runs": 1,
        "ratios_meaning": "materialize: conveyor/feast rows/s; reads: feast ms / conveyor ms",
    }


def machine(settings: Settings) -> dict[str, Any]:
    return {**host(settings, ("redis", "hiredis", "orjson", "pandas")), "feast": FEAST_VERSION}


def host(settings: Settings, packages: Sequence[str]) -> dict[str, Any]:
    """The machine a bench ran on: platform, CPU, memory, Python, the Redis server's
    version and the versions of ``packages``."""
    info = cast(dict[str, Any], redis.Redis.from_url(settings.redis_url).info("server"))
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "redis_server": info.get("redis_version"),
        "packages": {name: version(name) for name in packages},
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return round(pages * size / 2**30, 1)


def print_summary(results: dict[str, Any]) -> None:
    rows = ["materialize_rows_per_s", *latency_keys()]
    print(f"{'':24}{'conveyor':>14}{'feast':>14}{'ratio':>9}")
    for key in rows:
        print(
            f"{key:24}{results['conveyor'][key]:>14,.3f}{results['feast'][key]:>14,.3f}"
            f"{results['ratios'][key]:>8.1f}x"
        )
    print(f"targets: {results['targets']}  ->  {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
