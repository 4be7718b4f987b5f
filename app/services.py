"""The catalogue of runnable services: name → factory taking the settings.

``conveyor run NAME`` and each Kubernetes Deployment start one entry of it. Stage
packages add theirs here as they are built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

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


def service_names() -> list[str]:
    """Names of every runnable service."""
    return sorted(SERVICES)


def build_service(name: str, settings: Settings) -> Service:
    """Build a service by name; ``KeyError`` lists the known names."""
    if name not in SERVICES:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(service_names())}")
    check_start(settings)  # outside local development: no guest, no published key
    module_name, _, attr = SERVICES[name].partition(":")
    factory: Callable[[Settings], Service] = getattr(importlib.import_module(module_name), attr)
    return factory(settings)
