"""Tests of cgc_refine.device: the CPU thread count and seed validation (issue 13, items 1, 10)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import cgc_refine.device as device
from cgc_refine.config import ConfigError as ReexportedConfigError
from cgc_refine.device import MAX_SEED, available_cpus, cgroup_cpu_limit, check_seed, configure_threads
from cgc_refine.exceptions import CGCRefineError, ConfigError

REAL_BUSY_CPUS = device.busy_cpus  # the autouse fixture below replaces it with an idle machine


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    # Other processes on the test machine must not change the default thread count under test.
    monkeypatch.setattr(device, "busy_cpus", lambda: 0.0)
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------- threads


def _fake_cgroup(root: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = root.parent / f"{root.name}-self-cgroup"
    proc.write_text(membership)
    return root, proc


@pytest.mark.parametrize(("files", "membership", "expected"), [
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 2),  # v2, 1.5 CPUs -> 2
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # v2, no quota
    ({"cpu.max": "max 100000\n", "job/cpu.max": "100000 100000\n"}, "0::/job\n", 1),  # own cgroup
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "3:cpu:/\n", 1),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "3:cpu:/\n", None),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
      "cpu/box/cpu.cfs_quota_us": "300000\n", "cpu/box/cpu.cfs_period_us": "100000\n"},
     "4:cpu,cpuacct:/box\n", 3),
    ({}, "0::/\n", None),  # no cgroup files at all
])
def test_cgroup_cpu_limit(tmp_path, files, membership, expected):
    root, proc = _fake_cgroup(tmp_path / "cgroup", files, membership)
    assert cgroup_cpu_limit(root, proc) == expected


def test_available_cpus_takes_the_smallest_limit(monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 4
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: 2)
    assert available_cpus() == 2
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert available_cpus() == 1


def test_default_threads_are_the_available_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(device, "available_cpus", lambda: 3)
    assert configure_threads() == 3
    assert torch.get_num_threads() == 3
    monkeypatch.setattr(device, "available_cpus", lambda: 1)
    assert configure_threads(None) == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("busy, expected", [(0.0, 2), (0.3, 2), (0.6, 1), (1.0, 1), (2.0, 1)])
def test_default_leaves_the_cores_other_processes_use(monkeypatch, busy, expected):
    # Two cores, one of them kept busy by another program: one thread, not two that stall each other.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(device, "available_cpus", lambda: 2)
    monkeypatch.setattr(device, "busy_cpus", lambda: busy)
    assert configure_threads() == expected
    assert torch.get_num_threads() == expected


def test_cpu_times_and_busy_cpus_from_proc_stat(tmp_path, monkeypatch):
    # /proc/stat columns: user nice system idle iowait irq softirq steal; the "cpu" total line is skipped.
    first = tmp_path / "stat1"
    first.write_text("cpu  9 9 9 9 9 9 9 9\ncpu0 100 0 0 100 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0\nintr 5\n")
    second = tmp_path / "stat2"
    second.write_text("cpu  9 9 9 9 9 9 9 9\ncpu0 150 0 10 110 0 0 0 0\ncpu1 5 0 0 215 0 0 0 0\nintr 7\n")
    assert device._cpu_times(first) == {0: (100, 200), 1: (0, 200)}
    assert device._cpu_times(tmp_path / "missing") is None
    readings = iter([device._cpu_times(first), device._cpu_times(second)])
    monkeypatch.setattr(device, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    # core 0: 60 busy of 70 jiffies; core 1: 5 busy of 20.
    assert REAL_BUSY_CPUS(interval=0.0) == pytest.approx(60 / 70 + 5 / 20)


def test_default_never_exceeds_available_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert 1 <= configure_threads() <= available_cpus()


def test_omp_num_threads_is_honoured(monkeypatch):
    monkeypatch.setattr(device, "available_cpus", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert configure_threads() == 2
    assert torch.get_num_threads() == 2


def test_invalid_omp_num_threads_is_ignored_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(device, "available_cpus", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with caplog.at_level(logging.WARNING, logger="cgc_refine.device"):
        assert configure_threads() == 2
    assert "OMP_NUM_THREADS" in caplog.text


def test_explicit_threads_win_and_oversubscription_is_warned(monkeypatch, caplog):
    monkeypatch.setattr(device, "available_cpus", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configure_threads(2) == 2
    assert torch.get_num_threads() == 2
    assert configure_threads(np.int64(1)) == 1
    with caplog.at_level(logging.WARNING, logger="cgc_refine.device"):
        assert configure_threads(3) == 3
    assert "only 2 core(s)" in caplog.text


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_invalid_threads(bad):
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        configure_threads(bad)


# ----------------------------------------------------------------------------------- seeds


def test_config_error_lives_in_exceptions_and_is_reexported():
    assert ReexportedConfigError is ConfigError
    assert issubclass(ConfigError, CGCRefineError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("seed", [0, 42, MAX_SEED, np.int64(7), np.uint32(2**32 - 1)])
def test_valid_seeds(seed):
    assert check_seed(seed) == int(seed)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70, "abc", 1.5, 2.0, None, True])
def test_invalid_seeds(seed):
    with pytest.raises(ConfigError, match="random_state must be") as info:
        check_seed(seed)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seed", [-1, 2**70, "abc", 1.5])
def test_refiner_fit_refuses_bad_random_state(seed):
    from cgc_refine.refiner import Refiner

    volume = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    prior = np.zeros((8, 8, 8), dtype=np.float32)
    with pytest.raises(ConfigError, match="random_state"):
        Refiner(prior, random_state=seed).fit(volume)
