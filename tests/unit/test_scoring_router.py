"""The model router: versions, chain, circuits, deadlines, canary, shadow, hot swap.

Latency is simulated on an injected clock that fake models advance, so nothing sleeps;
only the deadline tests use a real thread pool and a model blocked on an Event.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from common.errors import InvalidInput, ModelNotFound, Status
from scoring.latency import CircuitBreaker, CircuitState, LatencyTracker
from scoring.router import (
    Answer,
    DeployedModel,
    ModelRouter,
    NoAnswer,
    NoModelDeployed,
    RouteDecision,
    RouterConfig,
    ShadowResult,
    answer,
    key_fraction,
)

BUDGET = 0.005
OPEN_FOR = 2.0


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeModel:
    """Answers ``"<version>:<batch>"`` after ``latency_s`` on the fake clock, or raises."""

    def __init__(self, version: str, clock: FakeClock, latency_s: float = 0.001) -> None:
        self.version, self.clock, self.latency_s = version, clock, latency_s
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self, batch: Any) -> str:
        self.calls += 1
        self.clock.advance(self.latency_s)
        if self.error is not None:
            raise self.error
        return f"{self.version}:{batch}"


class Fleet:
    """A router over fake models v1..v4 sharing one fake clock; chain v3 -> v2 -> v1."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.clock = FakeClock()
        self.router = ModelRouter("fraud", config, rng=random.Random(7))
        self.models = {v: FakeModel(v, self.clock) for v in ("v1", "v2", "v3", "v4")}
        for version, fake in self.models.items():
            self.router.deploy(DeployedModel(version, f"m-{version}", fake, self.breaker()))
        self.router.set_chain(["v3", "v2", "v1"])

    def breaker(self) -> CircuitBreaker:
        return CircuitBreaker(BUDGET, 0.99, min_samples=10, open_for_s=OPEN_FOR, clock=self.clock)

    def score(self, decision: RouteDecision | None = None, **kwargs: Any) -> Answer:
        decision = decision or self.router.route()
        return answer(decision, lambda m: m.predict("row"), clock=self.clock, **kwargs)

    def open_champion(self) -> None:
        """Ten slow answers from v3: its p99 breaks the budget."""
        self.models["v3"].latency_s = 0.012
        for _ in range(10):
            self.score()
        self.models["v3"].latency_s = 0.001


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4)
    yield executor
    executor.shutdown(wait=True)


def versions(models: list[DeployedModel]) -> list[str]:
    return [model.version for model in models]


# --- LatencyTracker and CircuitBreaker -------------------------------------------------


def test_tracker_percentiles_over_a_bounded_window() -> None:
    tracker = LatencyTracker(window=100)
    assert tracker.count == 0 and math.isnan(tracker.p99)
    for ms in range(1, 201):  # the first hundred fall out of the window
        tracker.record(ms / 1000)
    assert tracker.count == 100
    assert tracker.p50 == pytest.approx(0.1505)
    assert tracker.p99 == pytest.approx(0.19901)
    summary = tracker.summary()
    assert (summary.count, summary.p95_s) == (100, pytest.approx(0.19505))
    tracker.reset()
    assert tracker.count == 0


def test_breaker_waits_for_min_samples_then_opens_with_its_reason() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BUDGET, 0.99, min_samples=5, open_for_s=OPEN_FOR, clock=clock)
    for _ in range(4):
        breaker.record(0.012)
    assert breaker.state is CircuitState.CLOSED and breaker.allow()
    breaker.record(0.012)
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    assert breaker.reason == "p99 12.0 ms over budget 5.0 ms"
    assert breaker.describe() == "open (p99 12.0 ms over budget 5.0 ms)"


def test_breaker_stays_closed_while_the_tail_is_within_budget() -> None:
    breaker = CircuitBreaker(BUDGET, min_samples=5, clock=FakeClock())
    for _ in range(1000):
        breaker.record(0.004)
    assert breaker.state is CircuitState.CLOSED and breaker.reason is None


def test_half_open_admits_one_probe_and_a_lost_probe_is_given_up() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(BUDGET, min_samples=1, open_for_s=OPEN_FOR, clock=clock)
    breaker.record(0.050)
    clock.advance(OPEN_FOR)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()
    clock.advance(OPEN_FOR)  # the probe never reported back
    assert breaker.allow()


def test_consecutive_failures_open_the_circuit() -> None:
    breaker = CircuitBreaker(BUDGET, clock=FakeClock(), max_failures=3)
    breaker.record_failure("RuntimeError: boom")
    breaker.record(0.001)  # a success breaks the run
    for _ in range(3):
        breaker.record_failure("RuntimeError: boom")
    assert breaker.state is CircuitState.OPEN
    assert breaker.reason == "3 failures in a row, last: RuntimeError: boom"


