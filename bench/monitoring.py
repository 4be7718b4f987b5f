"""Benchmark of the monitoring service: the rate of served scores it keeps up with, and drift.

Run with ``make bench-monitoring`` (``.venv/bin/python bench/monitoring.py``). In one run:

1. **drift**: the pure core, ``monitoring.drift.drift_report``, on a model's training
   reference (20 features and the predictions; 20,000 training rows, 10 bins and a
   2,000-value KS sample each, as training stores it) against 10,000 live scores: PSI and
   the KS test of 21 inputs. Also ``MonitoringCore.observe`` of 10,000 served scores in
   batches (serving-time figures, windows, and a drift measurement every 1,000 scores
   over the latest 5,000, the service's defaults).
2. **sustained rate**: that model is stored and promoted in a throwaway namespace and
   data root; the real monitoring service runs as a local process (``conveyor run
   monitoring``, as ``conveyor up`` starts it) on the real RabbitMQ and Redis. ScoreServed
   events are published at a steady rate, each carrying the batch the scoring reporter
   sends at that rate (``ReportSettings``: at most ``flush_size`` = 500 scores, else what
   ``flush_interval_s`` = 0.5 s gathers), 20 features per score. The rate is stepped up
   (doubling, then bisecting between the last kept and the first lost rate). At each
   rate, after a warm-up, the backlog (events published minus events the service
   handled, read from its /metrics: the queue's ready and unacknowledged messages
   together) is sampled over a window of ``--window`` seconds; the rate is kept up with
   when the backlog does not grow: over the window, its least-squares slope adds up to no
   more than 5 % of the events offered (at least 3 events, for those in flight at the
   edges), and the service handled all but that many. Between steps the backlog drains.

Results go to ``bench/results/monitoring.json``, compared with the scoring service's
measured throughput (``bench/results/scoring.json``) when that file exists
(``--compare-only`` redoes just that). The namespace (queues, exchange, Redis keys) and
the data root are deleted afterwards. See ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on the path, and this file, named
# monitoring.py, would hide the monitoring package it measures.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
# The repository root on the path: the bench namespace is cleaned up by the test harness
# (tests/support), which is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression

from app.config import load_pipeline_config
from app.local import LocalService, wait_until
from bench.save import save_results
from bench.timing import times_ms
from common.bus.publisher import Message
from common.bus.rabbitmq import RabbitMQBus, properties
from common.events import ScoreServed, ServedScore
from common.reference import (
    input_references,
    model_reference,
    reference_rows,
    references_from,
)
from common.settings import Settings
from common.stores import ModelRegistry
from common.wiring import Stores
from monitoring.core import CoreConfig, ModelInfo, MonitoringCore
from monitoring.drift import PREDICTION, DriftThresholds, drift_report
from scoring.reporting import ReportSettings
from tests.support.harness import delete_namespace

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "monitoring.json"
SCORING_RESULTS = ROOT / "bench" / "results" / "scoring.json"
FEATURES = [f"f{i:02d}" for i in range(20)]
EVENT_ID = "00000000-0000-4000-8000-000000000000"
"""Placeholder of each event's id in a body template (replaced by a fresh one)."""
TOKEN = "@@@@@@@@"
"""Placeholder in each score's request id (replaced by a counter: ids stay unique)."""
TEMPLATES = 16
log = logging.getLogger("bench.monitoring")


# -- a realistic model and its traffic -----------------------------------------------------


def feature_rows(rows: int, seed: int) -> pd.DataFrame:
    """Rows of 20 features shaped like a fraud model's: scaled, log-normal, binary, counts."""
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for i, name in enumerate(FEATURES):
        kind = i % 4
        if kind == 0:
            columns[name] = rng.normal(size=rows)
        elif kind == 1:
            columns[name] = rng.lognormal(sigma=1.5, size=rows)
        elif kind == 2:
            columns[name] = (rng.random(rows) < 0.3).astype(np.float64)
        else:
            columns[name] = rng.poisson(3, size=rows).astype(np.float64)
    return pd.DataFrame(columns)


