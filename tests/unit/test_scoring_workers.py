"""How many scoring workers a container gets: its affinity mask, capped by a cgroup quota."""

from __future__ import annotations

from pathlib import Path

import pytest

from scoring import workers


@pytest.fixture
def cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cgroup files under tmp_path instead of /sys/fs/cgroup (none written yet)."""
    monkeypatch.setattr(workers, "CGROUP_V2_CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(workers, "CGROUP_V1_QUOTA", tmp_path / "cpu.cfs_quota_us")
    monkeypatch.setattr(workers, "CGROUP_V1_PERIOD", tmp_path / "cpu.cfs_period_us")
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    return tmp_path


def test_without_a_quota_the_affinity_mask_decides(cgroup: Path) -> None:
    assert workers.cgroup_cpu_quota() is None
    assert workers.available_cpus() == 4


def test_an_unlimited_v2_quota_leaves_the_mask(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert workers.available_cpus() == 4


def test_a_v2_quota_caps_the_workers_rounded_up(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("150000 100000\n")  # a limit of 1.5 CPUs
    assert workers.cgroup_cpu_quota() == 1.5
    assert workers.available_cpus() == 2


def test_a_v1_quota_caps_the_workers(cgroup: Path) -> None:
    (cgroup / "cpu.cfs_quota_us").write_text("100000\n")
    (cgroup / "cpu.cfs_period_us").write_text("100000\n")
    assert workers.available_cpus() == 1


def test_a_v1_quota_of_minus_one_is_unlimited(cgroup: Path) -> None:
    (cgroup / "cpu.cfs_quota_us").write_text("-1\n")
    (cgroup / "cpu.cfs_period_us").write_text("100000\n")
    assert workers.available_cpus() == 4


def test_a_quota_above_the_mask_does_not_add_cpus(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("800000 100000\n")
    assert workers.available_cpus() == 4


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one scoring worker"):
        workers.WorkerPool(0, lambda slot: None)
