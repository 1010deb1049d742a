"""MicroVM(jail=...): the VMM in a child process, in its own namespaces and
cgroup, with an empty read-only root, no capabilities and the jail's uid
(microvm/jail). Tiny PVH guests, natively on this host; each property is
read back from /proc and the cgroup's files while the VMM runs."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from microvm.errors import ConfigError, GuestTimeoutError, LoaderError, VmStoppedError
from microvm.hostprocess import proc_fields
from microvm.jail import OVERHEAD_MIB, PIDS_SPARE, Jail, JailError
from microvm.jail.cgroups import PARENT, Cgroup, CgroupError, cgroup_paths, mounts, v1_roots
from microvm.machine import MicroVM
from tests.kvm.pvh import guest, tiny_pvh_kernel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a jail is set up by root")

REPO = str(Path(__file__).resolve().parents[2])
NAMESPACES = ("mnt", "pid", "ipc", "uts", "net")

# Reports "init reached", then touches one word in each 4 KiB page from 2 MiB
# up to {top} (KVM faults the VMM's memory in: it counts in its cgroup), then
# spins for ever. With top=0 it only spins.
SPIN = """
    mov edi, 0x200000
1:  cmp edi, {top}
    jae 2f
    mov dword ptr [edi], 1
    add edi, 4096
    jmp 1b
2:  pause
    jmp 2b
