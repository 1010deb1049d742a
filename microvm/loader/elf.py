"""ELF vmlinux booted through its PVH entry point, and the hvm_start_info it is handed.

PVH boot (include/xen/interface/hvm/start_info.h, arch/x86/platform/pvh/head.S):
every PT_LOAD segment goes to its physical address, and the vCPU starts in 32-bit
protected mode, paging off, at the address in the kernel's Xen ELF note
XEN_ELFNOTE_PHYS32_ENTRY, with %ebx holding the address of struct hvm_start_info.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from microvm.arch.x86_64.layout import HIMEM_START, PVH_MEMMAP, PVH_MODLIST, START_INFO
from microvm.errors import LoaderError
from microvm.loader import kernelcache
from microvm.loader.layout import KernelTooBigError, LoadedKernel, align_up, mib
from microvm.memory import PAGE_SIZE as PAGE
from microvm.memory import GuestMemory

# include/xen/interface/elfnote.h
XEN_ELFNOTE_PHYS32_ENTRY = 18
# include/xen/interface/hvm/start_info.h: "xEn3" with the 0x80 bit of the "E" set
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1  # version 1 added memmap_paddr/memmap_entries

# The start-info page: hvm_start_info, then one module, then the memory map.
MODLIST = PVH_MODLIST
MEMMAP = PVH_MEMMAP
# arch/x86/platform/pvh/enlighten.c copies memmap_entries into the kernel's own
# boot_params.e820_table[E820_MAX_ENTRIES_ZEROPAGE] without a bounds check, then
# appends the ISA hole: more than 127 entries would overrun that table.
MEMMAP_MAX = 127
# x86's COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h... include/uapi/asm-generic/setup.h
# for the default): the kernel copies at most this many bytes, NUL included,
# into boot_command_line and silently drops the rest. A vmlinux with a symbol
# table tells its own size (that of boot_command_line); this is for one without.
DEFAULT_COMMAND_LINE_SIZE = 2048
# struct Elf64_Sym { Elf64_Word st_name; unsigned char st_info, st_other;
#                    Elf64_Half st_shndx; Elf64_Addr st_value; Elf64_Xword st_size; }
ELF64_SYM = struct.Struct("<IBBHQQ")
# Elf64_Ehdr (e_ident, then e_type ... e_shstrndx), Elf64_Phdr, Elf64_Shdr: read
# with struct, not pyelftools, whose import alone was a tenth of `microvm run`'s.
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
SHDR = struct.Struct("<IIQQQQIIQQ")  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, ...
ELFCLASS64, ELFDATA2LSB, ET_EXEC, EM_X86_64 = 2, 1, 2, 62
PT_LOAD, PT_NOTE, SHT_SYMTAB, SHT_NOTE = 1, 4, 2, 7
ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
EM_NAMES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 40: "EM_ARM", 62: "EM_X86_64",
            183: "EM_AARCH64", 243: "EM_RISCV"}


class HvmStartInfo(ctypes.LittleEndianStructure):
    """include/xen/interface/hvm/start_info.h::

    struct hvm_start_info {
        uint32_t magic;             /* Contains the magic value 0x336ec578 */
        uint32_t version;           /* Version of this structure. */
        uint32_t flags;             /* SIF_xxx flags. */
        uint32_t nr_modules;        /* Number of modules passed to the kernel. */
        uint64_t modlist_paddr;     /* Physical address of an array of hvm_modlist_entry. */
        uint64_t cmdline_paddr;     /* Physical address of the command line. */
        uint64_t rsdp_paddr;        /* Physical address of the RSDP ACPI data structure. */
        /* All following fields only present in version 1 and newer */
        uint64_t memmap_paddr;      /* Physical address of an array of hvm_memmap_table_entry. */
        uint32_t memmap_entries;    /* Number of entries in the memmap table. */
        uint32_t reserved;          /* Must be zero. */
    };
    """

    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        ("memmap_paddr", ctypes.c_uint64),
        ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class HvmModlistEntry(ctypes.LittleEndianStructure):
    """include/xen/interface/hvm/start_info.h::

    struct hvm_modlist_entry {
        uint64_t paddr;             /* Physical address of the module. */
        uint64_t size;              /* Size of the module in bytes. */
        uint64_t cmdline_paddr;     /* Physical address of the command line. */
        uint64_t reserved;
    };
    """

    _fields_ = [
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


class HvmMemmapTableEntry(ctypes.LittleEndianStructure):
    """include/xen/interface/hvm/start_info.h::

    struct hvm_memmap_table_entry {
        uint64_t addr;              /* Base address of the memory region */
        uint64_t size;              /* Size of the memory region in bytes */
        uint32_t type;              /* Mapping type */
        uint32_t reserved;          /* Must be zero for Version 1. */
    };
    """

    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header, checked against the file."""

    index: int
    paddr: int
    offset: int
    filesz: int
    memsz: int
    vaddr: int = 0  # where the kernel sees it (its image mapping)


