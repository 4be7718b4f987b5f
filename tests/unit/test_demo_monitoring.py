"""The demo's monitoring part: its summaries, and the settings it gives the scoring service."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.demo_monitoring import Answer, fallbacks, gist, slow_scoring_env, tally
from common.events import ModelDegraded
from scoring.service import ScoringSettings


def answer(version: str, latency_ms: float, reason: str | None = None) -> Answer:
    reply = SimpleNamespace(model_version=version, latency_ms=latency_ms,
                            fallback=reason is not None, fallback_reason=reason)
    return Answer("C1", 0, reply)


def test_fallbacks_are_counted_by_their_reason() -> None:
    answers = [answer("v2", 150.0),
               answer("v1", 2.0, "champion v2 skipped: demoted (latency 0.15 against 0.1)"),
               answer("v1", 2.0, "champion v2 skipped: circuit open (p99 151.0 ms ...)"),
               answer("v1", 130.0, "v2 passed its deadline of 125.0 ms"),
               Answer("C2", 0, None, "DEADLINE_EXCEEDED: no model answered")]
    assert fallbacks(answers) == ("fallback share 75% (champion demoted 1, circuit open 1, "
                                  "past its deadline 1)")
    assert tally(answers) == ("5 calls: v1 3 fallback (p50 2.0 ms, max 130.0 ms), "
                              "v2 1 own (p50 150.0 ms, max 150.0 ms), 1 DEADLINE_EXCEEDED")


def test_a_latency_degradation_reads_in_milliseconds() -> None:
    event = ModelDegraded(model_version="v2", reason="latency", observed=0.1524,
                          expected=0.1, producer="monitoring")
    assert gist(event) == "v2 latency: p99 152 ms over the budget of 100 ms"


def test_the_slowed_scoring_settings_reach_its_core(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in slow_scoring_env("v7").items():
        monkeypatch.setenv(name, value)
    core = ScoringSettings().core()
    assert (core.inject_delay_version, core.inject_delay_s, core.deadline_s) == (
        "v7", 0.15, 0.5)
    # Half the deadline is the champion's: its ~150 ms answers arrive, over the 100 ms budget.
    assert core.latency_budget_s < core.inject_delay_s < core.deadline_s / 2
