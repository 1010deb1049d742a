"""A vmlinux's segments mapped copy-on-write from a sealed memfd into guest
RAM (loader/kernelcache.py, GuestMemory.map_file, Mapping.map_file): the
guest sees the same bytes as a copy would give it, writes stay its own, the
image's pages are shared between guests, and nothing done to the file
afterwards reaches a guest."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from microvm._kvm import Mapping
from microvm.loader import kernelcache, load_linux
from microvm.memory import GuestMemory
from tests.unit.test_loader_images import CODE_OFFSET, EHDR, EM_X86_64, ET_EXEC, PHDR, PT_LOAD, PT_NOTE, xen_note

PAGE = 4096
PADDR = 0x100000
TEXT = bytes((i * 7 + i // 4096) & 0xFF for i in range(3 * PAGE + 100))  # three whole pages and a part
BSS = 0x2000
MEM = 16 << 20


def vmlinux(path: Path, text: bytes = TEXT, paddr: int = PADDR) -> Path:
    """One PT_LOAD (text + bss) at a page-aligned file offset, and the PVH note."""
    notes = xen_note(paddr + 0x40)
    note_off = 64 + 2 * 56
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr = struct.pack(EHDR, ident, ET_EXEC, EM_X86_64, 1, paddr, 64, 0, 0, 64, 56, 2, 64, 0, 0)
    phdrs = struct.pack(PHDR, PT_LOAD, 5, CODE_OFFSET, paddr, paddr, len(text), len(text) + BSS, PAGE)
    phdrs += struct.pack(PHDR, PT_NOTE, 4, note_off, 0, 0, len(notes), len(notes), 4)
    head = ehdr + phdrs + notes
    path.write_bytes(head + b"\0" * (CODE_OFFSET - len(head)) + text + b"\xee" * 5000)  # the file goes on
    return path


def load(mem: GuestMemory, kernel: Path) -> None:
    load_linux(mem, kernel, cmdline="console=ttyS0", ram=[(0, 0x9F000), (PADDR, MEM - PADDR)], zeroed=True)


def backing_of(mem: GuestMemory, addr: int) -> str:
    """The /proc/self/maps name of the host mapping behind a guest address."""
    host = mem.regions[0].host_address() + addr
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= host < hi:
            return fields[5] if len(fields) > 5 else ""
    raise AssertionError("not mapped")


@pytest.fixture(autouse=True)
def fresh_cache():
    kernelcache.clear()
    yield
    kernelcache.clear()


def test_whole_pages_are_mapped_from_the_memfd_and_the_rest_copied(tmp_path):
    with GuestMemory.anonymous([(0, MEM)]) as mem:
        load(mem, vmlinux(tmp_path / "vmlinux"))
        assert mem.read(PADDR, len(TEXT)) == TEXT
        assert mem.read(PADDR + len(TEXT), BSS) == bytes(BSS)  # not the file's next bytes
        assert "memfd:microvm-kernel" in backing_of(mem, PADDR)
        assert "memfd:microvm-kernel" in backing_of(mem, PADDR + 2 * PAGE)
        assert "memfd" not in backing_of(mem, PADDR + 3 * PAGE)  # the partial last page: copied
        mem.write(PADDR + 10, b"guest's own")  # copy-on-write: the image is untouched
        with GuestMemory.anonymous([(0, MEM)]) as other:
            load(other, tmp_path / "vmlinux")
            assert other.read(PADDR, len(TEXT)) == TEXT
            assert len(kernelcache._images) == 1  # one memfd for both guests
        (fd,) = kernelcache._images.values()
        assert os.pread(fd, PAGE, CODE_OFFSET) == TEXT[:PAGE]
        assert os.pread(fd, 100, CODE_OFFSET + len(TEXT)) == bytes(100)  # only the segment was copied
        assert mem.read(PADDR + 10, 11) == b"guest's own"


def test_the_file_changing_afterwards_reaches_no_guest(tmp_path):
    path = vmlinux(tmp_path / "vmlinux")
    with GuestMemory.anonymous([(0, MEM)]) as mem:
        load(mem, path)
        with open(path, "r+b") as f:  # a rebuild in place: truncated, then rewritten
            f.truncate(0)
        assert mem.read(PADDR, len(TEXT)) == TEXT  # no SIGBUS, same bytes
        vmlinux(path, text=bytes(len(TEXT)))
        os.utime(path, ns=(1, 1))  # a new mtime: a new image
        with GuestMemory.anonymous([(0, MEM)]) as other:
            load(other, path)
            assert other.read(PADDR, len(TEXT)) == bytes(len(TEXT))
        assert mem.read(PADDR, len(TEXT)) == TEXT


def test_ram_that_cannot_take_a_file_mapping_gets_a_copy(tmp_path):
    path = vmlinux(tmp_path / "vmlinux")
    with GuestMemory.memfd([(0, MEM)]) as mem:  # forkable RAM: shared, in its own memfd
        load(mem, path)
        assert mem.read(PADDR, len(TEXT)) == TEXT
        assert "microvm-kernel" not in backing_of(mem, PADDR)
    mem2 = GuestMemory([(0, bytearray(MEM))])
    load(mem2, path)
    assert mem2.read(PADDR, len(TEXT)) == TEXT


def test_at_most_max_images_are_kept_and_an_evicted_one_lives_on_in_its_guest(tmp_path):
    mems = []
    for i in range(kernelcache.MAX_IMAGES + 1):
        mem = GuestMemory.anonymous([(0, MEM)])
        load(mem, vmlinux(tmp_path / f"k{i}", text=bytes([i + 1]) * len(TEXT)))
        mems.append(mem)
    assert len(kernelcache._images) == kernelcache.MAX_IMAGES
    for i, mem in enumerate(mems):
        assert mem.read(PADDR, len(TEXT)) == bytes([i + 1]) * len(TEXT)
        mem.close()


def test_mapping_map_file_checks_its_arguments(tmp_path):
    fd = kernelcache.image_fd(str(vmlinux(tmp_path / "vmlinux")), [(CODE_OFFSET, len(TEXT))])
    assert fd is not None
    m = Mapping(4 * PAGE)
    try:
        assert fd not in kernelcache._images.values()  # the caller's own copy of the fd
        with pytest.raises(ValueError, match="page-aligned"):
            m.map_file(1, PAGE, fd, 0)
        with pytest.raises(ValueError, match="page-aligned"):
            m.map_file(0, PAGE, fd, 100)
        with pytest.raises(ValueError, match="outside"):
            m.map_file(3 * PAGE, 2 * PAGE, fd, 0)
        with pytest.raises(ValueError, match="past the end"):
            m.map_file(0, 4 * PAGE, fd, os.fstat(fd).st_size // PAGE * PAGE)
        m.map_file(PAGE, PAGE, fd, CODE_OFFSET)
        assert bytes(memoryview(m)[PAGE:2 * PAGE]) == TEXT[:PAGE]
    finally:
        m.close()
    shared = Mapping(PAGE, fd=fd, offset=0)
    try:
        with pytest.raises(ValueError, match="anonymous private"):
            shared.map_file(0, PAGE, fd, 0)
    finally:
        shared.close()
        os.close(fd)


def test_a_file_mapping_the_kernel_refuses_leaves_zero_ram_and_says_so(tmp_path):
    """mmap refused (here EACCES: a file open for writing only) is no error:
    the range is anonymous zero RAM again, writable, and the loader copies
    instead (GuestMemory.map_file says False)."""
    import errno

    path = tmp_path / "image"
    path.write_bytes(b"\xab" * (4 * PAGE))
    fd = os.open(path, os.O_WRONLY)
    m = Mapping(4 * PAGE)
    try:
        memoryview(m)[PAGE:2 * PAGE] = b"\x01" * PAGE
        assert m.map_file(PAGE, PAGE, fd, 0) is False
        assert m.map_file_refused == errno.EACCES
        assert bytes(memoryview(m)[PAGE:2 * PAGE]) == bytes(PAGE)  # zero RAM, not a hole
        memoryview(m)[PAGE:2 * PAGE] = b"\x02" * PAGE
        assert bytes(memoryview(m)[PAGE:PAGE + 4]) == b"\x02" * 4
    finally:
        m.close()
    mem = GuestMemory.anonymous([(0, 4 * PAGE)])
    try:
        assert mem.map_file(PAGE, PAGE, fd, 0) is False
        mem.write(PAGE, b"copied")
        assert mem.read(PAGE, 6) == b"copied"
    finally:
        mem.close()
        os.close(fd)
