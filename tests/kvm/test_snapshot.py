"""Pause, snapshot, restore and fork on real /dev/kvm with tiny guests.

The guests run at CPL3 (native speed on any KVM, PVM included) in long
mode, with the in-kernel irqchip and PIT, so that every part of the state
(vCPU registers of each class, both PICs, the I/O APIC, the PIT, the clock)
is captured and applied.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from microvm import _kvm, snapshot
from microvm.arch.x86_64 import flat
from microvm.errors import SnapshotError
from microvm.snapshot import files
from microvm.vm import Vm
from tests.kvm.asm import assemble
from tests.support.resources import open_fds

ROOT = Path(__file__).resolve().parents[2]
COUNTER = 0x200000  # where the counting guest keeps its count
FLAG = 0x300000  # the toucher waits until this is non-zero
TOUCHED = 0x1000000  # and then writes one byte in each page of 4 MiB from here

COUNTING = """
    xor ebx, ebx
loop:
    inc rbx
    mov [0x200000], rbx
    mov eax, ebx
    out 0x80, eax
    jmp loop
"""

# Reports "ready" (port 0x80), waits for FLAG, writes its value in one byte
# of each of 1024 pages from TOUCHED, reports "done" (port 0x81), spins.
TOUCHER = """
    out 0x80, al
wait:
    mov rax, [0x300000]
    test rax, rax
    jz wait
    mov rdi, 0x1000000
    mov ecx, 1024
touch:
    mov [rdi], al
    add rdi, 4096
    dec ecx
    jnz touch
    out 0x81, al
done:
    jmp done
"""


class Port:
    """Records the values written to a port; wait() for a condition on them."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.cond = threading.Condition()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self.cond:
            if len(self.values) < 10_000:
                self.values.append(value)
            else:
                self.values[-1] = value
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float = 30.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.values), timeout), self.values[-5:]


def guest(source: str, mem_size: int = 4 << 20, forkable: bool = False) -> Vm:
    vm = Vm([(0, mem_size)], irqchip=True, forkable=forkable)
    vm.mem.write(flat.CODE, assemble(source, 64))
    limit = flat.prepare(vm.mem, map_gib=1, user=True)
    for vcpu in vm.vcpus:
        flat.enter(vcpu.fd, limit, user=True, rsp=flat.STACK, rdi=vcpu.index)
    return vm


def counting_vm(past: int = 2000, forkable: bool = False) -> tuple[Vm, Port]:
    vm = guest(COUNTING, forkable=forkable)
    port = Port()
    vm.pio.register(0x80, 1, port)
    vm.start()
    port.wait(lambda v: v and v[-1] >= past)
    vm.pause()
    return vm, port


def test_pause_stops_every_vcpu_and_resume_goes_on() -> None:
    vm, port = counting_vm()
    try:
        count = vm.mem.read_int(COUNTER, 8)
        assert count == port.values[-1]  # paused after the exit was answered, before the next store
        time.sleep(0.05)
        assert vm.mem.read_int(COUNTER, 8) == count
        vm.resume()
        port.wait(lambda v: v[-1] > count + 100)
    finally:
        vm.close()