def labels(frame: pd.DataFrame, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(scale=0.5, size=len(frame))
    return (frame["f00"] + 0.5 * frame["f02"] - 0.1 * frame["f03"] + noise > 1.0).astype(int)


def trained_model() -> tuple[LogisticRegression, dict[str, Any]]:
    """A model trained on 20,000 rows and the metadata training and evaluation give it."""
    X = feature_rows(20_000, seed=0)
    model = LogisticRegression(max_iter=1000).fit(X, labels(X, seed=0))
    rows = reference_rows(X)
    X_test = feature_rows(5_000, seed=1)
    accuracy = float((model.predict(X_test) == labels(X_test, seed=1)).mean())
    metadata = {"features": FEATURES, "reference": model_reference(model, rows,
                                                                   input_references(rows)),
                "metrics": {"accuracy": accuracy}, "datasets": ["paysim"]}
    return model, metadata


def served_scores(model: Any, rows: pd.DataFrame, version: str, prefix: str,
                  seed: int) -> list[ServedScore]:
    """The scores the scoring service would report for these rows."""
    proba = model.predict_proba(rows)[:, 1]
    latency = np.random.default_rng(seed).lognormal(np.log(4.0), 0.4, size=len(rows))
    now = datetime.now(UTC)
    records = rows.to_dict(orient="records")
    return [ServedScore(request_id=f"{prefix}{i:05d}", entity_id=f"C{seed}-{i}",
                        model_version=version, score=float(p), label=str(int(p >= 0.5)),
                        fallback=False, latency_ms=float(ms),
                        served_at=now + timedelta(microseconds=i), features=record)
            for i, (p, ms, record) in enumerate(zip(proba, latency, records, strict=True))]


# -- 1. drift and the core -----------------------------------------------------------------


def median_ms(fn: Callable[[], Any], rounds: int) -> tuple[float, list[float]]:
    times = [round(ms, 2) for ms in times_ms(lambda _: fn(), range(rounds), warm=0)]
    return round(statistics.median(times), 2), times


def bench_drift(model: Any, metadata: dict[str, Any], rounds: int) -> dict[str, Any]:
    refs = references_from(metadata)
    live_rows = feature_rows(10_000, seed=7)
    live = {name: live_rows[name].to_numpy() for name in FEATURES}
    live[PREDICTION] = model.predict_proba(live_rows)[:, 1]
    drift_ms, drift_rounds = median_ms(
        lambda: drift_report(refs, live, DriftThresholds(), min_values=500), rounds)
    report = drift_report(refs, live, DriftThresholds(), min_values=500)

    info = ModelInfo("v1", "bench-model", references=refs)
    scores = served_scores(model, live_rows, "v1", "core-", seed=7)
    batch = ReportSettings().flush_size

    def observe_all() -> None:
        core = MonitoringCore(CoreConfig(), lambda version: info)
        for start in range(0, len(scores), batch):
            core.observe(scores[start : start + batch])

    core_ms, core_rounds = median_ms(observe_all, rounds)
    return {
        "drift_ms_per_10k_scores": drift_ms, "drift_ms_rounds": drift_rounds,
        "drift_inputs": len(refs), "drift_level_on_unshifted_traffic": report.level,
        "core_observe_ms_per_10k_scores": core_ms, "core_observe_ms_rounds": core_rounds,
        "core_config": {"drift_every": CoreConfig().drift_every,
                        "drift_window": CoreConfig().drift_window, "batch": batch},
    }


# -- 2. the service at a sustained rate ----------------------------------------------------


def batch_for(scores_per_s: float) -> int:
    """Scores per ScoreServed event at this rate, as the reporter flushes them."""
    report = ReportSettings()
    return max(1, min(report.flush_size, round(scores_per_s * report.flush_interval_s)))


class Traffic:
    """ScoreServed bodies made from a few templates: fresh event and request ids each."""

    def __init__(self, model: Any, version: str, batch: int) -> None:
        self.batch = batch
        self.templates = []
        for t in range(TEMPLATES):
            rows = feature_rows(batch, seed=100 + t)
            scores = served_scores(model, rows, version, f"{TOKEN}-{t:02d}-", seed=100 + t)
            event = ScoreServed(event_id=uuid.UUID(EVENT_ID), producer="scoring", scores=scores)
            self.templates.append(event.to_json())
        self.sent = 0

    def next_body(self) -> tuple[str, bytes]:
        event_id = str(uuid.uuid4())
        template = self.templates[self.sent % TEMPLATES]
        self.sent += 1
        body = template.replace(EVENT_ID.encode(), event_id.encode(), 1)
        return event_id, body.replace(TOKEN.encode(), f"{self.sent:08x}".encode())


class Publisher:
    """Publishes events at a steady rate from a thread of its own, confirmed."""

    def __init__(self, bus: RabbitMQBus) -> None:
        self.bus = bus
        self.published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.behind_s = 0.0

    def start(self, traffic: Traffic, events_per_s: float) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(traffic, events_per_s),
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, traffic: Traffic, events_per_s: float) -> None:
        began, sent = time.perf_counter(), 0
        exchange = self.bus.settings.exchange
        while not self._stop.is_set():
            due = began + sent / events_per_s
            wait = due - time.perf_counter()
            if wait > 0:
                self._stop.wait(wait)
                continue
            self.behind_s = max(self.behind_s, -wait)
            event_id, body = traffic.next_body()
            props = properties()
            props.message_id, props.type = event_id, "ScoreServed"
            self.bus.publisher.publish([Message(exchange, "ScoreServed", body, props)])
            sent += 1
            self.published += 1


