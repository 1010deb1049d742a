"""Tiny hand-made guests: a VM, code at 0x1000, registers for one mode."""

from __future__ import annotations

from microvm.arch.x86_64 import paging, regs
from microvm.vm import Vm
from tests.kvm.asm import assemble

CODE = 0x1000
GDT = 0x500
TSS = 0x3000
# A 64-bit TSS with a full I/O permission bitmap (SDM 19.5.2): every port
# open to CPL3, whatever the IOPL.
IOMAP_OFFSET = 0x68
TSS_LIMIT = IOMAP_OFFSET + 0x2000
STACK = 0x8000
PML4 = 0x10000
MEM_SIZE = 2 << 20


class Recorder:
    """A bus device that records writes and answers reads with a value."""

    def __init__(self, answer: int = 0) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []
        self.answer = answer

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.answer & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class Exit:
    """A port that ends the VM when written: how CPL3 guests (no HLT) finish."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.vm.request_stop()


def real_mode_vm(source: str, vcpus: int = 1, mem_size: int = MEM_SIZE) -> Vm:
    vm = Vm([(0, mem_size)], vcpus=vcpus, irqchip=False)
    vm.mem.write(CODE, assemble(source, 16))
    for vcpu in vm.vcpus:
        sregs = vcpu.fd.get_sregs()
        sregs["cs"]["base"] = 0
        sregs["cs"]["selector"] = 0
        vcpu.fd.set_sregs(sregs)
        r = vcpu.fd.get_regs()
        r.update(rip=CODE, rflags=2, rsp=STACK)
        vcpu.fd.set_regs(r)
    return vm


def long_mode_vm(source: str, user: bool = False, vcpus: int = 1, mem_size: int = MEM_SIZE,
                 map_gib: int = 1) -> Vm:
    """64-bit guest; user=True runs it at CPL3 with IOPL 3 (so it may use in/out)."""
    vm = Vm([(0, mem_size)], vcpus=vcpus, irqchip=False)
    mem = vm.mem
    mem.write(CODE, assemble(source, 64))
    limit = regs.write_gdt(mem, GDT, TSS, TSS_LIMIT)
    mem.write_int(TSS + 0x66, 2, IOMAP_OFFSET)
    mem.fill(TSS + IOMAP_OFFSET + 0x2000, 1, 0xFF)
    paging.identity_map(mem, PML4, gib=map_gib, user=user)
    for vcpu in vm.vcpus:
        sregs = regs.long_mode_sregs(vcpu.fd.get_sregs(), GDT, limit, PML4, user=user,
                                     tss_addr=TSS, tss_limit=TSS_LIMIT)
        vcpu.fd.set_sregs(sregs)
        r = vcpu.fd.get_regs()
        # IOPL (rflags bits 12-13) = 3 lets CPL3 code execute in/out.
        r.update(rip=CODE, rflags=0x3002 if user else 2, rsp=STACK - 0x100 * vcpu.index,
                 rdi=vcpu.index)
        vcpu.fd.set_regs(r)
    return vm
