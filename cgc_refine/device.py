"""Compute-device selection, CPU thread count and seeding.

Library code follows the device of the tensors it is given; a device name is resolved in one
place, :func:`resolve_device`, and :func:`autocast` / :func:`fp32_region` are the one mixed
precision switch (training, inference and the losses). :func:`configure_threads`
sets torch's intra-op thread count from the CPU cores this process may actually use (the
command line calls it for every command); :func:`check_seed` validates a random seed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .exceptions import ConfigError, DeviceUnavailableError

__all__ = [
    "DeviceLike",
    "MAX_SEED",
    "autocast",
    "available_cpus",
    "busy_cpus",
    "check_seed",
    "configure_threads",
    "fp32_region",
    "resolve_device",
    "seed_everything",
]

logger = logging.getLogger(__name__)

#: Largest accepted random seed (seeds are integers 0 .. 2**32 - 1, NumPy's legacy range).
MAX_SEED = 2**32 - 1

#: What a device argument may be: a name (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``) or a
#: :class:`torch.device`.
DeviceLike = str | torch.device

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")
_PROC_STAT = Path("/proc/stat")


def resolve_device(
    device: DeviceLike | None = "auto",
    *,
    default: torch.device | None = None,
    invalid: type[Exception] = DeviceUnavailableError,
) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a torch.device) into a torch.device.

    ``"auto"`` picks the first CUDA GPU when one is present and the CPU otherwise (and logs
    the choice). An explicitly requested CUDA device that is absent is an error rather than
    a silent fall-back. This is the one place a device name is resolved (the refiner, the
    distributed launcher and the Mumford-Shah prior all call it).

    Parameters
    ----------
    device : str, torch.device or None, default "auto"
        The requested device. None means ``default`` when one is given.
    default : torch.device, optional
        What None stands for (e.g. the device of the input tensor).
    invalid : type of Exception, default DeviceUnavailableError
        The error raised for a value that is not a CPU or CUDA device name (a prior raises
        its parameter error, :class:`~cgc_refine.exceptions.InvalidPriorError`, here).

    Returns
    -------
    torch.device

    Raises
    ------
    invalid
        If ``device`` is not a device name torch understands, or names another device type.
    DeviceUnavailableError
        If CUDA (or device ``N``) is requested but not available.
    """
    if device is None and default is not None:
        return default
    if not isinstance(device, str | torch.device):
        raise invalid(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}"
        )
    name = str(device) if isinstance(device, torch.device) else device.strip().lower()
    if name == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("device auto -> %s", chosen)
        return chosen
    try:
        chosen = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise invalid(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from error
    if chosen.type not in ("cpu", "cuda"):
        raise invalid(f"device type {chosen.type!r} is not supported; use auto, cpu or cuda")
    if chosen.type == "cuda":
        _check_cuda(chosen, name)
    return chosen


def _check_cuda(chosen: torch.device, name: str) -> None:
    """Raise :class:`DeviceUnavailableError` unless CUDA device ``chosen`` exists."""
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {name!r} was requested but CUDA is not available on this machine; "
            "use --device cpu (or auto)"
        )
    index = chosen.index or 0
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device {name!r} was requested but only {torch.cuda.device_count()} CUDA "
            "device(s) exist; pick another index"
        )


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """The mixed-precision context of a forward pass: :func:`torch.autocast` on CUDA.

    Parameters
    ----------
    device : torch.device
        Where the forward pass runs. Autocast is only used on CUDA; elsewhere the context does
        nothing (logged at DEBUG when a ``dtype`` was asked for).
    dtype : torch.float16, torch.bfloat16 or None
        The autocast dtype; None switches autocast off.

    Returns
    -------
    contextlib.AbstractContextManager
    """
    if dtype is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        logger.debug("autocast_dtype=%s ignored: autocast is only used on CUDA, not %s", dtype, device)
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Context in which autocast is off on ``device``, so float32 inputs stay float32."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_seed(seed: Any, name: str = "random_state") -> int:
    """Return ``seed`` as an int after checking it is an integer in ``0 .. 2**32 - 1``.

    Parameters
    ----------
    seed : int
        The seed (Python or NumPy integer; ``bool`` is refused).
    name : str
        How the caller calls it, for the message (``"random_state"``, ``"--seed"``).

    Returns
    -------
    int
        The seed.

    Raises
    ------
    ConfigError
        If ``seed`` is not an integer or is outside ``0 .. 2**32 - 1``.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(
            f"{name} must be an integer between 0 and {MAX_SEED} (2**32 - 1), got {seed!r} "
            f"of type {type(seed).__name__}; pass a whole number such as 0 or 42"
        )
    value = int(seed)
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(
            f"{name} must be between 0 and {MAX_SEED} (2**32 - 1), got {value}; pick a seed "
            "in that range"
        )
    return value


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller name -> cgroup path of this process (``""`` is the unified v2 hierarchy)."""
    text = _read_text(proc_cgroup) or ""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = parts[2]
    return paths