def handled(port: int) -> float:
    """ScoreServed events the service has handled (its /metrics), duplicates included."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name not in ("conveyor_events_handled", "conveyor_events_duplicate"):
            continue
        for sample in family.samples:
            if (sample.name.endswith("_total") and sample.labels.get("service") == "monitoring"
                    and sample.labels.get("event_type") == "ScoreServed"):
                total += sample.value
    return total


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (time, value) points."""
    t = np.array([p[0] for p in points])
    v = np.array([p[1] for p in points])
    return float(np.polyfit(t - t[0], v, 1)[0]) if len(points) > 2 else 0.0


def run_step(service: LocalService, publisher: Publisher, model: Any, version: str,
             scores_per_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """Offer one rate for warm-up + window; sample the backlog; drain it after."""
    batch = batch_for(scores_per_s)
    events_per_s = scores_per_s / batch
    traffic = Traffic(model, version, batch)
    publisher.start(traffic, events_per_s)
    time.sleep(args.warmup)  # the bench's own pacing: nothing to synchronise with
    samples: list[tuple[float, float]] = []
    window_began = time.perf_counter()
    handled_began = handled(service.port)
    while time.perf_counter() - window_began < args.window:
        samples.append((time.perf_counter(), backlog(service, publisher)))
        time.sleep(args.sample_every)
    window_s = time.perf_counter() - window_began
    handled_in_window = handled(service.port) - handled_began
    offered_in_window = events_per_s * window_s
    publisher.stop()
    growth = slope(samples)
    # A few events in flight at the window's edges are not a backlog: allow 5 % or 3 events.
    allowed = max(3.0, 0.05 * offered_in_window)
    kept = growth * window_s <= allowed and handled_in_window >= offered_in_window - allowed
    result = {
        "scores_per_s": round(scores_per_s, 1), "events_per_s": round(events_per_s, 2),
        "batch": batch, "kept_up": kept,
        "backlog_slope_events_per_s": round(growth, 3),
        "backlog_start": samples[0][1], "backlog_end": samples[-1][1],
        "backlog_max": max(v for _, v in samples),
        "handled_events_per_s": round(handled_in_window / window_s, 2),
        "publisher_behind_max_s": round(publisher.behind_s, 3),
    }
    log.warning("%8.0f scores/s (%6.2f events/s of %3d): backlog %+.2f events/s, end %d, "
                "handled %.2f/s -> %s", scores_per_s, events_per_s, batch, growth,
                samples[-1][1], result["handled_events_per_s"], "kept up" if kept else "behind")
    result["drained"] = drained(service, publisher, args.drain)
    return result


def backlog(service: LocalService, publisher: Publisher) -> float:
    """Events published and not yet handled: in the queue, ready or unacknowledged."""
    return publisher.published - handled(service.port)


def drained(service: LocalService, publisher: Publisher, timeout: float) -> bool:
    """Wait until the service has handled every event published (False: not in time)."""
    try:
        wait_until(lambda: backlog(service, publisher) <= 0, timeout, 0.2,
                   message="the backlog drained")
    except TimeoutError:
        log.warning("backlog not drained within %.0f s: stepping stops here", timeout)
        return False
    return True


def sustained(settings: Settings, args: argparse.Namespace, model: Any,
              metadata: dict[str, Any], work: Path) -> dict[str, Any]:
    stores = Stores.from_settings(settings)
    stores.models.save("bench-model", model, metadata)
    name = load_pipeline_config(settings.pipeline_config).name
    version = ModelRegistry(settings.data_root, name).promote("bench-model", reason="bench")
    env = {"CONVEYOR_DATA_ROOT": settings.data_root, "CONVEYOR_LOG_LEVEL": "WARNING"}
    with ExitStack() as stack:
        service = LocalService("monitoring", settings, work, env=env)
        stack.callback(service.stop)
        wait_until(service.ready, 60, 0.2, message="the monitoring service ready")
        bus = RabbitMQBus(settings, name="bench-monitoring")
        stack.callback(bus.close)
        publisher = Publisher(bus)
        steps: list[dict[str, Any]] = []
        kept, lost = 0.0, math.inf
        rate = args.start
        deadline = time.monotonic() + args.budget
        while time.monotonic() < deadline and len(steps) < args.max_steps:
            step = run_step(service, publisher, model, version, rate, args)
            steps.append(step)
            if step["kept_up"]:
                kept = max(kept, rate)
            else:
                lost = min(lost, rate)
            if not step["drained"]:
                break  # the next rate would start behind
            if math.isinf(lost):
                rate *= 2
            elif lost / max(kept, 1.0) <= 1 + args.precision or kept == 0.0 and rate <= 1:
                break
            else:
                rate = math.sqrt(max(kept, rate / 4) * lost)
        dead = bus.queue_depths("monitoring")["dead"]
    best = max((s for s in steps if s["kept_up"]), key=lambda s: s["scores_per_s"],
               default=None)
    return {
        "scores_per_s": best["scores_per_s"] if best else 0.0,
        "events_per_s": best["events_per_s"] if best else 0.0,
        "batch": best["batch"] if best else None,
        "first_rate_not_kept_scores_per_s": None if math.isinf(lost) else round(lost, 1),
        "steps": steps, "dead_letters": dead, "model_version": version,
    }


# -- the run ---------------------------------------------------------------------------------


def scoring_comparison(scores_per_s: float) -> dict[str, Any]:
    """The scoring service's measured throughput (its best ``rps`` of Conveyor's own
    answers in bench/results/scoring.json) and how monitoring compares."""
    if not SCORING_RESULTS.exists():
        return {"scoring_results": None,
                "note": f"{SCORING_RESULTS.relative_to(ROOT)} is absent: no comparison"}
    figures = dict(rps_figures(json.loads(SCORING_RESULTS.read_text())))
    ours = {path: rps for path, rps in figures.items() if path.startswith("conveyor")}
    if not ours:
        return {"scoring_results": str(SCORING_RESULTS.relative_to(ROOT)),
                "note": "no rps figure of Conveyor's scoring found: no comparison"}
    best = max(ours, key=ours.__getitem__)
    return {"scoring_results": str(SCORING_RESULTS.relative_to(ROOT)),
            "scoring_rps_figures": ours, "scoring_scores_per_s": ours[best],
            "scoring_figure": best,
            "ratio_to_scoring": round(scores_per_s / ours[best], 2),
            "target_met": scores_per_s >= ours[best]}


def rps_figures(data: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every ``rps`` number in a nested result, with its dotted path."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if key == "rps" and isinstance(value, int | float):
            yield path.rstrip("."), float(value)
        else:
            yield from rps_figures(value, f"{path}{key}.")


def machine() -> dict[str, Any]:
    import sklearn

    return {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "numpy": np.__version__, "pandas": pd.__version__, "scikit-learn": sklearn.__version__,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    began, load_at_start = time.monotonic(), [round(x, 2) for x in os.getloadavg()]
    model, metadata = trained_model()
    results: dict[str, Any] = {}
    log.warning("drift core: %d rounds", args.rounds)
    results.update(bench_drift(model, metadata, args.rounds))
    log.warning("drift of 21 inputs over 10,000 scores: %.1f ms; core observe: %.1f ms",
                results["drift_ms_per_10k_scores"], results["core_observe_ms_per_10k_scores"])
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-monitoring-"))
    settings = Settings(namespace=f"bench-mon-{uuid.uuid4().hex[:8]}",
                        data_root=str(work / "data"))
    try:
        service = sustained(settings, args, model, metadata, work)
    finally:
        delete_namespace(settings, ["monitoring"])
        shutil.rmtree(work, ignore_errors=True)
    results = {"events_per_s": service.pop("events_per_s"),
               "scores_per_s": service.pop("scores_per_s"), **results, "sustained": service}
    results["compared_with_scoring"] = scoring_comparison(results["scores_per_s"])
    results["method"] = (
        f"keeps up: over a {args.window:g} s window after {args.warmup:g} s of warm-up, the "
        "backlog (published - handled) grows by at most max(3, 5% of the events offered) "
        "(least-squares slope x window) and all but that many are handled; "
        "ScoreServed batches as the scoring reporter flushes them (<= 500 scores, 0.5 s), "
        "20 features per score, unshifted traffic; monitoring as a local process with its "
        "default settings (Parquet drift reports on)")
    results["machine"] = {**machine(), "load_average_at_start": load_at_start}
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["run_s"] = round(time.monotonic() - began, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=float, default=1_000.0,
                        help="first rate tried, in scores per second")
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds the backlog is sampled at each rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    parser.add_argument("--sample-every", type=float, default=0.5)
    parser.add_argument("--drain", type=float, default=45.0,
                        help="longest wait for the backlog to drain between rates")
    parser.add_argument("--precision", type=float, default=0.15,
                        help="stop when the first lost rate is within this ratio of the kept")
    parser.add_argument("--max-steps", type=int, default=9)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds of stepping at most (the whole run stays under ~3 min)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the drift timings")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--compare-only", action="store_true",
                        help="only redo the comparison of --out with bench/results/scoring.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.compare_only:
        results = json.loads(args.out.read_text())
        results["compared_with_scoring"] = scoring_comparison(results["scores_per_s"])
    else:
        results = run(args)
    save_results(args.out, results)
    print(json.dumps({k: results[k] for k in ("events_per_s", "scores_per_s",
                                              "drift_ms_per_10k_scores",
                                              "compared_with_scoring")}, indent=2))


if __name__ == "__main__":
    main()