"""


def spin_kernel(tmp: Path, top_mib: int = 0) -> Path:
    return guest(SPIN, tmp, top=top_mib << 20)


def open_fds() -> dict[int, str]:
    """This process's fds and what each is (the listing's own fd left out)."""
    with os.scandir("/proc/self/fd") as listing:
        found = {int(e.name): e.path for e in listing}
    return {fd: target for fd, path in found.items() if (target := _readlink(path)) is not None}


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # the listing's own fd, closed by now
        return None


def leftovers(before: set[str], pid: int | None = None) -> set[str]:
    """The jail cgroups and root directories of this process (or `pid`) that
    outlived their VM. Only those (named "<pid>-<n>"): another test run on the
    host (a second clone's suite) makes and removes its own in the same places."""
    mine = f"{os.getpid() if pid is None else pid}-"
    found = set()
    for root in v1_roots(mounts()).values():
        d = root / PARENT
        if d.is_dir():
            found |= {str(p) for p in d.iterdir() if p.is_dir() and p.name.startswith(mine)}
    found |= {str(p) for p in Path("/tmp/microvm-jails").glob(f"microvm-jail-{mine}*")}
    return found - before


@pytest.fixture
def clean():
    """Nothing of a jail is left behind: cgroups, root directories, children, fds."""
    before = leftovers(set())
    fds = open_fds().keys()
    children = {c.pid for c in psutil.Process().children()}  # others' (multiprocessing's resource tracker)
    yield
    from microvm import teardown
    from microvm.loader import kernelcache  # its sealed kernel images live as long as the process

    assert teardown.drain(30.0)  # closed jails reaped and removed, VMs closed in this process destroyed
    assert leftovers(before) == set()

    now = open_fds()
    assert not now.keys() - fds - kernelcache.fds(), {fd: now[fd] for fd in now.keys() - fds - kernelcache.fds()}
    left = [(c.pid, c.status()) for c in psutil.Process().children() if c.pid not in children]
    assert left == []  # a jail's children reaped (a zombie is listed too), none running


def test_a_jailed_run_gives_the_guests_result(clean):
    r = MicroVM(tiny_pvh_kernel(1, 5), force=True, mem_mib=32, jail=True).run(["true"], timeout=30)
    assert (r.exit_code, r.reason) == (5, "exit")
    marks = ["jail set up", "jail namespaces made", "vmm forked", "vm created", "kernel loaded", "jail entered",
             "first vcpu entry", "vm ended"]
    assert [m for m in r.timeline if m in marks] == marks  # the jail's steps, in order, as data
    assert all(r.timeline[a] <= r.timeline[b] for a, b in itertools.pairwise(marks)), r.timeline
    # The cgroup is joined while the VMM makes its VM, and before the jail is entered (no guest code yet)
    assert r.timeline["vmm forked"] <= r.timeline["jail cgroup joined"] <= r.timeline["jail entered"], r.timeline


def test_the_vmm_runs_unprivileged_in_its_own_namespaces_and_cgroup(tmp_path, clean):
    vm = MicroVM(spin_kernel(tmp_path), force=True, mem_mib=64, vcpus=2,
                 jail=Jail(uid=4242, gid=4343, hostname="jailed")).start(["true"])
    try:
        jailed = vm._jailed
        assert jailed is not None
        pid = jailed.vmm_pid
        assert pid is not None and pid != os.getpid()
        st = proc_fields(f"/proc/{pid}/status")
        assert st["Uid"].split() == ["4242"] * 4
        assert st["Gid"].split() == ["4343"] * 4
        assert st["Groups"] == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[caps], 16) == 0, caps
        assert st["NoNewPrivs"] == "1"
        assert st["NSpid"].split()[-1] == "1"  # PID 1 of its own PID namespace
        for ns in NAMESPACES:
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        # Its root: an empty read-only tmpfs.
        assert os.listdir(f"/proc/{pid}/root") == []
        root_mount = [line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
        assert len(root_mount) == 1 and root_mount[0][4] == "/" and root_mount[0][5].startswith("ro")
        assert " - tmpfs " in Path(f"/proc/{pid}/mountinfo").read_text()
        # Its cgroup, with limits from the VM's size.
        paths = cgroup_paths(pid)
        for c in ("cpu", "memory", "pids"):
            assert paths[c] == f"/{PARENT}/{jailed.name}", c
        assert jailed.cgroup is not None
        limits = jailed.cgroup.limits()
        assert limits.cpus == 3.0  # two vCPUs and the I/O thread
        assert limits.memory_bytes == (64 + OVERHEAD_MIB) << 20
        assert limits.pids == PIDS_SPARE + 2
        no_swap = {1: "memory.memsw.limit_in_bytes", 2: "memory.swap.max"}[jailed.cgroup.version]
        if (jailed.cgroup.dirs["memory"] / no_swap).exists():  # the host accounts swap: none for the VMM
            swap_limit = (jailed.cgroup.dirs["memory"] / no_swap).read_text().strip()
            assert swap_limit == {1: str(limits.memory_bytes), 2: "0"}[jailed.cgroup.version]
        # Its threads too (the vCPUs started after the jail was entered).
        for tid in os.listdir(f"/proc/{pid}/task"):
            tst = proc_fields(f"/proc/{pid}/task/{tid}/status")
            assert tst["Uid"].split()[0] == "4242" and int(tst["CapBnd"], 16) == 0 and tst["NoNewPrivs"] == "1"
        assert len(os.listdir(f"/proc/{pid}/task")) >= 3  # main, control, two vCPUs, I/O
    finally:
        vm.kill()
    with pytest.raises(VmStoppedError):
        vm.wait(5)


def test_a_vm_with_a_nic_keeps_the_hosts_network_namespace(tmp_path, clean):
    from microvm.specs import Nic

    tap = f"mvj{os.getpid() % 100000}"
    vm = MicroVM(spin_kernel(tmp_path), force=True, mem_mib=32, nics=[Nic(tap)], jail=True,
                 seccomp="kill").start(["true"])
    try:
        pid = vm._jailed.vmm_pid  # type: ignore[union-attr]
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert int(proc_fields(f"/proc/{pid}/status")["CapEff"], 16) == 0
    finally:
        vm.kill()
    assert not Path(f"/sys/class/net/{tap}").exists()  # its fd went with the VMM


def test_the_memory_limit_holds(tmp_path, clean):
    """A guest that touches 400 MiB of its RAM in a VMM limited to 200 MiB:
    the kernel's OOM killer ends the VMM, and the error names the limit."""
    vm = MicroVM(spin_kernel(tmp_path, top_mib=400), force=True, mem_mib=512, jail=Jail(memory_mib=200))
    with pytest.raises(JailError, match="memory limit of 200 MiB"):
        vm.run(["true"], timeout=60)


def test_the_pids_limit_holds(tmp_path, clean):
    """More vCPU threads than the jail allows tasks: starting them fails, named."""
    vm = MicroVM(spin_kernel(tmp_path), force=True, mem_mib=32, vcpus=8, jail=Jail(pids=8))
    with pytest.raises(Exception, match="thread"):
        vm.run(["true"], timeout=30)


def test_timeout_stop_and_kill(tmp_path, clean):
    kernel = spin_kernel(tmp_path)
    with pytest.raises(GuestTimeoutError):
        MicroVM(kernel, force=True, mem_mib=32, jail=True).run(["true"], timeout=0.5)
    vm = MicroVM(kernel, force=True, mem_mib=32, jail=True).start(["true"])
    vm.stop()
    with pytest.raises(VmStoppedError):
        vm.wait(10)
    vm = MicroVM(kernel, force=True, mem_mib=32, jail=True).start(["true"])
    pid = vm._jailed.vmm_pid  # type: ignore[union-attr]
    vm.kill()
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    with pytest.raises(VmStoppedError):
        vm.wait(10)
    vm.close()


def test_setup_errors_come_back_named(tmp_path, clean):
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"\x7fELF" + b"\0" * 60)
    with pytest.raises(LoaderError):
        MicroVM(bad, force=True, mem_mib=32, jail=True).run(["true"], timeout=30)
    with pytest.raises(ConfigError, match="jail uid"):
        Jail(uid=0)
    with pytest.raises(ConfigError, match="jail must be"):
        MicroVM(bad, jail="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="interactive"):
        MicroVM(tiny_pvh_kernel(1, 0), force=True, jail=True).start(None)
    with pytest.raises(CgroupError, match="the cpu, memory, pids cgroup controller"):  # not delegated
        Cgroup.create("x", Jail().limits(32, 1, 0), "v2", mounts_text="none /nonexistent cgroup2 rw 0 0\n")


def test_seccomp_in_the_jail(clean):
    """seccomp= filters the jailed VMM's main and control threads as well as its VM's."""
    r = MicroVM(tiny_pvh_kernel(1, 7), force=True, mem_mib=32, jail=True, seccomp="kill").run(["true"], timeout=30)
    assert r.exit_code == 7


def test_the_vmm_goes_when_its_caller_dies(tmp_path):
    """The caller killed with SIGKILL: its jailed VMM sees the end of its control pipe and stops."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from microvm.machine import MicroVM
        vm = MicroVM({str(spin_kernel(tmp_path))!r}, force=True, mem_mib=32, jail=True).start(["true"])
        print(vm._jailed.vmm_pid, flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        vmm = int(p.stdout.readline())
        assert Path(f"/proc/{vmm}").exists()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{vmm}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{vmm}").exists()
        # What the dead caller could not remove, the next jail does.
        MicroVM(tiny_pvh_kernel(1, 0), force=True, mem_mib=32, jail=True).run(["true"], timeout=30)
        from microvm import teardown

        assert teardown.drain(30.0)
        assert leftovers(set(), pid=p.pid) == set()
    finally:
        p.kill()
        p.wait()


def test_jailed_vms_started_from_several_threads_at_once(clean):
    """Each start forks while other threads run VMs and fork too: every one of them gives its result."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int | None:
        return MicroVM(tiny_pvh_kernel(1, i), force=True, mem_mib=32, jail=True).run(["true"], timeout=60).exit_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(12))) == list(range(12))


