"""Drift of live values from a training reference: PSI over reference bins, and the KS test.

Pure functions over numpy arrays. At training, ``reference_of`` summarises each model
input (and the predictions on the training rows) as a ``Reference``: cut points from the
reference's deciles (constant and discrete inputs get one bin per value, plus one below
and one above), the share of reference values in each bin, and a bounded seeded sample
for the two-sample Kolmogorov-Smirnov test. Live values are then compared with it::

    ref = reference_of(train["amount"].to_numpy(), sample_size=2_000, seed=0)
    result = drift_of(ref, live_amounts, DriftThresholds())
    result.psi, result.ks_statistic, result.level        # 0.31, 0.24, "alert"
    report = drift_report({"amount": ref}, {"amount": live_amounts}, DriftThresholds())
    report.level, report.psi                             # "alert", {"amount": 0.31}

PSI = sum over bins of (live - ref) * ln(live / ref), shares floored at ``epsilon`` so an
empty bin does not make it infinite. The level of one input is the worse of its PSI level
(``psi_warn``, ``psi_alert``) and its KS level (KS statistic at least ``ks_warn`` or
``ks_alert`` *and* p-value below ``ks_pvalue``: with thousands of live values a tiny,
harmless difference is already "significant", so the statistic must be large too).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import ks_2samp

Level = Literal["none", "warn", "alert"]
LEVELS: tuple[Level, ...] = ("none", "warn", "alert")
PREDICTION = "__prediction__"
"""The key of the predictions among the inputs of a model's reference and drift report."""


@dataclass(frozen=True)
class DriftThresholds:
    """When a PSI or a KS result counts as a warning or an alert."""

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    ks_warn: float = 0.1
    ks_alert: float = 0.2
    ks_pvalue: float = 0.01
    epsilon: float = 1e-4
    """Floor of a bin's share, so an empty bin costs a finite amount."""


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


@dataclass(frozen=True)
class InputDrift:
    """One input's drift: PSI, KS statistic and p-value, how many live values, level, and
    the live distribution (share of live values in each reference bin)."""

    psi: float
    ks_statistic: float
    ks_pvalue: float
    live_count: int
    level: Level
    shares: tuple[float, ...] = ()


@dataclass(frozen=True)
class DriftReport:
    """Drift of every input of a model; its level is the worst of theirs."""

    inputs: dict[str, InputDrift]

    @property
    def level(self) -> Level:
        """The worst level of any input ("none" when there are none)."""
        return worst(d.level for d in self.inputs.values())

    @property
    def psi(self) -> dict[str, float]:
        """PSI per input."""
        return {name: d.psi for name, d in self.inputs.items()}


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


def psi(reference: Reference, live: np.ndarray, epsilon: float = 1e-4) -> float:
    """Population stability index of live values against the reference's bins."""
    return psi_of_shares(reference.proportions, proportions(reference.cuts, finite(live)),
                         epsilon)


def psi_of_shares(expected: np.ndarray, actual: np.ndarray, epsilon: float = 1e-4) -> float:
    """PSI of live shares against reference shares of the same bins (floored at epsilon)."""
    expected, actual = np.maximum(expected, epsilon), np.maximum(actual, epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks(reference: Reference, live: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and p-value of live values against the reference sample."""
    live = finite(live)
    if not len(live) or not len(reference.sample):
        return 0.0, 1.0
    # The asymptotic p-value: within a few thousandths of the exact one at these sizes
    # (thousands of values), and four times faster.
    result = ks_2samp(reference.sample, live, method="asymp")
    return float(result.statistic), float(result.pvalue)


def drift_of(reference: Reference, live: np.ndarray, thresholds: DriftThresholds) -> InputDrift:
    """PSI and KS of one input, and the level they reach."""
    live = finite(live)
    shares = proportions(reference.cuts, live)
    value = psi_of_shares(reference.proportions, shares, thresholds.epsilon)
    statistic, pvalue = ks(reference, live)
    level = worst([_psi_level(value, thresholds), _ks_level(statistic, pvalue, thresholds)])
    return InputDrift(value, statistic, pvalue, len(live), level, tuple(shares.tolist()))


def drift_report(
    references: Mapping[str, Reference], live: Mapping[str, np.ndarray],
    thresholds: DriftThresholds, min_values: int = 1,
) -> DriftReport:
    """Drift of every input that has a reference and at least ``min_values`` live values
    (an input scoring did not report is not drift)."""
    return DriftReport({name: drift_of(references[name], values, thresholds)
                        for name, values in live.items()
                        if name in references and np.isfinite(values).sum() >= min_values})


def worst(levels: Any) -> Level:
    """The most severe of some levels ("none" for none)."""
    return max(levels, key=LEVELS.index, default="none")


def finite(values: np.ndarray) -> np.ndarray:
    """The finite values of an array, as float64."""
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _psi_level(value: float, thresholds: DriftThresholds) -> Level:
    if value >= thresholds.psi_alert:
        return "alert"
    return "warn" if value >= thresholds.psi_warn else "none"


def _ks_level(statistic: float, pvalue: float, thresholds: DriftThresholds) -> Level:
    if pvalue >= thresholds.ks_pvalue:
        return "none"
    if statistic >= thresholds.ks_alert:
        return "alert"
    return "warn" if statistic >= thresholds.ks_warn else "none"

