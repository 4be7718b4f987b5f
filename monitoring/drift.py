"""Drift of live values from a training reference: PSI over reference bins, and the KS test.

Pure functions over numpy arrays. At training, ``reference_of`` (``common.reference``)
summarises each model input (and the predictions on the training rows) as a
``Reference``: bin cut points, the share of reference values in each bin, and a bounded
seeded sample for the two-sample Kolmogorov-Smirnov test. Live values are then compared
with it::

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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import ks_2samp

# The reference's format is shared with training (common.reference); its names stay
# importable from here, where drift is measured against it.
from common.reference import (  # noqa: F401 - re-exported
    PREDICTION,
    Reference,
    cut_points,
    finite,
    proportions,
    reference_of,
)

Level = Literal["none", "warn", "alert"]
LEVELS: tuple[Level, ...] = ("none", "warn", "alert")


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

