"""How many CPUs this process may keep busy: its affinity mask, by core, capped by its cgroups' CPU quota.

Workers of a split call count cores, not hardware threads: two threads of
one core share its L1 and L2, which the unit split's slices and the packed
product's panels are sized for, and a partner spinning at a barrier on the
sibling takes issue slots from the worker it waits for. ONNX Runtime's
default intra-op pool has a thread per physical core too. A compile helper
process counts hardware threads: it needs no cache to itself, only time.

A container given one CPU's time (``docker run --cpus=1``, a Kubernetes CPU
limit) still sees every CPU of the host in its affinity mask. Split calls
there would run a partner that spins at a barrier on the same quota the
other worker needs, and a helper process that compiles beside the kernel on
it too; both are worth a second CPU only where there is one. The quota is
read from the cgroup v2 ``cpu.max`` files, or the v1 ``cpu.cfs_quota_us``
and ``cpu.cfs_period_us`` ones, of the process's cgroup and every cgroup
above it up to the mount point (the smallest wins), and rounded down: a
quota of 1.5 CPUs gives one worker, as a spinning partner needs a whole one.

No numba import here: :mod:`numrnn.runtime.helper` asks before numba loads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def available(root: str = "/", *, by_core: bool = True) -> int:
    """CPUs this process may keep busy, capped by its cgroups' quota (at least 1).

    ``by_core``: the cores of the affinity mask (:func:`core_count`), else
    its hardware threads. ``root``: the file system root to read ``/proc``,
    ``/sys`` and the cgroup mounts under (tests pass a fake tree).
    """
    count = core_count(root) if by_core else len(allowed_cpus())
    limit = quota(root)
    if limit is not None:
        count = min(count, math.floor(limit))
    return max(count, 1)


def allowed_cpus() -> set[int]:
    """The CPUs of this process's affinity mask (every CPU of the machine where there is none, as on macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def core_count(root: str = "/", cpus: set[int] | None = None) -> int:
    """Cores among ``cpus`` (default: :func:`allowed_cpus`), each core's hardware threads counted once.

    From each CPU's ``topology/thread_siblings_list`` in sysfs; where one
    cannot be read (no sysfs, as on macOS), every CPU counts.
    """
    cpus = allowed_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        try:
            siblings = _cpu_list(_read(root, f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"))
        except (OSError, ValueError):
            return len(cpus)
        cores.add(frozenset(siblings & cpus) or frozenset([cpu]))
    return len(cores)


def _cpu_list(text: str) -> set[int]:
    """The CPUs of a sysfs list such as ``0-3,8,10-11``."""
    cpus = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def quota(root: str = "/") -> float | None:
    """CPUs' worth of time per period that the process's cgroups allow, or ``None`` where none limits it.

    Unreadable or unparsable files count as no limit: the quota can only
    lower the count, never raise an error.
    """
    try:
        mounts = _read(root, "/proc/self/mountinfo")
        memberships = _read(root, "/proc/self/cgroup")
    except OSError:
        return None
    paths = _cgroup_paths(memberships)
    limits = []
    for point, mount_root, version in _cpu_mounts(mounts):
        path = paths.get(version)
        if path is not None:
            limits.extend(_limits_up_to(Path(root, point.lstrip("/")), _relative(path, mount_root), version))
    return min(limits, default=None)


def _read(root: str, path: str) -> str:
    return Path(root, path.lstrip("/")).read_text()


def _cgroup_paths(text: str) -> dict[int, str]:
    """The process's cgroup by hierarchy: 2 for the unified one, 1 for the v1 one with the ``cpu`` controller."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[2] = path
        elif "cpu" in controllers.split(","):
            paths[1] = path
    return paths


def _cpu_mounts(text: str) -> list[tuple[str, str, int]]:
    """``(mount point, root within the hierarchy, version)`` of each cgroup2 mount and each v1 ``cpu`` mount."""
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            mounts.append((fields[4], fields[3], 2))
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            mounts.append((fields[4], fields[3], 1))
    return mounts


def _relative(path: str, mount_root: str) -> str:
    """``path`` below the mount's root: ``""`` where the process's cgroup is the root (a container's v1
    mounts, whose root is the container's cgroup; a cgroup namespace) or lies outside it."""
    path, mount_root = path.rstrip("/"), mount_root.rstrip("/")
    if mount_root and not (path == mount_root or path.startswith(mount_root + "/")):
        return ""
    return path[len(mount_root):].strip("/")


def _limits_up_to(point: Path, relative: str, version: int) -> list[float]:
    """The quota of each cgroup from the process's up to the mount point that sets one."""
    limits = []
    parts = [p for p in relative.split("/") if p]
    for depth in range(len(parts), -1, -1):
        limit = _limit(point.joinpath(*parts[:depth]), version)
        if limit is not None:
            limits.append(limit)
    return limits


def _limit(directory: Path, version: int) -> float | None:
    """One cgroup's quota in CPUs: v2 ``cpu.max`` (``max 100000`` or ``150000 100000``), v1 ``cpu.cfs_*_us``."""
    try:
        if version == 2:
            fields = (directory / "cpu.max").read_text().split()
            quota_us, period_us = fields[0], fields[1]
        else:
            quota_us = (directory / "cpu.cfs_quota_us").read_text().strip()
            period_us = (directory / "cpu.cfs_period_us").read_text().strip()
        if quota_us == "max" or int(quota_us) < 0 or int(period_us) <= 0:
            return None
        return int(quota_us) / int(period_us)
    except (OSError, ValueError, IndexError):
        return None
