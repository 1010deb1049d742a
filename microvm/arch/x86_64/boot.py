"""The vCPUs' state at the first instruction of a Linux guest.

Every vCPU gets its CPUID, boot MSRs and LINT0/LINT1 wiring; only the boot
CPU gets registers. The others wait for INIT/SIPI from the guest, in the
in-kernel local APIC. The boot CPU starts where the loader says, in the
mode its boot protocol asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from microvm.arch.x86_64 import cpuid, lapic, msr, paging, regs
from microvm.arch.x86_64.layout import GDT_ADDR, PML4_ADDR
from microvm.memory import GuestMemory

IDENTITY_MAPPED_GIB = 4  # enough for the kernel, its initrd and the MMIO gap


def setup_vcpus(mem: GuestMemory, vcpu_fds: Sequence[Any], *, supported_cpuid: Any, tsc_deadline: bool,
                protocol: Literal["pvh", "linux64"], entry: int, params_addr: int) -> None:
    """Write the boot GDT (and page tables) into `mem` and set every vCPU's state.

    vcpu_fds are the VcpuFds in index order; supported_cpuid is
    KVM_GET_SUPPORTED_CPUID's answer; entry and params_addr come from the loader.
    """
    count = len(vcpu_fds)
    for index, fd in enumerate(vcpu_fds):
        fd.set_cpuid2(cpuid.vcpu_cpuid(supported_cpuid, index, count, tsc_deadline))
        fd.set_msrs(msr.boot_msrs())
        fd.set_lapic(lapic.wire_lints(fd.get_lapic()))
    bsp = vcpu_fds[0]
    limit = regs.write_gdt(mem, GDT_ADDR)
    sregs = bsp.get_sregs()
    r = bsp.get_regs()
    if protocol == "pvh":
        # PVH entry (xen/interface/hvm/start_info.h): 32-bit protected
        # mode, paging off, ebx = physical address of hvm_start_info.
        regs.protected_mode_sregs(sregs, GDT_ADDR, limit)
        r.update(rip=entry, rbx=params_addr, rflags=2)
    else:
        # 64-bit boot protocol (boot.rst): identity paging, rsi = boot_params.
        paging.identity_map(mem, PML4_ADDR, gib=IDENTITY_MAPPED_GIB)
        regs.long_mode_sregs(sregs, GDT_ADDR, limit, PML4_ADDR)
        r.update(rip=entry, rsi=params_addr, rflags=2)
    bsp.set_sregs(sregs)
    bsp.set_regs(r)
