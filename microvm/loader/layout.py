"""The pieces both boot protocols share: placing the initrd, the memory map
the guest is told about, the command line.

Where things go in guest memory (START_INFO, ZERO_PAGE, CMDLINE,
HIMEM_START, ...) is microvm.arch.x86_64.layout's to say, not ours.
Everything here goes through GuestMemory; nothing knows about KVM.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from microvm.arch.x86_64.layout import CMDLINE_MAX
from microvm.errors import LoaderError
from microvm.memory import PAGE_SIZE, GuestMemory

# e820 / XEN_HVM_MEMMAP_TYPE_* values (arch/x86/include/asm/e820/types.h and
# include/xen/interface/hvm/start_info.h agree: both are the ACPI address range types).
E820_TYPE_RAM = 1
E820_TYPE_RESERVED = 2

FOUR_GIB = 1 << 32  # where 32-bit boot protocol fields (ramdisk_image, e820) stop reaching



class KernelTooBigError(LoaderError):
    """The kernel (or its initrd) does not fit in guest memory; `needed` is
    the guest memory, in bytes, that would have held it."""

    def __init__(self, needed: int, message: str):
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class LoadedKernel:
    """Where a kernel image landed: entry point and the guest range it may use."""

    entry: int
    start: int
    end: int


def mib(n: int) -> str:
    """n bytes as MiB for a message: whole numbers stay whole, others get one decimal."""
    return str(n >> 20) if n % (1 << 20) == 0 else f"{n / (1 << 20):.1f}"


def align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def read_input(source: Path | str | bytes | bytearray | memoryview, what: str) -> bytes:
    """The bytes of a kernel or initrd given as contents or as a path (a str is a path)."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    try:
        st = path.stat()
        return _read_cached(str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError as e:
        raise LoaderError(f"cannot read {what} {path}: {e.strerror or e}") from e


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, dev: int, ino: int, size: int, mtime_ns: int) -> bytes:
    # Keyed by identity and mtime: booting the same kernel many times in one
    # process reads it once; a rebuilt file is read again.
    return Path(path).read_bytes()


def encode_cmdline(cmdline: str, limit: int) -> bytes:
    """The command line as bytes, NUL-terminated, checked against `limit` characters.

    boot.rst, "The Kernel Command Line": a NUL-terminated string of at most
    cmdline_size characters, the terminating zero not counted.
    """
    raw = cmdline.encode()
    if b"\0" in raw:
        raise LoaderError("command line contains a NUL byte")
    limit = min(limit, CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise LoaderError(f"command line is {len(raw)} bytes, the kernel accepts at most {limit}")
    return raw + b"\0"


def memory_map(
    ram: Iterable[tuple[int, int]], reserved: Iterable[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries sorted by address, for e820 and the PVH memmap."""
    entries = [(a, s, E820_TYPE_RAM) for a, s in ram] + [(a, s, E820_TYPE_RESERVED) for a, s in reserved]
    entries = sorted(e for e in entries if e[1] > 0)
    for (a, s, _), (b, _, _) in pairwise(entries):
        if a + s > b:
            raise LoaderError(f"memory map ranges overlap: {a:#x}+{s:#x} runs into {b:#x}")
    if any(a < 0 for a, _, _ in entries) or not any(t == E820_TYPE_RAM for _, _, t in entries):
        raise LoaderError("memory map needs at least one RAM range and no negative addresses")
    return entries


def place_initrd(
    mem: GuestMemory,
    size: int,
    ram: Iterable[tuple[int, int]],
    *,
    above: int,
    limit: int,
) -> int:
    """The highest page-aligned address for `size` bytes in one RAM range.

    The initrd sits above the kernel's footprint (`above`) and ends at or below
    `limit` (initrd_addr_max + 1 for a bzImage, boot.rst; 4 GiB always, since
    ramdisk_image and the e820 ranges we describe stay 32-bit friendly).
    """
    limit = min(limit, FOUR_GIB)
    floor = align_up(above, PAGE_SIZE)
    for start, length in sorted(ram, key=lambda r: r[0] + r[1], reverse=True):
        top = min(start + length, limit)
        addr = align_down(top - size, PAGE_SIZE)
        if addr >= max(start, floor) and mem.contains(addr, size):
            return addr
    raise KernelTooBigError(floor + align_up(size, PAGE_SIZE),
                            f"initrd of {mib(size)} MiB does not fit in guest memory ({mib(mem.size)} MiB)")
