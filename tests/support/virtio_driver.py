"""A fake virtio driver for the split virtqueue (builders only, no tests here).

VirtqDriver plays the guest side of virtio 1.2 section 2.7 in a plain
GuestMemory: it lays out the three rings, allocates buffers and offers
chains the way Linux's drivers/virtio/virtio_ring.c does, and reads back
the used ring. Its structs are packed with `struct` from the C declarations
in include/uapi/linux/virtio_ring.h, not with queue.py's offsets, so the
tests cross-check the device side.

The second half is a hostile driver: `hostile_ring` builds a random,
mostly broken ring from a Picker (random.Random for the fuzz script,
hypothesis draws for the property tests) and `run_hostile` drives a Queue
over it, checking that the queue only ever returns descriptors inside guest
memory, raises nothing but QueueError and writes nothing but the used ring.
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from microvm.devices.virtio import net_abi
from microvm.devices.virtio import queue as vq
from microvm.devices.virtio.queue import DescriptorChain, Queue, QueueError
from microvm.memory import GuestMemory

T = TypeVar("T")

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1

# struct vring_desc { __virtio64 addr; __virtio32 len; __virtio16 flags; __virtio16 next; };
VRING_DESC = struct.Struct("<QIHH")
# struct vring_used_elem { __virtio32 id; __virtio32 len; };
VRING_USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")


def avail_ring_size(n: int) -> int:
    """struct vring_avail { flags; idx; ring[n]; } plus used_event (vring_used_event)."""
    return 4 + 2 * n + 2


def used_ring_size(n: int) -> int:
    """struct vring_used { flags; idx; ring[n]; } plus avail_event (vring_avail_event)."""
    return 4 + VRING_USED_ELEM.size * n + 2


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class VirtqDriver:
    """The driver side of one split virtqueue, laid out in `mem`."""

    def __init__(self, mem: GuestMemory, size: int, desc_table: int, avail_ring: int, used_ring: int,
                 data: tuple[int, int], start_idx: int = 0):
        """data: [start, end) of guest memory for buffers and indirect tables.
        start_idx: where avail.idx and used.idx start (the queue must start there too)."""
        self.mem = mem
        self.size = size
        self.desc_table, self.avail_ring, self.used_ring = desc_table, avail_ring, used_ring
        self.data_start, self.data_end = data
        self._next_data = self.data_start
        self.start_idx = start_idx & 0xFFFF
        self.avail_idx = self.start_idx
        self.last_used = self.start_idx
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}  # head -> the table descriptors it holds
        self.buffers: dict[int, list[tuple[int, int, bool]]] = {}  # head -> (addr, len, writable)
        mem.fill(desc_table, VRING_DESC.size * size)
        mem.fill(avail_ring, avail_ring_size(size))
        mem.fill(used_ring, used_ring_size(size))
        mem.write(avail_ring + 2, U16.pack(self.avail_idx))
        # used.idx belongs to the device, but after a reset both sides agree on it.
        mem.write(used_ring + 2, U16.pack(self.start_idx))

    @classmethod
    def create(cls, mem: GuestMemory, size: int, base: int = 0x1000, data: tuple[int, int] | None = None,
               start_idx: int = 0) -> VirtqDriver:
        """Rings packed from `base` with the spec's alignments (2.7: 16, 2, 4)."""
        desc = align_up(base, 16)
        avail = desc + VRING_DESC.size * size
        used = align_up(avail + avail_ring_size(size), 4)
        end = used + used_ring_size(size)
        if data is None:
            data = (align_up(end, 16), align_up(end, 16) + 0x8000)
        return cls(mem, size, desc, avail, used, data, start_idx)

    # --- buffers -----------------------------------------------------------------

    def alloc(self, length: int, align: int = 16) -> int:
        """Guest memory for a buffer: a bump allocator that wraps (buffers are short-lived)."""
        addr = align_up(self._next_data, align)
        if addr + length > self.data_end:
            addr = align_up(self.data_start, align)
            if addr + length > self.data_end:
                raise ValueError(f"buffer of {length} bytes does not fit the data area")
        self._next_data = addr + length
        return addr

    def _buffer(self, part: bytes | int, writable: bool) -> tuple[int, int, bool]:
        if isinstance(part, int):
            addr = self.alloc(part)
            self.mem.fill(addr, part)
            return addr, part, writable
        addr = self.alloc(len(part))
        self.mem.write(addr, part)
        return addr, len(part), writable

    # --- raw ring access (also for hostile tests) ----------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int | None = None) -> None:
        """Descriptor `index` of the queue's table, or of the indirect table at `table`."""
        base = self.desc_table if table is None else table
        self.mem.write(base + VRING_DESC.size * index, VRING_DESC.pack(addr, length, flags, next))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = VRING_DESC.unpack(self.mem.read(self.desc_table + VRING_DESC.size * index,
                                                                   VRING_DESC.size))
        return addr, length, flags, nxt

    def offer(self, head: int) -> None:
        """Put `head` in the next available slot and publish it (2.7.13)."""
        self.mem.write(self.avail_ring + 4 + 2 * (self.avail_idx % self.size), U16.pack(head & 0xFFFF))
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write(self.avail_ring + 2, U16.pack(self.avail_idx))

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write(self.avail_ring, U16.pack(VRING_AVAIL_F_NO_INTERRUPT if on else 0))

    def set_used_event(self, idx: int) -> None:
        self.mem.write(self.avail_ring + 4 + 2 * self.size, U16.pack(idx & 0xFFFF))

    def avail_event(self) -> int:
        return int(U16.unpack(self.mem.read(self.used_ring + 4 + VRING_USED_ELEM.size * self.size, 2))[0])

    def used_idx(self) -> int:
        return int(U16.unpack(self.mem.read(self.used_ring + 2, 2))[0])

    # --- chains ------------------------------------------------------------------------

    def add_chain(self, parts: Sequence[tuple[bytes | int, bool]]) -> int:
        """Offer one chain: (data, False) is device-readable, (length, True) device-writable.
        Returns the head descriptor index."""
        if not parts or len(parts) > len(self.free):
            raise ValueError(f"{len(parts)} descriptors wanted, {len(self.free)} free")
        indices = [self.free.pop(0) for _ in parts]
        buffers = [self._buffer(part, writable) for part, writable in parts]
        for i, (index, (addr, length, writable)) in enumerate(zip(indices, buffers, strict=True)):
            last = i == len(parts) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(index, addr, length, flags, 0 if last else indices[i + 1])
        head = indices[0]
        self.chains[head], self.buffers[head] = indices, buffers
        self.offer(head)
        return head

    def add_indirect_chain(self, parts: Sequence[tuple[bytes | int, bool]]) -> int:
        """Like add_chain, but the buffers are in an indirect table (2.7.5.3) held by one descriptor."""
        if not parts or not self.free:
            raise ValueError("no free descriptor")
        buffers = [self._buffer(part, writable) for part, writable in parts]
        table = self.alloc(VRING_DESC.size * len(parts))
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(parts) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(i, addr, length, flags, 0 if last else i + 1, table=table)
        head = self.free.pop(0)
        self.write_desc(head, table, VRING_DESC.size * len(parts), VRING_DESC_F_INDIRECT)
        self.chains[head], self.buffers[head] = [head], buffers
        self.offer(head)
        return head

    def used(self) -> list[tuple[int, int]]:
        """(id, len) of every element the device used since the last call; frees their descriptors."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            elem = self.mem.read(self.used_ring + 4 + VRING_USED_ELEM.size * slot, VRING_USED_ELEM.size)
            head, length = VRING_USED_ELEM.unpack(elem)
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.buffers.pop(head, None)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def make_queue(driver: VirtqDriver, event_idx: bool = False, max_size: int | None = None,
               queue_class: Callable[[int], Queue] | None = None) -> Queue:
    """A Queue (the one in use, or queue_class) configured over `driver`'s rings, as
    the transport would leave it."""
    queue = (queue_class or vq.Queue)(max_size or driver.size)
    queue.size = driver.size
    queue.desc_table, queue.avail_ring, queue.used_ring = driver.desc_table, driver.avail_ring, driver.used_ring
    queue.ready = True
    queue.activate(driver.mem, event_idx)
    queue.next_avail = queue.next_used = driver.start_idx
    return queue


def chain_bytes(mem: GuestMemory, chain: DescriptorChain) -> list[tuple[bytes, bool]]:
    """The contents of every descriptor of a chain, read at its guest address."""
    return [(mem.read(d.addr, d.len), d.write) for d in chain.descriptors]


# --- the hostile driver -----------------------------------------------------------------


class Picker:
    """Where hostile choices come from: RandomPicker for the fuzz script, hypothesis draws in the tests."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def boolean(self, p: float = 0.5) -> bool:
        """True with probability p."""
        raise NotImplementedError

    def raw(self, n: int) -> bytes:
        """n arbitrary bytes."""
        raise NotImplementedError

    def noise(self, n: int) -> bytes:
        """n bytes of background for guest memory (may be one repeated byte)."""
        return self.raw(1) * n

    def choice(self, options: Sequence[T]) -> T:
        return options[self.integer(0, len(options) - 1)]