@pytest.mark.parametrize("seed", range(20))
def test_the_budget_counter_agrees_with_the_nearest_rank_percentile(seed: int) -> None:
    rng = random.Random(seed)
    samples = [rng.choice([0.001, 0.004, 0.006, 0.030]) for _ in range(rng.randint(1, 300))]
    q = rng.choice([0.5, 0.9, 0.95, 0.99, 0.07])
    breaker = CircuitBreaker(BUDGET, q, min_samples=len(samples), clock=FakeClock())
    for sample in samples:
        breaker.record(sample)
    nearest_rank = float(np.quantile(samples, q, method="inverted_cdf"))
    assert (breaker.state is CircuitState.OPEN) == (nearest_rank > BUDGET)


def test_a_model_that_hangs_opens_even_when_its_deadline_is_under_budget() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(0.050, min_samples=1, open_for_s=OPEN_FOR, clock=clock, max_failures=3)
    for _ in range(3):
        breaker.record_timeout(0.010)
    assert breaker.reason == "3 failures in a row, last: no answer after 10.0 ms"
    clock.advance(OPEN_FOR)
    assert breaker.allow()
    breaker.record_timeout(0.010)  # the probe hung too
    assert breaker.state is CircuitState.OPEN
    assert breaker.reason == "probe failed: no answer after 10.0 ms"


def test_a_request_abandoned_sooner_than_the_link_usually_answers_is_not_held_against_it(
) -> None:
    breaker = CircuitBreaker(0.050, min_samples=10, clock=FakeClock(), max_failures=3)
    for _ in range(10):
        breaker.record(0.006)
    for _ in range(10):
        breaker.record_timeout(0.002)  # a fallback asked with 2 ms left
    assert breaker.state is CircuitState.CLOSED and breaker.tracker.count == 10
    for _ in range(3):
        breaker.record_timeout(0.008)  # given more than it usually takes, and no answer
    assert breaker.reason == "3 failures in a row, last: no answer after 8.0 ms"


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="percentile"):
        CircuitBreaker(BUDGET, percentile=99)
    with pytest.raises(ValueError, match="budget_s"):
        CircuitBreaker(0.0)


# --- registry: versions, aliases, chain ------------------------------------------------


def test_a_named_version_is_routed_to_it(fleet: Fleet) -> None:
    decision = fleet.router.route("v1")
    assert decision.primary.version == "v1" and decision.fallbacks == []
    assert (decision.reason, decision.fallback) == ("named v1", False)
    reply = fleet.score(decision)
    assert (reply.value, reply.version, reply.fallback) == ("v1:row", "v1", False)


def test_an_unknown_version_is_not_found_with_its_name(fleet: Fleet) -> None:
    for lookup in (fleet.router.route, fleet.router.get, fleet.router.retire):
        with pytest.raises(ModelNotFound) as raised:
            lookup("v9")
        assert str(raised.value) == "model fraud with version v9 not found"
        assert raised.value.status is Status.NOT_FOUND


def test_the_chain_runs_champion_previous_older(fleet: Fleet) -> None:
    decision = fleet.router.route()
    assert decision.primary.version == "v3"
    assert versions(decision.fallbacks) == ["v2", "v1"]
    assert (decision.reason, decision.fallback) == ("champion v3", False)
    assert fleet.router.get("champion").version == "v3"
    assert fleet.router.get("previous").version == "v2"
    assert fleet.score().version == "v3"


def test_promote_puts_a_version_in_front(fleet: Fleet) -> None:
    fleet.router.promote("v4")
    assert versions(fleet.router.chain()) == ["v4", "v3", "v2", "v1"]
    aliases = {h.version: h.alias for h in fleet.router.health()}
    assert aliases == {"v4": "champion", "v3": "previous", "v2": "older #1", "v1": "older #2"}


def test_set_chain_of_an_undeployed_version_changes_nothing(fleet: Fleet) -> None:
    with pytest.raises(ModelNotFound, match="model fraud with version v9 not found"):
        fleet.router.set_chain(["v9", "v3"])
    with pytest.raises(InvalidInput, match="twice"):
        fleet.router.set_chain(["v3", "v3"])
    assert versions(fleet.router.chain()) == ["v3", "v2", "v1"]


def test_deploying_a_version_twice_is_refused(fleet: Fleet) -> None:
    twin = DeployedModel("v3", "m-other", fleet.models["v3"], fleet.breaker())
    with pytest.raises(InvalidInput, match="v3 is already deployed"):
        fleet.router.deploy(twin)


def test_no_chain_means_unavailable_and_not_ready() -> None:
    router = ModelRouter("fraud")
    assert not router.ready
    with pytest.raises(NoModelDeployed) as raised:
        router.route()
    assert raised.value.status is Status.UNAVAILABLE
    assert str(raised.value) == "model fraud has no deployed version to serve"


