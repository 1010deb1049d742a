"""The kernel loader with an ELF vmlinux (PVH boot), plus what both formats share. No KVM."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from microvm.errors import LoaderError
from microvm.loader import CMDLINE, HIMEM_START, START_INFO, BootInfo, load_linux
from microvm.loader.elf import (
    DEFAULT_COMMAND_LINE_SIZE,
    MEMMAP,
    MODLIST,
    XEN_HVM_START_MAGIC_VALUE,
    HvmMemmapTableEntry,
    HvmModlistEntry,
    HvmStartInfo,
)
from microvm.memory import PAGE_SIZE, GuestMemory
from tests.unit.test_loader_images import (
    ELF_BSS,
    ELF_CODE,
    ELF_ENTRY,
    ELF_PADDR,
    EM_386,
    ET_DYN,
    FILL,
    MEM_SIZE,
    RAM,
    RESERVED,
    guest_memory,
    make_elf,
)

INITRD = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: not a whole page


def load(mem: GuestMemory, kernel: bytes | str | Path, **kw: object) -> BootInfo:
    args: dict = {"cmdline": "console=ttyS0 root=/dev/vda", "ram": RAM, "reserved": RESERVED, **kw}
    return load_linux(mem, kernel, **args)


# ---- the happy path ----


def test_segments_land_at_paddr_and_bss_is_zeroed() -> None:
    mem = guest_memory()
    info = load(mem, make_elf())
    assert mem.read(ELF_PADDR, len(ELF_CODE)) == ELF_CODE  # at p_paddr, not p_vaddr
    assert mem.read(ELF_PADDR + len(ELF_CODE), ELF_BSS) == bytes(ELF_BSS)
    assert mem.read(ELF_PADDR + len(ELF_CODE) + ELF_BSS, 1) == bytes([FILL])  # nothing past p_memsz
    assert mem.read(ELF_PADDR - 1, 1) == bytes([FILL])
    assert info.kernel_start == ELF_PADDR
    assert info.kernel_end == ELF_PADDR + len(ELF_CODE) + ELF_BSS


@pytest.mark.parametrize("from_file", [False, True])
def test_zeroed_memory_keeps_its_bss_untouched(tmp_path: Path, from_file: bool) -> None:
    """zeroed=True: the caller's RAM is fresh (all zeros), so the BSS is not written (nor faulted in)."""
    mem = guest_memory()  # filled with FILL: what a write would change
    kernel: bytes | Path = make_elf()
    if from_file:
        kernel = tmp_path / "vmlinux"
        kernel.write_bytes(make_elf())
    load(mem, kernel, zeroed=True)
    assert mem.read(ELF_PADDR, len(ELF_CODE)) == ELF_CODE
    assert mem.read(ELF_PADDR + len(ELF_CODE), ELF_BSS) == bytes([FILL]) * ELF_BSS