@dataclass(frozen=True)
class ElfImage:
    """A parsed, checked vmlinux: nothing written to guest memory yet. The
    segments' bytes come from `data` (a kernel given as bytes) or are read
    from `path` straight into guest memory."""

    data: bytes | None
    entry: int
    segments: list[Segment]
    path: str | None = None
    command_line_size: int = DEFAULT_COMMAND_LINE_SIZE  # NUL included
    log_pointer: int | None = None  # the address (virtual) of `prb`, the kernel's log buffer (printk.py)


@dataclass(frozen=True)
class KernelSymbols:
    """What the loader and the host take from a vmlinux's symbol table."""

    command_line_size: int = DEFAULT_COMMAND_LINE_SIZE
    log_pointer: int | None = None


Reader = Callable[[int, int], bytes]  # (offset, length) -> bytes of the file


def parse(data: bytes) -> ElfImage:
    """Check a vmlinux given as bytes and find its segments and PVH entry point."""
    entry, segments, syms = _checked(len(data), lambda offset, n: data[offset:offset + n], None)
    return ElfImage(data, entry, segments, command_line_size=syms.command_line_size, log_pointer=syms.log_pointer)


def parse_file(path: str | os.PathLike[str]) -> ElfImage:
    """The same for a vmlinux on disk, reading only its headers and notes: the
    segments are read into guest memory by load(), without a copy in between."""
    try:
        with open(path, "rb") as f:
            fd = f.fileno()
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            entry, segments, syms = _checked(st.st_size, lambda offset, n: os.pread(fd, n, offset), identity)
    except OSError as e:
        raise LoaderError(f"cannot read kernel {path}: {e.strerror or e}") from e
    return ElfImage(None, entry, segments, path=os.fspath(path), command_line_size=syms.command_line_size,
                    log_pointer=syms.log_pointer)


def _checked(size: int, read: Reader,
             identity: tuple[int, ...] | None) -> tuple[int, list[Segment], KernelSymbols]:
    try:
        return _parse(size, read, identity)
    except (struct.error, ValueError, OverflowError) as e:  # a header cut short or mangled past our checks
        raise LoaderError(f"vmlinux is truncated or corrupt: {e}") from e


