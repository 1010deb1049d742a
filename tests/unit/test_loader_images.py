"""Tiny hand-made kernel images for the loader tests (builders only, no tests here).

Both are packed with struct at the offsets the specs give, not with the
loader's own ctypes declarations, so the tests cross-check those declarations.
"""

from __future__ import annotations

import struct

from microvm.memory import GuestMemory

MEM_SIZE = 4 << 20
RAM = [(0, 0x9FC00), (0x100000, MEM_SIZE - 0x100000)]
RESERVED = [(0x9FC00, 0x400), (0xF0000, 0x10000)]
FILL = 0xA5  # guest memory starts out as this, so zeroing and untouched bytes show


def guest_memory(size: int = MEM_SIZE) -> GuestMemory:
    return GuestMemory([(0, bytearray([FILL]) * size)])


# ---- ELF64 (System V gABI; include/uapi/linux/elf.h) ----

ELF_PADDR = 0x100000
ELF_VADDR = 0xFFFFFFFF80000000 + ELF_PADDR  # like vmlinux: virtual != physical
ELF_CODE = bytes(range(256)) * 4  # 1 KiB of recognisable "text"
ELF_BSS = 0x3000
ELF_ENTRY = ELF_PADDR + 0x40
CODE_OFFSET = 0x1000

EHDR = "<16sHHIQQQIHHHHHH"  # Elf64_Ehdr, 64 bytes
PHDR = "<IIQQQQQQ"  # Elf64_Phdr, 56 bytes
SHDR = "<IIQQQQIIQQ"  # Elf64_Shdr, 64 bytes
PT_LOAD, PT_NOTE = 1, 4
SHT_STRTAB, SHT_NOTE = 3, 7
ET_EXEC, ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62


def xen_note(entry: int, desc_size: int = 8, name: bytes = b"Xen\0", ntype: int = 18) -> bytes:
    """An ELF note: Elf64_Nhdr, name and desc each padded to 4 bytes."""
    desc = entry.to_bytes(desc_size, "little")
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def make_elf(
    *,
    note: str | None = "segment",
    entry: int = ELF_ENTRY,
    desc_size: int = 8,
    paddr: int = ELF_PADDR,
    bss: int = ELF_BSS,
    machine: int = EM_X86_64,
    etype: int = ET_EXEC,
    elfclass: int = 2,
) -> bytes:
    """An x86_64 vmlinux look-alike: one PT_LOAD (text + bss) and a Xen PVH note.

    note: "segment" (a PT_NOTE), "section" (only an SHT_NOTE section) or None.
    """
    note_bytes = xen_note(entry, desc_size) if note else b""
    # A GNU build-id note first, so the loader has to walk past a foreign note.
    build_id = struct.pack("<III", 4, 8, 3) + b"GNU\0" + b"\x11" * 8
    notes = build_id + note_bytes
    phnum = 2 if note == "segment" else 1
    note_off = 64 + phnum * 56
    shstrtab = b"\0.note.Xen\0.shstrtab\0"
    sh_off = 0
    shnum = 0
    tail = b""
    if note == "section":
        strtab_off = CODE_OFFSET + len(ELF_CODE)
        sh_off = (strtab_off + len(shstrtab) + 7) & ~7
        shnum = 3
        tail = shstrtab + b"\0" * (sh_off - strtab_off - len(shstrtab))
        tail += struct.pack(SHDR, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        tail += struct.pack(SHDR, 1, SHT_NOTE, 2, 0, note_off, len(notes), 0, 0, 4, 0)
        tail += struct.pack(SHDR, 11, SHT_STRTAB, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([elfclass, 1, 1, 0]) + b"\0" * 8
    ehdr = struct.pack(EHDR, ident, etype, machine, 1, ELF_VADDR, 64, sh_off, 0, 64, 56, phnum, 64, shnum,
                       2 if shnum else 0)
    phdrs = struct.pack(PHDR, PT_LOAD, 5, CODE_OFFSET, ELF_VADDR, paddr, len(ELF_CODE), len(ELF_CODE) + bss,
                        0x200000)
    if note == "segment":
        phdrs += struct.pack(PHDR, PT_NOTE, 4, note_off, 0, 0, len(notes), len(notes), 4)
    head = ehdr + phdrs + notes
    assert len(head) <= CODE_OFFSET
    return head + b"\0" * (CODE_OFFSET - len(head)) + ELF_CODE + tail


# ---- bzImage (Documentation/x86/boot.rst, "The Real-Mode Kernel Header") ----

BZ_PAYLOAD = b"\x90" * 0x200 + b"ENTRY64!" + bytes(range(256)) * 8  # startup_32, then startup_64 at 0x200
BZ_PAYLOAD += b"\0" * (-len(BZ_PAYLOAD) % 16)
BZ_PREF = 0x200000
BZ_ALIGN = 0x200000
BZ_INIT_SIZE = 0x100000


def make_bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    loadflags: int = 0x01,  # LOADED_HIGH
    xloadflags: int = 0x03,  # XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    relocatable: int = 1,
    pref_address: int = BZ_PREF,
    kernel_alignment: int = BZ_ALIGN,
    init_size: int = BZ_INIT_SIZE,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    header_len: int = 0x6A,  # jump offset: the header ends at 0x202 + this (0x26c, protocol 2.15)
    payload: bytes = BZ_PAYLOAD,
) -> bytes:
    """Setup sectors with a setup header, then a protected-mode "kernel"."""
    setup = bytearray((max(setup_sects, 0) or 4) * 512 + 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, len(payload) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)  # boot_flag
    struct.pack_into("<BB", setup, 0x200, 0xEB, header_len)  # jump
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<BB", setup, 0x234, relocatable, 21)  # min_alignment 2 MiB
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    struct.pack_into("<I", setup, 0x264, 0x190)  # handover_offset
    struct.pack_into("<I", setup, 0x268, 0x12345)  # kernel_info_offset (2.15)
    setup[0x26C:0x290] = b"\xee" * 0x24  # past the header: must not reach the zero page
    return bytes(setup) + payload
