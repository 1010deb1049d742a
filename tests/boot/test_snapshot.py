"""Snapshots of Linux guests: a MicroVM with a disk, a NIC and vsock restored in
another process; a sandbox restored and forked; a pool of forks.

On a PVM host the file runs in the lane (tests/boot/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from microvm import MicroVM
from microvm.errors import SnapshotError
from microvm.memory import GuestMemory
from microvm.sandbox import Sandbox, SandboxPool
from microvm.snapshot import Snapshot
from microvm.specs import Drive, Nic
from tests.boot.conftest import boots_here
from tests.support import pyenv
from tests.support.resources import open_fds

pytestmark = pytest.mark.boot
ROOT = Path(__file__).resolve().parents[2]
GUEST_IP, HOST_IP = "10.0.93.2", "10.0.93.1"

WORKLOAD = (
    "mount /dev/vda /mnt || exit 9; "
    "for i in $(seq 1 20); do echo line$i >> /mnt/log; sync; echo n$i; sleep 0.2; done; "
    "umount /mnt; "
    f"ping -c 1 -W 5 {HOST_IP} >/dev/null && echo net-ok; "
    "echo done"
)


def ext4_disk(path: Path, mib: int = 32) -> Path:
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


def machine(disk: Path, uds: Path, kernel: Path | None = None) -> MicroVM:
    return MicroVM(kernel, mem_mib=128, drives=[Drive(disk)], vsock=uds,
                   nics=[Nic(tap="mvsnap0", ip=f"{GUEST_IP}/24", host_ip=f"{HOST_IP}/24")])


def snapshot_mid_workload(tmp_path: Path, kernel: Path | None = None) -> tuple[Path, Path, bytes]:
    """Boot, run WORKLOAD until it has written 5 lines, snapshot, close; (snapshot, disk, output so far)."""
    disk = ext4_disk(tmp_path / "disk.img")
    vm = machine(disk, tmp_path / "vsock", kernel)
    try:
        vm.start(["sh", "-c", WORKLOAD])
        deadline = time.monotonic() + 120
        while b"n5\n" not in vm.stdout:
            assert time.monotonic() < deadline, vm.console_tail()
            assert vm.reason is None, vm.console_tail()
            time.sleep(0.02)
        vm.snapshot(tmp_path / "snap")
        before = bytes(vm.stdout)
    finally:
        vm.close()
    return tmp_path / "snap", disk, before


def test_a_guest_with_disk_nic_and_vsock_finishes_its_work_in_another_process(tmp_path: Path) -> None:
    if not boots_here():
        return
    snap, disk, before = snapshot_mid_workload(tmp_path)
    assert b"n20" not in before
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from microvm import MicroVM
        vm = MicroVM.restore({str(snap)!r})
        r = vm.wait(120)
        print(json.dumps({{"exit": r.exit_code, "stdout": r.stdout.decode()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["exit"] == 0
    assert result["stdout"].split() == [f"n{i}" for i in range(1, 21)] + ["net-ok", "done"]
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    log = subprocess.run(["debugfs", "-R", "cat /log", str(disk)], capture_output=True, text=True, check=True)
    assert log.stdout.split() == [f"line{i}" for i in range(1, 21)]


def test_a_changed_disk_or_kernel_is_refused_before_anything_runs(tmp_path: Path) -> None:
    if not boots_here():
        return
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    assert art is not None
    kernel = tmp_path / "vmlinux"
    shutil.copy2(art.vmlinux, kernel)
    snap, disk, _ = snapshot_mid_workload(tmp_path, kernel)
    me = psutil.Process()
    fds, threads = open_fds(me), me.num_threads()
    st = disk.stat()
    with open(disk, "r+b") as f:  # one byte, same size: the mtime tells
        f.seek(1 << 20)
        old = f.read(1)
        f.seek(1 << 20)
        f.write(b"x")
    with pytest.raises(SnapshotError, match=f"the writable disk image {disk} changed since the snapshot"):
        MicroVM.restore(snap)
    with open(disk, "r+b") as f:  # put it back as it was, mtime too
        f.seek(1 << 20)
        f.write(old)
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(kernel, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(SnapshotError, match=f"the kernel {kernel} changed since the snapshot"):
        MicroVM.restore(snap)
    kernel.unlink()
    with pytest.raises(SnapshotError, match=f"the kernel {kernel} the snapshot uses is gone"):
        MicroVM.restore(snap)
    deadline = time.monotonic() + 2.0  # an exiting thread may be listed for a moment more
    while (open_fds(me), me.num_threads()) != (fds, threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (open_fds(me), me.num_threads()) == (fds, threads)
    assert "mvsnap0" not in os.listdir("/sys/class/net")


@pytest.fixture(scope="module")
def image():  # type: ignore[no-untyped-def]
    return pyenv.test_image()


@pytest.fixture(scope="module")
def sb(image) -> Iterator[Sandbox | None]:  # type: ignore[no-untyped-def]
    if not boots_here():
        yield None
        return
    with Sandbox(image=image, mem_mib=256, timeout=120, forkable=True) as sandbox:
        yield sandbox


def identity() -> tuple[bytes, float, float]:
    import os
    import random
    import time

    return os.urandom(16), time.time(), random.random()


def test_a_restored_sandbox_answers_calls_with_its_own_entropy(sb: Sandbox, tmp_path: Path) -> None:
    if sb is None:
        return
    mine = sb.call(identity)
    sb.snapshot(tmp_path / "snap")
    assert sb.call(lambda: 6 * 7) == 42  # the original goes on
    restored = [Sandbox.restore(tmp_path / "snap", timeout=120) for _ in range(2)]
    try:
        seen = [r.call(identity) for r in restored]
        assert [r.call(lambda: 6 * 7) for r in restored] == [42, 42]
    finally:
        for r in restored:
            r.close()
    randoms = {mine[0], *(s[0] for s in seen)}
    assert len(randoms) == 3
    assert len({mine[2], *(s[2] for s in seen)}) == 3
    for _, when, _ in seen:
        assert abs(when - time.time()) < 30


def test_pages_recorded_once_are_prefetched_by_later_restores(sb: Sandbox, tmp_path: Path) -> None:
    if sb is None:
        return
    sb.snapshot(tmp_path / "snap")
    with Sandbox.restore(tmp_path / "snap", timeout=120) as first:
        assert first.call(lambda: 6 * 7) == 42
        pages = first.record_pages(tmp_path / "snap")
    assert pages > 100  # the agent, the call's process, the kernel's paths for both
    assert (tmp_path / "snap" / "pages").stat().st_size > 0
    snap = Snapshot.load(tmp_path / "snap")
    cold, warm = snap.map_memory(), snap.map_memory(prefetch=True)
    try:  # before any guest runs: only the prefetched mapping has its pages in place
        assert _resident_pages(cold) < pages // 10
        assert _resident_pages(warm) >= pages
    finally:
        cold.close()
        warm.close()
    with Sandbox.restore(tmp_path / "snap", timeout=120, prefetch=True) as again:
        assert again.call(lambda: 6 * 7) == 42


def _resident_pages(mem: GuestMemory) -> int:
    """Pages of `mem` mapped in this process (what prefetch faults in), from /proc/self/smaps."""
    starts = {region.host_address() for region in mem.regions}
    rss = 0
    for m in psutil.Process().memory_maps(grouped=False):
        if int(m.addr.split("-")[0], 16) in starts:
            rss += m.rss
    return rss // 4096


def test_ten_forks_each_answer_with_their_own_entropy_and_the_time(sb: Sandbox) -> None:
    if sb is None:
        return
    clones = sb.fork(10)
    try:
        seen = [c.call(identity) for c in clones]
    finally:
        for c in clones:
            c.close()
    assert len({s[0] for s in seen}) == 10
    assert len({s[2] for s in seen}) == 10
    for _, when, _ in seen:
        assert abs(when - time.time()) < 30
    assert sb.call(lambda: 1 + 1) == 2  # the parent goes on


def test_a_pool_of_forks_starts_with_the_preloaded_modules(image) -> None:  # type: ignore[no-untyped-def]
    if not boots_here():
        return

    def loaded() -> tuple[bool, int]:
        import os
        import sys

        return "decimal" in sys.modules, os.getpid()

    with SandboxPool(2, from_snapshot=True, preload=["decimal"], image=image, mem_mib=256, timeout=120) as pool:
        results = []
        for _ in range(3):
            with pool.sandbox(timeout=300) as s:
                results.append(s.call(loaded))
    assert all(flag for flag, _ in results)
    with Sandbox(image=image, mem_mib=256, timeout=120) as plain:
        assert plain.call(loaded)[0] is False  # not there unless preloaded


def test_fork_refuses_a_writable_disk(tmp_path: Path) -> None:
    if not boots_here():
        return
    disk = ext4_disk(tmp_path / "disk.img", 8)
    vm = MicroVM(mem_mib=128, drives=[Drive(disk)])
    try:
        vm.start(["sh", "-c", "sleep 30"])
        time.sleep(1)
        with pytest.raises(SnapshotError, match="clones would share the writable disk"):
            vm.fork(1)
    finally:
        vm.close()
    os.unlink(disk)


def test_microvm_restore_cli_finishes_the_command(tmp_path: Path) -> None:
    if not boots_here():
        return
    snap, _, before = snapshot_mid_workload(tmp_path)
    out = subprocess.run([sys.executable, "-m", "microvm", "restore", "--timeout", "120", str(snap)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # Only what the command wrote after the snapshot: together with the
    # output before it, the whole workload's, each line once.
    after = out.stdout.split()
    assert before.decode().split() + after == [f"n{i}" for i in range(1, 21)] + ["net-ok", "done"]
    assert after[-2:] == ["net-ok", "done"] and "n20" in after and "n5" not in after
