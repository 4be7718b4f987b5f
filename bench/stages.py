"""Per-stage cost of the pipeline in one process: wall, CPU and Redis CPU seconds.

A profiling aid for ``bench/pipeline.py`` on a busy machine, where wall times swing: it
calls each service's handler in turn, in this process (no broker, the real Redis and
stores), and counts for each stage the wall seconds, this process's CPU seconds (every
thread), its child processes' CPU seconds (the training workers) and the Redis server's
CPU seconds (``INFO cpu``). ``--plain`` does the same for the plain script's steps.
``--profile DIR`` also writes a cProfile file per stage. Example::

    .venv/bin/python bench/stages.py bench/.work/paysim-1000000-7-c14fe790.csv
    .venv/bin/python bench/stages.py CSV --plain
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from uuid import uuid4

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
T = TypeVar("T")
TICKS = os.sysconf("SC_CLK_TCK")


def _children_cpu(pid: int) -> float:
    """CPU seconds of the live descendants of ``pid`` (from /proc)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if _descends(int(entry.name), pid):
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def _descends(child: int, ancestor: int) -> bool:
    while child > 1:
        try:
            child = int((Path("/proc") / str(child) / "stat").read_text().rsplit(")", 1)[1]
                        .split()[1])
        except OSError:
            return False
        if child == ancestor:
            return True
    return False


class Meter:
    """Wall, process CPU, children CPU and Redis CPU seconds of named steps."""

    def __init__(self, client: redis.Redis, profile: Path | None) -> None:
        self.client, self.profile = client, profile
        self.rows: dict[str, dict[str, float]] = {}

    def redis_cpu(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def time(self, name: str, fn: Callable[[], T]) -> T:
        before = (time.perf_counter(), time.process_time(), _children_cpu(os.getpid()),
                  self.redis_cpu())
        if self.profile is not None:
            profiler = cProfile.Profile()
            result = profiler.runcall(fn)
            profiler.dump_stats(str(self.profile / f"{name}.prof"))
        else:
            result = fn()
        after = (time.perf_counter(), time.process_time(), _children_cpu(os.getpid()),
                 self.redis_cpu())
        wall, cpu, kids, rcpu = (round(b - a, 3) for a, b in zip(before, after, strict=True))
        self.rows[name] = {"wall_s": wall, "cpu_s": cpu, "children_cpu_s": kids,
                           "redis_cpu_s": rcpu}
        print(f"{name:14s} wall {wall:6.2f}  cpu {cpu:6.2f}  children {kids:6.2f}  "
              f"redis {rcpu:5.2f}", flush=True)
        return result


def services(csv: Path, meter: Meter, work: Path) -> None:
    from app.config import load_pipeline_config
    from common.events import SourceDataAvailable
    from common.settings import Settings
    from common.wiring import Stores
    from evaluation.service import EvaluationService
    from ingestion.service import IngestionService
    from preparation.service import PreparationService
    from training.service import TrainingService

    settings = Settings(namespace=f"stages-{uuid4().hex[:8]}", data_root=str(work))
    config = load_pipeline_config(settings.pipeline_config)
    stores = Stores.from_settings(settings)
    ingestion = IngestionService(config, stores.raw)
    preparation = PreparationService(config, stores.raw, stores.offline, stores.online,
                                     stores.feature_pipelines)
    training = TrainingService(config, stores.offline, stores.models).warm()
    evaluation = EvaluationService(config, stores.offline, stores.models,
                                   stores.feature_pipelines,
                                   stores.registry(settings, config.name), stores.raw,
                                   online=stores.online)
    try:
        while not training.ready():
            time.sleep(0.1)
        source = SourceDataAvailable(dataset="paysim", uri=str(csv), producer="stages")
        raw = meter.time("ingestion", lambda: ingestion.on_source_data_available(source))
        features = meter.time("preparation", lambda: preparation.on_raw_data_extracted(raw))
        meter.time("online", lambda: preparation.on_features_generated(features))
        trained = meter.time("training", lambda: training.on_features_generated(features))
        ready = meter.time("evaluation", lambda: evaluation.on_candidates_trained(trained))
        print(type(ready).__name__, getattr(ready, "metrics", None) or ready)
    finally:
        training.close()
        keys = list(stores.redis.scan_iter(match=f"{settings.namespace}:*", count=10_000))
        for i in range(0, len(keys), 10_000):
            stores.redis.unlink(*keys[i:i + 10_000])


def plain(csv: Path, meter: Meter) -> None:
    from app.config import load_pipeline_config
    from bench import plain_pipeline as p
    from preparation import build_pipeline

    config = load_pipeline_config(p.DEFAULT_CONFIG)
    spec, (dataset,) = config.features, config.features.inputs
    import pandas as pd

    frame = meter.time("read_csv", lambda: pd.read_csv(csv))
    frame = meter.time("type", lambda: p.typed(frame, config.datasets[dataset].columns))
    cut = p.train_cut(len(frame), config.split.ratio)
    fitted = meter.time("fit_features", lambda: build_pipeline(spec).fit(frame.iloc[:cut]))
    features = meter.time("transform", lambda: fitted.transform(frame))
    names, label = list(fitted.feature_names), spec.label
    X_train, y_train = features.iloc[:cut][names], features.iloc[:cut][label]
    X_test, y_test = features.iloc[cut:][names], features.iloc[cut:][label]
    trained = meter.time("train", lambda: p.train(p.estimators(config), X_train, y_train,
                                                  config.training.workers))
    meter.time("evaluate", lambda: p.evaluate(trained, X_test, y_test, config))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--plain", action="store_true", help="the plain script's steps")
    parser.add_argument("--profile", type=Path, help="write a cProfile file per stage here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    meter = Meter(redis.Redis.from_url(os.environ.get("CONVEYOR_REDIS_URL",
                                                      "redis://127.0.0.1:6379/0")), args.profile)
    load = os.getloadavg()
    if args.plain:
        plain(args.csv, meter)
    else:
        work = Path(tempfile.mkdtemp(prefix="stages-", dir=ROOT / "bench" / ".work"))
        try:
            services(args.csv, meter, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    total = {k: round(sum(r[k] for r in meter.rows.values()), 3)
             for k in ("wall_s", "cpu_s", "children_cpu_s", "redis_cpu_s")}
    print("total", total, "load before", [round(x, 2) for x in load],
          "after", [round(x, 2) for x in os.getloadavg()])
    if args.json:
        args.json.write_text(json.dumps({"stages": meter.rows, "total": total}, indent=2))


if __name__ == "__main__":
    main()
