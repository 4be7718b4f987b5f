"""The training reference kept with each model: what its inputs and predictions looked like.

Training writes it and monitoring reads it, so the format lives here, below both stages
(like the events). Training calls ``input_references`` once per run (on a seeded sample of
the training rows) and ``model_reference`` once per candidate, and stores the result in
the model's metadata under ``"reference"`` (plain JSON: the store signs the artifact, the
metadata needs no signature of its own). Monitoring reads it back with
``references_from`` and compares live values with it (``monitoring.drift``). Example::

    rows = reference_rows(X_train)                          # at most 20,000, seeded
    inputs = input_references(rows)                         # once per training run
    metadata["reference"] = model_reference(model, rows, inputs)
    refs = references_from(metadata)                        # {"amount": Reference, ...,
                                                            #  "__prediction__": Reference}

One input's ``Reference`` (``reference_of``): cut points from the training values'
deciles (constant and discrete inputs get one bin per value, plus one below and one
above), the share of training values in each bin, and a bounded seeded sample for the
two-sample Kolmogorov-Smirnov test.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

PREDICTION = "__prediction__"
"""The key of the predictions among the inputs of a model's reference and drift report."""

REFERENCE_ROWS = 20_000
"""Training rows the reference is built from (a seeded sample when there are more)."""
PREDICTION_ROWS = 5_000
"""Of those, the rows predicted for the predictions' reference (a predict per candidate
costs training time; 5,000 rows bin the scores well enough)."""
KS_SAMPLE = 2_000
"""Values per input kept for the KS test."""
BINS = 10


@dataclass(frozen=True)
class Reference:
    """One input's training distribution: bin cut points, shares and a KS sample."""

    cuts: np.ndarray
    """Bin ``i`` holds ``cuts[i-1] < x <= cuts[i]``; the first and last bins are open."""
    proportions: np.ndarray
    """Share of reference values in each of the ``len(cuts) + 1`` bins."""
    sample: np.ndarray
    """A seeded sample of reference values for the KS test."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (for the model's metadata), exact: the sample as base64 of
        its float64 bytes (a third the size of decimal text, and no rounding, which would
        make saturated predictions like 1 - 1e-9 look drifted to the KS test)."""
        return {"cuts": self.cuts.tolist(), "proportions": self.proportions.tolist(),
                "sample": base64.b64encode(self.sample.astype("<f8").tobytes()).decode()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        """The reference ``to_json`` wrote."""
        sample = np.frombuffer(base64.b64decode(data["sample"]), dtype="<f8")
        return cls(np.asarray(data["cuts"], dtype=np.float64),
                   np.asarray(data["proportions"], dtype=np.float64), sample.astype(np.float64))


def cut_points(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Bin cut points of the reference: deciles, or one bin per value when few values.

    A constant or discrete input (at most ``bins`` distinct values) gets a cut just below
    its smallest value and one at each value, so a value never seen in training (below,
    between or above) lands in a bin of its own and a shifted constant shows.
    """
    distinct = np.unique(values)
    if len(distinct) == 0:
        return np.empty(0)
    if len(distinct) <= bins:
        return np.concatenate(([np.nextafter(distinct[0], -np.inf)], distinct))
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(quantiles)


def proportions(cuts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin of ``cuts`` (all zeros when there are none)."""
    counts = np.bincount(np.searchsorted(cuts, values, side="left"), minlength=len(cuts) + 1)
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def reference_of(
    values: np.ndarray, *, bins: int = 10, sample_size: int = 2_000, seed: int = 0
) -> Reference:
    """The reference of one input from its training values (non-finite ones dropped)."""
    values = finite(values)
    cuts = cut_points(values, bins)
    rng = np.random.default_rng(seed)
    sample = values if len(values) <= sample_size else rng.choice(values, sample_size,
                                                                   replace=False)
    return Reference(cuts, proportions(cuts, values), np.sort(sample))


def finite(values: np.ndarray) -> np.ndarray:
    """The finite values of an array, as float64."""
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


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