def test_snapshot_restored_in_another_process_continues_from_the_exact_count(tmp_path: Path) -> None:
    vm, port = counting_vm()
    try:
        last = port.values[-1]
        snapshot.take(vm, tmp_path / "snap")
    finally:
        vm.close()
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from microvm import snapshot
        from tests.kvm.test_snapshot import Port
        vm = snapshot.Snapshot.load({str(tmp_path / "snap")!r}).restore_vm()
        memory_then = vm.mem.read_int({COUNTER}, 8)
        port = Port()
        vm.pio.register(0x80, 1, port)
        vm.start()
        port.wait(lambda v: len(v) >= 100)
        vm.close()
        print(json.dumps({{"memory": memory_then, "first": port.values[:3]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == {"memory": last, "first": [last + 1, last + 2, last + 3]}


def test_snapshot_directory_is_sparse_and_complete(tmp_path: Path) -> None:
    vm, _ = counting_vm()
    try:
        snap = snapshot.take(vm, tmp_path / "snap")
    finally:
        vm.close()
    memory = tmp_path / "snap" / files.MEMORY
    assert memory.stat().st_size == 4 << 20
    assert memory.stat().st_blocks * 512 < 1 << 20  # code, page tables, stack, counter: holes elsewhere
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["memory", "state"]
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]  # no temporary left beside it
    assert snapshot.Snapshot.load(tmp_path / "snap").state == snap.state


def _pit_without_load_times(pit: bytes) -> bytes:
    # struct kvm_pit_state2: three 24-byte channels, each with an s64
    # count_load_time (host ktime) at offset 16.
    out = bytearray(pit)
    for channel in range(3):
        out[channel * 24 + 16:channel * 24 + 24] = bytes(8)
    return bytes(out)


class Counter:
    """Answers reads with 1, 2, 3, ...; at `pause_at` asks its own vCPU to pause
    (from inside the exit: the request is all it can make there)."""

    def __init__(self, start: int = 1, pause_at: int = 0, vm: Vm | None = None) -> None:
        self.next, self.pause_at, self.vm = start, pause_at, vm

    def read(self, offset: int, size: int) -> int:
        value = self.next
        self.next += 1
        if value == self.pause_at and self.vm is not None:
            self.vm.vcpus[0].pause(0)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def test_a_vcpu_paused_right_after_an_in_has_finished_it(tmp_path: Path) -> None:
    # KVM puts an IN's value in the register, and steps past it, only at the
    # next KVM_RUN. Paused without that, a restore would run the IN again:
    # the guest would skip the value it had read.
    vm = guest("loop:\n in eax, 0x80\n out 0x81, eax\n jmp loop")
    before = Port()
    vm.pio.register(0x80, 1, Counter(pause_at=500, vm=vm))
    vm.pio.register(0x81, 1, before)
    try:
        vm.start()
        assert vm.vcpus[0]._paused.wait(10)
        vm.pause()
        snapshot.take(vm, tmp_path / "snap")
    finally:
        vm.close()
    restored = snapshot.Snapshot.load(tmp_path / "snap").restore_vm()
    after = Port()
    restored.pio.register(0x80, 1, Counter(start=501))
    restored.pio.register(0x81, 1, after)
    try:
        restored.start()
        after.wait(lambda v: len(v) >= 3)
    finally:
        restored.close()
    assert before.values == list(range(1, 500))  # 500 was read, not yet written out
    assert after.values[:3] == [500, 501, 502]


def test_every_register_class_round_trips() -> None:
    vm, _ = counting_vm()
    other = Vm([(0, 4 << 20)], irqchip=True)
    try:
        saved = snapshot.capture(vm)
        snapshot._apply(other, saved)
        again = snapshot.capture(other)
    finally:
        vm.close()
        other.close()
    a, b = saved["vcpus"][0], again["vcpus"][0]
    assert set(a) == {"cpuid", "mp_state", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "lapic",
                      "msrs", "events"}
    for key in ("cpuid", "mp_state", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "lapic", "events"):
        assert a[key] == b[key], key
    tsc = 0x10  # counts on: the restored one is later, never earlier
    assert {k: v for k, v in a["msrs"].items() if k != tsc} == {k: v for k, v in b["msrs"].items() if k != tsc}
    assert b["msrs"][tsc] >= a["msrs"][tsc]
    assert len(a["msrs"]) >= 10  # KVM's whole list, as far as this vCPU reads it
    assert saved["kvm"]["irqchip"] == again["kvm"]["irqchip"]
    assert _pit_without_load_times(saved["kvm"]["pit"]) == _pit_without_load_times(again["kvm"]["pit"])
    assert 0 <= again["kvm"]["clock"] - saved["kvm"]["clock"] < 5_000_000_000


def _toucher(forkable: bool = True, mem_size: int = 256 << 20) -> tuple[Vm, Port]:
    vm = guest(TOUCHER, mem_size=mem_size, forkable=forkable)
    ready = Port()
    vm.pio.register(0x80, 1, ready)
    vm.pio.register(0x81, 1, Port())
    vm.start()
    ready.wait(lambda v: len(v) == 1)
    time.sleep(0.01)  # into the wait loop
    vm.pause()
    return vm, ready


def _run_clone(clone: Vm, value: int) -> Port:
    done = Port()
    clone.pio.register(0x80, 1, Port())
    clone.pio.register(0x81, 1, done)
    clone.mem.write_int(FLAG, 8, value)
    clone.start()
    return done


def test_twenty_forks_touching_4_mib_each_share_the_rest() -> None:
    vm, _ = _toucher()
    me = psutil.Process()
    clones: list[Vm] = []
    try:
        before = me.memory_full_info().pss
        clones = snapshot.fork(vm, 20)
        ports = [_run_clone(c, i + 1) for i, c in enumerate(clones)]
        for port in ports:
            port.wait(lambda v: len(v) == 1)
        for clone in clones:
            clone.pause()
        grown = me.memory_full_info().pss - before
        assert grown <= 120 << 20, f"PSS grew {grown >> 20} MiB for 20 clones"
        for i, clone in enumerate(clones):  # each wrote its own value, and sees only its own
            assert clone.mem.read(TOUCHED, 1) == bytes([i + 1])
            assert clone.mem.read(TOUCHED + (4 << 20) - 4096, 1) == bytes([i + 1])
        assert vm.mem.read(TOUCHED, 1) == b"\0"
    finally:
        for clone in clones:
            clone.close()
        vm.close()


def test_a_clone_never_sees_what_its_parent_writes_after_the_fork() -> None:
    vm, _ = _toucher(mem_size=32 << 20)
    try:
        (clone,) = snapshot.fork(vm, 1)
        try:
            vm.mem.write_int(FLAG, 8, 7)  # the parent, from the host...
            vm.resume()  # ...and from the guest: it now touches its 4 MiB with 7
            time.sleep(0.05)
            vm.pause()
            assert vm.mem.read(TOUCHED, 1) == b"\x07"
            assert clone.mem.read_int(FLAG, 8) == 0
            assert clone.mem.read(TOUCHED, 1) == b"\0"
            # A second fork after the parent ran starts from the parent as it is now.
            (late,) = snapshot.fork(vm, 1)
            try:
                assert late.mem.read(TOUCHED, 1) == b"\x07"
                late.mem.write_int(TOUCHED, 1, 9)
                assert vm.mem.read(TOUCHED, 1) == b"\x07"
                assert clone.mem.read(TOUCHED, 1) == b"\0"
            finally:
                late.close()
        finally:
            clone.close()
    finally:
        vm.close()


def test_any_vm_forks_by_copying_what_it_touched() -> None:
    vm, _ = _toucher(forkable=False, mem_size=32 << 20)
    try:
        (clone,) = snapshot.fork(vm, 1)
        try:
            done = _run_clone(clone, 5)
            done.wait(lambda v: len(v) == 1)
            clone.pause()
            assert clone.mem.read(TOUCHED, 1) == b"\x05"
            assert vm.mem.read(TOUCHED, 1) == b"\0"
        finally:
            clone.close()
    finally:
        vm.close()


# --- bad snapshots: SnapshotError before any vCPU runs -------------------------


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    vm, _ = counting_vm()
    try:
        snapshot.take(vm, tmp_path / "snap")
    finally:
        vm.close()
    return tmp_path / "snap"


def _rewrite_state(snap: Path, change: Any) -> None:
    state = files.read_state(snap)
    change(state)
    (snap / files.STATE).write_bytes(files.encode_state(state))


def _restore_fails(snap: Path, match: str, **kw: Any) -> None:
    before = (open_fds(), _kvm.live_mappings())
    with pytest.raises(SnapshotError, match=match):
        snapshot.Snapshot.load(snap).restore_vm(**kw)
    assert (open_fds(), _kvm.live_mappings()) == before


def test_a_flipped_byte_in_the_state_is_caught(snap: Path) -> None:
    data = bytearray((snap / files.STATE).read_bytes())
    data[-10] ^= 0x40
    (snap / files.STATE).write_bytes(bytes(data))
    _restore_fails(snap, "corrupted: its checksum does not match")


def test_a_truncated_state_is_caught(snap: Path) -> None:
    data = (snap / files.STATE).read_bytes()
    (snap / files.STATE).write_bytes(data[:len(data) // 2])
    _restore_fails(snap, "truncated")
    (snap / files.STATE).write_bytes(data[:20])
    _restore_fails(snap, "truncated")


def test_another_state_format_is_named(snap: Path) -> None:
    data = bytearray((snap / files.STATE).read_bytes())
    data[len(files.MAGIC)] = 99
    (snap / files.STATE).write_bytes(bytes(data))
    _restore_fails(snap, "has state format 99; this microvm reads format 1")


def test_not_a_snapshot_is_named(tmp_path: Path, snap: Path) -> None:
    _restore_fails(tmp_path, "is not a snapshot: it has no state file")
    (snap / files.STATE).write_bytes(b"hello")
    _restore_fails(snap, "not a microvm snapshot state file")


def test_a_truncated_memory_file_is_caught(snap: Path) -> None:
    os.truncate(snap / files.MEMORY, 1 << 20)
    _restore_fails(snap, r"memory is truncated or grown: 1048576 bytes, the state says 4194304")


def test_corrupted_memory_is_caught_when_verified(snap: Path) -> None:
    with open(snap / files.MEMORY, "r+b") as f:
        f.seek(flat.CODE)
        byte = f.read(1)
        f.seek(flat.CODE)
        f.write(bytes([byte[0] ^ 1]))
    _restore_fails(snap, "memory is corrupted", verify=True)


def test_a_snapshot_without_a_memory_checksum_cannot_be_verified(tmp_path: Path) -> None:
    vm, _ = counting_vm()
    try:
        taken = snapshot.take(vm, tmp_path / "snap", checksum=False)
    finally:
        vm.close()
    assert taken.state["memory"]["sha256"] is None
    _restore_fails(tmp_path / "snap", "taken without a memory checksum; cannot verify", verify=True)
    snapshot.Snapshot.load(tmp_path / "snap").restore_vm().close()  # unverified, it restores


def test_cpuid_features_this_host_lacks_are_named(snap: Path) -> None:
    def claim_everything(state: dict[str, Any]) -> None:
        for entry in state["vm"]["vcpus"][0]["cpuid"]:
            if entry["function"] == 7 and entry["index"] == 0:
                entry["ebx"] = 0xFFFFFFFF
                return
        state["vm"]["vcpus"][0]["cpuid"].append(
            {"function": 7, "index": 0, "flags": 1, "eax": 0, "ebx": 0xFFFFFFFF, "ecx": 0, "edx": 0})

    _rewrite_state(snap, claim_everything)
    _restore_fails(snap, "this host lacks CPUID features the guest was given: leaf 0x7.0 ebx")


def test_a_malformed_state_is_named(snap: Path) -> None:
    _rewrite_state(snap, lambda s: s["vm"]["vcpus"][0].pop("lapic"))
    _restore_fails(snap, "vcpu0: the state has no 'lapic'")
    _rewrite_state(snap, lambda s: s["vm"]["vcpus"][0].update(lapic=b"short"))
    _restore_fails(snap, "vcpu0: KVM refused the saved lapic")


def test_a_snapshot_is_never_written_over_another(snap: Path) -> None:
    vm, _ = counting_vm()
    try:
        with pytest.raises(SnapshotError, match="exists already"):
            snapshot.take(vm, snap)
    finally:
        vm.close()


def test_a_failed_write_leaves_no_directory(tmp_path: Path) -> None:
    # A 16 KiB tmpfs cannot hold the guest's 36 KiB of data: ENOSPC part-way.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], check=True)
    try:
        vm, _ = counting_vm()
        try:
            with pytest.raises(SnapshotError, match="No space left on device"):
                snapshot.take(vm, small / "snap")
        finally:
            vm.close()
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
