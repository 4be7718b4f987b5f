"""The training reference kept with each model: what its inputs and predictions looked like.

Training calls ``input_references`` once per run (on a seeded sample of the training rows)
and ``model_reference`` once per candidate, and stores the result in the model's metadata
under ``"reference"`` (plain JSON: the store signs the artifact, the metadata needs no
signature of its own). Monitoring reads it back with ``references_from``. Example::

    rows = reference_rows(X_train)                          # at most 20,000, seeded
    inputs = input_references(rows)                         # once per training run
    metadata["reference"] = model_reference(model, rows, inputs)
    refs = references_from(metadata)                        # {"amount": Reference, ...,
                                                            #  "__prediction__": Reference}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from monitoring.drift import PREDICTION, Reference, reference_of

REFERENCE_ROWS = 20_000
"""Training rows the reference is built from (a seeded sample when there are more)."""
PREDICTION_ROWS = 5_000
"""Of those, the rows predicted for the predictions' reference (a predict per candidate
costs training time; 5,000 rows bin the scores well enough)."""
KS_SAMPLE = 2_000
"""Values per input kept for the KS test."""
BINS = 10


def reference_rows(X: pd.DataFrame, rows: int = REFERENCE_ROWS, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of at most ``rows`` training rows."""
    return X if len(X) <= rows else X.sample(rows, random_state=seed)


def input_references(rows: pd.DataFrame, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """The JSON reference of every numeric input column."""
    numeric = rows.select_dtypes(include=["number", "bool"])
    return {str(name): reference_of(numeric[name].to_numpy(dtype=np.float64), bins=BINS,
                                    sample_size=KS_SAMPLE, seed=seed).to_json()
            for name in numeric.columns}


def scores_of(model: Any, rows: pd.DataFrame) -> np.ndarray:
    """What scoring reports as a row's score: the last class's probability, else predict."""
    if hasattr(model, "predict_proba"):
        return np.asarray(model.predict_proba(rows))[:, -1]
    return np.asarray(model.predict(rows), dtype=np.float64)


def model_reference(
    model: Any, rows: pd.DataFrame, inputs: Mapping[str, Any], seed: int = 0
) -> dict[str, Any]:
    """The JSON reference of one model: its inputs', its predictions' and its classes."""
    predictions = reference_of(scores_of(model, rows.iloc[:PREDICTION_ROWS]), bins=BINS,
                               sample_size=KS_SAMPLE, seed=seed)
    classes = [str(c) for c in getattr(model, "classes_", [])]
    return {"bins": BINS, "rows": int(len(rows)),
            "prediction_rows": int(min(len(rows), PREDICTION_ROWS)), "inputs": dict(inputs),
            "prediction": predictions.to_json(), "classes": classes}


def references_from(metadata: Mapping[str, Any]) -> dict[str, Reference]:
    """Every input's reference and the predictions' (under ``PREDICTION``); {} if none."""
    stored = metadata.get("reference") or {}
    references = {name: Reference.from_json(data)
                  for name, data in (stored.get("inputs") or {}).items()}
    if stored.get("prediction"):
        references[PREDICTION] = Reference.from_json(stored["prediction"])
    return references


def classes_from(metadata: Mapping[str, Any]) -> list[str]:
    """The model's classes as labels, as stored with its reference ([] if unknown)."""
    return list((metadata.get("reference") or {}).get("classes") or [])
