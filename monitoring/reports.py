"""Monitoring reports over time: one Parquet file per drift measurement of a version.

Each measurement becomes ``monitoring/<version>/window-<served>.parquet`` under the data
root (any fsspec URL), ``served`` being the version's total scores when it was taken, so
the names sort in time. One row per input (and ``__prediction__``) with its PSI, KS
statistic and p-value, level, live count and live shares of the reference bins, beside
the version's serving figures at that moment. Example::

    reports = Reports(settings.data_root)
    reports.write(finding, figures={"served": 12_000, "latency_p99_ms": 4.1})
    reports.read("v3")      # every window of v3 as one DataFrame, oldest first
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pandas as pd

from common.events import utc_now
from common.stores._fs import DataRoot, check_id
from monitoring.core import DriftFinding


def report_frame(
    finding: DriftFinding, figures: Mapping[str, Any], at: datetime | None = None
) -> pd.DataFrame:
    """One row per measured input, with the version's figures on each row."""
    rows = [
        {"model_version": finding.version, "at": at or utc_now(), "served": finding.served,
         "input": name, "psi": d.psi, "ks_statistic": d.ks_statistic,
         "ks_pvalue": d.ks_pvalue, "live_count": d.live_count, "level": d.level,
         "model_level": finding.report.level, "live_shares": list(d.shares)}
        for name, d in finding.report.inputs.items()
    ]
    frame = pd.DataFrame(rows, columns=["model_version", "at", "served", "input", "psi",
                                        "ks_statistic", "ks_pvalue", "live_count", "level",
                                        "model_level", "live_shares"])
    for name, value in figures.items():
        if name not in frame.columns and isinstance(value, int | float | str):
            frame[name] = value
    return frame


class Reports:
    """Drift reports of every version under a data root."""

    def __init__(self, data_root: str) -> None:
        self.root = DataRoot(data_root)

    def write(self, finding: DriftFinding, figures: Mapping[str, Any]) -> str:
        """Write one measurement; returns its path under the data root."""
        path = (f"monitoring/{check_id('model version', finding.version)}/"
                f"window-{finding.served:012d}.parquet")
        with self.root.atomic_open(path) as handle:
            report_frame(finding, figures).to_parquet(handle, index=False)
        return path

    def read(self, version: str) -> pd.DataFrame:
        """Every measurement of a version, oldest first (empty if none)."""
        paths = self.root.glob(f"monitoring/{check_id('model version', version)}/window-*.parquet")
        frames = [pd.read_parquet(self.root.open(path)) for path in paths]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
