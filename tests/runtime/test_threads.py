"""The default thread count: the physical cores of the affinity mask, capped by a cgroup v1 or v2
CPU quota."""

from __future__ import annotations

import os

from kiln.runtime.threads import affinity_cores, cgroup_cpu_quota, default_threads, usable_cores


def test_v2_quota_is_the_smallest_along_the_path(tmp_path):
    (tmp_path / "user" / "job").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "user" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "user" / "job" / "cpu.max").write_text("150000 100000\n")
    proc = "0::/user/job\n"
    assert cgroup_cpu_quota(cgroup_root=tmp_path, proc_cgroup=proc) == 1.5
    # rounded up, and never above the affinity mask
    assert usable_cores(cgroup_root=tmp_path, proc_cgroup=proc) == min(2, affinity_cores())
    (tmp_path / "user" / "job" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "user" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(cgroup_root=tmp_path, proc_cgroup=proc) is None
    assert usable_cores(cgroup_root=tmp_path, proc_cgroup=proc) == affinity_cores()


def test_v1_quota_and_a_container_path_missing_under_the_mount(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("50000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    # inside a container /proc/self/cgroup names the host's path; the mount is its own cgroup
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n"
    assert cgroup_cpu_quota(cgroup_root=tmp_path, proc_cgroup=proc) == 0.5
    assert usable_cores(cgroup_root=tmp_path, proc_cgroup=proc) == 1
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cgroup_cpu_quota(cgroup_root=tmp_path, proc_cgroup=proc) is None


def test_no_cgroup_files_and_explicit_threads(tmp_path):
    assert cgroup_cpu_quota(cgroup_root=tmp_path, proc_cgroup="0::/\n") is None
    assert usable_cores(cgroup_root=tmp_path, proc_cgroup="") == len(os.sched_getaffinity(0))
    assert default_threads(3) == 3
    assert default_threads(None) == default_threads(0) == usable_cores()


def test_smt_siblings_count_once(tmp_path):
    """cpu0/cpu2 and cpu1/cpu3 are two hardware threads of one core each; cpu4 another package."""
    for cpu, package, core in ((0, 0, 0), (1, 0, 1), (2, 0, 0), (3, 0, 1), (4, 1, 0)):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert affinity_cores({0, 1, 2, 3}, sysfs=tmp_path) == 2
    assert affinity_cores({0, 2}, sysfs=tmp_path) == 1
    assert affinity_cores({0, 4}, sysfs=tmp_path) == 2
    assert affinity_cores({0, 9}, sysfs=tmp_path) == 2  # no topology for cpu9: count CPUs
