"""Threads, crashes and stopping: how the run loop behaves when things go wrong."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from microvm.errors import DeviceError, GuestCrashError
from microvm.vcpu import StopReason
from tests.kvm.guests import Recorder, long_mode_vm
from tests.support.resources import open_fds


class Stamps:
    """Records (vcpu index, what, monotonic time) for each port write."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int, float]] = []
        self.lock = threading.Lock()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.events.append((value >> 8, value & 0xFF, time.monotonic()))


BARRIER = 0x100000  # a counter in guest RAM, away from code, stack, TSS and page tables


def test_two_vcpus_run_at_the_same_time() -> None:
    # A barrier in guest memory: each vCPU (index in rdi) reports "start",
    # adds one to the counter, spins until both have arrived, reports "end".
    # Only vCPUs that run at the same time get past it: were they serialised
    # (the GIL held across KVM_RUN, say), the first would spin for ever and
    # the second never arrive. No timing is compared.
    src = f"""
        mov rax, rdi
        shl rax, 8
        mov dx, 0x80
        out dx, ax
        lock inc dword ptr [{BARRIER:#x}]
    wait_other:
        pause
        cmp dword ptr [{BARRIER:#x}], 2
        jne wait_other
        or al, 1
        out dx, ax
    park:
        jmp park
    """
    with long_mode_vm(src, user=True, vcpus=2) as vm:
        stamps = Stamps()
        vm.pio.register(0x80, 2, stamps)
        vm.start()
        deadline = time.monotonic() + 60
        while len(stamps.events) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.stop()
        assert vm.wait(5) is StopReason.STOPPED
    assert {(cpu, what) for cpu, what, _ in stamps.events} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_triple_fault_is_a_clear_error() -> None:
    # No IDT: ud2 raises #UD, which escalates to #DF and then a triple fault.
    with long_mode_vm("ud2") as vm:
        vm.start()
        with pytest.raises(GuestCrashError, match="triple fault"):
            vm.wait(10)
        assert vm.end_reason is StopReason.SHUTDOWN


def test_jump_into_unmapped_memory_is_a_clear_error() -> None:
    # 0x20000000 is inside the identity map but has no RAM behind it.
    with long_mode_vm("mov rax, 0x20000000\njmp rax") as vm:
        vm.start()
        with pytest.raises(GuestCrashError, match="vcpu0"):
            vm.wait(10)
        assert vm.end_reason in (StopReason.SHUTDOWN, StopReason.ERROR)


@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_stop_a_spinning_vcpu_within_100ms(user: bool) -> None:
    with long_mode_vm("out 0x80, al\nspin: jmp spin", user=user) as vm:
        started = Recorder()
        vm.pio.register(0x80, 1, started)
        vm.start()
        deadline = time.monotonic() + 10
        while not started.writes and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)  # let it spin inside KVM_RUN
        assert vm.vcpus[0].running
        t0 = time.monotonic()
        vm.stop()
        assert vm.wait(1.0) is StopReason.STOPPED
        elapsed = time.monotonic() - t0
    assert elapsed < 0.1, f"stop took {elapsed * 1000:.1f} ms"


def test_pause_and_resume() -> None:
    src = """
        xor eax, eax
    loop:
        inc eax
        out 0x80, al
        jmp loop
    """
    with long_mode_vm(src) as vm:
        rec = Recorder()
        vm.pio.register(0x80, 1, rec)
        vm.start()
        while len(rec.writes) < 10:
            time.sleep(0.001)
        vcpu = vm.vcpus[0]
        assert vcpu.pause(1.0)
        n = len(rec.writes)
        time.sleep(0.05)
        assert len(rec.writes) == n  # parked: no progress
        vcpu.resume()
        deadline = time.monotonic() + 5
        while len(rec.writes) <= n and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(rec.writes) > n
        vm.stop()
        assert vm.wait(1.0) is StopReason.STOPPED
    assert [v for _, _, v in rec.writes[:5]] == [1, 2, 3, 4, 5]


def test_teardown_closes_fds_and_joins_threads() -> None:
    proc = psutil.Process()
    fds_before = open_fds(proc)
    threads_before = threading.active_count()
    for _ in range(20):
        with long_mode_vm("spin: jmp spin", vcpus=2) as vm:
            vm.start()
            time.sleep(0.002)
    assert open_fds(proc) == fds_before
    assert threading.active_count() == threads_before
    maps = open(f"/proc/{os.getpid()}/maps").read()
    assert "kvm-vcpu" not in maps


def test_pause_resume_many_times() -> None:
    # A kick landing while the loop handles an earlier one must not be lost.
    src = """
    loop:
        out 0x80, al
        jmp loop
    """
    with long_mode_vm(src) as vm:
        vm.pio.register(0x80, 1, Recorder())
        vm.start()
        vcpu = vm.vcpus[0]
        for _ in range(30):
            assert vcpu.pause(1.0), "pause request lost"
            vcpu.resume()
        vm.stop()
        assert vm.wait(1.0) is StopReason.STOPPED


def test_closing_a_running_vcpu_is_refused() -> None:
    with long_mode_vm("spin: jmp spin") as vm:
        vm.start()
        deadline = time.monotonic() + 5
        while not vm.vcpus[0].fd.in_run and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(RuntimeError, match="inside KVM_RUN"):
            vm.vcpus[0].fd.close()
        vm.stop()
        assert vm.wait(1.0) is StopReason.STOPPED


def test_device_error_in_vcpu_thread_is_reported() -> None:
    class Broken:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            raise RuntimeError("device exploded")

    with long_mode_vm("out 0x80, al\nhlt") as vm:
        vm.pio.register(0x80, 1, Broken(), "post-code")
        vm.start()
        with pytest.raises(DeviceError, match="device post-code failed on a pio write at 0x80: "
                                              "RuntimeError: device exploded") as info:
            vm.wait(5)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert vm.end_reason is StopReason.ERROR
