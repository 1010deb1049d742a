"""A flat 64-bit environment for tiny guests (probes, tests, benchmarks).

Identity-mapped page tables, a GDT with kernel and user segments and a TSS
whose I/O permission bitmap opens every port to CPL3 (SDM Vol. 1, 19.5.2),
so user-mode code can use in/out whatever IOPL the hypervisor leaves it.
"""

from __future__ import annotations

from typing import Any

from microvm.arch.x86_64 import layout, paging, regs
from microvm.memory import GuestMemory

GDT = layout.FLAT_GDT
TSS = layout.FLAT_TSS
IOMAP_OFFSET = 0x68  # I/O bitmap right after the 104-byte TSS
TSS_LIMIT = IOMAP_OFFSET + 0x2000  # 65536 ports / 8, plus the 0xff terminator byte
PML4 = layout.FLAT_PML4
CODE = layout.FLAT_CODE
STACK = layout.FLAT_STACK
RAM = layout.FLAT_RAM


def prepare(mem: GuestMemory, map_gib: int = 1, user: bool = False) -> int:
    """Write page tables, GDT and TSS; returns the GDT limit."""
    limit = regs.write_gdt(mem, GDT, TSS, TSS_LIMIT)
    mem.fill(TSS, TSS_LIMIT + 1)
    mem.write_int(TSS + 0x66, 2, IOMAP_OFFSET)
    mem.fill(TSS + TSS_LIMIT, 1, 0xFF)
    paging.identity_map(mem, PML4, gib=map_gib, user=user)
    return limit


def enter(fd: Any, gdt_limit: int, rip: int = CODE, user: bool = False, rsp: int = STACK,
          **gprs: int) -> None:
    """Point a vCPU (a VcpuFd) at rip in 64-bit mode, CPL0 or CPL3."""
    sregs = regs.long_mode_sregs(fd.get_sregs(), GDT, gdt_limit, PML4, user=user,
                                 tss_addr=TSS, tss_limit=TSS_LIMIT)
    fd.set_sregs(sregs)
    r = fd.get_regs()
    # IOPL (rflags bits 12-13) = 3 also opens the ports where it is honoured.
    r.update(rip=rip, rflags=0x3002 if user else 0x2, rsp=rsp, **gprs)
    fd.set_regs(r)