def _parse(size: int, read: Reader, identity: tuple[int, ...] | None) -> tuple[int, list[Segment], KernelSymbols]:
    ident = read(0, min(size, EHDR.size))
    if len(ident) < 6 or ident[:4] != b"\x7fELF":
        raise LoaderError("vmlinux is truncated or corrupt: no ELF header")
    if ident[4] != ELFCLASS64:
        raise LoaderError(f"kernel is ELFCLASS{ {1: 32}.get(ident[4], ident[4])}, need an ELFCLASS64 x86_64 vmlinux")
    if ident[5] != ELFDATA2LSB:
        raise LoaderError("kernel is big-endian, need a little-endian x86_64 vmlinux")
    if len(ident) < EHDR.size:
        raise LoaderError(f"vmlinux is truncated: its ELF header needs {EHDR.size} bytes, file is {size}")
    (_, e_type, e_machine, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum,
     _) = EHDR.unpack(ident)
    if e_machine != EM_X86_64:
        raise LoaderError(f"kernel is for e_machine {EM_NAMES.get(e_machine, e_machine)}, need EM_X86_64")
    if e_type != ET_EXEC:
        raise LoaderError(f"kernel is {ET_NAMES.get(e_type, e_type)}, need ET_EXEC (a vmlinux)")
    ph_end = e_phoff + e_phnum * e_phentsize
    if ph_end > size:
        raise LoaderError(f"vmlinux is truncated: program headers end at {ph_end:#x}, file is {size} bytes")
    if e_phnum and e_phentsize != PHDR.size:
        raise LoaderError(f"vmlinux is corrupt: e_phentsize is {e_phentsize}, ELF64 says {PHDR.size}")

    segments: list[Segment] = []
    notes: list[tuple[int, int, int]] = []  # (offset, size, alignment)
    for index, h in enumerate(PHDR.iter_unpack(read(e_phoff, e_phnum * PHDR.size))):
        p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = h
        if p_type == PT_LOAD and p_memsz:
            segments.append(_load_segment(index, p_paddr, p_offset, p_filesz, p_memsz, p_vaddr, size))
        elif p_type == PT_NOTE:
            notes.append((p_offset, p_filesz, p_align))
    if not segments:
        raise LoaderError("vmlinux has no loadable (PT_LOAD) segments")

    def sections() -> list[tuple[int, ...]]:
        return _sections(read, size, e_shoff, e_shnum, e_shentsize)

    entry = _pvh_entry(read, size, notes)
    if entry is None:  # no PT_NOTE carried it: look in the SHT_NOTE sections
        entry = _pvh_entry(read, size, [(sh[4], sh[5], sh[8]) for sh in sections() if sh[1] == SHT_NOTE])
    if entry is None:
        raise LoaderError("kernel has no PVH entry point (CONFIG_PVH=y needed)")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in segments):
        raise LoaderError(f"PVH entry point {entry:#x} is outside the kernel's loaded segments")
    if identity is None:
        return entry, segments, _kernel_symbols(sections(), read, size)
    syms = _KERNEL_SYMBOLS.get(identity)
    if syms is None:
        syms = _KERNEL_SYMBOLS[identity] = _kernel_symbols(sections(), read, size)
    return entry, segments, syms


# (st_dev, st_ino, st_size, st_mtime_ns) of a vmlinux -> what its symbol table
# says: the same kernel boots again and again, and its symbols never change.
_KERNEL_SYMBOLS: dict[tuple[int, ...], KernelSymbols] = {}


def _sections(read: Reader, size: int, e_shoff: int, e_shnum: int, e_shentsize: int) -> list[tuple[int, ...]]:
    sh_end = e_shoff + e_shnum * e_shentsize
    if sh_end > size:
        raise LoaderError(f"vmlinux is truncated: section headers end at {sh_end:#x}, file is {size} bytes")
    if e_shnum and e_shentsize != SHDR.size:
        raise LoaderError(f"vmlinux is corrupt: e_shentsize is {e_shentsize}, ELF64 says {SHDR.size}")
    return list(SHDR.iter_unpack(read(e_shoff, e_shnum * SHDR.size))) if e_shnum else []


def _symbol_tables(sections: list[tuple[int, ...]], read: Reader, size: int) -> tuple[bytes, bytes]:
    """The raw symbol table (ELF64_SYM entries) and its string table; empty
    without a symbol table."""
    symtab = next((sh for sh in sections if sh[1] == SHT_SYMTAB), None)
    if symtab is None or symtab[9] != ELF64_SYM.size or not 0 <= symtab[6] < len(sections):
        return b"", b""
    strtab = sections[symtab[6]]  # sh_link
    tables = [(symtab[4], symtab[5]), (strtab[4], strtab[5])]  # (sh_offset, sh_size)
    if any(offset + length > size for offset, length in tables):
        raise LoaderError("vmlinux is truncated: its symbol table runs past the end of the file")
    return read(*tables[0]), read(*tables[1])