def test_boot_info_for_pvh(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(INITRD)
    info = load(guest_memory(), make_elf(), initrd=path)
    assert info.protocol == "pvh"
    assert info.entry == ELF_ENTRY
    assert info.params_addr == START_INFO
    assert info.cmdline_addr == CMDLINE
    assert info.initrd is not None and info.initrd[1] == len(INITRD)


def test_start_info_fields() -> None:
    mem = guest_memory()
    info = load(mem, make_elf(), initrd=INITRD)
    si = mem.read_obj(START_INFO, HvmStartInfo)
    assert si.magic == XEN_HVM_START_MAGIC_VALUE
    assert mem.read(START_INFO, 4) == b"\x78\xc5\x6e\x33"  # "xEn3" with 0x80 set on the "E"
    assert si.version == 1
    assert si.flags == 0
    assert si.nr_modules == 1
    assert si.modlist_paddr == MODLIST
    assert si.cmdline_paddr == CMDLINE
    assert si.rsdp_paddr == 0
    assert si.memmap_paddr == MEMMAP
    assert si.memmap_entries == len(RAM) + len(RESERVED)
    assert si.reserved == 0
    mod = mem.read_obj(MODLIST, HvmModlistEntry)
    assert (mod.paddr, mod.size, mod.cmdline_paddr, mod.reserved) == (*info.initrd, 0, 0)  # type: ignore[misc]
    # Everything stays in the start-info page, clear of the GDT and page tables.
    end = MEMMAP + si.memmap_entries * ctypes.sizeof(HvmMemmapTableEntry)
    assert START_INFO <= MODLIST < MEMMAP < end <= START_INFO + PAGE_SIZE


def test_memmap_table_lists_ram_and_reserved_in_order() -> None:
    mem = guest_memory()
    load(mem, make_elf())
    table = (HvmMemmapTableEntry * 4).from_buffer_copy(mem.read(MEMMAP, 4 * ctypes.sizeof(HvmMemmapTableEntry)))
    got = [(e.addr, e.size, e.type, e.reserved) for e in table]
    assert got == [
        (0, 0x9FC00, 1, 0),
        (0x9FC00, 0x400, 2, 0),
        (0xF0000, 0x10000, 2, 0),
        (0x100000, MEM_SIZE - 0x100000, 1, 0),
    ]


def test_no_initrd_means_no_modules() -> None:
    mem = guest_memory()
    info = load(mem, make_elf())
    si = mem.read_obj(START_INFO, HvmStartInfo)
    assert info.initrd is None
    assert (si.nr_modules, si.modlist_paddr) == (0, 0)  # 0 = "not present" (start_info.h)


def test_initrd_goes_to_the_highest_page_above_the_kernel() -> None:
    mem = guest_memory()
    info = load(mem, make_elf(), initrd=INITRD)
    assert info.initrd is not None
    addr, size = info.initrd
    assert addr % PAGE_SIZE == 0
    assert addr >= info.kernel_end
    assert addr + size <= MEM_SIZE
    assert addr + PAGE_SIZE + size > MEM_SIZE  # one page higher would not fit
    assert mem.read(addr, size) == INITRD


def test_initrd_stays_in_the_ram_it_is_given() -> None:
    mem = guest_memory()
    ram = [(0, 0x9FC00), (0x100000, 0x200000)]  # less RAM described than mapped
    info = load(mem, make_elf(), initrd=INITRD, ram=ram)
    assert info.initrd is not None
    assert info.initrd[0] + len(INITRD) <= 0x300000


def test_cmdline_is_nul_terminated() -> None:
    mem = guest_memory()
    load(mem, make_elf(), cmdline="console=ttyS0 quiet")
    assert mem.read(CMDLINE, 20) == b"console=ttyS0 quiet\0"


def test_longest_cmdline_fits() -> None:
    # A vmlinux without a symbol table: x86's COMMAND_LINE_SIZE, NUL included.
    mem = guest_memory()
    load(mem, make_elf(), cmdline="x" * (DEFAULT_COMMAND_LINE_SIZE - 1))
    assert mem.read(CMDLINE + DEFAULT_COMMAND_LINE_SIZE - 1, 1) == b"\0"


def test_cmdline_over_the_kernels_limit_is_refused() -> None:
    # The kernel would cut it short without a word, and with it whatever
    # came last; the error names the limit.
    with pytest.raises(LoaderError, match=f"at most {DEFAULT_COMMAND_LINE_SIZE - 1}"):
        load(guest_memory(), make_elf(), cmdline="x" * DEFAULT_COMMAND_LINE_SIZE)


def test_pvh_note_only_in_a_section() -> None:
    assert load(guest_memory(), make_elf(note="section")).entry == ELF_ENTRY


def test_pvh_note_with_a_4_byte_address() -> None:
    assert load(guest_memory(), make_elf(desc_size=4)).entry == ELF_ENTRY


def test_kernel_as_path_str_or_bytes(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(make_elf())
    infos = [load(guest_memory(), k) for k in (path, str(path), make_elf())]
    assert infos[0] == infos[1] == infos[2]


def test_loader_leaves_the_callers_low_memory_alone() -> None:
    mem = guest_memory()
    load(mem, make_elf(), initrd=INITRD)
    assert mem.read(0x500, 0x100) == bytes([FILL]) * 0x100  # GDT
    assert mem.read(0x9000, 0x7000) == bytes([FILL]) * 0x7000  # page tables


def test_hvm_start_info_layout_matches_start_info_h() -> None:
    # Offsets from the diagram in include/xen/interface/hvm/start_info.h.
    offsets = {"magic": 0, "version": 4, "flags": 8, "nr_modules": 12, "modlist_paddr": 16,
               "cmdline_paddr": 24, "rsdp_paddr": 32, "memmap_paddr": 40, "memmap_entries": 48,
               "reserved": 52}
    for name, offset in offsets.items():
        assert getattr(HvmStartInfo, name).offset == offset, name
    assert ctypes.sizeof(HvmStartInfo) == 56
    assert ctypes.sizeof(HvmModlistEntry) == 32
    assert HvmModlistEntry.cmdline_paddr.offset == 16
    assert ctypes.sizeof(HvmMemmapTableEntry) == 24
    assert HvmMemmapTableEntry.type.offset == 16


# ---- failures: each one a LoaderError that says what is wrong ----


def expect(message: str, kernel: bytes | str | Path, mem: GuestMemory | None = None, **kw: object) -> None:
    with pytest.raises(LoaderError, match=message):
        load(mem or guest_memory(), kernel, **kw)


def test_wrong_machine() -> None:
    expect("e_machine EM_386, need EM_X86_64", make_elf(machine=EM_386))


def test_32_bit_elf() -> None:
    expect("ELFCLASS32", make_elf(elfclass=1))


def test_not_an_executable() -> None:
    expect("ET_DYN, need ET_EXEC", make_elf(etype=ET_DYN))


@pytest.mark.parametrize("cut", [5, 20, 63, 64 + 30, 64 + 56 + 10])
def test_truncated_in_the_headers(cut: int) -> None:
    expect("truncated", make_elf()[:cut])


def test_truncated_in_a_segment() -> None:
    expect("segment 0 needs file bytes up to 0x1400", make_elf()[:0x1200])


def test_truncated_in_the_notes() -> None:
    expect("vmlinux is truncated", make_elf()[:0xD0])  # the notes start at 0xb0


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"", b"#!/bin/sh\necho hello\n", b"MZ" + bytes(0x300)],
    ids=["random", "empty", "shell script", "PE without a setup header"],
)
def test_not_a_kernel(content: bytes) -> None:
    expect("not a kernel: neither an ELF vmlinux nor a bzImage", content)


