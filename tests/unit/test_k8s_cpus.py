"""Thread pools follow the container's CPU limit (the cgroup quota), not the node's CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.cpus import available_cpus, cpu_quota


def test_a_v2_quota_caps_the_affinity_mask_rounded_up(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # limits.cpu: 1500m
    assert cpu_quota(tmp_path) == 1.5
    assert available_cpus(tmp_path) == 2


def test_no_quota_leaves_the_affinity_mask(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) == 3
    assert available_cpus(tmp_path / "absent") == 3


def test_a_v1_quota_is_read_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 2


def test_a_tiny_quota_still_gives_one_cpu(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    (tmp_path / "cpu.max").write_text("10000 100000\n")  # 100m
    assert available_cpus(tmp_path) == 1


def test_training_sizes_its_threads_from_it() -> None:
    source = (Path(__file__).resolve().parents[2] / "training" / "trainer.py").read_text()
    assert "available_cpus() // workers" in source
    assert "os.cpu_count()" not in source