def symbol_tables(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The raw symbol table and string table of an ELF64 file (loader/symbols.py
    names addresses with them), empty without a symbol table; a LoaderError for
    a file that is not a little-endian ELF64 one (a bzImage) or is cut short."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def read(offset: int, length: int) -> bytes:
            return os.pread(f.fileno(), length, offset)

        header = read(0, EHDR.size)
        if len(header) < EHDR.size or header[:4] != b"\x7fELF" or header[4] != ELFCLASS64 or header[5] != ELFDATA2LSB:
            raise LoaderError(f"{os.fspath(path)} is not a little-endian ELF64 file")
        e_shoff, e_shentsize, e_shnum = (EHDR.unpack(header)[i] for i in (6, 11, 12))
        try:
            return _symbol_tables(_sections(read, size, e_shoff, e_shnum, e_shentsize), read, size)
        except (struct.error, ValueError, OverflowError) as e:
            raise LoaderError(f"{os.fspath(path)} is truncated or corrupt: {e}") from e


def _kernel_symbols(sections: list[tuple[int, ...]], read: Reader, size: int) -> KernelSymbols:
    """The size of the kernel's boot_command_line buffer and the address of
    `prb` (its log buffer's pointer), from its symbol table: a raw scan, the
    table whole (tens of thousands of symbols; once per kernel file)."""
    symbols, names = _symbol_tables(sections, read, size)
    if not symbols:
        return KernelSymbols()
    command_line = _symbol(names, symbols, b"boot_command_line")
    log = _symbol(names, symbols, b"prb", unique=True)
    return KernelSymbols(command_line[1] if command_line and command_line[1] > 0 else DEFAULT_COMMAND_LINE_SIZE,
                         log[0] if log and log[1] == 8 else None)


def _symbol(names: bytes, symbols: bytes, name: bytes, unique: bool = False) -> tuple[int, int] | None:
    """(st_value, st_size) of the symbol called name; with unique, None where
    more than one has that name (a static variable's name may repeat)."""
    at = names.find(b"\0" + name + b"\0")
    if at < 0:
        return None
    key = struct.pack("<I", at + 1)
    found = []
    pos = symbols.find(key)
    while pos >= 0:
        if pos % ELF64_SYM.size == 0:
            found.append(ELF64_SYM.unpack_from(symbols, pos))
            if not unique:
                break
        pos = symbols.find(key, pos + 1)
    if len(found) != 1:
        return None
    return int(found[0][4]), int(found[0][5])


def _load_segment(index: int, paddr: int, offset: int, filesz: int, memsz: int, vaddr: int,
                  file_size: int) -> Segment:
    seg = Segment(index, paddr, offset, filesz, memsz, vaddr)
    if seg.filesz > seg.memsz:
        raise LoaderError(f"segment {index}: p_filesz {seg.filesz:#x} exceeds p_memsz {seg.memsz:#x}")
    if seg.offset + seg.filesz > file_size:
        raise LoaderError(
            f"vmlinux is truncated: segment {index} needs file bytes up to "
            f"{seg.offset + seg.filesz:#x}, file is {file_size} bytes"
        )
    if seg.paddr < HIMEM_START:
        # Low memory holds the loader's and the caller's boot structures.
        raise LoaderError(f"segment {index} at {seg.paddr:#x} is below {HIMEM_START:#x}")
    return seg


def _pvh_entry(read: Reader, size: int, areas: list[tuple[int, int, int]]) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address in these note areas, if there.

    Each note is an Elf64_Nhdr (namesz, descsz, type), then the name and the
    descriptor, each padded to 4 bytes (8 where the area asks for 8, as GNU
    property notes do). head.S emits the address with _ASM_PTR: 8 bytes on
    x86_64, 4 on older 32-bit-style notes.
    """
    for offset, area_size, alignment in areas:
        pad = 8 if alignment == 8 else 4
        if offset + area_size > size:
            raise LoaderError(f"vmlinux is truncated: a note area ends at {offset + area_size:#x}, "
                              f"file is {size} bytes")
        data = read(offset, area_size)
        pos, end = 0, len(data)
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_at = pos + 12
            desc_at = name_at + align_up(namesz, pad)
            pos = desc_at + align_up(descsz, pad)
            if desc_at + descsz > end:
                break  # a malformed note: the rest of this area cannot be trusted
            if data[name_at : name_at + namesz].rstrip(b"\0") == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if descsz not in (4, 8):
                    raise LoaderError(f"PVH entry note has a {descsz}-byte address, expected 4 or 8")
                return int.from_bytes(data[desc_at : desc_at + descsz], "little")
    return None


def load(mem: GuestMemory, image: ElfImage, zero_bss: bool = True) -> LoadedKernel:
    """Copy every PT_LOAD segment to its p_paddr and zero the rest up to p_memsz
    (unless the memory is known to be zero already: zero_bss=False)."""
    for s in image.segments:
        if not mem.contains(s.paddr, s.memsz):
            raise KernelTooBigError(
                max(s.paddr + s.memsz for s in image.segments),
                f"segment {s.index} ({s.paddr:#x}+{s.memsz:#x}) does not fit in guest memory "
                f"({mib(mem.size)} MiB)"
            )
    if image.data is not None:
        view = memoryview(image.data)
        for s in image.segments:
            mem.write(s.paddr, view[s.offset : s.offset + s.filesz])
    else:
        assert image.path is not None
        _read_segments(mem, image.path, image.segments)
    for s in image.segments:
        if s.memsz > s.filesz and zero_bss:
            mem.fill(s.paddr + s.filesz, s.memsz - s.filesz)
    start = min(s.paddr for s in image.segments)
    end = max(s.paddr + s.memsz for s in image.segments)
    return LoadedKernel(image.entry, start, end)


def share_image(path: str | os.PathLike[str]) -> None:
    """Make the kernel cache's memfd for a vmlinux now (jail/run.py, before it
    forks: every jailed VMM then maps the same pages instead of copying its
    own). Nothing for a file that is no ELF or cannot be read: loading names it."""
    try:
        image = parse_file(path)
    except LoaderError:
        return
    fd = kernelcache.image_fd(os.fspath(path), [(s.offset, s.filesz) for s in image.segments])
    if fd is not None:
        os.close(fd)


def _read_segments(mem: GuestMemory, path: str, segments: list[Segment]) -> None:
    """Each segment into guest memory: its whole pages mapped copy-on-write
    from the image's sealed memfd (kernelcache.py: no copy, pages shared by
    every guest of this image), the rest preadv'd, from the memfd or the file."""
    shared = kernelcache.image_fd(path, [(s.offset, s.filesz) for s in segments])
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if shared is None else shared
    except OSError as e:
        raise LoaderError(f"cannot read kernel {path}: {e.strerror or e}") from e
    try:
        for s in segments:
            mapped_from = mapped_to = s.paddr
            if shared is not None and (s.paddr - s.offset) % PAGE == 0:
                first = -(-s.paddr // PAGE) * PAGE
                end = (s.paddr + s.filesz) // PAGE * PAGE  # a partial last page would carry the file's next bytes
                if end > first and mem.map_file(first, end - first, shared, s.offset + first - s.paddr):
                    mapped_from, mapped_to = first, end
            _pread(mem, fd, path, s, s.paddr, mapped_from)
            _pread(mem, fd, path, s, max(mapped_to, s.paddr), s.paddr + s.filesz)
    except OSError as e:
        raise LoaderError(f"cannot read kernel {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _pread(mem: GuestMemory, fd: int, path: str, s: Segment, start: int, end: int) -> None:
    """preadv segment s's bytes for guest [start, end) straight into guest memory."""
    if end <= start:
        return
    view = mem.view(start, end - start)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], s.offset + start - s.paddr + done)
        if n <= 0:
            raise LoaderError(f"kernel {path} shrank while it was being loaded")
        done += n
    view.release()


