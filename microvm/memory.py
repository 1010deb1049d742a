"""Guest physical memory: the only door into guest RAM.

GuestMemory owns one or more regions, each a host mapping placed at a guest
physical address. Every access is bounds-checked: an address outside every
region, or a range that runs off the end of its region, raises
GuestMemoryError; it never reaches host memory outside the mapping.
"""

from __future__ import annotations

import bisect
import ctypes
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from microvm.errors import GuestMemoryError

PAGE_SIZE = 4096

_CT = TypeVar("_CT", bound=ctypes.Structure)


@dataclass
class MemoryRegion:
    """One contiguous range of guest RAM backed by a host buffer."""

    guest_addr: int
    size: int
    backing: object  # the object that owns the host memory (Mapping, bytearray)

    def __post_init__(self) -> None:
        # One export of the backing, sliced per access (cheap). A slice keeps
        # the export alive after this view is released, so once close()
        # has released it, a non-zero export count means live slices.
        self.mv = memoryview(self.backing)  # type: ignore[arg-type]

    def view(self, offset: int, length: int) -> memoryview:
        return self.mv[offset : offset + length]

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    def host_address(self) -> int:
        address = getattr(self.backing, "address", None)
        if address is None:
            raise GuestMemoryError("region has no host address (not an mmap)")
        return int(address)


