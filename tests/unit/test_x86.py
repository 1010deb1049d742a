"""x86 setup tables: MP table, CPUID, GDT, page tables (no KVM)."""

from __future__ import annotations

import ctypes

from microvm.arch.x86_64 import cpuid, gdt, lapic, mptable, paging, regs
from microvm.memory import GuestMemory


def test_mptable_checksums_and_contents() -> None:
    data = mptable.build(4)
    mpf = mptable.MpfIntel.from_buffer_copy(data)
    assert mpf.signature == b"_MP_" and sum(data[:16]) % 256 == 0
    assert mpf.physptr == mptable.MPTABLE_START + 16
    table = mptable.MpcTable.from_buffer_copy(data, 16)
    assert table.signature == b"PCMP" and table.length == len(data) - 16
    assert sum(data[16:]) % 256 == 0
    cpus = [mptable.MpcCpu.from_buffer_copy(data, 16 + 44 + 20 * i) for i in range(4)]
    assert [c.apicid for c in cpus] == [0, 1, 2, 3]
    assert cpus[0].cpuflag == 3 and all(c.cpuflag == 1 for c in cpus[1:])
    # 4 CPUs + bus + ioapic + 24 pins + 2 local interrupts
    assert table.oemcount == 4 + 1 + 1 + 24 + 2


def test_mptable_struct_sizes_match_the_spec() -> None:
    assert ctypes.sizeof(mptable.MpfIntel) == 16
    assert ctypes.sizeof(mptable.MpcTable) == 44
    assert ctypes.sizeof(mptable.MpcCpu) == 20
    assert ctypes.sizeof(mptable.MpcIoapic) == 8
    assert ctypes.sizeof(mptable.MpcIntsrc) == 8


def test_cpuid_per_vcpu() -> None:
    supported = [
        {"function": 1, "index": 0, "flags": 0, "eax": 0x806F8, "ebx": 0x800, "ecx": 0, "edx": 0},
        {"function": 0xB, "index": 0, "flags": 1, "eax": 0, "ebx": 1, "ecx": 0x100, "edx": 0},
        {"function": 0x40000000, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0},
    ]
    e = cpuid.vcpu_cpuid(supported, 2, 4)
    assert e[0]["ebx"] >> 24 == 2 and (e[0]["ebx"] >> 16) & 0xFF == 4
    assert e[0]["ecx"] & cpuid.CPUID_1_ECX_HYPERVISOR
    assert e[1]["edx"] == 2
    sig = b"".join(e[2][r].to_bytes(4, "little") for r in ("ebx", "ecx", "edx"))
    assert sig == b"KVMKVMKVM\0\0\0"
    assert supported[0]["ebx"] == 0x800  # input left alone
    assert not e[0]["ecx"] & cpuid.CPUID_1_ECX_TSC_DEADLINE  # only where KVM says it emulates it
    assert cpuid.vcpu_cpuid(supported, 0, 1, tsc_deadline=True)[0]["ecx"] & cpuid.CPUID_1_ECX_TSC_DEADLINE


def test_gdt_descriptor_encoding() -> None:
    # Flat 64-bit kernel code: the well-known 0x00af9b000000ffff.
    assert gdt.descriptor(gdt.CODE64_KERNEL, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert gdt.descriptor(gdt.DATA_KERNEL, 0, 0xFFFFF) == 0x00CF93000000FFFF
    seg = gdt.kvm_segment(gdt.CODE64_KERNEL, 0, 0xFFFFF, regs.SEL_CODE64)
    assert seg["l"] == 1 and seg["limit"] == 0xFFFFFFFF and seg["selector"] == 0x10


def test_identity_map() -> None:
    mem = GuestMemory([(0, bytearray(0x20000))])
    end = paging.identity_map(mem, 0x9000, gib=4)
    assert end == 0x9000 + 0x2000 + 4 * 0x1000
    assert mem.read_int(0x9000, 8) & ~0xFFF == 0xA000
    pd3 = mem.read_int(0xA000 + 3 * 8, 8) & ~0xFFF
    last = mem.read_int(pd3 + 511 * 8, 8)
    assert last & ~0xFFF == 4 * paging.GIB - paging.PAGE_2M and last & paging.PTE_PS


def test_lapic_lints() -> None:
    state = bytes(1024)
    out = lapic.wire_lints(state)
    assert (int.from_bytes(out[0x350:0x354], "little") >> 8) & 7 == 7
    assert (int.from_bytes(out[0x360:0x364], "little") >> 8) & 7 == 4
