"""The service catalogue hands each stage the pipeline config it loaded once; the stages
type what they read of it with protocols of their own, which ``PipelineConfig`` meets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app import services
from app.config import load_pipeline_config
from common.errors import InvalidInput
from common.runtime import Service
from common.settings import Settings
from evaluation.service import EvaluationSections
from ingestion.service import IngestionSections
from monitoring.service import MonitoringSections
from preparation.spec import FeatureSections, PreparationSections
from tests.fixtures.pipeline import PAYSIM_CONFIG
from training.service import TrainingSections

SECTIONS = [IngestionSections, FeatureSections, PreparationSections, TrainingSections,
            EvaluationSections, MonitoringSections]
BUILT: list[tuple[Any, ...]] = []


class Probe(Service):
    name = "probe"


def build_probe(*args: Any) -> Probe:
    BUILT.append(args)
    return Probe()


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    monkeypatch.setitem(services.SERVICES, "probe", f"{__name__}:build_probe")
    BUILT.clear()
    return BUILT


@pytest.mark.parametrize("sections", SECTIONS, ids=lambda s: s.__name__)
def test_the_pipeline_config_has_what_each_stage_reads(sections: type) -> None:
    assert isinstance(load_pipeline_config(PAYSIM_CONFIG), sections)
    assert not isinstance(object(), sections)


def test_a_stage_factory_gets_the_settings_and_the_config_they_name(
        probe: list[tuple[Any, ...]]) -> None:
    settings = Settings(pipeline_config=str(PAYSIM_CONFIG), local_dev=True)
    assert services.build_service("probe", settings).name == "probe"
    [(given, config)] = probe
    assert given is settings
    assert config == load_pipeline_config(PAYSIM_CONFIG)


def test_a_missing_pipeline_config_is_named(probe: list[tuple[Any, ...]],
                                            tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(InvalidInput, match=f"pipeline config {missing} not found"):
        services.build_service("probe", Settings(pipeline_config=str(missing), local_dev=True))
    assert probe == []


def test_the_event_log_reads_no_pipeline_config(tmp_path: Path) -> None:
    settings = Settings(pipeline_config=str(tmp_path / "nope.yaml"), local_dev=True)
    assert services.build_service("eventlog", settings).name == "eventlog"
