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
"""

from __future__ import annotations

import errno
import os
import struct
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from microvm.devices.state import State
from microvm.devices.virtio.blk_abi import HEADER_SIZE as BLK_HEADER_SIZE
from microvm.devices.virtio.blk_abi import SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from microvm.devices.virtio.ring import (
    DESC,
    IOV_MAX,
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    QUEUE_COUNTERS,
    SEND_LONG,
    SEND_PARTIAL,
    SEND_SHORT,
    SEND_WRITABLE,
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

_BLK_OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector

__all__ = ["MAX_QUEUE_SIZE", "QUEUE_COUNTERS", "VIRTQ_DESC_SIZE", "VIRTQ_USED_ELEM_SIZE",
           "VRING_AVAIL_F_NO_INTERRUPT", "VRING_DESC_F_INDIRECT", "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE",
           "VRING_USED_F_NO_NOTIFY", "Descriptor", "DescriptorChain", "PyQueue", "Queue", "QueueError",
           "full_barrier", "implementation", "stream_views"]


class PyQueue:
    """One split virtqueue as the transport configures it (the reference implementation)."""

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
        # reserve()'s chains (head, capacity, number of views) and the views of their buffers.
        self._reserved: deque[tuple[int, int, int]] = deque()
        self._reserved_views: list[memoryview] = []
        self._reserved_room = 0
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


    # --- frames: a chain's buffers straight to and from an fd -------------------------
    #
    # A device that moves whole frames between its queues and a host fd (virtio-net
    # and its tap) does so here, without handing each buffer to Python: the Cython
    # queue runs these in C over the same checks. The device keeps what frames mean.

    def send_chains(self, fd: int, min_len: int, max_len: int) -> tuple[int, int, tuple[int, int, int] | None]:
        """Write each available chain's buffers to fd, one writev each, and return it
        used (0 bytes written into it), until none is left, `size` chains are done, or
        one fails. A chain fails with device-writable buffers (code SEND_WRITABLE),
        fewer than min_len bytes (SEND_SHORT), more than max_len (SEND_LONG), an
        error from writev (its errno) or a short write (SEND_PARTIAL): it is used
        too, and the call stops there. Returns (chains sent, their bytes, None or
        the failed chain's (length, code, bytes written)); the chains done before
        a QueueError (a broken chain) are published before it is raised."""
        mem = self._mem()
        n = start = self.next_used
        sent = total = 0
        failure = None
        try:
            while n - start < self.size:
                chain = self.pop()
                if chain is None:
                    break
                # Each element as its chain is taken, the index once at the end (the
                # Cython queue's order: a ring that overlaps the used ring sees the same).
                self._put_used(mem, n, chain.head, 0)
                n += 1
                length, code, written = self._send_chain(fd, chain, min_len, max_len)
                if code:
                    failure = (length, code, written)
                    break
                sent += 1
                total += length
        finally:
            self._publish_used(mem, start, n)
        return sent, total, failure

    def _send_chain(self, fd: int, chain: DescriptorChain, min_len: int, max_len: int) -> tuple[int, int, int]:
        mem = self._mem()
        readable = [d for d in chain.descriptors if not d.write]
        length = sum(d.len for d in readable)
        if len(readable) != len(chain.descriptors):
            return length, SEND_WRITABLE, 0
        if length < min_len:
            return length, SEND_SHORT, 0
        if length > max_len:
            return length, SEND_LONG, 0
        views = [mem.view(d.addr, d.len) for d in readable]
        try:
            written = os.writev(fd, views)
        except OSError as e:
            return length, e.errno or errno.EIO, 0
        finally:
            for v in views:
                v.release()
        return length, 0 if written == length else SEND_PARTIAL, written

    def reserve(self, room: int, most: int, min_capacity: int) -> int:
        """Pop chains as receive buffers, kept in order, until they hold more than
        `room` bytes, `most` (at most the queue's max_size) are kept, or none is
        available; the bytes kept. A chain with device-readable buffers, or of
        fewer than min_capacity bytes, is a QueueError (popped, not kept)."""
        mem = self._mem()
        most = min(most, self.max_size)
        while self._reserved_room <= room and len(self._reserved) < most:
            chain = self.pop()
            if chain is None:
                break
            if any(not d.write for d in chain.descriptors):
                raise QueueError("receive buffer has device-readable descriptors")
            capacity = sum(d.len for d in chain.descriptors)
            if capacity < min_capacity:
                raise QueueError(f"receive buffer of {capacity} bytes is smaller than the {min_capacity}-byte header")
            self._reserved_views += [mem.view(d.addr, d.len) for d in chain.descriptors]
            self._reserved.append((chain.head, capacity, len(chain.descriptors)))
            self._reserved_room += capacity
        return self._reserved_room

    @property
    def reserved(self) -> int:
        """Chains reserve() keeps."""
        return len(self._reserved)

    def reserved_head_len(self) -> int:
        """The first reserved buffer's length (0 with none)."""
        return len(self._reserved_views[0]) if self._reserved_views else 0

    def readv_reserved(self, fd: int) -> int:
        """One readv from fd into every reserved buffer: the bytes read, or -errno
        (-E2BIG: more buffers than one readv takes; -ENOBUFS: none reserved)."""
        self._mem()
        if not self._reserved_views:
            return -errno.ENOBUFS
        if len(self._reserved_views) > IOV_MAX:
            return -errno.E2BIG
        try:
            return os.readv(fd, self._reserved_views)
        except OSError as e:
            return -(e.errno or errno.EIO)

    def peek_reserved(self, length: int) -> bytearray:
        """The first `length` bytes of the reserved buffers."""
        self._mem()
        out = bytearray()
        for view in self._reserved_views:
            if len(out) >= length:
                break
            out += view[:length - len(out)]
        return out + bytes(length - len(out))

    def chains_for(self, nbytes: int) -> int:
        """How many reserved chains, from the first, hold nbytes (at least one)."""
        if nbytes > self._reserved_room or not self._reserved:
            raise ValueError(f"{nbytes} bytes are more than the {self._reserved_room} reserved")
        room = 0
        for i, (_, capacity, _) in enumerate(self._reserved):
            room += capacity
            if room >= nbytes:
                return i + 1
        raise AssertionError("unreachable: the reserved room holds nbytes")

    def use_reserved(self, nbytes: int, front: bytes | bytearray | memoryview | None = None) -> int:
        """Write `front` at the start of the reserved buffers, then return the
        chains that hold nbytes (chains_for) to the driver, each with what it got
        of them, published with one index update: the number of chains."""
        self._mem()
        chosen = self.chains_for(nbytes)
        if front is not None and len(front):
            if len(front) > self._reserved_room:
                raise ValueError(f"{len(front)} bytes are more than the {self._reserved_room} reserved")
            pos = 0
            for view in self._reserved_views:
                take = min(len(view), len(front) - pos)
                view[:take] = front[pos:pos + take]
                pos += take
                if pos == len(front):
                    break
        used, left = [], nbytes
        for _ in range(chosen):
            head, capacity = self._take_reserved()
            used.append((head, min(capacity, left)))
            left -= min(capacity, left)
        self.add_used_many(used)
        return chosen

    # --- virtio-blk reads and writes: a request straight between a disk and guest memory ---
    #
    # virtio-blk's common requests, reads and writes of whole sectors, go between
    # the disk and guest memory here, one preadv/pwritev each, with no object per
    # buffer (in C in the Cython queue). Anything else (a flush, GET_ID, a discard,
    # every request the device answers with an error) is declined: left available
    # for the device's own path (VirtioBlock._request), which says what is wrong.

    def serve_block_io(self, fd: int, capacity: int, seg_max: int,
                       read_only: bool) -> tuple[int, int, int, int, int, bool]:
        """Serve each available chain that is a virtio-blk read (IN) or write (OUT)
        of whole sectors below `capacity`, laid out as the device's path takes it
        (a header buffer of at least 16 bytes, device-readable buffers before
        device-writable ones, at most seg_max data buffers, a write's status byte
        alone after its data), with one preadv/pwritev at its sector and status
        OK, until none is left, `size` are done or one is declined: any other
        request, one that path would answer with an error, or a transfer that
        fails or comes up short is left available (not popped) for the caller's
        path, which then does it from the start and reports what went wrong. A
        read's used length is its data and the status byte, a write's the status
        byte (VirtioBlock._request's rule). Returns (chains served, reads, bytes
        read, writes, bytes written, whether one was declined); the chains served
        before a QueueError (a broken chain) are published before it is raised."""
        mem = self._mem()
        n = start = self.next_used
        served = reads = nread = writes = nwritten = 0
        declined = False
        try:
            while n - start < self.size:
                found = self._peek()
                if found is None:
                    break
                head, descs = found
                done = self._block_io(mem, fd, descs, capacity, seg_max, read_only)
                if done is None:
                    declined = True
                    break
                kind, data = done
                self._next_avail = (self._next_avail + 1) & 0xFFFF
                self.chains_popped += 1
                self._put_used(mem, n, head, data + 1 if kind == VIRTIO_BLK_T_IN else 1)
                n += 1
                served += 1
                if kind == VIRTIO_BLK_T_IN:
                    reads, nread = reads + 1, nread + data
                else:
                    writes, nwritten = writes + 1, nwritten + data
        finally:
            self._publish_used(mem, start, n)
        return served, reads, nread, writes, nwritten, declined

    @staticmethod
    def _block_io(mem: GuestMemory, fd: int, descs: list[Descriptor], capacity: int, seg_max: int,
                  read_only: bool) -> tuple[int, int] | None:
        """One request served: (its type, its data bytes); None: declined."""
        first_writable = next((i for i, d in enumerate(descs) if d.write), len(descs))
        if first_writable in (0, len(descs)) or not all(d.write for d in descs[first_writable:]):
            return None  # no header; no byte for the status; device-readable after device-writable
        readable, writable = descs[:first_writable], descs[first_writable:]
        if readable[0].len < BLK_HEADER_SIZE:
            return None  # a header split over buffers
        kind, _ioprio, sector = _BLK_OUTHDR.unpack(mem.read(readable[0].addr, BLK_HEADER_SIZE))
        out_len, in_len = sum(d.len for d in readable), sum(d.len for d in writable)
        status_addr = writable[-1].addr + writable[-1].len - 1
        if kind == VIRTIO_BLK_T_IN and out_len == BLK_HEADER_SIZE:
            data, io = in_len - 1, os.preadv
            views = stream_views(mem, writable, 0, data)
        elif kind == VIRTIO_BLK_T_OUT and not read_only and in_len == 1:
            data, io = out_len - BLK_HEADER_SIZE, os.pwritev
            views = stream_views(mem, readable, BLK_HEADER_SIZE, out_len)
        else:
            return None
        try:
            if (data % SECTOR_SIZE or sector > capacity or data // SECTOR_SIZE > capacity - sector
                    or len(views) > min(seg_max, IOV_MAX)):
                return None
            if views:
                try:
                    if io(fd, views, sector * SECTOR_SIZE) != data:
                        return None
                except OSError:
                    return None
        finally:
            for view in views:
                view.release()
        mem.write_int(status_addr, 1, VIRTIO_BLK_S_OK)
        return kind, data

    def _take_reserved(self) -> tuple[int, int]:
        head, capacity, nviews = self._reserved.popleft()
        for view in self._reserved_views[:nviews]:
            view.release()
        del self._reserved_views[:nviews]
        self._reserved_room -= capacity
        return head, capacity

    def _drop_reserved(self) -> None:
        """A reset, a release or an activation forgets reserved buffers (and lets go of their views)."""
        while self._reserved:
            self._take_reserved()


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
