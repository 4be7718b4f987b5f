"""The catalogue of runnable services: name → factory taking the settings and the
pipeline config.

``conveyor run NAME`` and each Kubernetes Deployment start one entry of it. The pipeline
config is read here, once, from the file the settings name (``CONVEYOR_PIPELINE_CONFIG``),
and handed to the stage's factory, which types what it reads of it with a protocol of its
own (``preparation.spec.PreparationSections``, ``training.service.TrainingSections``...):
the stages never import the application layer. Stage packages add theirs here as they
are built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from app.config import load_pipeline_config
from common.runtime import Service
from common.safety import check_start
from common.settings import Settings

SERVICES: dict[str, str] = {
    "eventlog": "common.eventlog:build",
    "ingestion": "ingestion.service:build",
    "preparation": "preparation.service:build",
    "online-preparation": "preparation.service:build_online",
    "training": "training.service:build",
    "evaluation": "evaluation.service:build",
    "scoring": "scoring.service:build",
    "batch-scoring": "scoring.batch_service:build",  # BatchScoringRequested only
    "monitoring": "monitoring.service:build",
}

PIPELINE_FREE = frozenset({"eventlog"})
"""Services that read no pipeline config: their factory takes the settings alone."""


def service_names() -> list[str]:
    """Names of every runnable service."""
    return sorted(SERVICES)


def build_service(name: str, settings: Settings) -> Service:
    """Build a service by name; ``KeyError`` lists the known names."""
    if name not in SERVICES:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(service_names())}")
    check_start(settings)  # outside local development: no guest, no published key
    module_name, _, attr = SERVICES[name].partition(":")
    factory: Callable[..., Service] = getattr(importlib.import_module(module_name), attr)
    if name in PIPELINE_FREE:
        return factory(settings)
    return factory(settings, load_pipeline_config(settings.pipeline_config))
