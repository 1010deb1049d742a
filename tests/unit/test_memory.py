"""GuestMemory bounds at every region edge (no KVM needed)."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microvm.errors import GuestMemoryError
from microvm.memory import GuestMemory

# Two regions with a hole between them, like RAM below and above a PCI hole.
LOW = (0x0, 0x10000)
HIGH = (0x100000, 0x8000)


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(LOW[0], bytearray(LOW[1])), (HIGH[0], bytearray(HIGH[1]))])


@pytest.mark.parametrize("base,size", [LOW, HIGH])
def test_every_edge(mem: GuestMemory, base: int, size: int) -> None:
    end = base + size
    mem.write(base, b"\x01")  # first byte
    mem.write(end - 1, b"\x02")  # last byte
    mem.write(end - 4, b"abcd")  # ends exactly at the edge
    assert mem.read(end - 4, 4) == b"abcd"
    assert mem.read(base, 1) == b"\x01"
    with pytest.raises(GuestMemoryError):
        mem.read(end - 3, 4)  # one byte past the end
    with pytest.raises(GuestMemoryError):
        mem.write(end, b"x")  # first byte after
    with pytest.raises(GuestMemoryError):
        mem.read(base - 1, 2)  # starts one byte before
    with pytest.raises(GuestMemoryError):
        mem.view(base, size + 1)


def test_hole_between_regions(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        mem.read(0x20000, 1)
    # A range spanning two regions is refused even though both ends are RAM.
    with pytest.raises(GuestMemoryError):
        mem.read(LOW[1] - 1, HIGH[0])
    assert not mem.contains(0x10000)
    assert mem.contains(0xFFFF)


def test_negative_and_huge(mem: GuestMemory) -> None:
    for addr, n in [(-1, 1), (0, -1), (1 << 64, 1), (0, 1 << 64), ((1 << 64) - 1, 2)]:
        with pytest.raises(GuestMemoryError):
            mem.read(addr, n)


def test_views_are_zero_copy(mem: GuestMemory) -> None:
    v = mem.view(0x100, 4)
    v[:] = b"wxyz"
    assert mem.read(0x100, 4) == b"wxyz"
    mem.write(0x102, b"!")
    assert bytes(v) == b"wx!z"


def test_ints_and_objs(mem: GuestMemory) -> None:
    class Pair(ctypes.LittleEndianStructure):
        _pack_ = 1
        _fields_ = [("a", ctypes.c_uint16), ("b", ctypes.c_uint32)]

    mem.write_obj(HIGH[0] + 10, Pair(0x1234, 0xDEADBEEF))
    assert mem.read_int(HIGH[0] + 12, 4) == 0xDEADBEEF
    got = mem.read_obj(HIGH[0] + 10, Pair)
    assert (got.a, got.b) == (0x1234, 0xDEADBEEF)
    with pytest.raises(GuestMemoryError):
        mem.read_obj(HIGH[0] + HIGH[1] - 5, Pair)


def test_overlapping_regions_refused() -> None:
    with pytest.raises(GuestMemoryError, match="overlaps"):
        GuestMemory([(0, bytearray(0x2000)), (0x1000, bytearray(0x1000))])


def test_anonymous_mapping_and_close() -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20), (1 << 32, 1 << 20)])
    assert mem.size == 2 << 20
    mem.write((1 << 32) + 5, b"hi")
    assert mem.read((1 << 32) + 5, 2) == b"hi"
    assert mem.regions[0].host_address() != 0
    view = mem.view(0, 16)
    with pytest.raises(GuestMemoryError, match="1 view"):
        mem.close()  # a live view keeps the mapping ...
    assert mem.read(0, 2) == b"\0\0"  # ... and the memory stays usable
    view.release()
    mem.close()
    assert mem.regions == []
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)


def test_unaligned_anonymous_refused() -> None:
    with pytest.raises(GuestMemoryError, match="page aligned"):
        GuestMemory.anonymous([(0, 1000)])


@given(addr=st.integers(-(1 << 20), 1 << 21), length=st.integers(0, 1 << 17))
def test_access_inside_iff_contained(addr: int, length: int) -> None:
    mem = GuestMemory([(LOW[0], bytearray(LOW[1])), (HIGH[0], bytearray(HIGH[1]))])
    inside = any(b <= addr and addr + length <= b + n and addr < b + n for b, n in (LOW, HIGH))
    try:
        data = mem.read(addr, length)
    except GuestMemoryError:
        assert not inside
    else:
        assert inside and len(data) == length


def _maps() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            out.append((start, end, perms))
    return out


@pytest.mark.parametrize("size", [1 << 20, (3 << 20) + 4096])
def test_guest_ram_lies_between_guard_regions(size: int) -> None:
    """No access on either side of guest RAM: a stray read or write by C code
    just outside it faults at once instead of reaching another mapping."""
    from microvm._kvm import Mapping

    m = Mapping(size)
    try:
        base, end = m.address, m.address + size
        maps = _maps()
        before = [p for s, e, p in maps if s < base <= e]
        after = [p for s, e, p in maps if s <= end < e]
        assert before and before[-1].startswith("---"), before
        assert after and after[0].startswith("---"), after
        guards = [(s, e) for s, e, p in maps if p.startswith("---") and (e == base or s == end)]
        assert len(guards) == 2 and all(e - s >= 2 << 20 for s, e in guards), guards
    finally:
        m.close()
