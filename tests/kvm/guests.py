"""Tiny hand-made guests: a VM, code at 0x1000, registers for one mode."""

from __future__ import annotations

from microvm.arch.x86_64 import flat
from microvm.vm import Vm
from tests.kvm.asm import assemble

CODE = flat.CODE
STACK = flat.STACK
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
    """64-bit guest at CPL0 or (user=True) CPL3; rdi holds the vCPU index."""
    vm = Vm([(0, mem_size)], vcpus=vcpus, irqchip=False)
    vm.mem.write(CODE, assemble(source, 64))
    limit = flat.prepare(vm.mem, map_gib=map_gib, user=user)
    for vcpu in vm.vcpus:
        flat.enter(vcpu.fd, limit, user=user, rsp=STACK - 0x100 * vcpu.index, rdi=vcpu.index)
    return vm
