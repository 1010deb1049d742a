"""A jailed VMM's cgroup: CPU, memory and pids limits, on cgroup v2 where the
host delegates those controllers to it, on cgroup v1 otherwise.

Like Firecracker's jailer, one group per VM under a `microvm` parent:
  v2: <cgroup2 mount>/microvm/<name>/{cpu.max, memory.max, pids.max}
      (the controllers enabled in the subtree_control of the mount's root
      and of microvm/; Documentation/admin-guide/cgroup-v2.rst)
  v1: <cpu mount>/microvm/<name>/{cpu.cfs_period_us, cpu.cfs_quota_us},
      <memory mount>/microvm/<name>/memory.limit_in_bytes,
      <pids mount>/microvm/<name>/pids.max
      (Documentation/admin-guide/cgroup-v1/)
Where the controllers live is read from /proc/self/mounts. The group is made
and its limits written before the VMM starts; the VMM's first process joins
it, so every thread and the guest's RAM are counted; it is removed once that
process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from microvm.errors import ConfigError

CONTROLLERS = ("cpu", "memory", "pids")
PARENT = "microvm"
CPU_PERIOD_US = 100_000
MODES = ("auto", "v1", "v2")


class CgroupError(ConfigError):
    """The host cannot give a jail the cgroup it asks for."""


@dataclass(frozen=True)
class Limits:
    cpus: float  # CPU time per wall-clock time: 1.5 = one and a half CPUs
    memory_bytes: int
    pids: int


def mounts(text: str | None = None) -> list[tuple[str, str, set[str]]]:
    """(mount point, type, options) of each cgroup and cgroup2 mount."""
    if text is None:
        text = Path("/proc/self/mounts").read_text()
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
            found.append((fields[1].replace("\\040", " "), fields[2], set(fields[3].split(","))))
    return found


def v2_root(found: list[tuple[str, str, set[str]]]) -> Path | None:
    """The cgroup2 mount, if it has cpu, memory and pids to give."""
    for point, kind, _ in found:
        if kind == "cgroup2":
            with contextlib.suppress(OSError):
                available = set((Path(point) / "cgroup.controllers").read_text().split())
                if set(CONTROLLERS) <= available:
                    return Path(point)
    return None


def v1_roots(found: list[tuple[str, str, set[str]]]) -> dict[str, Path]:
    """controller -> its v1 hierarchy's mount point, for those mounted."""
    roots: dict[str, Path] = {}
    for point, kind, options in found:
        if kind == "cgroup":
            for c in CONTROLLERS:
                if c in options and c not in roots:
                    roots[c] = Path(point)
    return roots