def test_a_step_the_host_refuses_is_named(monkeypatch, clean):
    """As in a container without mount rights: pivot_root fails in the child, and the caller hears which step."""
    import errno

    from microvm.jail import sys as jsys

    def refused(new_root: str, put_old: str) -> None:
        raise OSError(errno.EPERM, f"pivot_root {new_root}: Operation not permitted")

    monkeypatch.setattr(jsys, "pivot_root", refused)
    with pytest.raises(JailError, match=r"entering the jail failed: .*pivot_root .*not permitted"):
        MicroVM(tiny_pvh_kernel(1, 0), force=True, mem_mib=32, jail=True).run(["true"], timeout=30)


def test_a_cgroup_the_vmm_cannot_join_stops_the_run_before_any_guest_code(monkeypatch, tmp_path, clean):
    """The VMM joins its cgroup (v1: by itself, first thing; v2: moved by the
    intermediate while it makes its VM, jail/child.py); a join that fails ends
    it before it enters the jail: the caller hears why, nothing is left, and
    the guest never ran (its spin would not end)."""
    def refused(self: Cgroup, pid: int = 0) -> None:
        raise CgroupError(f"cannot write {pid!r} to the group: No space left on device")

    monkeypatch.setattr(Cgroup, "join", refused)
    monkeypatch.setattr(Cgroup, "join_self", refused)
    with pytest.raises((JailError, CgroupError), match=r"cannot write \d+ to the group: No space left on device"):
        MicroVM(spin_kernel(tmp_path), force=True, mem_mib=32, jail=True).run(["true"], timeout=30)


def test_a_process_with_other_threads_cannot_join_a_cgroup_by_itself(tmp_path: Path) -> None:
    """Cgroup.join_self moves only the calling thread: with others alive they would stay outside."""
    group = Cgroup(1, {"cpu": tmp_path})
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with pytest.raises(CgroupError, match=r"only a single-threaded process can join its cgroup by itself; "
                                              r"this one has \d+ threads"):
            group.join_self()
    finally:
        stop.set()
        other.join()
    assert not (tmp_path / "tasks").exists()


def test_a_jailed_vmm_on_cgroup_v1_joins_by_itself_before_its_vm_exists(clean) -> None:
    """v1: no move by PID (an RCU grace period, 5-15 ms, on the boot's path): the
    VMM writes itself into each hierarchy first, so its VM's memory counts too."""
    r = MicroVM(tiny_pvh_kernel(1, 5), force=True, mem_mib=32, jail=Jail(cgroup="v1")).run(["true"], timeout=30)
    t = r.timeline
    assert t["vmm forked"] <= t["jail cgroup joined"] <= t["vm created"] <= t["jail entered"], t

