"""The jail's configuration and its cgroup layer (microvm/jail), without KVM:
cgroup v1 and v2 trees are directories here, found through a mounts text."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm.errors import ConfigError
from microvm.jail import OVERHEAD_MIB, PIDS_SPARE, Jail, as_jail
from microvm.jail.cgroups import CPU_PERIOD_US, PARENT, Cgroup, CgroupError, Limits, mounts

LIMITS = Limits(cpus=1.5, memory_bytes=300 << 20, pids=40)


def v2_tree(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> str:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("")
    return f"cgroup2 {root} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"


def v1_tree(tmp_path: Path) -> str:
    lines = []
    for name, options in (("cpu,cpuacct", "rw,cpu,cpuacct"), ("memory", "rw,memory"), ("pids", "rw,pids")):
        (tmp_path / name).mkdir()
        lines.append(f"cgroup {tmp_path / name} cgroup {options} 0 0")
    return "\n".join(lines) + "\n"


def test_v2_where_the_controllers_are_delegated(tmp_path):
    text = v2_tree(tmp_path) + v1_tree(tmp_path)
    group = Cgroup.create("42-0", LIMITS, mounts_text=text)
    d = tmp_path / "unified" / PARENT / "42-0"
    assert group.version == 2 and group.dirs["memory"] == d
    assert (d / "cpu.max").read_text() == f"{int(1.5 * CPU_PERIOD_US)} {CPU_PERIOD_US}"
    assert (d / "memory.max").read_text() == str(300 << 20)
    assert (d / "pids.max").read_text() == "40"
    assert (tmp_path / "unified" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (tmp_path / "unified" / PARENT / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert group.limits() == LIMITS
    group.join(1234)
    assert (d / "cgroup.procs").read_text() == "1234"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert group.oom_killed()
    for f in d.iterdir():
        f.unlink()
    group.remove()
    assert not d.exists()
    group.remove()  # again: nothing to do


def test_no_swap_where_the_host_accounts_it(tmp_path):
    """memory.swap.max (v2) and memory.memsw.limit_in_bytes (v1) exist where
    the kernel accounts swap: the group may then swap nothing."""
    text = v2_tree(tmp_path) + v1_tree(tmp_path)
    d = tmp_path / "unified" / PARENT / "42-2"
    d.mkdir(parents=True)
    (d / "memory.swap.max").write_text("max\n")
    group = Cgroup.create("42-2", LIMITS, mounts_text=text)
    assert (d / "memory.swap.max").read_text() == "0"
    (tmp_path / "b").mkdir()
    text = v2_tree(tmp_path / "b", controllers="") + v1_tree(tmp_path / "b")
    memory = tmp_path / "b" / "memory" / PARENT / "42-3"
    memory.mkdir(parents=True)
    (memory / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")
    group = Cgroup.create("42-3", LIMITS, mounts_text=text)
    assert group.dirs["memory"] == memory
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(300 << 20)


def test_v1_where_v2_has_no_controllers(tmp_path):
    text = v2_tree(tmp_path, controllers="") + v1_tree(tmp_path)
    group = Cgroup.create("42-1", LIMITS, mounts_text=text)
    assert group.version == 1
    assert group.dirs["cpu"] == tmp_path / "cpu,cpuacct" / PARENT / "42-1"
    assert (group.dirs["cpu"] / "cpu.cfs_quota_us").read_text() == "150000"
    assert (group.dirs["cpu"] / "cpu.cfs_period_us").read_text() == str(CPU_PERIOD_US)
    assert (group.dirs["memory"] / "memory.limit_in_bytes").read_text() == str(300 << 20)
    assert (group.dirs["pids"] / "pids.max").read_text() == "40"
    assert group.limits() == LIMITS
    assert not (group.dirs["memory"] / "memory.memsw.limit_in_bytes").exists()  # no swap accounting: left alone
    group.join(99)
    for c in ("cpu", "memory", "pids"):
        assert (group.dirs[c] / "cgroup.procs").read_text() == "99"
    (group.dirs["memory"] / "memory.failcnt").write_text("0\n")
    (group.dirs["memory"] / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not group.oom_killed()
    memory = group.dirs["memory"]
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    for name, value in (("failcnt", "0"), ("max_usage_in_bytes", "1000"), ("limit_in_bytes", "2000")):
        (memory / f"memory.{name}").write_text(f"{value}\n")
        (memory / f"memory.memsw.{name}").write_text(f"{value}\n")
    assert not group.oom_killed()  # killed under the limit: the host's OOM killer, not the jail's limit
    (memory / "memory.failcnt").write_text("7\n")
    assert group.oom_killed()
    (memory / "memory.failcnt").write_text("0\n")
    (memory / "memory.memsw.max_usage_in_bytes").write_text("2000\n")  # failcnt left at 0, the peak at the limit
    assert group.oom_killed()


def test_a_v2_root_with_processes_of_its_own_is_named(tmp_path, monkeypatch):
    """In a cgroup namespace or a delegated subtree the mount's root may hold
    processes: enabling controllers below it fails with EBUSY, and the error
    says why and what to do."""
    import errno

    from microvm.jail import cgroups

    real = cgroups._write

    def busy(path: Path, value: str) -> None:
        if path.name == "cgroup.subtree_control":
            raise CgroupError(f"cannot write {value!r} to {path}: busy") from OSError(errno.EBUSY, "busy")
        real(path, value)

    monkeypatch.setattr(cgroups, "_write", busy)
    with pytest.raises(CgroupError, match=r"has processes of its own.*leaf group.*cgroup='v1'"):
        Cgroup.create("42-9", LIMITS, mounts_text=v2_tree(tmp_path))


def test_a_host_without_the_controllers_is_named(tmp_path):
    with pytest.raises(CgroupError, match=r"the cpu, memory, pids cgroup controller\(s\).*cgroup=None"):
        Cgroup.create("x", LIMITS, mounts_text="proc /proc proc rw 0 0\n")
    text = v2_tree(tmp_path, controllers="cpu memory") + v1_tree(tmp_path)
    with pytest.raises(CgroupError, match="the cpu, memory, pids"):
        Cgroup.create("x", LIMITS, mode="v2", mounts_text=text)  # v2 asked for, pids not delegated
    assert Cgroup.create("x", LIMITS, mode="v1", mounts_text=text).version == 1
    with pytest.raises(CgroupError, match="must be one of"):
        Cgroup.create("x", LIMITS, mode="v3", mounts_text=text)


def test_a_limit_the_kernel_refuses_is_named(tmp_path):
    text = v1_tree(tmp_path)
    (tmp_path / "pids" / PARENT / "bad" / "pids.max").mkdir(parents=True)  # cannot be written as a file
    with pytest.raises(CgroupError, match=r"cannot write '40' to .*pids\.max"):
        Cgroup.create("bad", LIMITS, mounts_text=text)


def test_mounts_parses_cgroup_lines():
    found = mounts("cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
                   "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nproc /proc proc rw 0 0\n")
    assert [(p, k) for p, k, _ in found] == [("/sys/fs/cgroup/cpu", "cgroup"), ("/sys/fs/cgroup/unified", "cgroup2")]
    assert "cpu" in found[0][2]


def test_jail_config():
    assert as_jail(None) is None and as_jail(False) is None
    assert as_jail(True) == Jail()
    assert Jail().limits(mem_mib=128, vcpus=2, devices=3) == Limits(
        cpus=3.0, memory_bytes=(128 + OVERHEAD_MIB) << 20, pids=PIDS_SPARE + 2 + 12)
    assert Jail(cpus=0.5, memory_mib=100, pids=9).limits(128, 2, 0) == Limits(0.5, 100 << 20, 9)
    for bad, match in (({"uid": 0}, "jail uid"), ({"gid": -1}, "jail gid"), ({"cpus": 0}, "jail cpus"),
                       ({"memory_mib": 1}, "jail memory_mib"), ({"pids": 2}, "jail pids"),
                       ({"cgroup": "v9"}, "jail cgroup"), ({"base": "/nonexistent"}, "jail base"),
                       ({"hostname": ""}, "jail hostname")):
        with pytest.raises(ConfigError, match=match):
            Jail(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="jail must be"):
        as_jail("yes")