class GuestMemory:
    """Bounds-checked access to guest physical memory."""

    def __init__(self, regions: Iterable[tuple[int, object]]):
        """regions: (guest_addr, backing) pairs; backing is a writable buffer."""
        checked: list[tuple[int, int, object]] = []
        for guest_addr, backing in sorted(regions, key=lambda r: r[0]):
            with memoryview(backing) as probe:  # type: ignore[arg-type]
                if probe.readonly or probe.itemsize != 1:
                    raise GuestMemoryError("guest memory backing must be a writable byte buffer")
                size = probe.nbytes
            if checked and checked[-1][0] + checked[-1][1] > guest_addr:
                raise GuestMemoryError(f"memory region at {guest_addr:#x} overlaps the one before it")
            checked.append((guest_addr, size, backing))
        # Only now the regions' views: a refusal above leaves no export, so the
        # caller can still close the backings.
        self._regions = [MemoryRegion(*r) for r in checked]
        self._starts = [r.guest_addr for r in self._regions]
        self._first = self._regions[0] if self._regions else MemoryRegion(0, 0, bytearray())
        self.fd = -1  # a memfd holding the RAM (memfd()), ours to close; else -1
        # snapshot.fork(): None while mapped shared over fd; else the VM's
        # run_stamp when its mapping became private over fd (the template).
        self.template_stamp: int | None = None

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]], hugepages: bool = False) -> GuestMemory:
        """Anonymous MAP_NORESERVE mappings for (guest_addr, size) pairs."""
        from microvm._kvm import Mapping

        return cls._mapped(layout, lambda size, _: Mapping(size, hugepages=hugepages))

    @classmethod
    def from_file(cls, layout: Iterable[tuple[int, int]], fd: int, *, shared: bool = False,
                  offset: int = 0) -> GuestMemory:
        """Map (guest_addr, size) regions from consecutive offsets of a file.

        Private (the default) is copy-on-write: pages come from the file (its
        page cache, shared by every mapping of it) on first touch, and the
        guest's writes stay ours. The fd stays the caller's.
        """
        from microvm._kvm import Mapping

        if offset < 0 or offset % PAGE_SIZE:  # mmap(2): EINVAL
            raise GuestMemoryError(f"file offset {offset:#x} is not page aligned")
        return cls._mapped(layout, lambda size, before: Mapping(size, fd=fd, offset=offset + before, shared=shared))

    @classmethod
    def _mapped(cls, layout: Iterable[tuple[int, int]], map_region: Callable[[int, int], object]) -> GuestMemory:
        """GuestMemory over map_region(size, bytes of the regions before it) for
        each (guest_addr, size). On any failure the regions mapped so far are
        unmapped first: the exception's traceback would keep them alive."""
        regions: list[tuple[int, object]] = []
        before = 0
        try:
            for guest_addr, size in layout:
                if size <= 0 or size % PAGE_SIZE or guest_addr % PAGE_SIZE:
                    raise GuestMemoryError(f"region {guest_addr:#x}+{size:#x} is not page aligned")
                try:
                    regions.append((guest_addr, map_region(size, before)))
                except (OSError, ValueError) as e:  # ValueError: past the end of the file
                    raise GuestMemoryError(f"cannot map {size >> 20} MiB of guest memory: {e}") from e
                before += size
            return cls(regions)
        except BaseException:
            for _, backing in regions:
                backing.close()  # type: ignore[attr-defined]
            raise

    @classmethod
    def memfd(cls, layout: Iterable[tuple[int, int]], name: str = "microvm-ram") -> GuestMemory:
        """RAM in a memfd, mapped shared: what fork needs (clones map the same
        file copy-on-write). Pages are only allocated when touched."""
        layout = list(layout)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, sum(size for _, size in layout))
            mem = cls.from_file(layout, fd, shared=True)
        except OSError as e:
            os.close(fd)
            raise GuestMemoryError(f"cannot map guest memory in a memfd: {e}") from e
        except BaseException:
            os.close(fd)
            raise
        mem.fd = fd
        return mem

    @property
    def regions(self) -> list[MemoryRegion]:
        return list(self._regions)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self._regions)

    def _locate(self, addr: int, length: int) -> tuple[MemoryRegion, int]:
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {addr:#x}+{length:#x}")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = self._regions[i]
            offset = addr - region.guest_addr
            if offset < region.size and offset + length <= region.size:
                return region, offset
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is outside guest memory")

    def contains(self, addr: int, length: int = 1) -> bool:
        try:
            self._locate(addr, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest memory [addr, addr+length)."""
        first = self._first
        offset = addr - first.guest_addr
        # The common case, low RAM, with _locate's rule: the address itself
        # must be inside (an empty range at the very end is not).
        if 0 <= offset < first.size and length >= 0 and offset + length <= first.size:
            return first.mv[offset:offset + length]
        region, offset = self._locate(addr, length)
        return region.mv[offset:offset + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def map_file(self, addr: int, length: int, fd: int, file_offset: int) -> bool:
        """Back guest [addr, addr+length) by the file's pages, copy-on-write
        (Mapping.map_file), if its region is anonymous private RAM: True. False
        where it cannot be (RAM in a memfd for fork, a restored snapshot's
        file, a buffer): the caller copies instead. Page aligned."""
        region, offset = self._locate(addr, length)
        map_file = getattr(region.backing, "map_file", None)
        if map_file is None or getattr(region.backing, "fd", 0) >= 0 or getattr(region.backing, "shared", True):
            return False
        try:  # refused by the kernel (e.g. a mapping count limit): zero RAM there, copied into
            return bool(map_file(offset, length, fd, file_offset))
        except ValueError:
            return False

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        self.view(addr, len(src))[:] = src

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        view = self.view(addr, length)
        view[:] = bytes([byte]) * length

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.view(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        self.view(addr, size)[:] = value.to_bytes(size, "little")

    def read_obj(self, addr: int, ctype: type[_CT]) -> _CT:
        """Copy a ctypes structure out of guest memory."""
        return ctype.from_buffer_copy(self.view(addr, ctypes.sizeof(ctype)))

    def write_obj(self, addr: int, obj: ctypes.Structure | ctypes.Array) -> None:
        self.write(addr, memoryview(obj).cast("B"))

    def close(self) -> None:
        """Unmap every region; refused (and nothing changed) while views are alive."""
        for r in self._regions:
            r.mv.release()
        in_use = sum(getattr(r.backing, "exports", 0) for r in self._regions)
        if in_use:
            for r in self._regions:
                r.mv = memoryview(r.backing)  # type: ignore[arg-type]
            raise GuestMemoryError(f"{in_use} view(s) of guest memory are still in use")
        for region in self._regions:
            close = getattr(region.backing, "close", None)
            if close is not None:
                close()
        self._regions = []
        self._starts = []
        self._first = MemoryRegion(0, 0, bytearray())
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
