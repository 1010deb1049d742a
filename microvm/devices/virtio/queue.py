"""The split virtqueue, device side (virtio 1.2, section 2.7).

Everything the driver gives us (ring addresses, indices, descriptor
addresses, lengths, flags) is untrusted. Every access goes through
GuestMemory, chains are bounded (a loop is detected by counting: no chain
can be longer than the queue, plus one indirect table), and any violation
raises QueueError, which the transport turns into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from microvm.devices.state import U16, Fields, State
from microvm.errors import GuestMemoryError, MicroVMError
from microvm.memory import GuestMemory

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

VIRTQ_DESC_SIZE = 16  # struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
VIRTQ_USED_ELEM_SIZE = 8  # struct virtq_used_elem { le32 id; le32 len; }
MAX_QUEUE_SIZE = 32768  # 2.7: Queue Size is a power of 2, at most 32768
MAX_CHAIN_BYTES = 1 << 32  # total length a chain may describe
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len
U32_MAX = 0xFFFF_FFFF

# Queue counters, summed over a device's queues in MmioTransport.stats().
QUEUE_COUNTERS = ("chains_popped", "used_added", "interrupts_suppressed")


_FENCE = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier between our stores and later loads.

    The driver runs on another CPU; x86 may let a load pass an earlier store
    (store-buffer forwarding), which is exactly the order virtio's
    notification suppression must not see reordered (2.7.7.2, 2.7.10: write
    used idx / avail_event, then read used_event / avail idx). Taking an
    uncontended lock executes a LOCK-prefixed atomic, which is a full fence
    on x86, and Python has no bare fence.
    """
    _FENCE.acquire()
    _FENCE.release()


class QueueError(MicroVMError):
    """The driver broke the virtqueue rules; the device needs a reset."""


class Descriptor(NamedTuple):
    addr: int
    len: int
    write: bool  # device-writable (VRING_DESC_F_WRITE)


@dataclass(slots=True)
class DescriptorChain:
    """One available buffer: its head index and its descriptors, in order,
    with indirect tables already expanded."""

    head: int
    descriptors: list[Descriptor]

    @property
    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.write]

    @property
    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.write]

    def readable_len(self) -> int:
        return sum(d.len for d in self.descriptors if not d.write)

    def writable_len(self) -> int:
        return sum(d.len for d in self.descriptors if d.write)


def stream_views(mem: GuestMemory, descs: list[Descriptor], start: int, end: int) -> list[memoryview]:
    """Views of bytes [start, end) of the stream the descriptors form, one per descriptor
    touched (2.7.4: a device assumes nothing about how the driver splits a message).
    The descriptors come from pop(), so every view is inside guest memory."""
    out: list[memoryview] = []
    pos = 0
    for d in descs:
        lo, hi = max(start, pos), min(end, pos + d.len)
        if lo < hi:
            out.append(mem.view(d.addr + lo - pos, hi - lo))
        pos += d.len
    return out