class RandomPicker(Picker):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def boolean(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    def raw(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def noise(self, n: int) -> bytes:
        return self.rng.randbytes(n)


# Guest RAM layouts: one region; a hole; two adjacent regions (an access may not
# straddle them); regions not starting at 0, one just below 4 GiB, one at the top of
# the 64-bit space (where addr + len overflows 64 bits).
LAYOUTS: list[list[tuple[int, int]]] = [
    [(0, 0x10000)],
    [(0, 0x8000), (0x20000, 0x8000)],
    [(0, 0x8000), (0x8000, 0x4000)],
    [(0x1000, 0x4000), (0x100000, 0x4000), (0xFFFF_F000, 0x1000)],
    [(0, 0x8000), ((1 << 64) - 0x4000, 0x4000)],
]
SIZES = [1, 2, 4, 8, 16, 16, 32, 256]
HUGE_LENGTHS = [0xFFFF_FFFF, 0x8000_0000, 0x1_0000, 0xFFF0]


@dataclass
class HostileRing:
    layout: list[tuple[int, int]]
    backings: list[bytearray]
    mem: GuestMemory
    size: int
    max_size: int
    desc_table: int
    avail_ring: int
    used_ring: int
    event_idx: bool
    start_idx: int
    hostility: float = 1.0  # the chance that any one field is broken rather than sane
    tables: list[tuple[int, int]] = field(default_factory=list)  # indirect tables (addr, entries)


@dataclass
class Outcome:
    config_error: str | None = None  # activate() refused the configuration
    error: str | None = None  # the QueueError pop() raised, if any
    chains: int = 0
    descriptors: int = 0
    zero_len_outside: int = 0  # zero-length descriptors whose address is outside memory
    # What the device saw, in order: each chain (head, descriptors) and each
    # needs_notification() answer: the differential run compares these.
    trace: list[object] = field(default_factory=list)


class InvariantError(AssertionError):
    """The queue broke one of the rules run_hostile checks."""


def _interesting_addr(pick: Picker, ring: HostileRing) -> int:
    base, size = pick.choice(ring.layout)
    kind = pick.integer(0, 9)
    if kind == 0:
        return pick.integer(0, (1 << 64) - 1)
    if kind == 1:
        return base + size - pick.integer(0, 32)  # at or just before the end of a region
    if kind == 2:
        return base + size + pick.integer(0, 32)  # just past the end: a hole or the next region
    if kind == 3:
        return max(0, base - pick.integer(1, 32))  # just before a region
    if kind == 4:
        return (1 << 64) - pick.integer(1, 0x20)
    if kind == 5 and ring.tables:
        return pick.choice(ring.tables)[0]
    if kind == 6:
        return pick.choice([ring.desc_table, ring.avail_ring, ring.used_ring])
    return base + pick.integer(0, size - 1)  # inside


def _interesting_len(pick: Picker, ring: HostileRing, addr: int) -> int:
    kind = pick.integer(0, 7)
    if kind == 0:
        return 0
    if kind == 1:
        return pick.choice(HUGE_LENGTHS)
    if kind == 2:
        return pick.integer(0, 0xFFFF_FFFF)
    if kind == 3:  # exactly to the end of addr's region, or one byte more
        for base, size in ring.layout:
            if base <= addr < base + size:
                return max(0, min(0xFFFF_FFFF, base + size - addr + pick.integer(0, 1)))
    return pick.integer(1, 0x200)


def pack_desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    """A struct vring_desc with every field cut to its width, as a driver's stores would:
    an address at or past 2^64 wraps to 0. Whatever the picker draws, the hostile
    driver can always write it; only the device under test has to cope."""
    return VRING_DESC.pack(addr & 0xFFFF_FFFF_FFFF_FFFF, length & 0xFFFF_FFFF, flags & 0xFFFF, nxt & 0xFFFF)


def _sane_desc(pick: Picker, ring: HostileRing, table_size: int, indirect: bool) -> bytes:
    """A descriptor a correct driver could write (though its `next` may still close a loop)."""
    if indirect and ring.tables and pick.boolean(0.15):
        addr, entries = pick.choice(ring.tables)
        return pack_desc(addr, VRING_DESC.size * entries, VRING_DESC_F_INDIRECT, 0)
    base, size = pick.choice(ring.layout)
    length = pick.integer(0, min(size, 0x200))
    # [addr, addr + length) inside the region; an empty buffer may sit at its very end,
    # which for the region at the top of the 64-bit space is 2^64 (packed as 0).
    addr = base + pick.integer(0, size - length)
    flags = pick.choice([0, 0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE])
    return pack_desc(addr, length, flags, pick.integer(0, table_size - 1))


def _hostile_desc(pick: Picker, ring: HostileRing, table_size: int, indirect: bool = True) -> bytes:
    if not pick.boolean(ring.hostility):
        return _sane_desc(pick, ring, table_size, indirect)
    if pick.boolean(0.15):
        return pick.raw(VRING_DESC.size)
    flags = pick.choice([0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                         VRING_DESC_F_NEXT, VRING_DESC_F_INDIRECT, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT,
                         VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE, pick.integer(0, 0xFFFF)])
    if flags & VRING_DESC_F_INDIRECT and ring.tables and pick.boolean(0.8):
        addr, entries = pick.choice(ring.tables)
        length = VRING_DESC.size * entries if pick.boolean(0.7) else _interesting_len(pick, ring, addr)
    else:
        addr = _interesting_addr(pick, ring)
        length = _interesting_len(pick, ring, addr)
    nxt = pick.integer(0, table_size - 1) if pick.boolean(0.8) else pick.choice([table_size, pick.integer(0, 0xFFFF)])
    return pack_desc(addr, length, flags, nxt)


def _place(pick: Picker, layout: list[tuple[int, int]], length: int, align: int) -> int:
    """An `align`-aligned address where `length` bytes fit in one region (falls back to 0)."""
    fits = [(b, s) for b, s in layout if s >= length + align]
    if not fits:
        return 0
    base, size = pick.choice(fits)
    return align_up(base + pick.integer(0, size - length - align), align)


def hostile_ring(pick: Picker, sizes: Sequence[int] = SIZES) -> HostileRing:
    """A random, mostly hostile split virtqueue in fresh guest memory."""
    layout = pick.choice(LAYOUTS)
    backings = [bytearray(pick.noise(size)) if pick.boolean(0.5) else bytearray(size) for _, size in layout]
    mem = GuestMemory([(base, b) for (base, _), b in zip(layout, backings, strict=True)])
    size = pick.choice(sizes)
    max_size = size if pick.boolean(0.97) else pick.choice([1, 2, 256, 32768])
    desc = _place(pick, layout, VRING_DESC.size * size, 16)
    avail = _place(pick, layout, avail_ring_size(size), 2)
    used = _place(pick, layout, used_ring_size(size), 4)
    if pick.boolean(0.05):  # a broken configuration: misaligned, outside memory, or a bad size
        base, region = pick.choice(layout)
        which = pick.integer(0, 4)
        if which == 0:
            desc += pick.integer(1, 15)
        elif which == 1:
            avail += 1
        elif which == 2:
            used += 2
        elif which == 3:
            used = pick.choice([base + region - 4, base + region, pick.integer(0, 1 << 64)])
        else:
            size = pick.choice([0, 3, 12, 65535, 1 << 16])
    ring = HostileRing(layout, backings, mem, size, max_size, desc, avail, used,
                       event_idx=pick.boolean(), start_idx=pick.choice([0, 0xFFFF, 0xFFFE, pick.integer(0, 0xFFFF)]),
                       hostility=pick.choice([0.0, 0.02, 0.1, 0.3, 1.0]))
    n = max(size, 1)
    for _ in range(pick.integer(0, 3)):
        entries = pick.choice([1, 2, 3, 5, 8, 40])
        addr = _place(pick, layout, VRING_DESC.size * entries, pick.choice([1, 16]))
        ring.tables.append((addr, entries))
    for addr, entries in ring.tables:
        for i in range(entries):
            _try_write(mem, addr + VRING_DESC.size * i, _hostile_desc(pick, ring, entries, indirect=False))
    if size in sizes:
        for i in range(size):
            _try_write(mem, desc + VRING_DESC.size * i, _hostile_desc(pick, ring, size))
    # The available ring: flags, idx, heads (mostly in range), used_event.
    delta = pick.integer(0, 0xFFFF) if pick.boolean(ring.hostility / 4) else n - pick.integer(0, n)
    _try_write(mem, avail, U16.pack(pick.integer(0, 0xFFFF)) + U16.pack((ring.start_idx + delta) & 0xFFFF))
    for slot in range(min(n, 256)):
        head = pick.choice([n, pick.integer(0, 0xFFFF)]) if pick.boolean(ring.hostility / 4) else pick.integer(0, n - 1)
        _try_write(mem, avail + 4 + 2 * slot, U16.pack(head & 0xFFFF))
    _try_write(mem, avail + 4 + 2 * n, U16.pack((ring.start_idx + pick.integer(-2, n + 2)) & 0xFFFF))
    _try_write(mem, used + 2, U16.pack(ring.start_idx))
    return ring


def _try_write(mem: GuestMemory, addr: int, data: bytes) -> None:
    if mem.contains(addr, len(data)):
        mem.write(addr, data)


def _check_chain(ring: HostileRing, chain: DescriptorChain, outcome: Outcome) -> None:
    if not 0 <= chain.head < ring.size:
        raise InvariantError(f"head {chain.head} out of range")
    # At most a full table plus one indirect table's worth of descriptors.
    if len(chain.descriptors) > ring.size + 32768:
        raise InvariantError(f"chain of {len(chain.descriptors)} descriptors")
    if chain.readable_len() + chain.writable_len() > 1 << 32:
        raise InvariantError("chain longer than 4 GiB")
    for d in chain.descriptors:
        if d.len == 0:
            # Nothing to access; the queue does not check where an empty buffer points.
            outcome.zero_len_outside += not ring.mem.contains(d.addr, 1)
        elif not ring.mem.contains(d.addr, d.len):
            raise InvariantError(f"descriptor {d.addr:#x}+{d.len:#x} is outside guest memory")


def run_hostile(ring: HostileRing, pick: Picker, mutate: Callable[[HostileRing, Picker], None] | None = None,
                queue_class: Callable[[int], Queue] | None = None, frames: bool = False,
                block: bool = False) -> Outcome:
    """Drive a Queue (the one in use, or queue_class) over `ring`: pop, add_used and
    needs_notification until the ring is empty or the queue raises QueueError. Any other
    exception propagates; a broken rule raises InvariantError. `mutate`, if given, plays
    a guest rewriting its rings between pops. `frames`: some steps go through the
    frame API instead (send_chains to /dev/null; reserve, peek and use_reserved).
    `block`: some steps go through serve_block_io (on an image in a memfd), which
    writes the buffers of the requests it serves: memory is judged around them."""
    outcome = Outcome()
    queue = (queue_class or vq.Queue)(ring.max_size)
    queue.size = ring.size
    queue.desc_table, queue.avail_ring, queue.used_ring = ring.desc_table, ring.avail_ring, ring.used_ring
    queue.ready = True
    try:
        queue.activate(ring.mem, ring.event_idx)
    except QueueError as e:
        outcome.config_error = str(e)
        return outcome
    queue.next_avail = queue.next_used = ring.start_idx
    # What the device may write: used.idx and the used elements, and avail_event with
    # VIRTIO_F_EVENT_IDX (2.7.8, 2.7.10). Never used.flags, never anything else.
    allowed = (ring.used_ring + 2, ring.used_ring + 4 + VRING_USED_ELEM.size * ring.size + 2 * ring.event_idx)
    snapshot = [bytes(b) for b in ring.backings]

    def check_untouched() -> None:
        for (base, size), before, after in zip(ring.layout, snapshot, ring.backings, strict=True):
            if before == after:
                continue
            lo, hi = max(allowed[0] - base, 0), min(allowed[1] - base, size)
            if lo >= hi or before[:lo] != after[:lo] or before[hi:] != after[hi:]:
                changed = next(i for i in range(size) if before[i] != after[i] and not lo <= i < hi)
                raise InvariantError(f"the queue wrote guest memory at {base + changed:#x}")

    for _ in range(ring.size + 2):
        try:
            if block and pick.boolean(0.3):
                if not _block_step(queue, pick, outcome):
                    break
                outcome.trace.append(queue.needs_notification())
                snapshot = [bytes(b) for b in ring.backings]  # (what it wrote is compared, not judged)
                if mutate is not None:
                    mutate(ring, pick)
                    snapshot = [bytes(b) for b in ring.backings]
                continue
            if frames and pick.boolean(0.5):
                more = _frame_step(queue, ring, pick, outcome)
                if outcome.trace and outcome.trace[-1][0] == "receive":
                    snapshot = [bytes(b) for b in ring.backings]  # (what it wrote is compared, not judged)
                if not more:
                    break
                outcome.trace.append(queue.needs_notification())
                if mutate is not None:
                    check_untouched()
                    mutate(ring, pick)
                    snapshot = [bytes(b) for b in ring.backings]
                continue
            chain = queue.pop()
        except QueueError as e:
            outcome.error = str(e)
            break
        if chain is None:
            break
        outcome.chains += 1
        outcome.descriptors += len(chain.descriptors)
        outcome.trace.append((chain.head, tuple(chain.descriptors)))
        _check_chain(ring, chain, outcome)
        queue.add_used(chain.head, pick.integer(0, 0xFFFF_FFFF))
        outcome.trace.append(queue.needs_notification())
        if mutate is not None:
            check_untouched()
            mutate(ring, pick)
            snapshot = [bytes(b) for b in ring.backings]
    check_untouched()
    return outcome


BLOCK_IMAGE = random.Random("hostile block image").randbytes(16 * 512)


def _block_step(queue: Queue, pick: Picker, outcome: Outcome) -> bool:
    """One serve_block_io over a 16-sector image (a capacity that may say more);
    False once nothing was available. A garbage chain is seldom a request: here
    the walk and the checks meet hostile rings (tests/unit/test_block_io.py
    compares the two queues serving near-valid requests)."""
    fd = os.memfd_create("hostile-disk", os.MFD_CLOEXEC)
    try:
        os.write(fd, BLOCK_IMAGE)
        result = queue.serve_block_io(fd, pick.integer(0, 20), pick.integer(0, 8), pick.boolean(0.3))
        image = os.pread(fd, 1 << 16, 0)
    finally:
        os.close(fd)
    outcome.trace.append(("block", result, image))
    outcome.chains += result[0]
    return bool(result[0] or result[5])


def _frame_step(queue: Queue, ring: HostileRing, pick: Picker, outcome: Outcome) -> bool:
    """One step through the frame API; False once nothing was available."""
    if pick.boolean(0.15):
        return _receive_step(queue, ring, pick, outcome)
    if pick.boolean(0.5):
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            sent, total, failure = queue.send_chains(fd, pick.integer(0, 64), pick.integer(0, 1 << 17))
        finally:
            os.close(fd)
        outcome.trace.append(("send", sent, total, failure))
        outcome.chains += sent + (failure is not None)
        return bool(sent or failure)
    before = queue.reserved
    room = queue.reserve(pick.integer(0, 1 << 17), pick.integer(1, ring.size + 1), pick.integer(0, 64))
    outcome.trace.append(("reserve", room, queue.reserved, queue.reserved_head_len(),
                          bytes(queue.peek_reserved(pick.integer(0, 32)))))
    outcome.chains += queue.reserved - before
    if queue.reserved and pick.boolean(0.7):
        nbytes = pick.integer(0, room)
        outcome.trace.append(("use", queue.chains_for(nbytes), queue.use_reserved(nbytes)))
    return queue.reserved > before or bool(queue.reserved)


# Headers a tap may give: the flags and gso_type bytes a receive header starts with.
_RX_FLAGS = (0, net_abi.VIRTIO_NET_HDR_F_NEEDS_CSUM, net_abi.VIRTIO_NET_HDR_F_DATA_VALID, 0xFF)
_RX_GSO = (0, net_abi.VIRTIO_NET_HDR_GSO_TCPV4, net_abi.VIRTIO_NET_HDR_GSO_TCPV6, 0x81, 0x84, 0x80, 3, 0xFF)


def _receive_step(queue: Queue, ring: HostileRing, pick: Picker, outcome: Outcome) -> bool:
    """One receive_frames over a few frames a tap might give (mostly plain headers,
    sometimes an offload the driver did not negotiate, sizes around the limits);
    the frames it read are in guest memory, compared with the other queue's
    through the trace (what it writes lands in buffers it was given)."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        reader.setblocking(False)
        for _ in range(pick.integer(0, 3)):
            header = bytes([pick.choice(_RX_FLAGS), pick.choice(_RX_GSO)]) + pick.raw(10)
            writer.send(header + pick.raw(pick.integer(0, 120)))
        accepted = net_abi.gso_accepted(pick.boolean(), pick.boolean(), pick.boolean())
        result = queue.receive_frames(reader.fileno(), pick.integer(12, 1 << 10), pick.integer(0, 40),
                                      pick.integer(1, ring.size + 1), accepted, pick.boolean())
    finally:
        reader.close()
        writer.close()
    frames, chains, nbytes, stop = result
    outcome.trace.append(("receive", frames, chains, nbytes, str(stop) if isinstance(stop, QueueError) else stop,
                          queue.reserved, tuple(bytes(b) for b in ring.backings)))
    outcome.chains += chains
    if isinstance(stop, QueueError):
        outcome.error = str(stop)
        return False
    return bool(chains) or bool(queue.reserved)


def mutate_ring(ring: HostileRing, pick: Picker) -> None:
    """A guest racing the device: rewrite a descriptor, a head or avail.idx between pops."""
    kind = pick.integer(0, 3)
    n = ring.size
    if kind == 0:
        _try_write(ring.mem, ring.desc_table + VRING_DESC.size * pick.integer(0, n - 1), _hostile_desc(pick, ring, n))
    elif kind == 1:
        _try_write(ring.mem, ring.avail_ring + 4 + 2 * pick.integer(0, n - 1), U16.pack(pick.integer(0, 0xFFFF)))
    elif kind == 2:
        _try_write(ring.mem, ring.avail_ring + 2, U16.pack(pick.integer(0, 0xFFFF)))
    elif ring.tables:
        addr, entries = pick.choice(ring.tables)
        _try_write(ring.mem, addr + VRING_DESC.size * pick.integer(0, entries - 1),
                   _hostile_desc(pick, ring, entries, indirect=False))


# --- the differential run: both queues on the same hostile ring --------------------------


class RecordingPicker(Picker):
    """Every choice `inner` makes, kept in order for a ReplayPicker."""

    def __init__(self, inner: Picker):
        self.inner = inner
        self.log: list[object] = []

    def _keep(self, value: T) -> T:
        self.log.append(value)
        return value

    def integer(self, lo: int, hi: int) -> int:
        return self._keep(self.inner.integer(lo, hi))

    def boolean(self, p: float = 0.5) -> bool:
        return self._keep(self.inner.boolean(p))

    def raw(self, n: int) -> bytes:
        return self._keep(self.inner.raw(n))

    def noise(self, n: int) -> bytes:
        return self._keep(self.inner.noise(n))


class Divergence(AssertionError):
    """The two queues behaved differently on the same ring."""


class ReplayPicker(Picker):
    """The choices a RecordingPicker kept, again: the same ring, the same guest.
    A second run that asks for something else (or more) has diverged."""

    def __init__(self, log: list[object]):
        self.log = log
        self.at = 0

    def _next(self, kind: type) -> object:
        if self.at >= len(self.log) or not isinstance(self.log[self.at], kind):
            raise Divergence(f"the second queue made the driver choose differently at choice {self.at}")
        self.at += 1
        return self.log[self.at - 1]

    def integer(self, lo: int, hi: int) -> int:
        return self._next(int)  # type: ignore[return-value]

    def boolean(self, p: float = 0.5) -> bool:
        return self._next(bool)  # type: ignore[return-value]

    def raw(self, n: int) -> bytes:
        return self._next(bytes)  # type: ignore[return-value]

    def noise(self, n: int) -> bytes:
        return self._next(bytes)  # type: ignore[return-value]


def _observed(pick: Picker, sizes: Sequence[int], mutate_rate: float,
              queue_class: Callable[[int], Queue], frames: bool = False, block: bool = False) -> tuple[object, ...]:
    """What one queue did to one hostile ring: its outcome (or the exception it
    raised, by type and message) and the guest memory it left."""
    ring = hostile_ring(pick, sizes)
    mutate = pick.boolean(mutate_rate)
    try:
        outcome: object = run_hostile(ring, pick, mutate_ring if mutate else None, queue_class, frames, block)
    except Divergence:
        raise
    except Exception as e:  # compared, not judged: run_hostile's own checks judge
        outcome = (type(e).__name__, str(e))
    return outcome, mutate, [bytes(b) for b in ring.backings]


def run_differential(pick: Picker, queues: Sequence[Callable[[int], Queue]], sizes: Sequence[int] = SIZES,
                     mutate_rate: float = 0.2, frames: bool = False, block: bool = False) -> tuple[object, bool]:
    """The same hostile ring (and the same racing guest) for each queue class in
    turn: Divergence unless every one returns the same chains, notifications and
    errors, raises the same exceptions and leaves the same guest memory. The first
    queue's outcome (an Outcome, or (exception type, message)) and whether the
    guest rewrote the ring between pops."""
    recorder = RecordingPicker(pick)
    first = _observed(recorder, sizes, mutate_rate, queues[0], frames, block)
    for other in queues[1:]:
        replay = ReplayPicker(recorder.log)
        again = _observed(replay, sizes, mutate_rate, other, frames, block)
        if replay.at != len(recorder.log):
            raise Divergence(f"{other} made the driver stop at choice {replay.at} of {len(recorder.log)}")
        for what, a, b in zip(("outcome", "rewritten", "guest memory"), first, again, strict=True):
            if a != b:
                raise Divergence(f"{queues[0]} and {other} differ in {what}: {str(a)[:300]} vs {str(b)[:300]}")
    return first[0], bool(first[1])
