"""Load a Linux kernel, its command line and initrd into guest memory.

Two formats, told apart by content:

- an ELF vmlinux with a Xen PVH note: booted through PVH (32-bit protected
  mode entry, %ebx = hvm_start_info); see elf.py;
- a bzImage: booted through the 64-bit boot protocol (64-bit entry at load
  address + 0x200, %rsi = boot_params); see bzimage.py.

The loader writes only through GuestMemory and knows nothing of KVM; the
caller turns the returned BootInfo into vCPU registers, page tables and a GDT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from microvm.arch.x86_64.layout import CMDLINE, CMDLINE_MAX, HIMEM_START, START_INFO, ZERO_PAGE
from microvm.errors import GuestMemoryError, LoaderError
from microvm.loader import elf
from microvm.loader.layout import (
    E820_TYPE_RAM,
    E820_TYPE_RESERVED,
    FOUR_GIB,
    PAGE_SIZE,
    KernelTooBigError,
    align_up,
    encode_cmdline,
    memory_map,
    place_initrd,
    read_input,
)
from microvm.memory import GuestMemory

__all__ = [
    "CMDLINE",
    "CMDLINE_MAX",
    "E820_TYPE_RAM",
    "E820_TYPE_RESERVED",
    "HIMEM_START",
    "START_INFO",
    "ZERO_PAGE",
    "BootInfo",
    "KernelTooBigError",
    "load_linux",
]

ELF_MAGIC = b"\x7fELF"


@dataclass
class BootInfo:
    """What the vCPU setup needs to start the loaded kernel."""

    protocol: Literal["pvh", "linux64"]
    entry: int  # PVH: XEN_ELFNOTE_PHYS32_ENTRY; linux64: load address + 0x200
    params_addr: int  # PVH: hvm_start_info (%ebx); linux64: boot_params (%rsi)
    kernel_start: int
    kernel_end: int
    initrd: tuple[int, int] | None  # (addr, size)
    cmdline_addr: int
    # PVH from a vmlinux with symbols: where the kernel's log buffer is found
    # (printk.py), and its image's (vaddr, paddr, size) to find it in guest RAM.
    log_pointer: int | None = None
    kernel_map: tuple[tuple[int, int, int], ...] = ()


def load_linux(
    mem: GuestMemory,
    kernel: Path | str | bytes,
    *,
    cmdline: str,
    initrd: Path | str | bytes | None = None,
    ram: Sequence[tuple[int, int]],
    reserved: Sequence[tuple[int, int]] = (),
    zeroed: bool = False,
) -> BootInfo:
    """Load `kernel` (vmlinux or bzImage), `cmdline` and `initrd` into `mem`.

    `ram` lists the usable RAM ranges (start, size) the caller mapped and
    `reserved` extra ranges to mark reserved; together they become the e820 map
    (bzImage) or the PVH memory map. `zeroed`: `mem` is fresh, all zeros, so a
    vmlinux's BSS needs no clearing (touching it would only fault its pages in).
    Every failure is a LoaderError.
    """
    initrd_data = None
    if initrd is not None:
        initrd_data = read_input(initrd, "initrd")
        if not initrd_data:
            raise LoaderError(f"initrd {_describe(initrd)} is empty")
    source: elf.ElfImage | bytes
    load: Callable[..., BootInfo]
    if not isinstance(kernel, bytes) and _file_magic(kernel) == ELF_MAGIC:
        # A vmlinux on disk: only its headers are read here; its segments go
        # from the file straight into guest memory.
        source, load = elf.parse_file(kernel), _load_pvh
    else:
        data = read_input(kernel, "kernel")
        from microvm.loader import bzimage  # here: a vmlinux (the usual kernel) never needs it

        if data[:4] == ELF_MAGIC:
            source, load = elf.parse(data), _load_pvh
        elif bzimage.is_bzimage(data):
            source, load = data, _load_bzimage
        else:
            raise LoaderError("not a kernel: neither an ELF vmlinux nor a bzImage")
    e820 = memory_map(ram, reserved)
    try:
        if load is _load_pvh:
            return _load_pvh(mem, source, cmdline, initrd_data, ram, e820, zero_bss=not zeroed)
        return load(mem, source, cmdline, initrd_data, ram, e820)
    except KernelTooBigError as e:
        if e.args[0].startswith("initrd"):
            raise
        # The kernel alone did not fit; the initrd goes above it.
        raise KernelTooBigError(align_up(e.needed, PAGE_SIZE) + align_up(len(initrd_data or b""), PAGE_SIZE),
                                str(e)) from e
    except GuestMemoryError as e:
        # The fixed boot structures live in low memory; a guest without it
        # cannot be booted this way.
        raise LoaderError(f"guest memory cannot hold the boot structures: {e}") from e


def _describe(source: Path | str | bytes) -> str:
    return "(given as bytes)" if isinstance(source, bytes) else str(source)


def _file_magic(path: Path | str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise LoaderError(f"cannot read kernel {path}: {e.strerror or e}") from e


def _load_pvh(
    mem: GuestMemory,
    source: Any,
    cmdline: str,
    initrd_data: bytes | None,
    ram: Sequence[tuple[int, int]],
    e820: list[tuple[int, int, int]],
    zero_bss: bool = True,
) -> BootInfo:
    # The kernel truncates a longer line without a word (and with it, the
    # device announcements we put in it); its buffer's size is in the vmlinux.
    image: elf.ElfImage = source
    raw_cmdline = encode_cmdline(cmdline, image.command_line_size - 1)
    loaded = elf.load(mem, image, zero_bss=zero_bss)
    initrd = _place_cmdline_and_initrd(mem, raw_cmdline, initrd_data, ram, loaded.end, FOUR_GIB)
    params = elf.write_start_info(mem, cmdline_addr=CMDLINE, initrd=initrd, memmap=e820)
    return BootInfo("pvh", loaded.entry, params, loaded.start, loaded.end, initrd, CMDLINE, image.log_pointer,
                    tuple((seg.vaddr, seg.paddr, seg.memsz) for seg in image.segments))


def has_log_symbol(kernel: Path | str) -> bool:
    """Whether the host can read this kernel's log from guest memory (a
    vmlinux whose symbol table locates it; that table is read once per file)."""
    return _file_magic(kernel) == ELF_MAGIC and elf.parse_file(kernel).log_pointer is not None


def _load_bzimage(
    mem: GuestMemory,
    source: Any,
    cmdline: str,
    initrd_data: bytes | None,
    ram: Sequence[tuple[int, int]],
    e820: list[tuple[int, int, int]],
) -> BootInfo:
    from microvm.loader import bzimage

    image = bzimage.parse(source)
    raw_cmdline = encode_cmdline(cmdline, image.cmdline_size)
    loaded = bzimage.load(mem, image)
    initrd = _place_cmdline_and_initrd(mem, raw_cmdline, initrd_data, ram, loaded.end, image.initrd_limit)
    params = bzimage.write_boot_params(mem, image, loaded, cmdline_addr=CMDLINE, initrd=initrd, e820=e820)
    return BootInfo("linux64", loaded.entry, params, loaded.start, loaded.end, initrd, CMDLINE)


def _place_cmdline_and_initrd(
    mem: GuestMemory, raw_cmdline: bytes, data: bytes | None, ram: Sequence[tuple[int, int]], above: int,
    limit: int,
) -> tuple[int, int] | None:
    """The command line at its fixed address; the initrd, if any, in RAM above the kernel, below limit."""
    mem.write(CMDLINE, raw_cmdline)
    if data is None:
        return None
    addr = place_initrd(mem, len(data), ram, above=above, limit=limit)
    mem.write(addr, data)
    return addr, len(data)
