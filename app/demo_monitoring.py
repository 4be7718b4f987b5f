"""The demo's monitoring part: normal traffic, a drift that retrains, a slowed champion.

``conveyor demo`` calls ``show_monitoring`` once a champion serves. Through the real gRPC
stub it sends Score calls (the scoring service reports every answer to monitoring as
ScoreServed) and publishes the true outcome of some (``monitoring.outcomes``); then the
same transactions with one feature shifted, until monitoring emits DriftDetected and
RetrainRequested, and it follows the retraining that causes through the event log; last,
it restarts the scoring service with a fault-injection delay on the champion's predict
(``CONVEYOR_SCORING_INJECT_DELAY_MS``) and sends traffic until monitoring finds the
champion over its latency budget (ModelDegraded), the scoring service demotes it and the
registry reverts to the previous version. Example::

    show_monitoring(MonitoringDemo(settings, bus, config, registry, data, scoring, follow),
                    say, first_step=6)

``MONITORING_ENV`` holds the settings the demo gives the monitoring service it starts:
cooldowns of a minute instead of an hour, so the demo can be run again at once.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pandas as pd
import redis

from app.config import PipelineConfig
from app.console import bearer_metadata, scoring_channel
from app.local import LocalService, wait_until
from common.bus.rabbitmq import RabbitMQBus
from common.errors import ConveyorError, ModelNotFound
from common.eventlog import EventLog
from common.events import Event
from common.settings import Settings
from common.stores import ModelRegistry
from monitoring.outcomes import report_outcome
from monitoring.state import MonitoringState

Say = Callable[[str], None]
Follow = Callable[[EventLog, str, Event, float], Event]
"""Prints a run's events as they arrive, from a log position, until its final event."""
NORMAL_CALLS = 400
"""Score calls of normal traffic (the champion's own answers, for its latency figures)."""
OUTCOMES = 200
"""Of those, how many get their true outcome published."""
SHIFTED_FEATURE, SHIFT_FACTOR = "amount", 20.0
DRIFT_ROUND, DRIFT_MAX = 250, 4_000
"""Shifted Score calls per round, and at most, until monitoring asks to retrain."""
SLOW_ROUND, SLOW_MAX = 20, 400
"""Score calls per round on the slowed champion, and at most, until it is demoted."""
INJECTED_DELAY_MS = 150
SLOW_DEADLINE_S = 0.5
"""The slowed scoring service's default deadline: the champion gets half of it (250 ms),
so its slow answers (~150 ms, over the 100 ms budget) still arrive and can be timed."""
MONITORING_ENV = {
    "CONVEYOR_MONITORING_RETRAIN_COOLDOWN_S": "60",
    "CONVEYOR_MONITORING_DRIFT_COOLDOWN_S": "60",
    "CONVEYOR_MONITORING_DEGRADED_COOLDOWN_S": "60",
    # The demo's slowed champion is judged at once; the default (60 s) waits out a
    # host's stall, and the demo's fallbacks answer its few hundred calls in seconds.
    "CONVEYOR_MONITORING_LATENCY_SUSTAIN_S": "0",
}
WATCHED = {"DriftDetected", "RetrainRequested", "ModelDegraded", "ModelReady", "ModelRejected"}


def slow_scoring_env(version: str) -> dict[str, str]:
    """The scoring service's settings that make ``version``'s predict slow (fault injection)."""
    return {"CONVEYOR_SCORING_INJECT_DELAY_MS": str(INJECTED_DELAY_MS),
            "CONVEYOR_SCORING_INJECT_DELAY_VERSION": version,
            "CONVEYOR_SCORING_DEADLINE_S": str(SLOW_DEADLINE_S)}


# -- Score calls -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One Score call: the row's entity and truth, and the reply (None: an error)."""

    entity: str
    truth: Any
    reply: Any | None
    error: str = ""


class NotAuthenticated(ConveyorError):
    """The scoring service wants a bearer token the demo's client did not send."""