def write_start_info(
    mem: GuestMemory,
    *,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    memmap: list[tuple[int, int, int]],
) -> int:
    """Write hvm_start_info, its module list and memory map; return its address."""
    if len(memmap) > MEMMAP_MAX:
        raise LoaderError(f"memory map has {len(memmap)} entries, PVH boot takes at most {MEMMAP_MAX}")
    # Entries one after another (an array type made per call would be a new class each time: garbage in cycles)
    table = b"".join(bytes(HvmMemmapTableEntry(a, s, t, 0)) for a, s, t in memmap)
    info = HvmStartInfo(
        magic=XEN_HVM_START_MAGIC_VALUE,
        version=HVM_START_INFO_VERSION,
        flags=0,
        cmdline_paddr=cmdline_addr,
        rsdp_paddr=0,  # no ACPI tables: 0 means "not present" (start_info.h)
        memmap_paddr=MEMMAP,
        memmap_entries=len(memmap),
    )
    if initrd is not None:
        # enlighten.c: "The first module is always ramdisk."
        mem.write_obj(MODLIST, HvmModlistEntry(paddr=initrd[0], size=initrd[1]))
        info.nr_modules = 1
        info.modlist_paddr = MODLIST
    mem.write(MEMMAP, table)
    mem.write_obj(START_INFO, info)
    return START_INFO
