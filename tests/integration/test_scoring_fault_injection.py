"""The scoring fault-injection setting: a named version's predict made slow for real.

``CoreSettings.inject_delay_s`` / ``inject_delay_version`` (``CONVEYOR_SCORING_INJECT_DELAY_MS``
and ``..._VERSION`` on the service) are what the demo uses to slow the champion. Here the
champion v2 sleeps 1 s per predict against a 0.2 s deadline (a margin no scheduling noise
closes): the previous version answers, marked fallback by deadline; the other versions,
and every version without the setting, answer themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scoring.core import ScoreQuery, ScoringCore
from scoring.router import FallbackKind
from scoring.service import ScoringSettings
from tests.fixtures.scoring import ScoringWorld, fields_of

pytestmark = pytest.mark.integration


def loaded(world: ScoringWorld, **settings: Any) -> Iterator[ScoringCore]:
    core = world.core(deadline_s=0.2, latency_budget_s=5.0, warmup_calls=1, **settings)
    core.load_chain()
    yield core
    core.close()


def query(world: ScoringWorld, core: ScoringCore, version: str | None = None) -> ScoreQuery:
    row = world.frame.iloc[7]
    return ScoreQuery(row["nameOrig"], fields_of(row, core.loaded().schema), version)


def test_the_slowed_champion_is_answered_by_the_previous_version(world: ScoringWorld) -> None:
    for core in loaded(world, inject_delay_s=1.0, inject_delay_version="v2"):
        result = core.score(query(world, core))
        assert (result.version, result.fallback) == ("v1", True)
        assert result.fallback_kind is FallbackKind.DEADLINE
        assert "v2 passed its deadline" in (result.fallback_reason or "")
        named = core.score(query(world, core, "v1"))
        assert (named.version, named.fallback) == ("v1", False)


def test_without_the_setting_the_champion_answers(world: ScoringWorld) -> None:
    for core in loaded(world, inject_delay_s=1.0, inject_delay_version="v9"):
        result = core.score(query(world, core))
        assert (result.version, result.fallback) == ("v2", False)


def test_the_service_settings_reach_the_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SCORING_INJECT_DELAY_MS", "150")
    monkeypatch.setenv("CONVEYOR_SCORING_INJECT_DELAY_VERSION", "v3")
    core = ScoringSettings().core()
    assert (core.inject_delay_s, core.inject_delay_version) == (0.15, "v3")
    assert ScoringSettings.model_fields["scoring_inject_delay_ms"].default == 0.0