class ScoreClient:
    """Score calls on transactions through the real gRPC stub, sending ``token`` (when
    there is one) as ``authorization: Bearer <token>``."""

    def __init__(self, channel: grpc.Channel, config: PipelineConfig, token: str = "") -> None:
        from protos.conveyor.scoring.v1 import scoring_pb2_grpc

        self.stub = scoring_pb2_grpc.ScoringStub(channel)
        self.key, self.label = config.features.entity_key or "", config.features.label or ""
        self.metadata = bearer_metadata(token)

    def request(self, row: dict[str, Any]) -> Any:
        """The ScoreRequest of a transaction (every field but the entity key and label)."""
        from protos.conveyor.scoring.v1 import scoring_pb2 as pb
        from scoring.server import field_value

        fields = {k: field_value(v.item() if hasattr(v, "item") else v)
                  for k, v in row.items() if k not in (self.key, self.label)}
        return pb.ScoreRequest(entity_id=str(row[self.key]), fields=fields)

    def score(self, row: dict[str, Any], timeout: float = 5.0) -> Answer:
        """One Score call; an RPC error becomes the answer's error."""
        try:
            reply = self.stub.Score(self.request(row), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            return Answer(str(row[self.key]), row.get(self.label), None,
                          f"{exc.code().name}: {exc.details()}")
        return Answer(str(row[self.key]), row.get(self.label), reply)

    def score_all(self, rows: pd.DataFrame, workers: int = 2) -> list[Answer]:
        """Score every row, ``workers`` calls at a time."""
        records = rows.to_dict(orient="records")
        if workers == 1:
            return [self.score(row) for row in records]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(self.score, records))

    def serves(self, row: dict[str, Any], version: str) -> bool:
        """Whether a Score call is answered by ``version`` now; ``NotAuthenticated`` when
        the service refuses the client's token (waiting would not help)."""
        answer = self.score(row, timeout=2.0)
        if answer.error.startswith(grpc.StatusCode.UNAUTHENTICATED.name):
            raise NotAuthenticated(
                f"the scoring service refused the demo's Score call ({answer.error}); set "
                "CONVEYOR_GRPC_TOKEN to one of its CONVEYOR_GRPC_AUTH_TOKENS")
        return answer.reply is not None and answer.reply.model_version == version


@contextlib.contextmanager
def scoring_client(
    settings: Settings, config: PipelineConfig, port: int | None = None
) -> Iterator[ScoreClient]:
    """A ScoreClient of the local scoring service (``port``: its CONVEYOR_GRPC_PORT), with
    the settings' client token (CONVEYOR_GRPC_TOKEN) and TLS CA (CONVEYOR_GRPC_TLS_CA)."""
    target = f"127.0.0.1:{_grpc_port() if port is None else port}"
    with scoring_channel(target, settings.grpc_tls_ca) as channel:
        yield ScoreClient(channel, config, settings.grpc_token.get_secret_value())


def fallbacks(answers: Sequence[Answer]) -> str:
    """How many answers were fallbacks, and why: one line."""
    replies = [a.reply for a in answers if a.reply is not None]
    kinds = Counter(_why(r.fallback_reason or "") for r in replies if r.fallback)
    why = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
    return (f"fallback share {sum(kinds.values()) / max(len(replies), 1):.0%}"
            + (f" ({why})" if why else ""))


def _why(reason: str) -> str:
    for kind, mark in (("champion demoted", "demoted"), ("circuit open", "circuit"),
                       ("past its deadline", "deadline")):
        if mark in reason:
            return kind
    return "error"


def tally(answers: Sequence[Answer]) -> str:
    """Who answered, how fast, and how many fell back: one line."""
    replies = [a.reply for a in answers if a.reply is not None]
    errors = Counter(a.error.split(":")[0] for a in answers if a.reply is None)
    parts = []
    for (version, fallback), count in sorted(Counter(
            (r.model_version, r.fallback) for r in replies).items()):
        ms = [r.latency_ms for r in replies if (r.model_version, r.fallback) == (version,
                                                                                  fallback)]
        kind = "fallback" if fallback else "own"
        parts.append(f"{version} {count} {kind} (p50 {statistics.median(ms):.1f} ms, "
                     f"max {max(ms):.1f} ms)")
    parts += [f"{count} {code}" for code, count in errors.items()]
    return f"{len(answers)} calls: " + ", ".join(parts)


