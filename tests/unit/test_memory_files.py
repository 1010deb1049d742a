"""GuestMemory over files: from_file (copy-on-write or shared) and memfd. No KVM needed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm import _kvm
from microvm.errors import GuestMemoryError
from microvm.memory import PAGE_SIZE, GuestMemory

# Two regions, at consecutive offsets of one file: three pages, then two.
LAYOUT = [(0x0, 3 * PAGE_SIZE), (0x100000, 2 * PAGE_SIZE)]
FILE_SIZE = 5 * PAGE_SIZE


def _pattern(size: int) -> bytes:
    """Every page different: its number in every byte."""
    return b"".join(bytes([1 + i % 250]) * PAGE_SIZE for i in range(size // PAGE_SIZE))


@pytest.fixture
def image(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "ram"
    path.write_bytes(_pattern(FILE_SIZE))
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def _memfds(name: str) -> int:
    """How many of this process's fds are memfds called `name`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listdir itself used, closed by now
            continue
        if target.startswith(f"/memfd:{name} "):
            count += 1
    return count


def test_from_file_maps_regions_at_consecutive_offsets(image: int) -> None:
    expected = _pattern(FILE_SIZE)
    with GuestMemory.from_file(LAYOUT, image) as mem:
        assert mem.read(0, 3 * PAGE_SIZE) == expected[:3 * PAGE_SIZE]
        assert mem.read(0x100000, 2 * PAGE_SIZE) == expected[3 * PAGE_SIZE:]
    with GuestMemory.from_file([(0, 2 * PAGE_SIZE)], image, offset=3 * PAGE_SIZE) as mem:
        assert mem.read(0, 2 * PAGE_SIZE) == expected[3 * PAGE_SIZE:]


def test_private_writes_never_reach_the_file_nor_another_mapping(image: int) -> None:
    before = os.pread(image, FILE_SIZE, 0)
    with GuestMemory.from_file(LAYOUT, image) as a, GuestMemory.from_file(LAYOUT, image) as b:
        a.write(0x10, b"from a")
        a.write(0x100000 + PAGE_SIZE, b"a, high")
        b.write(0x10, b"from b")
        assert a.read(0x10, 6) == b"from a"
        assert b.read(0x10, 6) == b"from b"
        assert b.read(0x100000 + PAGE_SIZE, 7) == before[4 * PAGE_SIZE:4 * PAGE_SIZE + 7]
        assert os.pread(image, FILE_SIZE, 0) == before


def test_shared_writes_reach_the_file(image: int) -> None:
    with GuestMemory.from_file(LAYOUT, image, shared=True) as mem:
        mem.write(0x100000 + 8, b"shared")
        assert os.pread(image, 6, 3 * PAGE_SIZE + 8) == b"shared"


def test_memfd_is_shared_between_views_and_closed_with_the_memory() -> None:
    name = f"microvm-test-{os.getpid()}"
    mem = GuestMemory.memfd(LAYOUT, name=name)
    assert mem.fd >= 0 and _memfds(name) == 1
    assert os.fstat(mem.fd).st_size == FILE_SIZE
    other = GuestMemory.from_file(LAYOUT, mem.fd, shared=True)
    mem.write(0x100000 + 5, b"one way")
    assert other.read(0x100000 + 5, 7) == b"one way"
    other.write(0x20, b"and back")
    assert mem.read(0x20, 8) == b"and back"
    assert os.pread(mem.fd, 7, 3 * PAGE_SIZE + 5) == b"one way"
    other.close()
    fd = mem.fd
    mem.close()
    assert mem.fd == -1
    assert _memfds(name) == 0
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("layout", [
    [(0, 2 * PAGE_SIZE), (0x100000, 1000)],  # the second region's size
    [(0, 2 * PAGE_SIZE), (0x100800, PAGE_SIZE)],  # the second region's address
    [(0, 2 * PAGE_SIZE), (0x100000, 0)],  # empty
])
def test_a_misaligned_region_is_refused_and_leaves_no_mapping(image: int, layout: list[tuple[int, int]]) -> None:
    name = f"microvm-test-{os.getpid()}"
    before = _kvm.live_mappings()
    # The exceptions are kept (excinfo): their tracebacks must not keep a mapping alive.
    with pytest.raises(GuestMemoryError, match="page aligned") as from_file:
        GuestMemory.from_file(layout, image)
    assert _kvm.live_mappings() == before
    with pytest.raises(GuestMemoryError, match="page aligned") as memfd:
        GuestMemory.memfd(layout, name=name)
    assert _kvm.live_mappings() == before
    assert _memfds(name) == 0
    with pytest.raises(GuestMemoryError, match="page aligned") as anonymous:
        GuestMemory.anonymous(layout)
    assert _kvm.live_mappings() == before
    assert from_file.value and memfd.value and anonymous.value


def test_a_misaligned_file_offset_is_refused_and_leaves_no_mapping(image: int) -> None:
    before = _kvm.live_mappings()
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_file([(0, PAGE_SIZE)], image, offset=100)
    with pytest.raises(GuestMemoryError):  # the second region runs past the end of the file
        GuestMemory.from_file([(0, PAGE_SIZE), (0x100000, FILE_SIZE)], image)
    assert _kvm.live_mappings() == before


def test_close_unmaps_every_region(image: int) -> None:
    count, size = _kvm.live_mappings()
    mem = GuestMemory.from_file(LAYOUT, image)
    assert _kvm.live_mappings() == (count + 2, size + FILE_SIZE)
    mem.close()
    assert _kvm.live_mappings() == (count, size)


def test_overlapping_mapped_regions_are_refused_and_unmapped(image: int) -> None:
    before = _kvm.live_mappings()
    overlapping = [(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)]
    with pytest.raises(GuestMemoryError, match="overlaps") as anonymous:
        GuestMemory.anonymous(overlapping)
    with pytest.raises(GuestMemoryError, match="overlaps") as from_file:
        GuestMemory.from_file(overlapping, image)
    assert _kvm.live_mappings() == before
    assert anonymous.value and from_file.value