def _quota_cpus(quota: float, period: float) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def cgroup_cpu_limit(
    root: str | os.PathLike[str] = _CGROUP_ROOT, proc_cgroup: str | os.PathLike[str] = _PROC_CGROUP
) -> int | None:
    """CPUs allowed by the cgroup CPU quota of this process, or None without a quota.

    Reads cgroup v2 ``cpu.max`` (``"max 100000"`` means no quota) and cgroup v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1 means none), in the process's
    own cgroup and at the root of the hierarchy (containers usually see their cgroup there).
    A quota of 1.5 CPUs counts as 2.

    Parameters
    ----------
    root : path
        The cgroup file system (``/sys/fs/cgroup``; a parameter for tests).
    proc_cgroup : path
        This process's cgroup membership file (``/proc/self/cgroup``).

    Returns
    -------
    int or None
        The smallest quota found, rounded up to whole CPUs, or None.
    """
    root = Path(root)
    own = _cgroup_paths(Path(proc_cgroup))
    limits: list[int] = []
    v2_dirs = {root}
    if "" in own:
        v2_dirs.add(root / own[""].lstrip("/"))
    for folder in v2_dirs:
        text = _read_text(folder / "cpu.max")
        if text is None:
            continue
        fields = text.split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                cpus = _quota_cpus(float(fields[0]), float(fields[1]))
            except ValueError:
                cpus = None
            if cpus is not None:
                limits.append(cpus)
    v1_dirs = set()
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / name).is_dir():
            v1_dirs.add(root / name)
            if "cpu" in own:
                v1_dirs.add(root / name / own["cpu"].lstrip("/"))
    for folder in v1_dirs:
        quota, period = _read_text(folder / "cpu.cfs_quota_us"), _read_text(folder / "cpu.cfs_period_us")
        if quota is None or period is None:
            continue
        try:
            cpus = _quota_cpus(float(quota), float(period))
        except ValueError:
            cpus = None
        if cpus is not None:
            limits.append(cpus)
    return min(limits) if limits else None


def available_cpus() -> int:
    """CPU cores this process may actually use: affinity mask and cgroup quota, at least 1.

    ``os.cpu_count()`` counts every core of the machine, also those a container, a batch
    scheduler (``taskset``, Slurm) or a cgroup quota keep this process from using; torch's
    default thread count is based on the machine, which oversubscribes a shared or limited
    CPU badly.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def _env_threads() -> int | None:
    """A valid ``OMP_NUM_THREADS`` (a positive integer), else None (with a warning if set)."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not text:
        return None
    try:
        value = int(text.split(",")[0])
    except ValueError:
        value = 0
    if value < 1:
        logger.warning("ignoring OMP_NUM_THREADS=%r (not a positive integer)", text)
        return None
    return value


def _cpu_times(stat: Path = _PROC_STAT) -> dict[int, tuple[int, int]] | None:
    """Per-core (busy, total) jiffies from ``/proc/stat``; None where it cannot be read."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()) or len(fields) < 4:
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times or None


def busy_cpus(interval: float = 0.1) -> float | None:
    """Cores of this process's affinity set that other processes keep busy, sampled now.

    Reads ``/proc/stat`` twice, ``interval`` seconds apart, while this process sleeps, and
    sums the busy fraction of each core this process may run on. None where ``/proc/stat`` is
    unavailable (not Linux).
    """
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(interval)
    after = _cpu_times()
    if after is None:
        return None
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(after)
    busy = 0.0
    for core in allowed:
        if core in before and core in after:
            spent = after[core][1] - before[core][1]
            if spent > 0:
                busy += (after[core][0] - before[core][0]) / spent
    return busy


def _idle_cores(cpus: int) -> tuple[int, str]:
    """The default thread count: available cores less those busy with other work, at least 1."""
    busy = busy_cpus()
    if busy is None:
        return cpus, "available cores"
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = cpus
    count = max(1, min(cpus, math.floor(allowed - busy + 0.5)))
    if count < cpus:
        return count, f"{cpus} available cores, {busy:.1f} busy with other processes; --threads fixes the count"
    return count, "available cores"


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU thread count and return it.

    With ``threads=None`` the count is an explicit ``OMP_NUM_THREADS`` environment variable
    when one is set, and otherwise the number of cores this process may use
    (:func:`available_cpus`: affinity mask and cgroup quota) less the cores that other
    processes keep busy right now (:func:`busy_cpus`), at least 1. Torch's threads wait for
    each other at every operation, so a thread that shares its core with another program's
    stalls all of them: on a 2-core machine with one other CPU-heavy process, two threads are
    several times slower than one. Results are bit-identical for one seed and one thread count,
    not across thread counts, so record the returned value with the results (the command line
    writes it to every sidecar) and pass an explicit count (``--threads``) to reproduce a run.

    Parameters
    ----------
    threads : int, optional
        An explicit thread count (at least 1). More threads than available cores is honoured
        but logged as a warning, since it usually slows training down.

    Returns
    -------
    int
        The thread count now in effect.

    Raises
    ------
    ConfigError
        If ``threads`` is not a positive integer.
    """
    cpus = available_cpus()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}; pass e.g. 1 or 4")
        count = int(threads)
        source = "requested"
    else:
        env = _env_threads()
        count, source = (env, "OMP_NUM_THREADS") if env is not None else _idle_cores(cpus)
    if count > cpus:
        logger.warning(
            "using %d CPU threads but only %d core(s) are available to this process; "
            "oversubscribed threads usually slow training down (try --threads %d)",
            count, cpus, cpus,
        )
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    logger.info("CPU threads: %d (%s)", count, source)
    return count