# -- the event log ---------------------------------------------------------------------------


class EventWatch:
    """The watched events recorded in the event log since the watch began."""

    def __init__(self, log: EventLog) -> None:
        self.log, self.cursor = log, log.last_entry_id()
        self.events: list[Event] = []

    def poll(self) -> list[Event]:
        """Read what was recorded since the last poll; the new watched events."""
        new: list[Event] = []
        entries = self.log.read_after(self.cursor, block_ms=1)
        for _, fields in entries:
            if fields["event_type"] in WATCHED:
                event = self.log.get(fields["event_id"])
                if event is not None:
                    new.append(event)
        self.cursor = entries[-1][0] if entries else self.cursor
        self.events += new
        return new

    def of(self, event_type: str, **match: Any) -> Event | None:
        """The first seen event of the type whose fields match."""
        return next((e for e in self.events if e.event_type == event_type
                     and all(getattr(e, k, None) == v for k, v in match.items())), None)


def gist(event: Event) -> str:
    """The fields of a monitoring event worth a line."""
    data = event.model_dump(mode="json")
    if event.event_type == "ModelDegraded" and data["reason"] == "latency":
        return (f"{data['model_version']} latency: p99 {data['observed'] * 1e3:.0f} ms over "
                f"the budget of {data['expected'] * 1e3:.0f} ms")
    if event.event_type == "ModelDegraded":
        return (f"{data['model_version']} {data['reason']} {data['observed']:.3f} against "
                f"{data['expected']:.3f} at evaluation")
    if event.event_type == "DriftDetected":
        worst = sorted(data["psi"].items(), key=lambda kv: -kv[1])[:3]
        return (f"{data['model_version']} level {data['level']}, PSI "
                + ", ".join(f"{name} {value:.2f}" for name, value in worst))
    keep = ("model_version", "reason", "observed", "expected", "version", "previous_version",
            "model_id", "reasons", "dataset")
    return json.dumps({k: data[k] for k in keep if data.get(k) not in (None, [], {})})[:300]


# -- the story -------------------------------------------------------------------------------


@dataclass
class MonitoringDemo:
    """What the monitoring part of the demo works with."""

    settings: Settings
    bus: RabbitMQBus
    config: PipelineConfig
    registry: ModelRegistry
    data: pd.DataFrame
    """Transactions to send as traffic (the demo's generated data set)."""
    scoring: LocalService | None
    """The scoring service, when the demo started it (only then can it be slowed)."""
    follow: Follow
    timeout: float = 300.0
    seed: int = 0
    log: EventLog = field(init=False)
    state: MonitoringState = field(init=False)

    def __post_init__(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url)
        self.log = EventLog(client, self.settings.namespace)
        self.state = MonitoringState(client, self.settings.namespace)

    def sample(self, rows: int) -> pd.DataFrame:
        """Transactions drawn from the data set (a new draw each call), each from a new
        account, as nearly every training row is: a replayed account would bring its
        stored history and look drifted."""
        self.seed += 1
        drawn = self.data.sample(rows, replace=len(self.data) < rows, random_state=self.seed)
        key = self.config.features.entity_key or ""
        first = 9_000_000_000 + self.seed * 10_000
        return drawn.assign(**{key: [f"C{first + i}" for i in range(len(drawn))]})

    def live(self, version: str) -> dict[str, Any]:
        """Monitoring's live view of a version."""
        return self.state.live(version)


def show_monitoring(demo: MonitoringDemo, say: Say, first_step: int) -> None:
    """The three monitoring steps, numbered from ``first_step``."""
    with scoring_client(demo.settings, demo.config) as client:
        normal_traffic(demo, client, say, first_step)
        drift_and_retraining(demo, client, say, first_step + 1)
        slowed_champion(demo, client, say, first_step + 2)


