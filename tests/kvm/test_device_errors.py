"""Devices that fail end the VM with an error naming them; the device
manager's pools refuse what does not fit (real /dev/kvm, tiny guests)."""

from __future__ import annotations

import time

import pytest

from microvm.arch.x86_64 import layout
from microvm.devicemanager import DeviceManager
from microvm.errors import ConfigError, DeviceError
from microvm.vm import Vm
from tests.kvm.guests import long_mode_vm

WINDOW = 0xC000_0000  # an address in the gap where nothing else lives

# Write once to WINDOW, then spin: only the host can end this guest.
WRITE_THEN_SPIN = f"""
    mov rax, {WINDOW:#x}
    mov dword ptr [rax], 1
spin:
    pause
    jmp spin
"""


class Broken:
    """A device with a bug: every access raises."""

    def read(self, offset: int, size: int) -> int:
        raise ZeroDivisionError("a bug in the device")

    def write(self, offset: int, size: int, value: int) -> None:
        raise ZeroDivisionError("a bug in the device")


def test_an_unexpected_exception_in_an_io_thread_ends_the_vm_with_a_device_error() -> None:
    def handler() -> None:
        raise ZeroDivisionError("a bug in the device")

    with long_mode_vm(WRITE_THEN_SPIN, map_gib=4) as vm:
        vm.ioeventfd(WINDOW, 4, None, handler, thread=vm.io_thread("blk9-io"), name="vdz")
        vm.start()
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match=r"device vdz failed in its I/O thread: ZeroDivisionError") as info:
            vm.wait(30)
        assert time.monotonic() - t0 < 30  # it ended the run; nobody waited for the timeout
        assert isinstance(info.value.__cause__, ZeroDivisionError)


# One page: found in MmioBus.pages by run_dispatch; 1 MiB: past PAGED_MAX,
# found by the bus's bisection. Both name the device alike.
MMIO_LENGTHS = pytest.mark.parametrize("length", [0x1000, 0x10_0000], ids=["paged", "bisected"])


@MMIO_LENGTHS
def test_a_device_that_raises_in_a_vcpu_exit_is_named(length: int) -> None:
    with long_mode_vm(WRITE_THEN_SPIN, map_gib=4) as vm:
        vm.mmio.register(WINDOW, length, Broken(), "gpu0")
        assert (WINDOW >> 12 in vm.mmio.pages) == (length == 0x1000)
        vm.start()
        with pytest.raises(DeviceError, match=r"device gpu0 failed on a mmio write at 0xc0000000: ZeroDivisionError"):
            vm.wait(30)


class NullVirtio:
    """The least a virtio device is (one queue, no config)."""

    device_type = 4
    features = 0
    queue_sizes = (8,)

    def read_config(self, offset: int, size: int) -> int:
        return 0

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def activate(self, *args: object) -> None:
        pass

    def process(self, queue_index: int) -> None:
        pass

    def reset(self) -> None:
        pass


def test_the_device_manager_refuses_a_virtio_device_past_the_last_interrupt_line() -> None:
    with Vm([(0, 2 << 20)], irqchip=True) as vm:
        devices = DeviceManager(vm)
        for i in range(len(layout.VIRTIO_IRQS)):
            devices.add_virtio(f"dev{i}", NullVirtio())
        with pytest.raises(ConfigError, match=r"no interrupt lines for virtio devices \(I/O APIC pins 5-23\) "
                                              r"left: a VM has 19"):
            devices.add_virtio("one too many", NullVirtio())
        assert not any(v.running for v in vm.vcpus)
        line = devices.cmdline().split()
        assert line[0] == f"virtio_mmio.device=4K@{layout.VIRTIO_MMIO_BASE:#x}:5"
        assert line[-1] == f"virtio_mmio.device=4K@{layout.VIRTIO_MMIO_BASE + 18 * 0x1000:#x}:23"
        assert len(line) == 19


def test_a_device_may_share_another_ones_interrupt_line() -> None:
    """hvc1 (the kernel's console) rides on hvc0's line: no line of the pool is spent."""
    with Vm([(0, 2 << 20)], irqchip=True) as vm:
        devices = DeviceManager(vm)
        devices.add_virtio("hvc0", NullVirtio())
        devices.add_virtio("hvc1", NullVirtio(), share_line_of="hvc0")
        devices.add_virtio("rng", NullVirtio())
        base = layout.VIRTIO_MMIO_BASE
        assert devices.cmdline().split() == [f"virtio_mmio.device=4K@{base:#x}:5",
                                             f"virtio_mmio.device=4K@{base + 0x1000:#x}:5",
                                             f"virtio_mmio.device=4K@{base + 0x2000:#x}:6"]
        assert devices.irqs.left == len(layout.VIRTIO_IRQS) - 2


def test_accesses_nobody_claims_reach_the_stats() -> None:
    with long_mode_vm(WRITE_THEN_SPIN, map_gib=4) as vm:
        devices = DeviceManager(vm)
        vm.start()
        deadline = time.monotonic() + 30
        while not vm.mmio.unhandled and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.stop()
        vm.wait(30)
        stats = devices.stats()
        assert stats["bus"] == {"pio_unhandled": 0, "mmio_unhandled": 1}
        # The write's exit, the stop's (and maybe a signal's): all through Python, none in C.
        assert stats["vcpu0"]["exits"] >= 2 and stats["vcpu0"]["fast_exits"] == 0


OUT_THEN_SPIN = """
    mov al, 1
    out 0x80, al
spin:
    pause
    jmp spin
"""

IN_THEN_SPIN = """
    in al, 0x80
spin:
    pause
    jmp spin
"""


def test_a_port_device_that_raises_is_named() -> None:
    """Port I/O is answered inside the ext (VcpuFd.run_dispatch); errors still name the device."""
    with long_mode_vm(OUT_THEN_SPIN) as vm:
        vm.pio.register(0x80, 1, Broken(), "post0")
        vm.start()
        with pytest.raises(DeviceError, match=r"device post0 failed on a pio write at 0x80: ZeroDivisionError") as info:
            vm.wait(30)
        assert isinstance(info.value.__cause__, ZeroDivisionError)


class Overflowing:
    """A device with a bug: a 1-byte read answered with 256."""

    def read(self, offset: int, size: int) -> int:
        return 256

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def test_a_read_answered_with_more_than_the_access_holds_ends_the_vm() -> None:
    with long_mode_vm(IN_THEN_SPIN) as vm:
        vm.pio.register(0x80, 1, Overflowing(), "post0")
        vm.start()
        with pytest.raises(DeviceError, match=r"device post0 failed on a pio read at 0x80: ValueError: "
                                              r"a 1-byte read at 0x80 was answered with 256"):
            vm.wait(30)


MMIO_READ_THEN_SPIN = f"""
    mov rax, {WINDOW:#x}
    mov ebx, dword ptr [rax]
spin:
    pause
    jmp spin
"""


class Negative(Overflowing):
    def read(self, offset: int, size: int) -> int:
        return -1


@MMIO_LENGTHS
def test_an_mmio_read_answered_with_a_negative_value_names_the_device(length: int) -> None:
    with long_mode_vm(MMIO_READ_THEN_SPIN, map_gib=4) as vm:
        vm.mmio.register(WINDOW, length, Negative(), "gpu0")
        vm.start()
        with pytest.raises(DeviceError, match=r"device gpu0 failed on a mmio read at 0xc0000000: ValueError: "
                                              r"a 4-byte read at 0xc0000000 was answered with -1"):
            vm.wait(30)
