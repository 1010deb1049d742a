"""Registers a vCPU answers in C without the GIL (bus.MmioBus.fast, _kvm.FastMmio):
an interrupt status word's 4-byte reads and acknowledgements, real /dev/kvm,
a tiny guest. Every other access to those addresses still reaches the device."""

from __future__ import annotations

import time

import pytest

from microvm import _kvm
from microvm._kvm import FAST_ACK, FAST_READ, FastMmio, InterruptStatus
from tests.kvm.guests import long_mode_vm

WINDOW = 0xC000_0000
STATUS, ACK = 0x60, 0x64
LOOPS = 1000

PROGRAM = f"""
    mov rbx, {WINDOW:#x}
    mov eax, [rbx + {STATUS}]
    mov [rbx + 0x10], eax
    mov dword ptr [rbx + {ACK}], 1
    mov eax, [rbx + {STATUS}]
    mov [rbx + 0x14], eax
    mov ecx, {LOOPS}
again:
    mov eax, [rbx + {STATUS}]
    dec ecx
    jnz again
    mov word ptr [rbx + {STATUS}], ax
    mov eax, [rbx + {ACK}]
    mov [rbx + 0x18], eax
spin:
    pause
    jmp spin
"""


class StatusDevice:
    """A device whose status word the vCPU answers; everything else is recorded here."""

    def __init__(self) -> None:
        self.isr = InterruptStatus()
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return 0x77

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))

    def fast_registers(self) -> list[tuple[int, int, InterruptStatus]]:
        return [(STATUS, FAST_READ, self.isr), (ACK, FAST_ACK, self.isr)]


def test_status_reads_and_acks_are_answered_in_c_and_nothing_else_is() -> None:
    with long_mode_vm(PROGRAM, map_gib=4) as vm:
        dev = StatusDevice()
        vm.mmio.register(WINDOW, 0x1000, dev, "isr0")
        assert len(vm.mmio.fast) == 2
        dev.isr.raise_bits(0b101)
        vm.start()
        deadline = time.monotonic() + 30
        while len(dev.writes) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.stop()
        vm.wait(10)
        fd = vm.vcpus[0].fd
        assert dev.writes == [(0x10, 4, 0b101), (0x14, 4, 0b100), (STATUS, 2, 0b100), (0x18, 4, 0x77)]
        assert dev.reads == [(ACK, 4)]  # a read of the acknowledgement register is the device's
        assert fd.fast_exits == 1 + 1 + 1 + LOOPS  # the status reads and the ack, nothing more
        assert dev.isr.value == 0b100
        vm.mmio.unregister(WINDOW)
        assert len(vm.mmio.fast) == 0


def test_fast_mmio_table_checks_its_entries() -> None:
    with pytest.raises(ValueError, match="neither FAST_READ nor FAST_ACK"):
        FastMmio([(0x1000, 3, InterruptStatus())])
    with pytest.raises(TypeError):
        FastMmio([(0x1000, FAST_READ, object())])
    word = InterruptStatus()
    word.raise_bits(0b11)
    word.ack(0b01)
    assert word.value == 0b10 and _kvm.FAST_READ != _kvm.FAST_ACK