class Queue:
    """One split virtqueue as the transport configures it."""

    def __init__(self, max_size: int):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size must be a power of 2 up to {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        # Counters (QUEUE_COUNTERS) live as long as the queue, across resets:
        # the run's results want the whole run. Plain ints, bumped by the
        # thread serving the queue (under the transport's lock).
        self.chains_popped = 0  # chains handed to the device (pop)
        self.used_added = 0  # used ring elements written (add_used, add_used_many)
        self.interrupts_suppressed = 0  # used buffer notifications the driver let us skip (2.7.7, 2.7.10)
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.event_idx = False
        self.mem: GuestMemory | None = None
        self.next_avail = 0  # our position in the available ring (free running, mod 2^16)
        self.next_used = 0  # the used ring's idx we publish next
        self.signalled_used: int | None = None  # used idx at our last interrupt

    # --- setup -----------------------------------------------------------------

    def check_config(self, mem: GuestMemory) -> None:
        """Validate what the driver configured before it may set QueueReady."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise QueueError(f"queue size {n} is not a power of 2 up to {self.max_size}")
        # 2.7: alignment 16 for the table, 2 for the available ring, 4 for the used ring.
        for name, addr, align, length in (
            ("descriptor table", self.desc_table, 16, VIRTQ_DESC_SIZE * n),
            ("available ring", self.avail_ring, 2, 6 + 2 * n),
            ("used ring", self.used_ring, 4, 6 + VIRTQ_USED_ELEM_SIZE * n),
        ):
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not mem.contains(addr, length):
                raise QueueError(f"{name} at {addr:#x}+{length:#x} is outside guest memory")

    def activate(self, mem: GuestMemory, event_idx: bool) -> None:
        self.check_config(mem)
        self.mem = mem
        self.event_idx = event_idx

    # --- snapshots (devices/state.py) ----------------------------------------------

    def snapshot_state(self, held: int = 0) -> State:
        """What the driver configured and where both sides are in the rings. `held`:
        chains the device popped but has not used (the newest ones); they are handed
        back to the ring, so the restored device pops them again from the same
        entries, which the driver cannot have reused (it reuses an available slot only
        once `size` later chains were made available, and this one is not used yet).
        The ring memory (and so the event_idx avail_event we published) is the guest's."""
        return {"kind": "virtqueue", "max_size": self.max_size, "size": self.size, "ready": self.ready,
                "desc_table": self.desc_table, "avail_ring": self.avail_ring, "used_ring": self.used_ring,
                "next_avail": (self._next_avail - held) & U16, "next_used": self.next_used,
                "signalled_used": self.signalled_used}

    def restore_state(self, state: State, mem: GuestMemory) -> None:
        """Take over a snapshot_state(); a ready queue's rings are checked against `mem`
        as QueueReady checks them. The transport activates it (event_idx, memory)."""
        f = Fields(state, "virtqueue")
        f.same("max_size", self.max_size)
        size, ready = f.integer("size", hi=U32_MAX), f.flag("ready")
        rings = f.integer("desc_table"), f.integer("avail_ring"), f.integer("used_ring")
        next_avail, next_used = f.integer("next_avail", hi=U16), f.integer("next_used", hi=U16)
        signalled_used = f.optional_integer("signalled_used", hi=U16)
        self.reset()
        self.size, (self.desc_table, self.avail_ring, self.used_ring) = size, rings
        if ready:
            try:
                self.check_config(mem)
            except QueueError as e:
                self.reset()
                raise f.error(str(e)) from e
        self.ready = ready
        self.next_avail, self.next_used, self.signalled_used = next_avail, next_used, signalled_used

    @property
    def next_avail(self) -> int:
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        self._next_avail = value
        self._avail_seen = value  # nothing known to be pending: the next pop reads avail idx

    # --- ring access -------------------------------------------------------------

    def _mem(self) -> GuestMemory:
        if self.mem is None or not self.ready:
            raise QueueError("queue is not ready")
        return self.mem

    def avail_idx(self) -> int:
        # Our avail_event store (in pop) must be visible before this load.
        full_barrier()
        return self._mem().read_int(self.avail_ring + 2, 2)

    def has_available(self) -> bool:
        return self.avail_idx() != self.next_avail

    def notify_at(self, index: int) -> None:
        """Ask the driver to notify us once it makes entry `index` available (with
        event_idx, avail_event says so, 2.7.10; without, it notifies anyway): for a
        device waiting on a buffer the driver adds beyond those it knows of. The
        next pop() that has consumed everything it saw writes its own again."""
        if self.event_idx:
            self._mem().write_int(self.used_ring + 4 + VIRTQ_USED_ELEM_SIZE * self.size, 2, index & 0xFFFF)
            full_barrier()  # before the avail idx load that follows in the caller

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if the driver has offered none.

        The available index is read once per batch: only when every entry we
        knew of is consumed do we publish avail_event ("notify me once you
        make this entry available", 2.7.10) and look again, so a driver that
        adds buffers meanwhile is either seen now or notifies us.
        """
        mem = self._mem()
        nxt = self._next_avail
        if nxt == self._avail_seen:
            if self.event_idx:
                # avail_event sits after the used ring's elements.
                mem.write_int(self.used_ring + 4 + VIRTQ_USED_ELEM_SIZE * self.size, 2, nxt)
            avail = self.avail_idx()  # after a full barrier: our avail_event store comes first
            pending = (avail - nxt) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise QueueError(f"available index jumped by {pending}, more than the queue size {self.size}")
            self._avail_seen = avail
        head = mem.read_int(self.avail_ring + 4 + 2 * (nxt % self.size), 2)
        chain = DescriptorChain(head, self._walk(mem, head))
        self._next_avail = (nxt + 1) & 0xFFFF
        self.chains_popped += 1
        return chain

    def _walk(self, mem: GuestMemory, head: int) -> list[Descriptor]:
        """Follow a chain from head, expanding at most one indirect table."""
        if head >= self.size:
            raise QueueError(f"descriptor index {head} out of range (queue size {self.size})")
        table, table_size = self.desc_table, self.size
        index = head
        seen = 0
        total = 0
        indirect = False
        out: list[Descriptor] = []
        while True:
            seen += 1
            if seen > table_size:
                raise QueueError("descriptor chain loops or is longer than its table")
            try:
                addr, length, flags, nxt = _DESC.unpack(mem.view(table + VIRTQ_DESC_SIZE * index, VIRTQ_DESC_SIZE))
            except GuestMemoryError as e:
                raise QueueError(f"descriptor {index} is outside guest memory") from e
            if flags & VRING_DESC_F_INDIRECT:
                # 2.7.5.3.1: not in an indirect table, not with NEXT, a whole
                # number of descriptors, at least one.
                if indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if flags & VRING_DESC_F_NEXT:
                    raise QueueError("indirect descriptor with the NEXT flag")
                # 2.7.5.3.1: a chain is no longer than the queue, indirect or not.
                if length == 0 or length % VIRTQ_DESC_SIZE or length // VIRTQ_DESC_SIZE > self.size:
                    raise QueueError(f"indirect table length {length} is invalid")
                if not mem.contains(addr, length):
                    raise QueueError(f"indirect table at {addr:#x}+{length:#x} is outside guest memory")
                indirect = True
                table, table_size = addr, length // VIRTQ_DESC_SIZE
                index, seen = 0, 0
                continue
            if length:
                # An empty buffer carries nothing (and may point anywhere): it
                # is followed, never handed to a device.
                if not mem.contains(addr, length):
                    raise QueueError(f"buffer {addr:#x}+{length:#x} is outside guest memory")
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise QueueError("descriptor chain describes more than 4 GiB")
                out.append(Descriptor(addr, length, bool(flags & VRING_DESC_F_WRITE)))
            if not flags & VRING_DESC_F_NEXT:
                return out
            if nxt >= table_size:
                raise QueueError(f"next descriptor {nxt} out of range ({table_size})")
            index = nxt

    def add_used(self, head: int, length: int) -> None:
        """Return a chain to the driver with `length` bytes written into it."""
        self.add_used_many(((head, length),))

    def add_used_many(self, used: Iterable[tuple[int, int]]) -> None:
        """Return several chains (head, bytes written) and publish them with one index update.

        A head outside the table (or a length that is no le32) is a QueueError
        and publishes nothing of the batch: the driver indexes its own arrays
        with the id we write (2.7.8), so a device bug or a head taken from a
        hostile ring must never reach it.
        """
        mem = self._mem()
        size = self.size
        n = start = self.next_used  # n runs past 2^16 here; the size divides 2^16, so n % size is the slot
        for head, length in used:
            if not (0 <= head < size and 0 <= length <= U32_MAX):
                raise QueueError(f"used element ({head}, {length}) out of range (queue size {size})")
            elem = self.used_ring + 4 + VIRTQ_USED_ELEM_SIZE * (n % size)
            _USED_ELEM.pack_into(mem.view(elem, VIRTQ_USED_ELEM_SIZE), 0, head, length)
            n += 1
        self.used_added += n - start
        n &= 0xFFFF
        self.next_used = n
        # The elements must be visible before the index that publishes them
        # (2.7.8.2); in Python the stores happen in program order, and the
        # x86 memory model keeps store order for the guest.
        mem.write_int(self.used_ring + 2, 2, n)

    def needs_notification(self) -> bool:
        """Whether to interrupt the driver for what we just used (2.7.7.2, 2.7.10)."""
        mem = self._mem()
        full_barrier()  # the used idx we published before the flags/used_event we read
        if not self.event_idx:
            wanted = not mem.read_int(self.avail_ring, 2) & VRING_AVAIL_F_NO_INTERRUPT
        else:
            used_event = mem.read_int(self.avail_ring + 4 + 2 * self.size, 2)
            old = self.signalled_used
            new = self.next_used
            self.signalled_used = new
            # vring_need_event(): did we cross used_event since the last signal?
            wanted = old is None or (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        if not wanted:
            self.interrupts_suppressed += 1
        return wanted
