"""``conveyor demo``: the pipeline's story, told on the real RabbitMQ and Redis.

It starts the services that are not running yet as local processes, writes a seeded
PaySim-style data set, publishes ``SourceDataAvailable`` and follows the run stage by
stage through the event log until a model is promoted (or rejected), then prints the
champion, its metrics and its lineage. A second run on fresh data trains a challenger
that is gated against the champion. Then the online path: a new account's transactions
scored then recorded, each answer counting the ones before. Then monitoring at work
(``app.demo_monitoring``): normal traffic with outcomes, a drift that retrains, a
slowed champion reverted. Last, an invalid event shows the dead-letter path, and the
per-model status view.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from uuid import uuid4

import pandas as pd
import redis

from app.config import PipelineConfig, load_pipeline_config
from app.console import broker_reachable, model_table, queue_table, redis_reachable
from app.demo_monitoring import (
    MONITORING_ENV,
    MonitoringDemo,
    scoring_client,
    show_monitoring,
)
from app.local import start_missing_services, wait_until
from common.bus.rabbitmq import RabbitMQBus
from common.datasets import paysim
from common.eventlog import EventLog
from common.events import Event, SourceDataAvailable
from common.settings import Settings
from common.stores import ModelRegistry, ModelStore
from common.stores.entity_state import RedisEntityState
from common.wiring import Stores
from monitoring.state import MonitoringState
from scoring.service import ScoringSettings

FINAL_EVENTS = {"ModelReady", "ModelRejected", "IngestionFailed"}


def say(text: str = "") -> None:
    """Print a line of the demo's story."""
    print(text, flush=True)


def run_demo(settings: Settings, *, rows: int, seed: int | None, timeout: float) -> int:
    """Run the demo; returns the process exit status."""
    say("== Conveyor demo ==")
    if not (broker_reachable(settings) and redis_reachable(settings)):
        say("RabbitMQ or Redis is not reachable: run `make setup` (scripts/setup.sh) first.")
        return 1
    work = Path("var/demo")
    work.mkdir(parents=True, exist_ok=True)
    config = load_pipeline_config(settings.pipeline_config)
    registry = ModelRegistry(settings.data_root, config.name)
    with ExitStack() as stack:
        bus = RabbitMQBus(settings, name="demo")
        stack.callback(bus.close)
        say("\n1. services")
        started = start_missing_services(settings, bus, stack, work, say,
                                         env={"monitoring": MONITORING_ENV})
        seed = seed if seed is not None else int(time.time()) % 100_000
        final, source = _pipeline_run(settings, bus, work, rows, seed, timeout)
        if final.event_type == "ModelReady" and len(registry.versions()) == 1:
            say("\n   a first champion: a second run on fresh data trains a challenger, gated "
                "against it (and a previous version to fall back to)")
            final, source = _pipeline_run(settings, bus, work, rows, seed + 1, timeout)
        _show_outcome(settings, registry, final)
        # A rejected challenger is a good ending too when a champion already serves.
        serving = bool(registry.chain())
        if serving:
            data = _live_scoring(settings, config, registry, source, timeout)
            _online_path(settings, config, registry, data, timeout)
            scoring = next((s for s in started if s.name == "scoring"), None)
            show_monitoring(MonitoringDemo(settings, bus, config, registry, data, scoring,
                                           _follow, min(timeout, 180.0)), say, first_step=7)
        _dead_letter_path(settings, bus, timeout)
        say("\n11. queues (0 ready everywhere: every event was acknowledged)")
        say(queue_table(bus))
        _dashboards_and_status(settings)
        say("\nstopping the services this demo started:")
    say("\nTry: conveyor status | conveyor events log | conveyor lineage <id> | make demo again")
    return 0 if final.event_type == "ModelReady" or serving else 1


def _pipeline_run(
    settings: Settings, bus: RabbitMQBus, work: Path, rows: int, seed: int, timeout: float
) -> tuple[Event, Path]:
    source = work / f"transactions-{seed}.csv"
    say(f"\n2. data: {rows:,} PaySim-style transactions (seed {seed}) -> {source}")
    paysim(rows, seed=seed).to_csv(source, index=False)
    event = SourceDataAvailable(dataset="paysim", uri=str(source.resolve()), producer="demo")
    log = EventLog(redis.Redis.from_url(settings.redis_url), settings.namespace)
    cursor = log.last_entry_id()
    bus.publish(event)
    say(f"\n3. published SourceDataAvailable {event.event_id} (confirmed by the broker);"
        " following the run:")
    return _follow(log, cursor, event, timeout), source


