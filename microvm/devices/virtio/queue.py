"""The split virtqueue, device side (virtio 1.2, section 2.7).

Everything the driver gives us (ring addresses, indices, descriptor
addresses, lengths, flags) is untrusted. Every access goes through
GuestMemory, chains are bounded (a loop is detected by counting: no chain
can be longer than the queue, plus one indirect table), and any violation
raises QueueError, which the transport turns into DEVICE_NEEDS_RESET.

Two implementations with one API and one behaviour, down to the error
messages: PyQueue here, the reference, and microvm._virtq.Queue, the same
rules in Cython over raw pointers (bounds checked against the region table
in C), the default. `Queue` is the one in use: the Cython one unless
MICROVM_VIRTQUEUE=python (or the extension is missing). The transport looks
it up at each queue's creation (queue.Queue), so tests can run both.
PyQueue's device paths (virtio-net's frames, virtio-blk's reads and
writes: buffers straight between an fd and guest memory) are its base
class's, queue_io.QueueIo.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from microvm.devices.state import State
from microvm.devices.virtio.queue_io import QueueIo
from microvm.devices.virtio.ring import (
    DESC,
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    QUEUE_COUNTERS,
    U32_MAX,
    USED_ELEM,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_ELEM_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    Descriptor,
    DescriptorChain,
    QueueError,
    check_config,
    full_barrier,
    queue_state,
    reset_queue,
    restore_queue,
    stream_views,
)
from microvm.errors import GuestMemoryError
from microvm.memory import GuestMemory

__all__ = ["MAX_QUEUE_SIZE", "QUEUE_COUNTERS", "VIRTQ_DESC_SIZE", "VIRTQ_USED_ELEM_SIZE",
           "VRING_AVAIL_F_NO_INTERRUPT", "VRING_DESC_F_INDIRECT", "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE",
           "VRING_USED_F_NO_NOTIFY", "Descriptor", "DescriptorChain", "PyQueue", "Queue", "QueueError",
           "full_barrier", "implementation", "stream_views"]


class PyQueue(QueueIo):
    """One split virtqueue as the transport configures it (the reference implementation);
    the device paths (frames, virtio-blk's reads and writes) are QueueIo's (queue_io.py)."""

    # What the transport configures (reset_queue() sets them all).
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_used: int

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
        QueueIo.__init__(self)
        self.reset()

    def reset(self) -> None:
        self._drop_reserved()
        self.mem: GuestMemory | None = None
        self.event_idx = False
        self.signalled_used: int | None = None  # used idx at our last interrupt
        # next_avail: our position in the available ring (free running, mod 2^16);
        # next_used: the used ring's idx we publish next.
        reset_queue(self)

    def release(self) -> None:
        """Let go of guest memory (the VM is closing); the queue is not ready from here."""
        self._drop_reserved()
        self.mem = None

    # --- setup -----------------------------------------------------------------

    def check_config(self, mem: GuestMemory) -> None:
        """Validate what the driver configured before it may set QueueReady."""
        check_config(self, mem)

    def activate(self, mem: GuestMemory, event_idx: bool) -> None:
        self.check_config(mem)
        self._drop_reserved()
        self.mem = mem
        self.event_idx = event_idx

    # --- snapshots (devices/state.py) ----------------------------------------------

    def snapshot_state(self, held: int = 0) -> State:
        return queue_state(self, held)

    def restore_state(self, state: State, mem: GuestMemory) -> None:
        restore_queue(self, state, mem)

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
        found = self._peek()
        if found is None:
            return None
        self._next_avail = (self._next_avail + 1) & 0xFFFF
        self.chains_popped += 1
        return DescriptorChain(*found)

    def _peek(self) -> tuple[int, list[Descriptor]] | None:
        """The next available chain's head and descriptors, not taken yet (pop() takes it)."""
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
        return head, self._walk(mem, head)

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
                addr, length, flags, nxt = DESC.unpack(mem.view(table + VIRTQ_DESC_SIZE * index, VIRTQ_DESC_SIZE))
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
            self._put_used(mem, n, head, length)
            n += 1
        self._publish_used(mem, start, n)

    def _put_used(self, mem: GuestMemory, n: int, head: int, length: int) -> None:
        elem = self.used_ring + 4 + VIRTQ_USED_ELEM_SIZE * (n % self.size)
        USED_ELEM.pack_into(mem.view(elem, VIRTQ_USED_ELEM_SIZE), 0, head, length)

    def _publish_used(self, mem: GuestMemory, start: int, n: int) -> None:
        if n == start:
            return
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



def _chosen() -> type[PyQueue]:
    if os.environ.get("MICROVM_VIRTQUEUE", "cython") == "python":
        return PyQueue
    try:
        from microvm._virtq import Queue as CQueue
    except ImportError:  # a source tree without the extension built
        return PyQueue
    return CQueue  # type: ignore[return-value]  # the same API (microvm/_virtq.pyi)


if TYPE_CHECKING:
    Queue = PyQueue
else:
    Queue = _chosen()


def implementation() -> str:
    """Which virtqueue new queues get: "cython" or "python"."""
    return "python" if Queue is PyQueue else "cython"