def test_what_the_vmm_sends_is_checked_never_unpickled():
    """A subverted VMM talks to a caller that may be root: only data, checked, comes across."""
    import msgpack

    from microvm.errors import GuestPanicError
    from microvm.jail.wire import decode, encode
    from microvm.machine import RunResult

    r = RunResult(exit_code=3, stdout=b"out", console=b"con", reason="exit", timeline={"vm created": 0.5},
                  stats={"vda": {"reads": 2}})
    assert decode(encode("result", r), RunResult) == ("result", r)
    kind, e = decode(encode("error", GuestPanicError("Kernel panic")), RunResult)
    assert (kind, type(e), str(e)) == ("error", GuestPanicError, "Kernel panic")
    kind, e = decode(encode("error", OSError(5, "EIO")), RunResult)
    assert type(e) is JailError and "OSError" in str(e)
    kind, e = decode(msgpack.packb({"kind": "error", "type": "__import__", "message": "os"}), RunResult)
    assert type(e) is JailError  # a name outside the allow-list is only text
    for bad in ({"kind": "started", "pid": "1"}, {"kind": "result", "exit_code": True}, {"kind": "nope"}, [1, 2],
                {"kind": "result", "exit_code": 0, "stdout": "not bytes", "console": b"", "reason": "exit",
                 "timeline": {}, "stats": {}}):
        with pytest.raises((ValueError, TypeError, KeyError)):
            decode(msgpack.packb(bad), RunResult)
    with pytest.raises((ValueError, msgpack.UnpackException)):  # garbage: msgpack's own error
        decode(b"\xc1\xff", RunResult)


def test_a_jailed_vm_with_vsock_under_the_default_seccomp(tmp_path, clean):
    """The listener is made before the jail and its directory bound in; the VMM (uid nobody,
    seccomp "kill" in the jail) leaves its socket for the caller to remove."""
    sock = tmp_path / "vsock" / "v.sock"
    sock.parent.mkdir()
    vm = MicroVM(tiny_pvh_kernel(1, 9), force=True, mem_mib=32, vsock=sock, jail=True)
    assert vm.seccomp == "auto"
    assert vm.run(["true"], timeout=30).exit_code == 9
    assert not sock.exists()
    with pytest.raises(JailError, match="directory of its own"):
        MicroVM(tiny_pvh_kernel(1, 9), force=True, mem_mib=32, vsock="/v.sock", jail=True).run(["true"])


def test_kill_from_another_thread_during_wait(tmp_path, clean):
    """wait() in one thread, kill() in another: the wait ends (stopped), nothing is left behind."""
    vm = MicroVM(spin_kernel(tmp_path), force=True, mem_mib=32, jail=True).start(["true"])
    killer = threading.Timer(0.5, vm.kill)
    killer.start()
    with pytest.raises(VmStoppedError):
        vm.wait(30)
    killer.join()
    vm.close()


def test_the_vmms_log_records_reach_the_callers_handlers(tmp_path, capfd, clean):
    """The jailed VMM keeps none of the caller's files: its records cross to the caller, whose
    FileHandler writes them (with the VMM's PID), instead of failing in the VMM on every record."""
    import logging

    from tests.kvm.hostile import hostile_kernel

    log_file = tmp_path / "vmm.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(processName)s %(jailed_vmm)s %(message)s"))
    logger = logging.getLogger("microvm")
    logger.addHandler(handler)
    try:
        vm = MicroVM(hostile_kernel(2000), force=True, mem_mib=32, jail=True)
        vm.run(["true"], timeout=60)
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = log_file.read_text().splitlines()
    refused = [line for line in lines if "refused" in line]
    assert refused, lines
    assert all(line.startswith("WARNING microvm.devices.virtio.mmio jailed VMM ") for line in refused), refused[:3]
    assert vm._jailed is not None and {line.split()[4] for line in refused} == {str(vm._jailed.vmm_pid)}
    assert "Logging error" not in capfd.readouterr().err


@pytest.mark.parametrize("planted", ["writable", "link"])
def test_a_base_directory_another_user_could_have_planted_is_refused(tmp_path, monkeypatch, planted, clean):
    """The roots go in <tmp>/microvm-jails: one that others may write to, or a link, is named, not used."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = tmp_path / "microvm-jails"
    if planted == "writable":
        base.mkdir(mode=0o777)
        base.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        base.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(JailError, match="microvm-jails is not a directory of root's that only root can write"):
        MicroVM(tiny_pvh_kernel(1, 0), force=True, mem_mib=32, jail=True).run(["true"], timeout=30)
    assert not list((tmp_path / ("elsewhere" if planted == "link" else "microvm-jails")).iterdir())
