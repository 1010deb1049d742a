"""Tiny guests on real /dev/kvm: port I/O, MMIO, halt, in every mode."""

from __future__ import annotations

import pytest

from microvm.vcpu import StopReason
from tests.kvm.guests import Exit, Recorder, long_mode_vm, real_mode_vm

HELLO = """
    mov dx, 0x3f8
    mov al, 'h'
    out dx, al
    mov al, 'i'
    out dx, al
    mov al, '!'
    out dx, al
"""


def test_real_mode_port_output_in_order() -> None:
    with real_mode_vm(HELLO + "hlt") as vm:
        rec = Recorder()
        vm.pio.register(0x3F8, 8, rec)
        vm.start()
        assert vm.wait(10) is StopReason.HALTED
        assert bytes(v for _, _, v in rec.writes) == b"hi!"
        assert all(off == 0 and size == 1 for off, size, _ in rec.writes)


def test_real_mode_port_read_gets_device_answer() -> None:
    # The guest reads port 0x60 and echoes what it got to port 0x80, plus one.
    src = """
        in al, 0x60
        inc al
        out 0x80, al
        mov dx, 0x61
        in ax, dx
        out dx, ax
        hlt
    """
    with real_mode_vm(src) as vm:
        dev = Recorder(answer=0x4241)
        sink = Recorder()
        vm.pio.register(0x60, 2, dev)
        vm.pio.register(0x80, 1, sink)
        vm.start()
        assert vm.wait(10) is StopReason.HALTED
        assert dev.reads == [(0, 1), (1, 2)]
        assert sink.writes == [(0, 1, 0x42)]
        assert dev.writes == [(1, 2, 0x4241)]


def test_real_mode_string_io() -> None:
    # rep outsb: one exit, count=3; the bus sees three byte writes in order.
    src = """
        mov si, offset msg
        mov cx, 3
        mov dx, 0x3f8
        cld
        rep outsb
        hlt
    msg: .ascii "abc"
    """
    with real_mode_vm(src) as vm:
        rec = Recorder()
        vm.pio.register(0x3F8, 1, rec)
        vm.start()
        assert vm.wait(10) is StopReason.HALTED
        assert bytes(v for _, _, v in rec.writes) == b"abc"


def test_real_mode_mmio_read_and_write() -> None:
    # Memory ends at 64 KiB; the device lives in the unbacked gap above it.
    src = """
        mov ax, 0x1000
        mov ds, ax
        mov ax, [0x10]
        add ax, 1
        mov [0x20], ax
        mov dword ptr [0x24], 0xdeadbeef
        hlt
    """
    with real_mode_vm(src, mem_size=0x10000) as vm:
        dev = Recorder(answer=0x1233)
        vm.mmio.register(0x10000, 0x1000, dev)
        vm.start()
        assert vm.wait(10) is StopReason.HALTED
        assert dev.reads == [(0x10, 2)]
        assert dev.writes == [(0x20, 2, 0x1234), (0x24, 4, 0xDEADBEEF)]


@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_long_mode_port_and_mmio(user: bool) -> None:
    # Identity map covers 1 GiB; guest RAM is 2 MiB, so 0x10000000 is MMIO.
    src = HELLO + """
        mov dx, 0x60
        in eax, dx
        mov rbx, 0x10000000
        mov [rbx + 8], rax
        mov ecx, [rbx + 4]
        mov dx, 0x80
        mov eax, ecx
        out dx, eax
        mov rax, cs
        and eax, 3
        mov dx, 0x81
        out dx, al
        out 0xf4, al
    """ + ("" if user else "hlt")
    with long_mode_vm(src, user=user) as vm:
        con, port_in, mmio, sink = Recorder(), Recorder(0xCAFEF00D), Recorder(0x1234), Recorder()
        vm.pio.register(0x3F8, 1, con)
        vm.pio.register(0x60, 4, port_in)
        vm.pio.register(0x80, 2, sink)
        vm.pio.register(0xF4, 1, Exit(vm))
        vm.mmio.register(0x10000000, 0x1000, mmio)
        vm.start()
        assert vm.wait(10) in (StopReason.HALTED, StopReason.REQUESTED)
        assert bytes(v for _, _, v in con.writes) == b"hi!"
        assert mmio.writes == [(8, 8, 0xCAFEF00D)]
        assert mmio.reads == [(4, 4)]
        # The guest saw the MMIO answer and reports the CPL it ran at.
        assert sink.writes == [(0, 4, 0x1234), (1, 1, 3 if user else 0)]