def _follow(log: EventLog, cursor: str, source: Event, timeout: float) -> Event:
    """Print the run's events as the event log gets them, until its final one."""
    started = time.monotonic()
    for entry, event in _run_events(log, cursor, source, started + timeout):
        gist = _gist(event) if event is not None else entry["payload"][:300]
        say(f"   +{time.monotonic() - started:6.1f}s  {entry['event_type']:<20} {gist}")
        if event is not None and event.event_type in FINAL_EVENTS:
            return event
    raise TimeoutError(f"the run did not finish within {timeout:.0f}s; see var/demo/*.log")


def _run_events(log: EventLog, cursor: str, source: Event, deadline: float
                ) -> Iterator[tuple[dict[str, str], Event | None]]:
    """The stream entries of the source's run, each with its event, or None where the log
    keeps no body (a ScoreServed, an observed outcome: the entry's summary is all)."""
    while time.monotonic() < deadline:
        entries = log.read_after(cursor)
        for _, fields in entries:
            if fields["correlation_id"] == str(source.correlation_id):
                yield fields, log.get(fields["event_id"])
        cursor = entries[-1][0] if entries else cursor


def _gist(event: Event) -> str:
    data = event.model_dump(mode="json")
    if "scores" in data:  # ScoreServed: a batch of answers
        data["scores"] = len(data["scores"])
    if "psi" in data:  # DriftDetected: the three most drifted inputs
        data["psi"] = dict(sorted(data["psi"].items(), key=lambda kv: -kv[1])[:3])
    keep = ("dataset", "batch_id", "rows", "feature_set_id", "model_ids", "failures",
            "model_id", "version", "previous_version", "reasons", "reason", "errors",
            "scores", "model_version", "level", "psi")
    return json.dumps({k: data[k] for k in keep if data.get(k) not in (None, [], {})})[:300]


