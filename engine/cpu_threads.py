"""How many threads torch's CPU kernels use: the CPUs this process may actually run on.

torch defaults to every core of the host, but a container on a large node is
usually limited by a CPU quota (Kubernetes `resources.limits.cpu`, cgroup v2
`cpu.max`), not by its affinity mask; more threads than the quota allows spin
and get throttled, and a decode step of many small operations then collapses.
OMP_NUM_THREADS, when set, is the user's decision and is left alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_thread_count(usable_cpus: int, cpu_quota: float | None) -> int:
    """The usable CPUs, capped by the quota (in CPUs, rounded up), at least one."""
    if cpu_quota is None:
        return max(1, usable_cpus)
    return max(1, min(usable_cpus, math.ceil(cpu_quota)))


def cgroup_cpu_quota(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """CPUs allowed by cgroup v2's cpu.max ("max 100000" or "200000 100000"); None when unlimited or unknown."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def configure_cpu_threads() -> None:
    """Set torch's intra-op threads from the affinity mask and the cgroup quota (unless OMP_NUM_THREADS is set)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    torch.set_num_threads(cpu_thread_count(len(os.sched_getaffinity(0)), cgroup_cpu_quota()))
