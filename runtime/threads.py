"""The CPU threads kiln uses by default: the cores this process may run on, not the machine's.

TVM's own default is `std::thread::hardware_concurrency() / 2` on x86 (it assumes two hardware
threads per core): one thread on a 2-core VM without SMT; and it counts CPUs outside the
process's affinity mask and ignores a container's CPU quota. kiln counts physical cores (SMT
siblings once) inside the mask, capped by the quota, and every entry point (`kiln run`,
`chat`, `eval`, `bench`, `tune`, the Python API through Session.load, a bundle's kiln_run.py)
sizes the pool with that (kiln.runtime.tvm_runtime.size_thread_pool).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SYSFS_CPU = Path("/sys/devices/system/cpu")
#: where a cgroup v1 hierarchy with the cpu controller is usually mounted
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def allowed_cpus() -> set[int]:
    """Logical CPUs in this process's affinity mask (taskset, cpuset)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def affinity_cores(cpus: set[int] | None = None, *, sysfs: Path = SYSFS_CPU) -> int:
    """Physical cores among `cpus` (default: the affinity mask): hardware threads of one core
    (SMT siblings, same package and core id) count once, as TVM's halving meant to; where the
    topology is unreadable, every CPU counts."""
    cpus = allowed_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((int((topo / "physical_package_id").read_text()),
                       int((topo / "core_id").read_text())))
        except (OSError, ValueError):
            return len(cpus)
    return max(len(cores), 1)


def usable_cores(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """Cores this process may keep busy: the physical cores of its affinity mask, capped by a
    cgroup CPU quota rounded up (a quota of 1.5 CPUs still runs two threads part of the time)."""
    cores = affinity_cores()
    quota = cgroup_cpu_quota(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(cores, 1)


def default_threads(threads: int | None = None) -> int:
    """`threads` when given (> 0), else the usable cores."""
    return threads if threads and threads > 0 else usable_cores()


def cgroup_cpu_quota(*, cgroup_root: Path = CGROUP_ROOT,
                     proc_cgroup: str | None = None) -> float | None:
    """CPUs' worth of time the process's cgroups allow per period (the smallest along the path
    from its cgroup up to the root), or None without a limit."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    limits = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            limits += [_v2_limit(d) for d in _ancestors(cgroup_root, path)]
        elif "cpu" in controllers.split(","):
            for mount in _V1_CPU_MOUNTS:
                limits += [_v1_limit(d) for d in _ancestors(cgroup_root / mount, path)]
    limits = [q for q in limits if q is not None]
    return min(limits) if limits else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """`mount/path` and its parents up to `mount`; inside a container the path named by
    /proc/self/cgroup may not exist under the mount (which is the container's own cgroup)."""
    parts = [p for p in path.strip().split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_limit(d: Path) -> float | None:
    try:
        quota, _, period = (d / "cpu.max").read_text().strip().partition(" ")
    except OSError:
        return None
    if quota == "max" or not period:
        return None
    return _ratio(quota, period)


def _v1_limit(d: Path) -> float | None:
    try:
        quota = (d / "cpu.cfs_quota_us").read_text().strip()
        period = (d / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