# --- circuits --------------------------------------------------------------------------


def test_a_slow_champion_opens_its_circuit_and_previous_answers(fleet: Fleet) -> None:
    fleet.open_champion()
    decision = fleet.router.route()
    assert decision.primary.version == "v2" and decision.fallback
    assert versions(decision.fallbacks) == ["v1"]  # the next links only
    assert decision.reason == (
        "champion v3 skipped: circuit open (p99 12.0 ms over budget 5.0 ms); previous v2"
    )
    reply = fleet.score(decision)
    assert (reply.version, reply.fallback) == ("v2", True)
    assert reply.fallback_reason == decision.reason


def test_a_probe_within_budget_closes_the_circuit(fleet: Fleet) -> None:
    fleet.open_champion()
    fleet.clock.advance(OPEN_FOR)
    probe = fleet.router.route()
    assert probe.primary.version == "v3" and not probe.fallback
    meanwhile = fleet.router.route()  # one probe at a time
    assert meanwhile.primary.version == "v2"
    assert "circuit half_open (p99 12.0 ms over budget 5.0 ms)" in meanwhile.reason
    assert fleet.score(probe).version == "v3"
    champion = fleet.router.get("v3")
    assert champion.breaker.state is CircuitState.CLOSED
    assert champion.latency().count == 0  # the window was reset
    assert fleet.router.route().primary.version == "v3"


def test_a_slow_probe_opens_the_circuit_again(fleet: Fleet) -> None:
    fleet.open_champion()
    fleet.clock.advance(OPEN_FOR)
    fleet.models["v3"].latency_s = 0.020
    assert fleet.score().version == "v3"  # a probe that answers is still an answer
    breaker = fleet.router.get("v3").breaker
    assert breaker.state is CircuitState.OPEN
    assert breaker.reason == "probe took 20.0 ms, over budget 5.0 ms"
    assert fleet.router.route().primary.version == "v2"


def test_every_circuit_open_still_asks_the_chain_in_order(fleet: Fleet) -> None:
    for model in fleet.router.chain():
        for _ in range(10):
            model.breaker.record(0.050)
    decision = fleet.router.route()
    assert decision.primary.version == "v3" and versions(decision.fallbacks) == ["v2", "v1"]
    assert decision.reason.endswith("every circuit is open: asking the chain in order")


# --- answers: exceptions and deadlines -------------------------------------------------


def test_an_error_in_the_champion_is_answered_by_the_next_link(fleet: Fleet) -> None:
    fleet.models["v3"].error = RuntimeError("boom")
    reply = fleet.score()
    assert (reply.value, reply.version, reply.fallback) == ("v2:row", "v2", True)
    assert reply.fallback_reason == "v3 raised RuntimeError: boom"


def test_bad_input_is_not_the_model_s_fault(fleet: Fleet) -> None:
    fleet.models["v3"].error = InvalidInput("field amount is missing")
    with pytest.raises(InvalidInput, match="amount"):
        fleet.score()
    assert fleet.models["v2"].calls == 0


def test_when_no_link_answers_the_error_lists_each_failure(fleet: Fleet) -> None:
    for version in ("v3", "v2", "v1"):
        fleet.models[version].error = RuntimeError(f"{version} down")
    with pytest.raises(NoAnswer) as raised:
        fleet.score()
    assert raised.value.status is Status.UNAVAILABLE
    assert str(raised.value) == (
        "no model answered: v3 raised RuntimeError: v3 down; "
        "v2 raised RuntimeError: v2 down; v1 raised RuntimeError: v1 down"
    )


def test_a_request_past_its_deadline_is_answered_by_the_next_link(
    fleet: Fleet, pool: ThreadPoolExecutor
) -> None:
    release = threading.Event()
    stuck = DeployedModel("v5", "m-v5", lambda batch: release.wait(5), fleet.breaker())
    fleet.router.deploy(stuck)
    fleet.router.set_chain(["v5", "v2"])
    try:
        reply = answer(fleet.router.route(), lambda m: m.predict("row"), 0.2, executor=pool)
    finally:
        release.set()
    assert (reply.value, reply.version, reply.fallback) == ("v2:row", "v2", True)
    assert reply.fallback_reason == "v5 passed its deadline of 100.0 ms"
    assert reply.latency_s < 0.2
    assert stuck.latency().count == 1 and stuck.latency().p50_s >= 0.1


def test_the_reserve_for_fallbacks_is_configurable(fleet: Fleet, pool: ThreadPoolExecutor) -> None:
    release = threading.Event()
    stuck = DeployedModel("v5", "m-v5", lambda batch: release.wait(5), fleet.breaker())
    fleet.router.deploy(stuck)
    fleet.router.set_chain(["v5", "v2"])
    decision = fleet.router.route()
    try:
        reply = answer(
            decision, lambda m: m.predict("r"), 0.1, executor=pool, fallback_reserve_s=0.08
        )
    finally:
        release.set()
    assert reply.version == "v2"
    assert reply.fallback_reason == "v5 passed its deadline of 20.0 ms"


