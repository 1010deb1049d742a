"""The I/O and MMIO buses: registration, overlaps, dispatch, unknown ports."""

from __future__ import annotations

import pytest

from microvm.bus import MmioBus, PioBus
from microvm.errors import BusError


class Dev:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, 0))
        return 0x11 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


@pytest.mark.parametrize("bus_type", [PioBus, MmioBus])
def test_dispatch_with_offsets(bus_type: type) -> None:
    bus = bus_type()
    a, b = Dev(), Dev()
    bus.register(0x3F8, 8, a)
    bus.register(0x400, 1, b)
    assert bus.read(0x3F8 + 5, 1) == 0x16
    bus.write(0x3FF, 1, 7)
    bus.write(0x400, 2, 0xBEEF)
    assert a.log == [("r", 5, 1, 0), ("w", 7, 1, 7)]
    assert b.log == [("w", 0, 2, 0xBEEF)]


@pytest.mark.parametrize("bus_type", [PioBus, MmioBus])
@pytest.mark.parametrize("base,length", [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3F0, 0x100), (0x3FA, 2)])
def test_overlaps_refused(bus_type: type, base: int, length: int) -> None:
    bus = bus_type()
    bus.register(0x3F8, 8, Dev())
    with pytest.raises(BusError, match="overlaps"):
        bus.register(base, length, Dev())


@pytest.mark.parametrize("bus_type", [PioBus, MmioBus])
def test_adjacent_ranges_fine(bus_type: type) -> None:
    bus = bus_type()
    bus.register(0x3F8, 8, Dev())
    bus.register(0x3F0, 8, Dev())
    bus.register(0x400, 8, Dev())
    assert bus.find(0x3F7) is not None and bus.find(0x408) is None


def test_unknown_ports_float_high_and_are_counted() -> None:
    bus = PioBus()
    assert bus.read(0x1234, 1) == 0xFF
    assert bus.read(0x1234, 2) == 0xFFFF
    assert bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x1234, 1, 0)  # dropped
    assert bus.unhandled[0x1234] == 4


def test_invalid_ranges() -> None:
    bus = PioBus()
    for base, length in [(0, 0), (-1, 2), (0xFFFF, 2)]:
        with pytest.raises(BusError):
            bus.register(base, length, Dev())


@pytest.mark.parametrize("bus_type", [PioBus, MmioBus])
def test_unregister(bus_type: type) -> None:
    bus = bus_type()
    d = Dev()
    bus.register(0x60, 4, d)
    assert bus.unregister(0x60) is d
    assert bus.find(0x61) is None
    bus.register(0x60, 4, Dev())  # the range is free again
    with pytest.raises(BusError):
        bus.unregister(0x70)


def test_unhandled_tracking_is_bounded() -> None:
    from microvm.bus import UNHANDLED_TRACKED

    bus = MmioBus()
    for addr in range(0, 10_000 * 8, 8):
        bus.read(addr, 8)
    assert len(bus.unhandled) == UNHANDLED_TRACKED + 1
    assert sum(bus.unhandled.values()) == 10_000


def test_the_port_table_holds_each_claimed_port_with_the_devices_bound_methods() -> None:
    bus = PioBus()
    d = Dev()
    bus.register(0x3F8, 8, d)
    base, length, read, _write, device = bus.ports[0x3FB]
    assert (base, length) == (0x3F8, 8) and device is d and bus.find(0x3FB) == (0x3F8, d)
    assert read(3, 1) == 0x14 and d.log == [("r", 3, 1, 0)]
    table = bus.ports
    bus.unregister(0x3F8)
    assert table == {} and bus.ports is table  # emptied in place: a vCPU thread holds it


def test_the_page_table_maps_pages_of_one_small_range_only() -> None:
    bus = MmioBus()
    table = bus.pages
    a, b, c, big = Dev(), Dev(), Dev(), Dev()
    bus.register(0xD000_0000, 0x200, a)  # a virtio-mmio transport: part of one page
    bus.register(0xD000_1000, 0x200, b)
    bus.register(0xD000_1800, 0x100, c)  # shares b's page: that page is the bus's
    bus.register(0xE000_0000, (MmioBus.PAGED_MAX + 1) << 12, big)  # too large for the table
    assert set(table) == {0xD000_0}
    base, length, _read, write, device = table[0xD000_0]
    assert (base, length) == (0xD000_0000, 0x200) and device is a
    write(4, 4, 9)
    assert a.log == [("w", 4, 4, 9)]
    bus.unregister(0xD000_1800)  # b's page is b's alone now
    assert set(table) == {0xD000_0, 0xD000_1} and bus.pages is table
    bus.register(0xE000_0000 + ((MmioBus.PAGED_MAX + 1) << 12), 0x100, Dev())  # on a page past big's end
    assert 0xE000_0 + MmioBus.PAGED_MAX + 1 in table


def test_a_small_range_on_a_page_a_large_one_reaches_is_left_to_the_bus() -> None:
    bus = MmioBus()
    bus.register(0xE000_0000, ((MmioBus.PAGED_MAX + 1) << 12) - 0x800, Dev())  # ends mid-page
    bus.register(0xE000_0000 + ((MmioBus.PAGED_MAX + 1) << 12) - 0x800, 0x100, Dev())
    assert bus.pages == {}
