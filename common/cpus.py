"""How many CPUs this process may use: the affinity mask capped by the cgroup's CPU quota,
which is what a Kubernetes CPU limit sets (``os.cpu_count`` counts the node's CPUs, so a
pod limited to 2 CPUs on a 64-core node would start 64-thread pools). Example::

    threads = max(1, available_cpus() // workers)
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs of the affinity mask, capped by the cgroup CPU quota rounded up (at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of the cgroup's quota (v2 ``cpu.max``, else v1), None when unlimited."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup_root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None
