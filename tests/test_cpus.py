"""The CPU count calls split over: the affinity mask by core, capped by the cgroups' CPU quota (fake trees)."""

from __future__ import annotations

import pytest

from numrnn.runtime import cpus, helper, schedule

V2_MOUNTS = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "33 31 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
)


def _tree(tmp_path, mountinfo: str, cgroup: str, files: dict[str, str]) -> str:
    """A fake root: ``/proc/self/mountinfo``, ``/proc/self/cgroup`` and the cgroup ``files`` (path -> text)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for path, text in files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return str(tmp_path)


@pytest.fixture
def four_cpus(monkeypatch):
    """Four allowed CPUs, each its own core (a tree without sysfs counts every CPU)."""
    monkeypatch.setattr(cpus, "allowed_cpus", lambda: {0, 1, 2, 3})


@pytest.mark.parametrize(("cpu_max", "expected_quota", "expected_cpus"), [
    ("max 100000\n", None, 4),
    ("100000 100000\n", 1.0, 1),
    ("150000 100000\n", 1.5, 1),  # rounded down: a spinning partner needs a whole CPU
    ("250000 100000\n", 2.5, 2),
    ("800000 100000\n", 8.0, 4),  # the affinity mask still caps
    ("50000 100000\n", 0.5, 1),  # at least one
])
def test_cgroup_v2_quota(tmp_path, four_cpus, cpu_max, expected_quota, expected_cpus):
    root = _tree(tmp_path, V2_MOUNTS, "0::/\n", {"/sys/fs/cgroup/cpu.max": cpu_max})
    assert cpus.quota(root) == expected_quota
    assert cpus.available(root) == expected_cpus


def test_cgroup_v2_parent_limits_the_child(tmp_path, four_cpus):
    """Without a cgroup namespace the process sits below the mount point; a quota above it binds it too."""
    root = _tree(tmp_path, V2_MOUNTS, "0::/kubepods/pod1/ctr\n", {
        "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",
        "/sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000\n",
        "/sys/fs/cgroup/kubepods/cpu.max": "300000 100000\n",
    })
    assert cpus.quota(root) == 2.0
    assert cpus.available(root) == 2


def test_cgroup_v1_quota_under_the_mount_root(tmp_path, four_cpus):
    """A v1 mount whose root is the container's own cgroup (``/docker/abc``): its files are at the mount point."""
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    root = _tree(tmp_path, V1_MOUNTS, membership, {
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cpus.quota(root) == 1.0
    assert cpus.available(root) == 1


def test_cgroup_v1_without_quota(tmp_path, four_cpus):
    root = _tree(tmp_path, V1_MOUNTS, "4:cpu,cpuacct:/docker/abc\n", {
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cpus.quota(root) is None
    assert cpus.available(root) == 4


@pytest.mark.parametrize("files", [
    {},  # a cgroup without the cpu controller's files
    {"/sys/fs/cgroup/cpu.max": "garbage\n"},
    {"/sys/fs/cgroup/cpu.max": "100000 0\n"},
])
def test_unreadable_quota_is_no_limit(tmp_path, four_cpus, files):
    root = _tree(tmp_path, V2_MOUNTS, "0::/\n", files)
    assert cpus.quota(root) is None
    assert cpus.available(root) == 4


def test_no_proc_is_no_limit(tmp_path, four_cpus):
    assert cpus.quota(str(tmp_path)) is None
    assert cpus.available(str(tmp_path)) == 4


def test_quota_sets_the_workers_and_the_helper(monkeypatch):
    """One CPU of quota: calls are not split (one worker), and no helper compiles beside the kernel."""
    monkeypatch.delenv("NUMRNN_NUM_THREADS", raising=False)
    monkeypatch.delenv(helper.HELPER_ENV, raising=False)
    monkeypatch.setattr(cpus, "allowed_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "quota", lambda root="/": 1.0)
    schedule.cores.cache_clear()
    try:
        assert schedule.cores() == 1
        assert not helper.allowed()
        monkeypatch.setenv("NUMRNN_NUM_THREADS", "3")  # the setting still wins
        schedule.cores.cache_clear()
        assert schedule.cores() == 3
    finally:
        schedule.cores.cache_clear()


def _topology(tmp_path, siblings: dict[int, str]) -> str:
    """A fake sysfs with each CPU's ``thread_siblings_list``."""
    for cpu, text in siblings.items():
        folder = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(text + "\n")
    return str(tmp_path)


#: Two cores of two hardware threads each, numbered as Linux numbers them on x86 (siblings n and n + 2).
SMT_PAIRS = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}


@pytest.mark.parametrize(("siblings", "allowed", "cores"), [
    (SMT_PAIRS, {0, 1, 2, 3}, 2),
    (SMT_PAIRS, {0, 2}, 1),  # both threads of one core
    (SMT_PAIRS, {0, 1}, 2),  # one thread of each
    ({0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3", 4: "4", 5: "5"}, {0, 1, 2, 3, 4, 5}, 4),  # ranges, some cores alone
    ({0: "0", 1: "1"}, {0, 1}, 2),  # no SMT, as on this project's machine
])
def test_hardware_threads_of_one_core_count_once(tmp_path, siblings, allowed, cores):
    root = _topology(tmp_path, siblings)
    assert cpus.core_count(root, allowed) == cores


def test_workers_count_cores_and_the_helper_threads(tmp_path, monkeypatch):
    root = _topology(tmp_path, SMT_PAIRS)
    monkeypatch.setattr(cpus, "allowed_cpus", lambda: {0, 1, 2, 3})
    assert cpus.available(root) == 2
    assert cpus.available(root, by_core=False) == 4


def test_unreadable_topology_counts_every_cpu(tmp_path):
    root = _topology(tmp_path, {0: "0,2", 2: "garbage"})
    assert cpus.core_count(root, {0, 1, 2}) == 3  # cpu1 has no file, cpu2's cannot be parsed
    assert cpus.core_count(str(tmp_path / "nothing"), {0, 1}) == 2


def test_this_machine_reads_without_error():
    """The real files parse (whatever they say): a positive count no larger than the affinity mask."""
    limit = cpus.quota()
    assert limit is None or limit > 0
    assert 1 <= cpus.available() <= cpus.available(by_core=False) <= len(cpus.allowed_cpus())
