"""The training section of the pipeline config: candidate models and how to train them.

Example (YAML)::

    training:
      workers: 2
      timeout_s: 600
      retries: 1
      features: null            # all features of the feature set
      candidates:
        - name: logreg
          estimator: LogisticRegression          # a scikit-learn class name ...
          params: {max_iter: 1000}
          grid: {C: [0.1, 1.0]}                  # one candidate per combination
        - name: hgb
          estimator: sklearn.ensemble.HistGradientBoostingClassifier   # ... or a dotted path
          params: {max_iter: 100}
"""

from __future__ import annotations

import functools
import importlib
import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sklearn.base import BaseEstimator
from sklearn.utils import all_estimators

from common.errors import InvalidInput

MAX_GRID_POINTS = 16


class CandidateSpec(BaseModel):
    """One candidate model: an estimator class, its parameters, an optional small grid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Name of the candidate, unique in the config."""
    estimator: str = Field(min_length=1)
    """scikit-learn class name (LogisticRegression) or dotted path (pkg.module.Class)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Constructor parameters."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Parameter values to try; each combination becomes a candidate of its own."""

    @model_validator(mode="after")
    def _estimator_resolves(self) -> CandidateSpec:
        try:
            resolve_estimator(self.estimator, self.name)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None  # fails at load, naming the candidate
        return self

    @field_validator("grid")
    @classmethod
    def _small_grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        points = 1
        for values in grid.values():
            points *= max(len(values), 1)
        if points > MAX_GRID_POINTS:
            raise ValueError(f"grid has {points} combinations; at most {MAX_GRID_POINTS}")
        return grid


class TrainingConfig(BaseModel):
    """How the Model Training Service trains candidates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: list[CandidateSpec] = Field(min_length=1)
    """The candidate models."""
    features: list[str] | None = None
    """Features to train on; None means every feature of the feature set."""
    workers: int = Field(default=2, ge=1)
    """Candidates trained in parallel (processes)."""
    timeout_s: float = Field(default=600.0, gt=0)
    """Wall-clock limit per candidate; a candidate past it is stopped and reported failed."""
    retries: int = Field(default=1, ge=0)
    """Extra attempts for a candidate that failed for a transient reason."""

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, candidates: list[CandidateSpec]) -> list[CandidateSpec]:
        names = [c.name for c in candidates]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"candidate names must be unique; repeated: {duplicates}")
        return candidates


class Candidate(BaseModel):
    """A concrete candidate to train: one grid point of a CandidateSpec."""

    model_config = ConfigDict(frozen=True)

    name: str
    estimator: str
    params: dict[str, Any]


def expand(config: TrainingConfig) -> list[Candidate]:
    """One Candidate per spec and grid combination, estimators checked to resolve."""
    return [c for spec in config.candidates for c in _grid_points(spec)]


def _grid_points(spec: CandidateSpec) -> list[Candidate]:
    resolve_estimator(spec.estimator, spec.name)
    keys = sorted(spec.grid)
    combos = itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]
    return [
        Candidate(
            name=spec.name + "".join(f"[{k}={v}]" for k, v in zip(keys, combo, strict=True)),
            estimator=spec.estimator,
            params={**spec.params, **dict(zip(keys, combo, strict=True))},
        )
        for combo in combos
    ]


def resolve_estimator(path: str, candidate: str = "?") -> type[BaseEstimator]:
    """The estimator class a config names; ``InvalidInput`` names the candidate otherwise."""
    cls = _sklearn_estimators().get(path) if "." not in path else _import(path, candidate)
    if cls is None:
        raise InvalidInput(
            f"candidate {candidate!r}: estimator {path!r} is not a scikit-learn estimator "
            "name; use a class name like LogisticRegression or a dotted path"
        )
    if not (isinstance(cls, type) and hasattr(cls, "fit")):
        raise InvalidInput(f"candidate {candidate!r}: {path!r} is not an estimator class")
    return cls


def _import(path: str, candidate: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"candidate {candidate!r}: cannot import {path!r} ({exc})") from None


@functools.cache  # walks every scikit-learn module: about 0.25 s a call
def _sklearn_estimators() -> dict[str, type[BaseEstimator]]:
    return dict(all_estimators())
