"""The PaySim pipeline as one plain single-process script: pandas and scikit-learn, no broker.

The baseline of ``bench/pipeline.py``: the same steps as the four services, with the same
libraries and the same ``config/pipeline.yaml``, and nothing else (no stores, no events,
no signing, no online features, no latency gate):

1. read the CSV with ``pandas.read_csv``;
2. type it per the dataset contract (``astype`` / ``to_datetime``; a bad value raises);
3. split the rows: sequential 80 % for train, as the config says (plain ``iloc``);
4. fit the feature pipeline on the train rows and transform every row. This step reuses
   ``preparation.build_pipeline``: the feature transforms *are* the library, so the plain
   script calls it as a notebook would (entity aggregates, balance errors, one-hot,
   ``SelectKBest(chi2)``...);
5. train the candidates of the config (scikit-learn classes by name) with the same
   parallelism as the training service: ``training.workers`` (2) worker processes, one
   candidate each, here through ``joblib.Parallel`` (``--sequential`` trains one after the
   other instead);
6. evaluate each candidate with ``sklearn.metrics`` on the test rows (the configured
   report metrics) and pick the best by the configured metric.

Importable (``run(csv_path)``) and runnable alone::

    .venv/bin/python bench/plain_pipeline.py bench/.work/paysim-1000000-7.csv [--json out.json]

Timings exclude the interpreter start and imports (the services are warm when timed too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import joblib
import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.utils import all_estimators

from app.config import PipelineConfig, load_pipeline_config
from preparation import build_pipeline

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "pipeline.yaml"
PANDAS_TYPES = {"int": "int64", "float": "float64", "string": "string", "category": "category",
                "bool": "bool"}
T = TypeVar("T")


class Steps:
    """Wall-clock seconds of each named step, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - started, 3)
        return result


def typed(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """The contract's columns converted to their types (a value that does not fit raises)."""
    converted = {
        name: pd.to_datetime(frame[name], utc=True, format="ISO8601") if kind == "datetime"
        else frame[name].astype(PANDAS_TYPES[kind])
        for name, kind in columns.items()
    }
    return frame.assign(**converted)


def train_cut(rows: int, ratio: float) -> int:
    """Rows in the train part: the sequential split's rule (ratio of rows, nearest row)."""
    return int(np.floor(ratio * rows + 0.5))


def estimators(config: PipelineConfig) -> dict[str, Any]:
    """One unfitted scikit-learn estimator per candidate, by name (no grids in the config)."""
    classes = dict(all_estimators())
    return {c.name: classes[c.estimator](**c.params) for c in config.training.candidates}


def _fit(model: Any, X: pd.DataFrame, y: pd.Series) -> tuple[Any, float]:
    started = time.perf_counter()
    model.fit(X, y)
    return model, time.perf_counter() - started


def train(models: dict[str, Any], X: pd.DataFrame, y: pd.Series, workers: int) -> dict[str, Any]:
    """Fit every model, ``workers`` processes at a time (1: in this process)."""
    if workers == 1:
        fitted = [_fit(model, X, y) for model in models.values()]
    else:
        fitted = joblib.Parallel(n_jobs=min(workers, len(models)))(
            joblib.delayed(_fit)(model, X, y) for model in models.values()
        )
    pairs = zip(models, fitted, strict=True)
    return {name: {"model": model, "fit_s": round(s, 3)} for name, (model, s) in pairs}


def scores(model: Any, X: pd.DataFrame, y: pd.Series, names: list[str]) -> dict[str, float]:
    """The named metrics of a binary classifier, straight from ``sklearn.metrics``."""
    predicted, proba = model.predict(X), model.predict_proba(X)
    positive = model.classes_[1]
    truth, p1 = (np.asarray(y) == positive).astype(int), proba[:, 1]
    binary = {"pos_label": positive, "zero_division": 0}
    table: dict[str, Callable[[], float]] = {
        "accuracy": lambda: skm.accuracy_score(y, predicted),
        "balanced_accuracy": lambda: skm.balanced_accuracy_score(y, predicted),
        "precision": lambda: skm.precision_score(y, predicted, **binary),
        "recall": lambda: skm.recall_score(y, predicted, **binary),
        "f1": lambda: skm.f1_score(y, predicted, **binary),
        "roc_auc": lambda: skm.roc_auc_score(truth, p1),
        "average_precision": lambda: skm.average_precision_score(truth, p1),
        "cohen_kappa": lambda: skm.cohen_kappa_score(y, predicted),
        "log_loss": lambda: skm.log_loss(y, proba, labels=model.classes_),
        "brier": lambda: skm.brier_score_loss(truth, p1),
    }
    return {name: float(table[name]()) for name in names}


def evaluate(trained: dict[str, Any], X: pd.DataFrame, y: pd.Series,
             config: PipelineConfig) -> dict[str, Any]:
    """Every candidate's metrics and the best one by the configured metric."""
    metric = config.evaluation.metric
    names = [metric, *(m for m in config.evaluation.report_metrics or [] if m != metric)]
    found = {name: scores(t["model"], X, y, names) for name, t in trained.items()}
    lower_is_better = metric in ("log_loss", "brier")
    best = (min if lower_is_better else max)(found, key=lambda name: found[name][metric])
    return {"metric": metric, "candidates": found, "champion": best}


def run(csv_path: str | Path, config_path: str | Path = DEFAULT_CONFIG,
        workers: int | None = None) -> dict[str, Any]:
    """Run the whole pipeline on one CSV; returns timings, the champion and its metrics."""
    config = load_pipeline_config(config_path)
    spec, (dataset,) = config.features, config.features.inputs
    workers = config.training.workers if workers is None else workers
    steps = Steps()
    started = time.perf_counter()
    frame = steps.time("read_csv", lambda: pd.read_csv(csv_path))
    frame = steps.time("type", lambda: typed(frame, config.datasets[dataset].columns))
    cut = train_cut(len(frame), config.split.ratio)
    train_rows = steps.time("split_rows", lambda: frame.iloc[:cut])
    fitted = steps.time("fit_features", lambda: build_pipeline(spec).fit(train_rows))
    features = steps.time("transform", lambda: fitted.transform(frame))
    names, label = list(fitted.feature_names), spec.label
    X_train, y_train = features.iloc[:cut][names], features.iloc[:cut][label]
    X_test, y_test = features.iloc[cut:][names], features.iloc[cut:][label]
    trained = steps.time("train", lambda: train(estimators(config), X_train, y_train, workers))
    report = steps.time("evaluate", lambda: evaluate(trained, X_test, y_test, config))
    total = round(time.perf_counter() - started, 3)
    return {
        "total_s": total, "steps_s": steps.seconds, "rows": len(frame),
        "train_rows": cut, "test_rows": len(frame) - cut, "features": names,
        "training": {"workers": workers, "how": "sequential" if workers == 1 else
                     f"{workers} joblib (loky) worker processes, one candidate each",
                     "fit_s": {name: t["fit_s"] for name, t in trained.items()}},
        **report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("csv", type=Path, help="PaySim CSV (see common.datasets.paysim)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--sequential", action="store_true",
                        help="train the candidates one after the other, in this process")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.csv, args.config, 1 if args.sequential else None)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()