def normal_traffic(demo: MonitoringDemo, client: ScoreClient, say: Say, step: int) -> None:
    """Score calls like the training data, and the true outcome of some of them."""
    champion = demo.registry.champion().version
    say(f"\n{step}. monitoring at work: {NORMAL_CALLS} Score calls of normal traffic, "
        f"the true outcome of {OUTCOMES} published")
    before = demo.live(champion)
    answers = client.score_all(demo.sample(NORMAL_CALLS))
    say(f"   {tally(answers)}")
    own = [(a, a.reply) for a in answers
           if a.reply is not None and a.reply.model_version == champion]
    _wait_served(demo, champion, before, len(own))
    for answer, reply in own[:OUTCOMES]:
        report_outcome(demo.bus, answer.entity, float(answer.truth), reply.request_id,
                       producer="demo")
    expected = min(int(before.get("outcomes", 0)) + min(len(own), OUTCOMES), 500)
    wait_until(lambda: demo.live(champion).get("outcomes", 0) >= expected, demo.timeout,
               0.1, message="monitoring joined the outcomes")
    view = demo.live(champion)
    quality, wanted = view.get("quality") or {}, view.get("quality_expected") or {}
    say(f"   monitoring of {champion}: {view.get('served')} served, p99 "
        f"{_num(view.get('latency_p99_ms'))} ms, live accuracy "
        f"{_num(quality.get('accuracy'), '.3f')} on {view.get('outcomes')} outcomes "
        f"(evaluation: {_num(wanted.get('accuracy'), '.3f')})")


def drift_and_retraining(demo: MonitoringDemo, client: ScoreClient, say: Say,
                         step: int) -> None:
    """Shifted traffic until monitoring finds drift; then the retraining run it asked for."""
    champion = demo.registry.champion().version
    say(f"\n{step}. drifted traffic: transactions with {SHIFTED_FEATURE} x {SHIFT_FACTOR:g}, "
        f"{DRIFT_ROUND} Score calls at a time until monitoring reacts")
    watch = EventWatch(demo.log)
    cursor, sent = watch.cursor, 0
    while sent < DRIFT_MAX and not (watch.of("DriftDetected") or watch.of("RetrainRequested")):
        rows = demo.sample(DRIFT_ROUND)
        rows[SHIFTED_FEATURE] = rows[SHIFTED_FEATURE] * SHIFT_FACTOR
        client.score_all(rows)
        sent += DRIFT_ROUND
        _poll_for(watch, 1.0, "DriftDetected")
    _poll_for(watch, 2.0, "RetrainRequested")  # decided with the drift, in the same handler
    view = demo.live(champion)
    say(f"   {sent} shifted calls; monitoring of {champion}: drift {view.get('drift_level', '-')}"
        f" after {view.get('drift_served', '-')} scores")
    retrain = watch.of("RetrainRequested")
    if retrain is None:
        drift = watch.of("DriftDetected")
        say(f"   DriftDetected {gist(drift)}" if drift else "   no drift detected")
        say("   no RetrainRequested: monitoring asks at most once per "
            "CONVEYOR_MONITORING_RETRAIN_COOLDOWN_S, and it asked recently")
        return
    say("   the run it started (training on the latest data, then the gate):")
    final = demo.follow(demo.log, cursor, retrain, demo.timeout)
    if final.event_type != "ModelReady":
        say(f"   the gate kept {champion}")
        return
    version = getattr(final, "version", "")
    if version == champion:
        say(f"   the gate chose {champion} again: the latest data is the data it was trained "
            "on (new data would bring a new model)")
        return
    row = demo.sample(1).to_dict(orient="records")[0]
    wait_until(lambda: client.serves(row, version), demo.timeout, 0.2,
               message=f"the scoring service serving {version}")
    say(f"   the scoring service serves the retrained {version}")


