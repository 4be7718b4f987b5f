"""Evaluate trained candidates against each other and the champion, in one pure call.

The Model Evaluation Service loads the models and the test part, calls
``evaluate_candidates`` and turns the report into ``ModelReady`` or ``ModelRejected``.
Example::

    report = evaluate_candidates({"m1": lr, "m2": forest}, champion, X_test, y_test, config)
    if report.accepted:
        promote(report.chosen_id, report.candidates[report.chosen_id], report.curves)
    else:
        reject(report.reasons())

Candidates are gated best first by ``config.metric``; the first one that passes is chosen,
so a slightly weaker model that meets the latency budget wins over a stronger one that does
not. When none passes, the best by the metric is reported with its rejection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from common.errors import InvalidInput
from evaluation.gate import EvaluationConfig, GateDecision, gate, measure_latency, rank_candidates
from evaluation.metrics import Outputs, applicable, curves, evaluate, is_binary

if TYPE_CHECKING:
    from distributed import Client

CHAMPION = "\0champion"
"""The champion's key beside the candidates' ids (no model id holds a NUL)."""


class EvaluationReport(BaseModel):
    """Everything evaluation learned about one set of candidates, JSON-ready."""

    model_config = ConfigDict(frozen=True)

    metric: str
    """The metric candidates were ranked and gated on."""
    candidates: dict[str, dict[str, float]]
    """Each candidate's metrics on the test data."""
    ranking: list[str]
    """Candidate ids, best first by ``metric``."""
    chosen_id: str
    """The first candidate in ``ranking`` that passed the gate, else the best one."""
    decision: GateDecision
    """The gate's decision on ``chosen_id``."""
    decisions: dict[str, GateDecision]
    """The gate's decision on each candidate gated, in ranking order."""
    latency: dict[str, dict[str, float]]
    """Measured latency of each candidate gated."""
    champion_metrics: dict[str, float] | None = None
    """The champion's metrics on the same test data; None without a champion."""
    curves: dict[str, dict[str, list[float]]] | None = None
    """ROC and PR curves of the chosen candidate (binary classifiers only)."""

    @property
    def accepted(self) -> bool:
        """Whether the chosen candidate passed the gate."""
        return self.decision.accepted

    def reasons(self) -> list[str]:
        """Every rejection reason, each prefixed with the candidate's id."""
        return [
            f"{model_id}: {reason}"
            for model_id, decision in self.decisions.items()
            for reason in decision.reasons
        ]


def evaluate_candidates(
    candidates: dict[str, Any],
    champion: Any | None,
    X_test: Any,
    y_test: Any,
    config: EvaluationConfig,
    client: Client | None = None,
) -> EvaluationReport:
    """Score every candidate and the champion on the same data, gate them best first.

    With a Dask ``client``, (X_test, y_test) are Dask collections and the metrics are
    computed partition by partition on the cluster (evaluation/partitioned.py); the
    latency check runs here on the first ``config.batch_size`` rows."""
    if not candidates:
        raise InvalidInput("there are no candidates to evaluate")
    if client is not None:
        scores, champion_metrics, curves_of, rows = _measured_on_cluster(
            candidates, champion, X_test, y_test, config, client)
    else:
        # Each candidate predicts the test rows once, for its metrics and, if chosen, curves.
        outputs = {key: Outputs(model, X_test) for key, model in candidates.items()}
        scores = {key: _score(model, X_test, y_test, config, outputs[key])
                  for key, model in candidates.items()}
        champion_metrics = None if champion is None else _score(champion, X_test, y_test, config)

        def curves_of(key: str) -> Any:
            return _curves(candidates[key], X_test, y_test, outputs[key])

        rows = X_test
    ranking = rank_candidates(scores, config.metric)
    decisions, latency = _gate_in_order(
        ranking, candidates, scores, champion_metrics, rows, config
    )
    chosen = next((key for key, decision in decisions.items() if decision.accepted), ranking[0])
    return EvaluationReport(
        metric=config.metric, candidates=scores, ranking=ranking, chosen_id=chosen,
        decision=decisions[chosen], decisions=decisions, latency=latency,
        champion_metrics=champion_metrics, curves=curves_of(chosen),
    )


def _measured_on_cluster(
    candidates: dict[str, Any], champion: Any | None, X_test: Any, y_test: Any,
    config: EvaluationConfig, client: Client,
) -> tuple[dict[str, dict[str, float]], dict[str, float] | None, Callable[[str], Any], Any]:
    """Scores, the champion's metrics, the curves and the latency rows, from the cluster."""
    from evaluation.partitioned import measure_partitioned  # the Dask path only

    models = {**candidates, **({CHAMPION: champion} if champion is not None else {})}
    measured = measure_partitioned(
        models, X_test, y_test, {key: metrics_for(m, config) for key, m in models.items()},
        client)
    scores = {key: measured[key].metrics for key in candidates}
    champion_metrics = measured[CHAMPION].metrics if champion is not None else None
    rows = client.compute(X_test.head(config.batch_size, npartitions=-1, compute=False),
                          sync=True)
    return scores, champion_metrics, lambda key: measured[key].curves, rows


def metrics_for(model: Any, config: EvaluationConfig) -> list[str]:
    """The metrics to report for a model: the configured ones or all that fit, gate metric first."""
    names = config.report_metrics if config.report_metrics is not None else applicable(model)
    return [config.metric, *(name for name in names if name != config.metric)]


def _score(
    model: Any, X_test: Any, y_test: Any, config: EvaluationConfig,
    outputs: Outputs | None = None,
) -> dict[str, float]:
    return evaluate(model, X_test, y_test, metrics_for(model, config), outputs)


def _gate_in_order(
    ranking: list[str],
    candidates: dict[str, Any],
    scores: dict[str, dict[str, float]],
    champion_metrics: dict[str, float] | None,
    X_test: Any,
    config: EvaluationConfig,
) -> tuple[dict[str, GateDecision], dict[str, dict[str, float]]]:
    decisions: dict[str, GateDecision] = {}
    latency: dict[str, dict[str, float]] = {}
    for key in ranking:
        latency[key] = measure_latency(
            candidates[key], X_test, config.batch_size, config.latency_repeats,
            config.batch_repeats,
        )
        decisions[key] = gate(scores[key], champion_metrics, latency[key], config)
        if decisions[key].accepted:
            break
    return decisions, latency


def _curves(
    model: Any, X_test: Any, y_test: Any, outputs: Outputs
) -> dict[str, dict[str, list[float]]] | None:
    if not (is_binary(model) and hasattr(model, "predict_proba")):
        return None
    return curves(model, X_test, y_test, outputs=outputs)