def test_no_pvh_note() -> None:
    expect(r"kernel has no PVH entry point \(CONFIG_PVH=y needed\)", make_elf(note=None))


def test_entry_outside_the_kernel() -> None:
    expect("PVH entry point 0x4000000 is outside", make_elf(entry=0x4000000))


def test_kernel_too_big_for_guest_memory() -> None:
    expect(r"segment 0 \(0x100000\+0x1000400\) does not fit in guest memory \(4 MiB\)",
           make_elf(bss=0x1000000))


def test_kernel_placed_beyond_guest_memory() -> None:
    expect(r"segment 0 \(0x8000000\+.*does not fit in guest memory", make_elf(paddr=0x8000000, entry=0x8000040))


def test_kernel_in_low_memory() -> None:
    expect("segment 0 at 0x8000 is below 0x100000", make_elf(paddr=0x8000, entry=0x8040))


def test_initrd_too_big() -> None:
    expect(r"initrd of 5 MiB does not fit in guest memory \(4 MiB\)", make_elf(), initrd=bytes(5 << 20))


def test_initrd_too_big_for_the_ram_above_the_kernel() -> None:
    expect(r"initrd of 3.5 MiB does not fit", make_elf(), initrd=bytes(7 << 19))


def test_empty_initrd(tmp_path: Path) -> None:
    path = tmp_path / "empty.cpio"
    path.touch()
    expect(f"initrd {path} is empty", make_elf(), initrd=path)


def test_command_line_with_nul() -> None:
    expect("NUL", make_elf(), cmdline="a\0b")


def test_missing_kernel(tmp_path: Path) -> None:
    path = tmp_path / "no-such-vmlinux"
    with pytest.raises(LoaderError, match=f"cannot read kernel {path}: No such file") as e:
        load(guest_memory(), path)
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_kernel_is_a_directory(tmp_path: Path) -> None:
    expect(f"cannot read kernel {tmp_path}", tmp_path)


def test_missing_initrd(tmp_path: Path) -> None:
    expect(f"cannot read initrd {tmp_path / 'nope'}", make_elf(), initrd=tmp_path / "nope")


def test_guest_memory_without_low_memory() -> None:
    mem = GuestMemory([(HIMEM_START, bytearray(MEM_SIZE))])
    expect("guest memory cannot hold the boot structures", make_elf(), mem=mem)


def test_overlapping_memory_map() -> None:
    expect("memory map ranges overlap", make_elf(), reserved=[(0x9F000, 0x1000)])


def test_too_many_memory_map_entries() -> None:
    reserved = [(0xA0000 + i * 0x100, 0x100) for i in range(200)]
    expect("memory map has 202 entries, PVH boot takes at most 127", make_elf(), reserved=reserved)