def _show_outcome(settings: Settings, registry: ModelRegistry, final: Event) -> None:
    store = ModelStore.from_settings(settings)
    say("\n4. outcome")
    if final.event_type == "ModelRejected":
        say("   the challenger was rejected by the gate:")
        for reason in getattr(final, "reasons", []):
            say(f"   - {reason}")
    if final.event_type == "IngestionFailed":
        say(f"   ingestion failed: {getattr(final, 'reason', '')}")
    if not registry.chain():
        return
    champion = registry.champion()
    record = store.metadata(champion.model_id)
    metrics = record.metadata.get("metrics", {})
    say(f"   champion of '{registry.name}': {champion.version} = model {champion.model_id} "
        f"({record.metadata.get('algorithm')})")
    say("   metrics on the evaluation part: " + ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    evaluation = record.metadata.get("evaluation", {})
    if evaluation.get("champion_metrics"):
        metric = evaluation["metric"]
        ours, theirs = metrics.get(metric, float("nan")), evaluation["champion_metrics"][metric]
        say(f"   gated against the previous champion on the same rows: {metric} "
            f"{ours:.4f} vs {theirs:.4f}")
    say("   registry history: " + "; ".join(
        f"{h.action} {h.to_version}" for h in registry.history()[-4:]))
    say(f"   lineage: conveyor lineage {champion.model_id}")


def _dead_letter_path(settings: Settings, bus: RabbitMQBus, timeout: float) -> None:
    before = bus.queue_depths("ingestion")["dead"]
    bad = {"event_type": "SourceDataAvailable", "uri": "s3://bucket/missing-dataset.csv"}
    bus.publish_raw("SourceDataAvailable", json.dumps(bad).encode())
    say("\n10. published an invalid SourceDataAvailable (no 'dataset' field)")
    wait_until(lambda: bus.queue_depths("ingestion")["dead"] > before, timeout,
               message="the dead letter")
    letter = bus.dead_letters("ingestion", limit=before + 1)[-1]
    say(f"   dead-lettered at once to {settings.dead_letter_queue('ingestion')}: {letter.error}")
    say("   the services keep consuming; `conveyor dlq list ingestion` shows it")


def _live_scoring(
    settings: Settings, config: PipelineConfig, registry: ModelRegistry, source: Path,
    timeout: float,
) -> pd.DataFrame:
    """A few Score calls over gRPC (with the settings' client token and TLS CA), once the
    scoring service serves the champion; returns the transactions (the monitoring steps
    send more of them)."""
    champion = registry.champion().version
    key, label = config.features.entity_key or "", config.features.label
    data = pd.read_csv(source)
    rows = pd.concat([data.tail(2), data[data[label] == 1].tail(1)])  # and one fraud
    port = ScoringSettings().grpc_port
    say(f"\n5. live scoring over gRPC (127.0.0.1:{port})")
    with scoring_client(settings, config, port) as client:
        first = rows.iloc[0].to_dict()
        wait_until(lambda: client.serves(first, champion), timeout,
                   message=f"the scoring service serving {champion}")
        for row in rows.to_dict(orient="records"):
            answer = client.score(row, timeout=2)
            reply = answer.reply
            if reply is None:
                say(f"   {row[key]}: {answer.error}")
                continue
            say(f"   {row[key]}: score {reply.score:.4f} label {reply.label} by "
                f"{reply.model_version} (fallback {reply.fallback}) in {reply.latency_ms:.1f} ms;"
                f" truth {row[label]}")
    return data


def _online_path(settings: Settings, config: PipelineConfig, registry: ModelRegistry,
                 data: pd.DataFrame, timeout: float, transactions: int = 6) -> None:
    """A new account's transactions, two hours apart, each scored then recorded (Score
    with ``observe``): the online preparation service adds each to the account's state
    in Redis, so the next answer counts it, and its 24 h count and sum grow."""
    from preparation.streaming import StreamPlan, timestamp_us

    stores = Stores.from_settings(settings)
    fsid = stores.models.metadata(registry.champion().model_id).metadata["feature_set_id"]
    plan = StreamPlan(stores.feature_pipelines.load(fsid))
    state = RedisEntityState(stores.redis, settings.namespace)
    key, ts = config.features.entity_key or "", config.features.timestamp or ""
    account = f"C-DEMO-{uuid4().hex[:6]}"
    start = pd.to_datetime(data[ts], format="ISO8601").max() + pd.Timedelta(1, "h")
    rows = data.sample(transactions, random_state=1).assign(**{key: account}).to_dict("records")
    say(f"\n6. the online path: {transactions} transactions of a new account {account}, each "
        "scored, then recorded (Score with observe); the next answer counts it")
    with scoring_client(settings, config, ScoringSettings().grpc_port) as client:
        for i, row in enumerate(rows):
            row[ts] = (start + pd.Timedelta(2 * i, "h")).isoformat()
            request = client.request(row)
            request.observe = True
            reply = client.stub.Score(request, timeout=5, metadata=client.metadata)
            held = _wait_held(state, fsid, account, i + 1, timeout)
            at = timestamp_us(row[ts]) or 0
            seen = plan.aggregates_at(held, at)  # what this Score read: the window ends at it
            age = "none" if not reply.HasField("feature_age_ms") else \
                f"{reply.feature_age_ms / 3.6e6:.0f} h"
            say(f"   {row[ts][:16]} amount {row['amount']:>11,.2f}: score {reply.score:.4f} by "
                f"{reply.model_version}; before it: " + ", ".join(
                    f"{name.removeprefix(key + '_')} {value:,.2f}"
                    for name, value in seen.items()) + f"; last record {age} before")


def _wait_held(state: RedisEntityState, fsid: str, account: str, count: int,
               timeout: float) -> list[Any]:
    """The account's entries, once the state holds ``count`` of them."""
    def held() -> list[Any]:
        entries = state.read(fsid, [account])[0] or []
        return entries if len(entries) >= count else []

    return wait_until(held, timeout, message=f"transaction {count} in {account}'s state")


def _dashboards_and_status(settings: Settings) -> None:
    """Where the dashboards are, and each model as monitoring sees it (conveyor status)."""
    state = MonitoringState(redis.Redis.from_url(settings.redis_url), settings.namespace)
    say("\n12. each model as monitoring sees it (`conveyor status`):")
    say(model_table(state.live_all()))
    say("   dashboards: deploy/grafana/dashboards/ (Scoring, Pipeline, Models; provisioning in "
        "deploy/grafana/provisioning/); `make observe` runs Prometheus on :9090 against "
        "the running services (see README, Observability)")