def slowed_champion(demo: MonitoringDemo, client: ScoreClient, say: Say, step: int) -> None:
    """A champion made slow for real: fallbacks, ModelDegraded, demotion and revert."""
    champion = demo.registry.champion().version
    previous = _previous(demo.registry)
    say(f"\n{step}. a slowed champion: {champion} made {INJECTED_DELAY_MS} ms slower per "
        f"predict (CONVEYOR_SCORING_INJECT_DELAY_MS, a fault-injection setting)")
    if demo.scoring is None:
        say("   skipped: the scoring service was not started by this demo, so it cannot be "
            "restarted with the fault injected")
        return
    if previous is None:
        say(f"   skipped: {champion} is the only registered version, so nothing could fall "
            "back; run `make demo` again (the next run trains a challenger)")
        return
    before = demo.live(champion)
    answers = client.score_all(demo.sample(NORMAL_CALLS // 2))
    say(f"   first at normal speed: {tally(answers)}")
    _wait_served(demo, champion, before, _own(answers, champion))
    code = demo.scoring.restart(slow_scoring_env(champion))
    wait_until(demo.scoring.ready, demo.timeout, 0.2, message="the slowed scoring service")
    say(f"   scoring restarted with {champion} slowed (old process exit status {code}); "
        f"{SLOW_ROUND} calls at a time until monitoring reacts")
    watch = EventWatch(demo.log)
    slow: list[Answer] = []
    while len(slow) < SLOW_MAX and watch.of("ModelDegraded", model_version=champion) is None:
        slow += client.score_all(demo.sample(SLOW_ROUND), workers=1)
        watch.poll()
    say(f"   {tally(slow)}")
    say(f"   {fallbacks(slow)}")
    _poll_for(watch, 5.0, "ModelDegraded")
    degraded = watch.of("ModelDegraded", model_version=champion)
    if degraded is None:
        say(f"   no ModelDegraded of {champion}: monitoring judges latency after "
            "CONVEYOR_MONITORING_LATENCY_MIN_SCORES own answers, once per "
            "CONVEYOR_MONITORING_DEGRADED_COOLDOWN_S")
        return
    say(f"   ModelDegraded: {gist(degraded)}")
    row = demo.sample(1).to_dict(orient="records")[0]
    after: Any = wait_until(lambda: _demoted_answer(client, row, champion), demo.timeout, 0.2,
                            message=f"the scoring service demoting {champion}")
    say(f"   next answer by {after.model_version} (fallback {after.fallback}): "
        f"{after.fallback_reason}")
    last = demo.registry.history()[-1]
    say(f"   registry: {last.action} {last.from_version} -> {last.to_version}; "
        f"the champion is now {demo.registry.champion().version}")


# -- helpers ---------------------------------------------------------------------------------


def _grpc_port() -> int:
    from scoring.service import ScoringSettings

    return ScoringSettings().grpc_port


def _previous(registry: ModelRegistry) -> str | None:
    try:
        return registry.previous().version
    except ModelNotFound:
        return None


def _own(answers: Sequence[Answer], version: str) -> int:
    return sum(1 for a in answers if a.reply is not None and a.reply.model_version == version)


def _wait_served(demo: MonitoringDemo, version: str, before: dict[str, Any], calls: int) -> None:
    """Until monitoring has accounted ``calls`` more scores of the version (the scoring
    service reports them every half second)."""
    def accounted() -> bool:
        return int(demo.live(version).get("served", 0)) >= int(before.get("served", 0)) + calls

    wait_until(accounted, demo.timeout, 0.1, message="monitoring accounted the scores")


def _poll_for(watch: EventWatch, seconds: float, event_type: str) -> None:
    """Poll the event log for a while, or until an event of the type shows."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and watch.of(event_type) is None:
        watch.poll()
        time.sleep(0.1)


def _demoted_answer(client: ScoreClient, row: dict[str, Any], version: str) -> Any | None:
    answer = client.score(row, timeout=2.0)
    reply = answer.reply
    if reply is None or reply.model_version == version or "demoted" not in (
            reply.fallback_reason or ""):
        return None
    return reply


def _num(value: Any, spec: str = ".1f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"
