"""Register state for the modes microvm starts vCPUs in."""

from __future__ import annotations

from typing import Any

from microvm.arch.x86_64 import gdt
from microvm.memory import GuestMemory

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Selectors of the GDT written by write_gdt (index << 3 | RPL). The 64-bit
# boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18 (boot.rst).
SEL_CODE32 = 0x08
SEL_CODE64 = 0x10
SEL_DATA = 0x18
SEL_USER_DATA = 0x23  # index 4, RPL 3
SEL_USER_CODE64 = 0x2B  # index 5, RPL 3
SEL_TSS = 0x30

_GDT = [
    0,
    gdt.CODE32_KERNEL,
    gdt.CODE64_KERNEL,
    gdt.DATA_KERNEL,
    gdt.DATA_USER,
    gdt.CODE64_USER,
]


def write_gdt(mem: GuestMemory, addr: int, tss_addr: int = 0, tss_limit: int = 0x67) -> int:
    """Write a flat GDT (kernel/user code and data, a TSS); returns its limit."""
    entries = [gdt.descriptor(f, 0, 0xFFFFF) if f else 0 for f in _GDT]
    # A 64-bit TSS descriptor takes two slots (SDM 7.2.3); base high half is 0.
    entries += [gdt.descriptor(gdt.TSS64, tss_addr, tss_limit), 0]
    mem.write(addr, b"".join(e.to_bytes(8, "little") for e in entries))
    return len(entries) * 8 - 1


def flat_segments(sregs: dict[str, Any], code_flags: int, code_sel: int, data_flags: int,
                  data_sel: int, tss_addr: int = 0, tss_limit: int = 0x67) -> None:
    sregs["cs"] = gdt.kvm_segment(code_flags, 0, 0xFFFFF, code_sel)
    data = gdt.kvm_segment(data_flags, 0, 0xFFFFF, data_sel)
    for name in ("ds", "es", "fs", "gs", "ss"):
        sregs[name] = dict(data)
    sregs["tr"] = gdt.kvm_segment(gdt.TSS64, tss_addr, tss_limit, SEL_TSS)


def long_mode_sregs(sregs: dict[str, Any], gdt_addr: int, gdt_limit: int, pml4: int,
                    user: bool = False, tss_addr: int = 0, tss_limit: int = 0x67) -> dict[str, Any]:
    """64-bit paging mode, flat segments, at CPL0 or (user=True) CPL3."""
    if user:
        flat_segments(sregs, gdt.CODE64_USER, SEL_USER_CODE64, gdt.DATA_USER, SEL_USER_DATA,
                      tss_addr, tss_limit)
    else:
        flat_segments(sregs, gdt.CODE64_KERNEL, SEL_CODE64, gdt.DATA_KERNEL, SEL_DATA,
                      tss_addr, tss_limit)
    sregs["gdt"] = {"base": gdt_addr, "limit": gdt_limit}
    sregs["idt"] = {"base": 0, "limit": 0}
    sregs["cr3"] = pml4
    sregs["cr4"] |= X86_CR4_PAE
    sregs["cr0"] |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE
    sregs["efer"] |= EFER_LME | EFER_LMA | EFER_SCE
    return sregs


def protected_mode_sregs(sregs: dict[str, Any], gdt_addr: int, gdt_limit: int) -> dict[str, Any]:
    """32-bit protected mode, paging off, flat 4 GiB segments (PVH entry state)."""
    flat_segments(sregs, gdt.CODE32_KERNEL, SEL_CODE32, gdt.DATA_KERNEL, SEL_DATA)
    sregs["gdt"] = {"base": gdt_addr, "limit": gdt_limit}
    sregs["idt"] = {"base": 0, "limit": 0}
    sregs["cr0"] = (sregs["cr0"] | X86_CR0_PE | X86_CR0_ET) & ~X86_CR0_PG
    sregs["cr4"] = 0
    sregs["efer"] = 0
    return sregs
