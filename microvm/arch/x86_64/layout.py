"""The guest-physical memory map: every address microvm puts anything at.

Nothing else defines a guest address, a port or a device interrupt line;
every module asks this one (Firecracker's arch/x86_64/layout.rs plays the
same part). Two maps live here: the Linux VM's and the tiny test guest's.

A Linux VM (microvm.machine)::

    0x0000_0500  GDT                     our boot GDT (arch/x86_64/regs.py)
    0x0000_6000  START_INFO              PVH: hvm_start_info, then PVH_MODLIST, PVH_MEMMAP
    0x0000_7000  ZERO_PAGE               64-bit boot protocol: struct boot_params
    0x0000_9000  PML4 ... 0xEFFF         identity page tables (4 GiB of 2 MiB pages)
    0x0002_0000  CMDLINE                 the kernel command line (CMDLINE_MAX bytes)
    0x0009_FC00  EBDA ... 0x9FFFF        reserved, as on a PC (the last KiB below 640 KiB)
    0x000A_0000  ... 0xEFFFF             legacy VGA/ROM hole: neither RAM nor reserved
    0x000F_0000  BIOS ... 0xFFFFF        reserved; the MP table (MPTABLE_START)
    0x0010_0000  HIMEM_START             the kernel; the initrd near the top of low RAM
    RAM up to MMIO_GAP_START (3 GiB); above that:
    0xD000_0000  CONTROL_BASE            our control device (one page)
    0xD000_1000  VIRTIO_MMIO_BASE        virtio-mmio windows, VIRTIO_MMIO_SIZE each
    0xFEC0_0000  IOAPIC_BASE             the in-kernel I/O APIC
    0xFEE0_0000  LAPIC_BASE              the local APICs
    0xFFFB_C000  KVM_IDENTITY_MAP_ADDR   KVM's own pages on Intel (api.rst
    0xFFFB_D000  KVM_TSS_ADDR              KVM_SET_IDENTITY_MAP_ADDR / KVM_SET_TSS_ADDR)
    MMIO_GAP_END (4 GiB): the rest of RAM

Interrupt lines (I/O APIC pins, edge, as the MP table announces them):
0-4 keep their ISA meaning (COM1 is 4); virtio devices get VIRTIO_IRQS,
5..23, 8 and 12 included (no RTC, no PS/2 mouse here). Device interrupts
go through irqfds: KVM_IRQ_LINE would have KVM treat GSI 8 as the RTC's
and drop an edge as "coalesced" until the last one's EOI.
Ports: COM1 and the i8042 at their PC addresses.
"""

from __future__ import annotations

from typing import Final

KIB: Final = 1 << 10
MIB: Final = 1 << 20
GIB: Final = 1 << 30
PAGE_SIZE: Final = 4 * KIB

# --- a Linux VM ----------------------------------------------------------------

# Low memory: what our loader and boot setup write before the first vCPU runs.
GDT_ADDR: Final = 0x500
START_INFO: Final = 0x6000  # struct hvm_start_info (xen/interface/hvm/start_info.h)
PVH_MODLIST: Final = START_INFO + 0x40  # struct hvm_modlist_entry: the initrd
PVH_MEMMAP: Final = START_INFO + 0x80  # struct hvm_memmap_table_entry[], to the page's end
PVH_MEMMAP_END: Final = START_INFO + PAGE_SIZE
ZERO_PAGE: Final = 0x7000  # struct boot_params (x86 boot protocol, "zero page")
PML4_ADDR: Final = 0x9000  # PML4, PDPT, then one PD per GiB (arch/x86_64/paging.py)
PAGE_TABLES_END: Final = 0xF000
CMDLINE: Final = 0x20000
CMDLINE_MAX: Final = 64 * KIB  # the buffer at CMDLINE, terminating NUL included
EBDA_START: Final = 0x9FC00  # the extended BIOS data area: reserved, as on a PC
LOW_RAM_END: Final = 0xA0000  # 640 KiB: the legacy hole starts here
BIOS_START: Final = 0xF0000  # the BIOS area; Linux scans it for the MP floating pointer
MPTABLE_START: Final = BIOS_START
HIMEM_START: Final = 0x100000  # 1 MiB: the kernel's load address and up

# The gap below 4 GiB for devices; RAM past MMIO_GAP_START continues at 4 GiB.
MMIO_GAP_START: Final = 3 * GIB
MMIO_GAP_END: Final = 4 * GIB
CONTROL_BASE: Final = 0xD000_0000
CONTROL_SIZE: Final = PAGE_SIZE
VIRTIO_MMIO_BASE: Final = CONTROL_BASE + CONTROL_SIZE
VIRTIO_MMIO_SIZE: Final = PAGE_SIZE  # one window per device (virtio 1.2, 4.2.2)
IOAPIC_BASE: Final = 0xFEC0_0000  # IO_APIC_DEFAULT_PHYS_BASE (arch/x86/include/asm/apicdef.h)
LAPIC_BASE: Final = 0xFEE0_0000  # APIC_DEFAULT_PHYS_BASE
VIRTIO_MMIO_END: Final = IOAPIC_BASE  # the windows' pool ends where the I/O APIC begins
KVM_IDENTITY_MAP_ADDR: Final = 0xFFFB_C000  # one page (api.rst, KVM_SET_IDENTITY_MAP_ADDR)
KVM_TSS_ADDR: Final = 0xFFFB_D000  # three pages (api.rst, KVM_SET_TSS_ADDR)

# Interrupt lines: the I/O APIC's pins.
IOAPIC_PINS: Final = 24
COM1_IRQ: Final = 4
VIRTIO_IRQS: Final = range(5, IOAPIC_PINS)  # 19 lines for virtio devices

# I/O ports (the PC's).
COM1_PORT: Final = 0x3F8
COM1_PORTS: Final = 8
I8042_DATA_PORT: Final = 0x60
I8042_COMMAND_PORT: Final = 0x64  # reads: status, writes: command
# QEMU's isa-debug-exit (bench startup's tiny guest ends QEMU there); nothing of ours.
QEMU_DEBUG_EXIT_PORT: Final = 0xF4


def ram_ranges(mem_bytes: int) -> list[tuple[int, int]]:
    """Guest RAM as (address, size) slots: below the gap, and the rest from 4 GiB."""
    if mem_bytes <= MMIO_GAP_START:
        return [(0, mem_bytes)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]


def e820(slots: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(usable RAM, reserved) ranges the guest is told about, for RAM `slots`.

    The EBDA and the BIOS area are reserved, the legacy hole is left out, and
    RAM starts again at 1 MiB.
    """
    low_end = slots[0][1]
    ram = [(0, EBDA_START), (HIMEM_START, low_end - HIMEM_START), *slots[1:]]
    reserved = [(EBDA_START, LOW_RAM_END - EBDA_START), (BIOS_START, HIMEM_START - BIOS_START)]
    return ram, reserved


# --- a tiny test guest (arch/x86_64/flat.py: probes, tests, benchmarks) -----------

FLAT_GDT: Final = 0x500
FLAT_CODE: Final = 0x1000  # where a tiny guest's code is loaded and starts
FLAT_TSS: Final = 0x3000  # the TSS and its I/O permission bitmap, to 0x5068
FLAT_STACK: Final = 0x8000  # top of the boot stack (grows down towards FLAT_TSS's end)
FLAT_PML4: Final = 0x10000  # identity page tables from here
FLAT_RAM: Final = 2 * MIB  # enough for a probe: code, stack, tables
