"""Conveyor evaluation: the evaluators library and the gate (pure; the service wraps them).

Example::

    from evaluation import EvaluationConfig, evaluate, evaluate_candidates
    evaluate(model, X_test, y_test, ["roc_auc", "f1"])
    report = evaluate_candidates({"m1": m1, "m2": m2}, champion, X_test, y_test,
                                 EvaluationConfig(metric="average_precision", minimum=0.5))
"""

from evaluation.gate import (
    EvaluationConfig,
    GateDecision,
    best_candidate,
    gate,
    measure_latency,
    rank_candidates,
)
from evaluation.metrics import EVALUATORS, Evaluator, curves, evaluate, get_evaluator, register
from evaluation.report import EvaluationReport, evaluate_candidates

__all__ = [
    "EVALUATORS",
    "EvaluationConfig",
    "EvaluationReport",
    "Evaluator",
    "GateDecision",
    "best_candidate",
    "curves",
    "evaluate",
    "evaluate_candidates",
    "gate",
    "get_evaluator",
    "measure_latency",
    "rank_candidates",
    "register",
]
