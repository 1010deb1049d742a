"""The port-I/O and MMIO buses: address ranges mapped to devices.

A device registers a range once; the vCPU loop hands every exit to the bus,
which finds the device and passes it the offset within its range. Ranges may
not overlap. Accesses nobody claims read as all ones (an undriven ISA/PCI
bus floats high) and writes are dropped; both are counted so a misbehaving
guest is visible without stopping the VM. A device that raises (a bug, or a
host failure it did not answer) becomes a DeviceError naming it, which ends
the vCPU and with it the VM.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from microvm._kvm import FastMmio
from microvm.errors import BusError, DeviceError

log = logging.getLogger(__name__)

UNHANDLED_TRACKED = 256

# What run_dispatch calls for a claimed address: (base, length, read, write,
# device), the device's methods bound once (no attribute lookup per exit);
# run_dispatch uses the first four.
Entry = tuple[int, int, Callable[[int, int], int], Callable[[int, int, int], None], "BusDevice"]


class BusDevice(Protocol):
    """What a device on a bus implements. Offsets are relative to its base.
    A device may also offer report_state() -> str, a line on its state for a
    timed-out guest's report (hangreport.py; the UART does)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class Bus:
    """A set of non-overlapping [base, base+length) ranges, each owned by a device."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []
        self.unhandled: Counter[int] = Counter()
        self.names: dict[int, str] = {}  # base -> the device's name, for errors

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(f"{self.name}: invalid range {base:#x}+{length:#x}")
        i = bisect.bisect_left(self._bases, base)
        for j in (i - 1, i):
            if 0 <= j < len(self._ranges):
                b, n, other = self._ranges[j]
                if base < b + n and b < base + length:
                    raise BusError(
                        f"{self.name}: {type(device).__name__} at {base:#x}+{length:#x} overlaps "
                        f"{type(other).__name__} at {b:#x}+{n:#x}"
                    )
        self._bases.insert(i, base)
        self._ranges.insert(i, (base, length, device))
        self.names[base] = name or type(device).__name__

    def unregister(self, base: int) -> BusDevice:
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise BusError(f"{self.name}: nothing registered at {base:#x}")
        del self._bases[i]
        self.names.pop(base, None)
        return self._ranges.pop(i)[2]

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        """(base, device) whose range holds addr, or None."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            base, length, device = self._ranges[i]
            if addr < base + length:
                return base, device
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._unhandled(addr, "read")
            return (1 << (8 * size)) - 1
        try:
            return hit[1].read(addr - hit[0], size)
        except DeviceError:
            raise
        except Exception as e:  # free when nothing is raised (3.11's zero-cost try)
            raise self.device_error(hit[0], "read", addr, e) from e

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._unhandled(addr, "write")
            return
        try:
            hit[1].write(addr - hit[0], size, value)
        except DeviceError:
            raise
        except Exception as e:
            raise self.device_error(hit[0], "write", addr, e) from e

    def device_error(self, base: int, what: str, addr: int, e: Exception) -> DeviceError:
        """What a device's exception becomes: a DeviceError naming the device
        (a DeviceError already is one, and stays as it is)."""
        if isinstance(e, DeviceError):
            return e
        return DeviceError(f"device {self.names.get(base, '?')} failed on a {self.name} {what} at {addr:#x}: "
                           f"{type(e).__name__}: {e}")

    def _unhandled(self, addr: int, what: str) -> None:
        # Counted per address, but a guest sweeping the address space only
        # ever costs UNHANDLED_TRACKED entries; the rest share key -1.
        if addr not in self.unhandled and len(self.unhandled) >= UNHANDLED_TRACKED:
            addr = -1
        if not self.unhandled[addr]:
            log.debug("%s: unhandled %s at %#x", self.name, what, addr)
        self.unhandled[addr] += 1


class PioBus(Bus):
    """The x86 I/O port space (64 KiB). Lookups go through a per-port table,
    because port exits are the hottest path of a VMM without virtio."""

    def __init__(self) -> None:
        super().__init__("pio", 0x10000)
        self._ports: dict[int, Entry] = {}

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        super().register(base, length, device, name)
        entry = (base, length, device.read, device.write, device)
        for port in range(base, base + length):
            self._ports[port] = entry

    def unregister(self, base: int) -> BusDevice:
        device = super().unregister(base)
        for port in range(base, base + self._ports[base][1]):
            del self._ports[port]
        return device

    def find(self, addr: int) -> tuple[int, BusDevice] | None:
        entry = self._ports.get(addr)
        return None if entry is None else (entry[0], entry[4])

    @property
    def ports(self) -> dict[int, Entry]:
        """port -> (base, length, read, write, device) of the device claiming it,
        its methods bound once: VcpuFd.run_dispatch's table."""
        return self._ports


class MmioBus(Bus):
    """Guest-physical MMIO. Besides the sorted ranges, a per-page table
    (`pages`) for run_dispatch: the hot devices (virtio-mmio transports, a
    page each) are found with one dict lookup, their methods bound once;
    and `fast`, the registers devices let a vCPU answer in C without the GIL
    (a device's fast_registers(): (offset, FAST_READ or FAST_ACK, InterruptStatus))."""

    PAGE_SHIFT = 12
    PAGED_MAX = 16  # pages: a range larger than this is found by bisection

    def __init__(self) -> None:
        super().__init__("mmio", 1 << 52)
        self._pages: dict[int, Entry] = {}
        self.fast = FastMmio()

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> None:
        super().register(base, length, device, name)
        self._index()

    def unregister(self, base: int) -> BusDevice:
        device = super().unregister(base)
        self._index()
        return device

    def _index(self) -> None:
        """Rebuild `pages`: each page touched by exactly one range of at most
        PAGED_MAX pages maps to it; a page shared by two ranges, or in a larger
        one, is left to the bus (run_dispatch then calls write()/read())."""
        owners: dict[int, list[tuple[int, int, BusDevice]]] = {}
        for base, length, device in self._ranges:
            first, last = base >> self.PAGE_SHIFT, (base + length - 1) >> self.PAGE_SHIFT
            if last - first < self.PAGED_MAX:
                for page in range(first, last + 1):
                    owners.setdefault(page, []).append((base, length, device))
        big = [(b >> self.PAGE_SHIFT, (b + n - 1) >> self.PAGE_SHIFT) for b, n, _ in self._ranges
               if ((b + n - 1) >> self.PAGE_SHIFT) - (b >> self.PAGE_SHIFT) >= self.PAGED_MAX]
        pages: dict[int, Entry] = {}
        entries: dict[int, Entry] = {}
        for page, held in owners.items():
            if len(held) == 1 and not any(lo <= page <= hi for lo, hi in big):
                base, length, device = held[0]
                if base not in entries:
                    entries[base] = (base, length, device.read, device.write, device)
                pages[page] = entries[base]
        # In place: a vCPU thread holds this dict. A lookup that misses in
        # between goes to the bus, which is always right.
        self._pages.clear()
        self._pages.update(pages)
        # A new table: a vCPU picks it up at its next run_dispatch call and keeps
        # the old one (and the words it points to) until then.
        self.fast = FastMmio([(base + offset, kind, word) for base, _, device in self._ranges
                              for offset, kind, word in getattr(device, "fast_registers", list)()])

    @property
    def pages(self) -> dict[int, Entry]:
        """page number -> (base, length, read, write, device) of the one device there:
        VcpuFd.run_dispatch's table (an address outside the range goes to the bus)."""
        return self._pages
