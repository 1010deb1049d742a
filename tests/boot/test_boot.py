"""Boot our kernel and run commands in it: what a user of `MicroVM` sees."""

from __future__ import annotations

import re
import threading

import psutil
import pytest

from microvm.errors import MicroVMError
from microvm.kernelbuild import find_default_kernel
from microvm.machine import GuestPanicError, GuestTimeoutError, MicroVM
from tests.support.resources import open_fds


@pytest.fixture(params=["vmlinux", "bzImage"], scope="module")
def kernel(request: pytest.FixtureRequest) -> str:
    art = find_default_kernel()
    if art is None:
        pytest.fail("no guest kernel built: run `microvm kernel build`")
    return str(art.vmlinux if request.param == "vmlinux" else art.bzimage)


def test_echo(kernel: str) -> None:
    with MicroVM(kernel) as vm:
        r = vm.run(["echo", "hello", "from the guest"], timeout=120)
    assert r.exit_code == 0 and r.reason == "exit"
    assert r.stdout == b"hello from the guest\n"
    phases = list(r.timeline)
    assert phases[:4] == ["vm created", "memory mapped", "kernel loaded", "first vcpu entry"]
    assert "init reached" in phases and "command done" in phases
    assert list(r.timeline.values()) == sorted(r.timeline.values())


def test_cpuinfo(kernel: str) -> None:
    r = MicroVM(kernel).run(["cat", "/proc/cpuinfo"], timeout=120)
    assert r.exit_code == 0
    assert r.output.count("processor\t:") == 1
    assert " hypervisor" in r.output


def test_failing_command_exit_code(kernel: str) -> None:
    r = MicroVM(kernel).run(["sh", "-c", "echo oops >&2; exit 42"], timeout=120)
    assert r.exit_code == 42
    assert r.stdout == b"oops\n"


def test_arguments_arrive_intact(kernel: str) -> None:
    args = ["a b", "it's", '"q"', "$HOME", "*", ""]
    r = MicroVM(kernel).run(["sh", "-c", 'for a in "$@"; do echo "<$a>"; done', "sh", *args], timeout=120)
    assert r.output == "".join(f"<{a}>\n" for a in args)


def test_one_mib_of_output_arrives_in_order(kernel: str) -> None:
    r = MicroVM(kernel).run(["seq", "1", "170000"], timeout=900)
    expected = "".join(f"{i}\n" for i in range(1, 170001)).encode()
    assert len(expected) > 1 << 20
    assert r.exit_code == 0
    assert r.stdout == expected


@pytest.mark.parametrize("cmd,reason", [(["reboot"], "reboot"), (["poweroff"], "poweroff"), (["halt"], "poweroff"),
                                        (["reboot", "-f"], "reboot"), (["poweroff", "-f"], "poweroff"),
                                        (["halt", "-f"], "poweroff")])
def test_reboot_poweroff_and_halt_end_the_vm(cmd: list[str], reason: str) -> None:
    art = find_default_kernel()
    assert art is not None
    r = MicroVM(art.vmlinux).run(cmd, timeout=120)
    assert r.reason == reason
    assert r.exit_code is None
    # The kernel's last words ("reboot: System halted") are console, never the command's output.
    assert r.stdout == b"", r.stdout


def test_kernel_panic_is_a_clear_error() -> None:
    art = find_default_kernel()
    assert art is not None
    vm = MicroVM(art.vmlinux, append="rdinit=/no/such/init init=/no/such/init")
    with pytest.raises(GuestPanicError, match="panicked") as info:
        vm.run(["true"], timeout=120)
    assert "Kernel panic - not syncing" in str(info.value)


def test_timeout_kills_and_frees() -> None:
    art = find_default_kernel()
    assert art is not None
    proc = psutil.Process()
    fds, threads = open_fds(proc), threading.active_count()
    vm = MicroVM(art.vmlinux)
    with pytest.raises(GuestTimeoutError, match="did not finish within 5") as info:
        vm.run(["sleep", "1000"], timeout=5)
    assert vm.vm is None
    # What the guest was doing (hangreport.py): the command ran, its vCPU idles
    # (halted, interrupts on, as `sleep` leaves it) and hvc0 has nothing pending.
    report = str(info.value)
    assert "boot reached: command started" in report, report
    vcpu = re.search(r"vcpu0: \d+ exits .*(halted|runnable), rip=0x[0-9a-f]+( \(\w+\+0x[0-9a-f]+\))? cpl=(\d) IF=1",
                     report)
    assert vcpu is not None, report
    assert vcpu.group(3) != "0" or vcpu.group(2), f"a kernel address without its function's name: {report}"
    assert re.search(r"hvc0: gsi \d+ \(vector 0x[0-9a-f]+ edge.*InterruptStatus 0x0", report), report
    assert re.search(r"com1: gsi 4 \(vector 0x[0-9a-f]+ edge\), IER 0x[0-9a-f]+, THRE interrupt", report), report
    assert open_fds(proc) == fds
    assert threading.active_count() == threads


def test_two_vcpus() -> None:
    art = find_default_kernel()
    assert art is not None
    r = MicroVM(art.vmlinux, vcpus=2).run(["nproc"], timeout=120)
    assert r.stdout == b"2\n"


def test_missing_kernel_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(MicroVMError, match="no-such-kernel"):
        MicroVM(tmp_path / "no-such-kernel").run(["true"])


def test_many_boots_leak_nothing() -> None:
    art = find_default_kernel()
    assert art is not None
    proc = psutil.Process()

    def boot() -> None:
        r = MicroVM(art.vmlinux, mem_mib=64).run(["true"], timeout=120)
        assert r.exit_code == 0

    for _ in range(5):  # warm caches (initramfs, imports)
        boot()
    fds, threads, rss = open_fds(proc), threading.active_count(), proc.memory_info().rss
    for _ in range(100):
        boot()
    assert open_fds(proc) == fds
    assert threading.active_count() == threads
    # Guest memory is unmapped at teardown; what remains is Python's own heap.
    assert proc.memory_info().rss - rss < 32 << 20