def test_without_an_executor_a_late_reply_is_kept_and_recorded(fleet: Fleet) -> None:
    fleet.models["v3"].latency_s = 0.050
    reply = fleet.score(deadline_s=0.020)
    assert (reply.version, reply.fallback) == ("v3", False)
    assert fleet.router.get("v3").latency().p50_s == pytest.approx(0.050)


# --- canary and shadow -----------------------------------------------------------------


def test_the_canary_share_holds_over_many_keys_and_each_key_sticks() -> None:
    fleet = Fleet(RouterConfig(canary_version="v4", canary_share=0.1))
    keys = [f"C-{i}" for i in range(10_000)]
    picked = [fleet.router.route(request_key=key).primary.version for key in keys]
    assert 0.09 <= picked.count("v4") / len(keys) <= 0.11
    assert set(picked) == {"v3", "v4"}
    again = [fleet.router.route(request_key=key).primary.version for key in keys[:500]]
    assert again == picked[:500]
    canary = next(k for k in keys if key_fraction(k) < 0.1)
    decision = fleet.router.route(request_key=canary)
    assert decision.reason == "canary v4 (share 0.1)" and not decision.fallback
    assert versions(decision.fallbacks) == ["v3", "v2", "v1"]


def test_without_a_key_the_canary_share_comes_from_the_injected_rng() -> None:
    fleet = Fleet(RouterConfig(canary_version="v4", canary_share=0.25))
    picked = [fleet.router.route().primary.version for _ in range(4000)]
    assert 0.22 <= picked.count("v4") / 4000 <= 0.28


def test_canary_config_must_name_a_deployed_version_and_a_share(fleet: Fleet) -> None:
    with pytest.raises(ModelNotFound, match="version v9 not found"):
        fleet.router.configure(RouterConfig(canary_version="v9", canary_share=0.5))
    with pytest.raises(InvalidInput, match="canary_share"):
        RouterConfig(canary_version="v4", canary_share=1.5)


def test_the_shadow_gets_a_copy_but_never_answers(fleet: Fleet) -> None:
    fleet.router.configure(RouterConfig(shadow_version="v4"))
    seen: list[ShadowResult] = []
    reply = fleet.score(on_shadow=seen.append)
    assert (reply.value, reply.version) == ("v3:row", "v3")
    assert [(s.version, s.value, s.error) for s in seen] == [("v4", "v4:row", None)]
    fleet.models["v4"].error = RuntimeError("shadow down")
    assert fleet.score(on_shadow=seen.append).version == "v3"
    assert seen[-1].error == "RuntimeError: shadow down"
    assert fleet.router.route("v4").shadow is None  # never a shadow of itself


def test_the_shadow_runs_on_the_executor(fleet: Fleet, pool: ThreadPoolExecutor) -> None:
    fleet.router.configure(RouterConfig(shadow_version="v4"))
    done = threading.Event()
    reply = fleet.score(executor=pool, on_shadow=lambda result: done.set())
    assert reply.version == "v3" and done.wait(5)


def test_retiring_the_canary_ends_canary_traffic() -> None:
    fleet = Fleet(RouterConfig(canary_version="v4", canary_share=1.0, shadow_version="v4"))
    assert fleet.router.route().primary.version == "v4"
    fleet.router.retire("v4")
    assert fleet.router.config == RouterConfig()
    assert fleet.router.route().primary.version == "v3"


# --- hot swap --------------------------------------------------------------------------


def test_a_decision_taken_before_a_swap_completes_on_the_old_model(fleet: Fleet) -> None:
    decision = fleet.router.route()
    fleet.router.promote("v4")
    fleet.router.retire("v3")
    assert fleet.router.route().primary.version == "v4"
    assert fleet.score(decision).version == "v3"


def test_a_request_in_flight_during_a_swap_finishes_on_the_old_model() -> None:
    fleet = Fleet()
    entered, release = threading.Event(), threading.Event()
    replies: list[Answer] = []

    def slow_call(model: DeployedModel) -> Any:
        entered.set()
        release.wait(5)
        return model.predict("row")

    worker = threading.Thread(
        target=lambda: replies.append(answer(fleet.router.route(), slow_call))
    )
    worker.start()
    assert entered.wait(5)
    fleet.router.set_chain(["v4", "v3"])
    fleet.router.retire("v2")
    assert fleet.router.route().primary.version == "v4"
    release.set()
    worker.join(5)
    assert [(r.version, r.value, r.fallback) for r in replies] == [("v3", "v3:row", False)]
