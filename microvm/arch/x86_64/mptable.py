"""The MP table (Intel MultiProcessor Specification 1.4, chapter 4).

How a guest without ACPI finds its CPUs, its I/O APIC and how ISA/virtio
interrupt lines reach it. Linux looks for the floating pointer in the BIOS
area (layout.BIOS_START; arch/x86/kernel/mpparse.c, smp_scan_config).
"""

from __future__ import annotations

import ctypes

from microvm.arch.x86_64.layout import IOAPIC_BASE, IOAPIC_PINS, LAPIC_BASE, MPTABLE_START
from microvm.memory import GuestMemory

IRQ_MAX = IOAPIC_PINS - 1

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = range(5)
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MP_IRQTYPE_INT, MP_IRQTYPE_NMI, MP_IRQTYPE_EXTINT = 0, 1, 3
MP_APIC_ALL = 0xFF
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_STEPPING = 0x600  # family 6
CPU_FEATURE_APIC = 1 << 9
CPU_FEATURE_FPU = 1 << 0


class _Packed(ctypes.LittleEndianStructure):
    _pack_ = 1


class MpfIntel(_Packed):
    """struct mpf_intel: the MP floating pointer structure (16 bytes)."""

    _fields_ = [
        ("signature", ctypes.c_char * 4),  # "_MP_"
        ("physptr", ctypes.c_uint32),
        ("length", ctypes.c_uint8),  # in 16-byte units
        ("specification", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("feature1", ctypes.c_uint8),
        ("feature2", ctypes.c_uint8),
        ("feature3", ctypes.c_uint8),
        ("feature4", ctypes.c_uint8),
        ("feature5", ctypes.c_uint8),
    ]


class MpcTable(_Packed):
    """struct mpc_table: the configuration table header (44 bytes)."""

    _fields_ = [
        ("signature", ctypes.c_char * 4),  # "PCMP"
        ("length", ctypes.c_uint16),
        ("spec", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem", ctypes.c_char * 8),
        ("productid", ctypes.c_char * 12),
        ("oemptr", ctypes.c_uint32),
        ("oemsize", ctypes.c_uint16),
        ("oemcount", ctypes.c_uint16),
        ("lapic", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class MpcCpu(_Packed):
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("cpuflag", ctypes.c_uint8),
        ("cpufeature", ctypes.c_uint32),
        ("featureflag", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 2),
    ]


class MpcBus(_Packed):
    _fields_ = [("type", ctypes.c_uint8), ("busid", ctypes.c_uint8), ("bustype", ctypes.c_char * 6)]


class MpcIoapic(_Packed):
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("apicid", ctypes.c_uint8),
        ("apicver", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("apicaddr", ctypes.c_uint32),
    ]


class MpcIntsrc(_Packed):
    """struct mpc_intsrc, also the layout of struct mpc_lintsrc."""

    _fields_ = [
        ("type", ctypes.c_uint8),
        ("irqtype", ctypes.c_uint8),
        ("irqflag", ctypes.c_uint16),
        ("srcbus", ctypes.c_uint8),
        ("srcbusirq", ctypes.c_uint8),
        ("dstapic", ctypes.c_uint8),
        ("dstirq", ctypes.c_uint8),
    ]


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build(num_cpus: int, base: int = MPTABLE_START) -> bytes:
    """The floating pointer followed by the configuration table, at `base`."""
    if not 1 <= num_cpus <= 254:
        raise ValueError(f"MP table supports 1..254 CPUs, not {num_cpus}")
    ioapic_id = num_cpus  # APIC ids 0..n-1 are the CPUs
    entries: list[ctypes.Structure] = []
    for cpu in range(num_cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(MpcCpu(MP_PROCESSOR, cpu, APIC_VERSION, flags, CPU_STEPPING,
                              CPU_FEATURE_APIC | CPU_FEATURE_FPU))
    entries.append(MpcBus(MP_BUS, 0, b"ISA   "))
    entries.append(MpcIoapic(MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_BASE))
    for irq in range(IRQ_MAX + 1):
        entries.append(MpcIntsrc(MP_INTSRC, MP_IRQTYPE_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(MpcIntsrc(MP_LINTSRC, MP_IRQTYPE_EXTINT, 0, 0, 0, MP_APIC_ALL, 0))
    entries.append(MpcIntsrc(MP_LINTSRC, MP_IRQTYPE_NMI, 0, 0, 0, MP_APIC_ALL, 1))
    body = b"".join(bytes(e) for e in entries)

    table_addr = base + ctypes.sizeof(MpfIntel)
    header = MpcTable(b"PCMP", ctypes.sizeof(MpcTable) + len(body), 4, 0, b"MICROVM ", b"MICROVM 1.0 ",
                      0, 0, len(entries), LAPIC_BASE, 0)
    header.checksum = _checksum(bytes(header) + body)
    mpf = MpfIntel(b"_MP_", table_addr, 1, 4, 0, 0, 0, 0, 0, 0)
    mpf.checksum = _checksum(bytes(mpf))
    return bytes(mpf) + bytes(header) + body


def write(mem: GuestMemory, num_cpus: int, base: int = MPTABLE_START) -> int:
    """Write the MP table at base; returns its size."""
    data = build(num_cpus, base)
    mem.write(base, data)
    return len(data)