class Cgroup:
    """One VM's group: made with its limits, joined by the VMM, removed after it."""

    def __init__(self, version: int, dirs: dict[str, Path]):
        self.version = version
        self.dirs = dirs  # controller -> the group's directory (v2: the same one for all)

    @classmethod
    def create(cls, name: str, limits: Limits, mode: str = "auto", mounts_text: str | None = None) -> Cgroup:
        if mode not in MODES:
            raise CgroupError(f"jail cgroup must be one of {', '.join(MODES)}, got {mode!r}")
        found = mounts(mounts_text)
        v2 = v2_root(found) if mode in ("auto", "v2") else None
        if v2 is not None:
            group = cls._make_v2(v2, name)
        else:
            roots = v1_roots(found) if mode in ("auto", "v1") else {}
            missing = [c for c in CONTROLLERS if c not in roots]
            if missing:
                raise CgroupError(
                    f"the jail needs the {', '.join(missing)} cgroup controller(s): not on a cgroup2 mount "
                    f"with them delegated{'' if mode == 'v2' else ' nor mounted as cgroup v1'} "
                    f"(cgroup mounts: {', '.join(p for p, _, _ in found) or 'none'}); "
                    f"Jail(cgroup=None) runs without limits")
            group = cls(1, {c: roots[c] / PARENT / name for c in CONTROLLERS})
            for d in group.dirs.values():
                _mkdir(d.parent)
                _mkdir(d)
        try:
            group.set_limits(limits)
        except BaseException:
            group.remove()
            raise
        return group

    @classmethod
    def _make_v2(cls, root: Path, name: str) -> Cgroup:
        parent = root / PARENT
        _mkdir(parent)
        enable = " ".join(f"+{c}" for c in CONTROLLERS)
        for d in (root, parent):
            try:
                _write(d / "cgroup.subtree_control", enable)
            except CgroupError as e:
                if not isinstance(e.__cause__, OSError) or e.__cause__.errno != errno.EBUSY:
                    raise
                # cgroup v2's "no internal processes" rule: a group with processes of its
                # own hands no controllers down. The mount's root is such a group where it
                # is not the host's root (a cgroup namespace, a delegated subtree).
                raise CgroupError(
                    f"cannot enable {enable} in {d}: that cgroup has processes of its own (cgroup v2 "
                    "gives controllers only to groups whose parent has none; here the cgroup2 mount's "
                    "root is not the host's, as in a container or a delegated subtree). Move this "
                    "process into a leaf group first, or use Jail(cgroup='v1') or Jail(cgroup=None)") from e
        group = root / PARENT / name
        _mkdir(group)
        return cls(2, dict.fromkeys(CONTROLLERS, group))

    def set_limits(self, limits: Limits) -> None:
        """A new group's limits. Swap is no way around the memory limit: where
        the host accounts it (memory.swap.max on v2, memory.memsw.* on v1 with
        swap accounting), the group may swap nothing, so a VMM over its limit
        is stopped by the kernel rather than paged out."""
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if self.version == 2:
            d = self.dirs["cpu"]
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(d / "memory.max", str(limits.memory_bytes))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.pids))
        else:
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
            memory = self.dirs["memory"]
            _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():  # memory + swap: after memory (never below it)
                _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            _write(self.dirs["pids"] / "pids.max", str(limits.pids))

    def limits(self) -> Limits:
        """Read back from the group's files."""
        if self.version == 2:
            d = self.dirs["cpu"]
            quota, period = d.joinpath("cpu.max").read_text().split()
            memory = d.joinpath("memory.max").read_text()
        else:
            quota = self.dirs["cpu"].joinpath("cpu.cfs_quota_us").read_text()
            period = self.dirs["cpu"].joinpath("cpu.cfs_period_us").read_text()
            memory = self.dirs["memory"].joinpath("memory.limit_in_bytes").read_text()
        pids = self.dirs["pids"].joinpath("pids.max").read_text()
        return Limits(cpus=int(quota) / int(period), memory_bytes=int(memory), pids=int(pids))

    def join(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group."""
        for d in dict.fromkeys(self.dirs.values()):
            _write(d / "cgroup.procs", str(pid))

    @property
    def self_join_is_cheap(self) -> bool:
        """v1: a single-threaded process moves itself in ~0.05 ms (join_self), where
        moving a process by its PID (join) waits for an RCU grace period (5-15 ms)."""
        return self.version == 1

    def join_self(self) -> None:
        """Move the calling process into the group (v1), from its one thread.

        Written as thread 0 into each hierarchy's `tasks`: moving only the
        calling thread takes no threadgroup lock (kernel/cgroup/cgroup.c,
        cgroup_procs_write_start: a write of pid 0 for one thread), so the
        kernel does not wait for an RCU grace period as it does for a whole
        process. With one thread, that thread is the process; a process with
        more is refused (the others would stay outside)."""
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise CgroupError(f"only a single-threaded process can join its cgroup by itself; this one has "
                              f"{threads} threads")
        for d in dict.fromkeys(self.dirs.values()):
            _write(d / "tasks", "0")

    def oom_killed(self) -> bool:
        """Did the kernel kill a process of the group for its memory limit?"""
        d = self.dirs["memory"]
        with contextlib.suppress(OSError, ValueError):
            if self.version == 2:
                events = d.joinpath("memory.events").read_text()
            else:
                events = d.joinpath("memory.oom_control").read_text()
                if not self._v1_limit_met(d):  # a kill of the host's OOM killer counts here too
                    return False
            for line in events.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        return False

    @staticmethod
    def _v1_limit_met(d: Path) -> bool:
        """The group's memory (or memory + swap: set_limits) reached its limit.
        failcnt counts that, but not always where swap is accounted (seen at 0
        with the peak at the limit, on Debian's 6.1): the peak says it too."""
        for prefix in ("memory.", "memory.memsw."):
            if not d.joinpath(f"{prefix}failcnt").exists():
                continue
            if int(d.joinpath(f"{prefix}failcnt").read_text()) > 0:
                return True
            peak, limit = (int(d.joinpath(f"{prefix}{f}").read_text()) for f in ("max_usage_in_bytes",
                                                                                    "limit_in_bytes"))
            if peak >= limit:
                return True
        return False

    def kill_all(self) -> None:
        """SIGKILL every process left in the group (cgroup.kill on v2, each PID on v1)."""
        import signal

        d = self.dirs["pids"]
        if self.version == 2 and d.joinpath("cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(d / "cgroup.kill", "1")
            return
        with contextlib.suppress(OSError):
            for pid in d.joinpath("cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)

    def remove(self) -> None:
        """Remove the group (its processes gone); idempotent. A group still busy
        (EBUSY: a killed process not yet gone) is tried again for a moment, then
        left for the next jail's sweep_groups()."""
        import time

        for d in dict.fromkeys(self.dirs.values()):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)


def sweep_groups(stale: Callable[[str], bool]) -> None:
    """Remove the empty groups under microvm/ whose names `stale` picks (their VMMs are gone)."""
    found = mounts()
    roots = [r for r in (v2_root(found),) if r is not None] + list(v1_roots(found).values())
    for root in roots:
        with contextlib.suppress(OSError):
            for d in (root / PARENT).iterdir():
                if d.is_dir() and stale(d.name):
                    with contextlib.suppress(OSError):
                        d.rmdir()


def _mkdir(d: Path) -> None:
    try:
        d.mkdir(exist_ok=True)
    except OSError as e:
        raise CgroupError(f"cannot make cgroup {d}: {e.strerror}") from e


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from e


def cgroup_paths(pid: int) -> dict[str, str]:
    """controller (or "" for v2) -> path of the cgroup process `pid` is in, from /proc/PID/cgroup."""
    paths: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths
