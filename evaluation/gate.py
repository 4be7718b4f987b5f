"""The evaluation gate: rank candidates, time them, and accept or reject against the champion.

Pure: metrics and latencies in, a decision with readable reasons out. Example::

    config = EvaluationConfig(metric="average_precision", minimum=0.5, max_regression=0.02,
                              latency_budget_single_ms=5.0)
    best = best_candidate({"m1": {"average_precision": 0.8}, "m2": {...}}, config.metric)
    latency = measure_latency(model, X_test, batch_size=config.batch_size)
    decision = gate(scores[best], champion_scores, latency, config)
    decision.reasons   # ["average_precision 0.41 below the minimum 0.5", ...]

Bounds are literal (``minimum`` is a floor, ``maximum`` a ceiling, whatever the metric's
direction); ``max_regression`` is an absolute drop from the champion in the metric's own
direction (a rise, for lower-is-better metrics such as rmse).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator
from threadpoolctl import threadpool_limits

from common.errors import InvalidInput
from evaluation.metrics import get_evaluator, higher_is_better

# Metric arithmetic in floats: 0.85 - 0.83 is 0.020000000000000018, which is no regression
# beyond an allowed 0.02.
TOLERANCE = 1e-9
DEFAULT_BATCH_REPEATS = 20
"""Batch calls timed by default: a median of 20 is steady (100 cost ~0.2 s per check)."""


class EvaluationConfig(BaseModel):
    """The gate a candidate must pass to become the champion."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    metric: str = "average_precision"
    """The metric candidates are ranked and gated on."""
    report_metrics: list[str] | None = None
    """Metrics reported for each model; None means every metric that fits the model."""
    minimum: float | None = None
    """Reject a candidate whose metric is below this (None: no floor)."""
    maximum: float | None = None
    """Reject a candidate whose metric is above this; for lower-is-better metrics (None: none)."""
    max_regression: float = Field(default=0.0, ge=0)
    """Allowed absolute worsening of the metric from the champion's, on the same test data."""
    latency_budget_single_ms: float | None = Field(default=None, ge=0)
    """Reject a candidate whose single-row predict p99 exceeds this (None: not checked)."""
    latency_budget_batch_row_ms: float | None = Field(default=None, ge=0)
    """Reject a candidate whose batch predict time per row exceeds this (None: not checked)."""
    batch_size: int = Field(default=256, ge=1)
    """Rows per batch in the latency check."""
    latency_repeats: int = Field(default=100, ge=1)
    """Timed single-row calls in the latency check (their p99 is gated: about 100 needed)."""
    latency_batch_repeats: int | None = Field(default=None, ge=1)
    """Timed batch calls (their median is gated, so fewer do); None: the smaller of
    ``latency_repeats`` and 20."""

    @property
    def batch_repeats(self) -> int:
        """How many batch calls the latency check times."""
        if self.latency_batch_repeats is not None:
            return self.latency_batch_repeats
        return min(self.latency_repeats, DEFAULT_BATCH_REPEATS)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        _known(metric)
        return metric

    @field_validator("report_metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str] | None) -> list[str] | None:
        for metric in metrics or []:
            _known(metric)
        return metrics


def _known(metric: str) -> None:
    try:
        get_evaluator(metric)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


class GateDecision(BaseModel):
    """Whether a candidate passed the gate, and every reason it did not."""

    model_config = ConfigDict(frozen=True)

    accepted: bool
    reasons: list[str] = Field(default_factory=list)


def rank_candidates(scores: dict[str, dict[str, float]], metric: str) -> list[str]:
    """Model ids best first by ``metric`` in its direction; ties by id, NaN scores last."""
    sign = -1.0 if higher_is_better(metric) else 1.0

    def key(model_id: str) -> tuple[bool, float, str]:
        value = _value(scores[model_id], metric, model_id)
        missing = math.isnan(value)
        return missing, 0.0 if missing else sign * value, model_id

    return sorted(scores, key=key)


def best_candidate(scores: dict[str, dict[str, float]], metric: str) -> str:
    """The id of the best model by ``metric``, respecting its direction; ties go to the lower id."""
    ranking = rank_candidates(scores, metric)
    if not ranking or math.isnan(float(scores[ranking[0]][metric])):
        raise InvalidInput(f"no candidate has a {metric} score to choose by")
    return ranking[0]


def _value(metrics: dict[str, float], metric: str, who: str) -> float:
    try:
        return float(metrics[metric])
    except KeyError:
        raise InvalidInput(f"{who} has no {metric} score (it has {sorted(metrics)})") from None


def measure_latency(
    model: Any, X: Any, batch_size: int = 256, repeats: int = 100,
    batch_repeats: int | None = None,
) -> dict[str, float]:
    """Timings of the call scoring makes (``predict_proba`` if the model has it, else
    ``predict``): p50 and p99 of ``repeats`` single-row calls over rows of ``X`` in turn,
    and the median batch-call time per row of ``batch_repeats`` (default ``repeats``) calls
    on ``batch_size`` rows (fewer if ``X`` is smaller). One untimed call warms it up first.

    Timed with native thread pools limited to one thread, as the scoring service runs
    each request: OpenMP start-up on a busy machine otherwise dominates single-row calls.
    """
    predict = getattr(model, "predict_proba", None) or model.predict
    batch = _rows(X, 0, min(batch_size, len(X)))
    with threadpool_limits(limits=1):
        predict(batch)
        single = [_time(predict, _rows(X, i % len(X), i % len(X) + 1)) for i in range(repeats)]
        batched = [_time(predict, batch) for _ in range(batch_repeats or repeats)]
    return {
        "single_p50_ms": float(np.percentile(single, 50)),
        "single_p99_ms": float(np.percentile(single, 99)),
        "batch_row_ms": float(np.median(batched)) / len(batch),
    }


def _rows(X: Any, start: int, stop: int) -> Any:
    return X.iloc[start:stop] if isinstance(X, pd.DataFrame | pd.Series) else X[start:stop]


def _time(call: Callable[[Any], Any], rows: Any) -> float:
    started = time.perf_counter_ns()
    call(rows)
    return (time.perf_counter_ns() - started) / 1e6


def gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    latency: dict[str, float] | None,
    config: EvaluationConfig,
) -> GateDecision:
    """Accept the candidate only if its metric meets the bounds, does not regress from the
    champion's (same test data) by more than allowed, and its latency fits the budgets."""
    value = _value(candidate, config.metric, "the candidate")
    reasons = _bounds(value, config)
    if champion is not None and not math.isnan(value):
        reasons += _regression(value, _value(champion, config.metric, "the champion"), config)
    reasons += _latency(latency, config)
    return GateDecision(accepted=not reasons, reasons=reasons)


def _bounds(value: float, config: EvaluationConfig) -> list[str]:
    name = config.metric
    if math.isnan(value):
        return [f"{name} is not a number"]
    reasons = []
    if config.minimum is not None and value < config.minimum:
        reasons.append(f"{name} {_num(value)} below the minimum {_num(config.minimum)}")
    if config.maximum is not None and value > config.maximum:
        reasons.append(f"{name} {_num(value)} above the maximum {_num(config.maximum)}")
    return reasons


def _regression(value: float, champion: float, config: EvaluationConfig) -> list[str]:
    worse_by = champion - value if higher_is_better(config.metric) else value - champion
    if math.isnan(champion) or worse_by <= config.max_regression + TOLERANCE:
        return []
    return [
        f"{config.metric} {_num(value)} regresses {_num(worse_by)} from the champion's "
        f"{_num(champion)} (allowed {_num(config.max_regression)})"
    ]


_LATENCY_WORDING = {
    "single_p99_ms": "single-row latency p99 {} ms",
    "batch_row_ms": "batch latency {} ms per row",
}


def _latency(latency: dict[str, float] | None, config: EvaluationConfig) -> list[str]:
    budgets = {
        "single_p99_ms": config.latency_budget_single_ms,
        "batch_row_ms": config.latency_budget_batch_row_ms,
    }
    set_budgets = {key: budget for key, budget in budgets.items() if budget is not None}
    if not set_budgets:
        return []
    if latency is None:
        raise InvalidInput("latency budgets are set but no latency was measured")
    return [
        f"{_LATENCY_WORDING[key].format(_num(latency[key]))} over the budget {_num(budget)} ms"
        for key, budget in set_budgets.items()
        if latency[key] > budget
    ]


def _num(value: float) -> str:
    return f"{value:.4g}"
