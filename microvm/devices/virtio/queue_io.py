"""The device paths of the reference virtqueue (queue.PyQueue): a request's
buffers straight between a host fd and guest memory, with no object per
buffer. The Cython queue (ext/_virtq.pyx) runs the same calls in C over the
same checks; the devices keep what the bytes mean.

- frames (virtio-net and its tap): send_chains writes each available chain
  with one writev; reserve, readv_reserved and use_reserved keep receive
  buffers and read a frame into them with one readv; receive_frames loops
  over those for every frame that needs nothing but its num_buffers;
- virtio-blk's reads and writes: serve_block_io moves each request's
  sectors with one preadv/pwritev, and declines everything else.

QueueIo is PyQueue's base: it keeps the reserved buffers and uses the ring
access PyQueue defines (_mem, pop, _peek, _put_used, _publish_used).
"""

from __future__ import annotations

import errno
import os
import struct
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable

from microvm.devices.virtio.blk_abi import HEADER_SIZE as BLK_HEADER_SIZE
from microvm.devices.virtio.blk_abi import SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from microvm.devices.virtio.net_abi import NUM_BUFFERS_OFFSET, VNET_HDR_SIZE, plain_header
from microvm.devices.virtio.ring import (
    IOV_MAX,
    SEND_LONG,
    SEND_PARTIAL,
    SEND_SHORT,
    SEND_WRITABLE,
    Descriptor,
    DescriptorChain,
    QueueError,
    stream_views,
)
from microvm.memory import GuestMemory

_BLK_OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector


class QueueIo(ABC):
    """The device paths; PyQueue supplies the ring (see the module docstring)."""

    max_size: int
    size: int
    next_used: int
    chains_popped: int
    _next_avail: int

    def __init__(self) -> None:
        # reserve()'s chains (head, capacity, number of views) and the views of their buffers.
        self._reserved: deque[tuple[int, int, int]] = deque()
        self._reserved_views: list[memoryview] = []
        self._reserved_room = 0

    # PyQueue's ring access.
    @abstractmethod
    def _mem(self) -> GuestMemory: ...

    @abstractmethod
    def pop(self) -> DescriptorChain | None: ...

    @abstractmethod
    def _peek(self) -> tuple[int, list[Descriptor]] | None: ...

    @abstractmethod
    def add_used_many(self, used: Iterable[tuple[int, int]]) -> None: ...

    @abstractmethod
    def _put_used(self, mem: GuestMemory, n: int, head: int, length: int) -> None: ...

    @abstractmethod
    def _publish_used(self, mem: GuestMemory, start: int, n: int) -> None: ...

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

    def receive_frames(self, fd: int, max_frame: int, min_frame: int, most: int, accepted: bytes,
                       csum: bool) -> tuple[int, int, int, int | QueueError | None]:
        """virtio-net's receive loop (5.1.6.3, 5.1.6.4): read frames from fd straight
        into reserved receive buffers, one readv each, keeping chains until they
        hold more than max_frame bytes (at most `most`), and give each frame back
        with its header's num_buffers set to the chains it took, as long as the
        frame needs nothing else: between min_frame and max_frame bytes and a
        plain header (net_abi.plain_header; without `csum` its offload fields are
        cleared). Returns (frames, chains used, bytes, stop), stop saying why the
        loop ended: None, the buffers posted cannot take a max_frame frame or the
        first is shorter than the header (the chains stay reserved); an int, the
        readv it did not take (bytes read, its frame in the reserved buffers, or
        -errno: -EAGAIN when there is nothing to read), for the device to finish;
        a QueueError, a broken receive chain (raised by reserve), after the frames
        before it were given back."""
        if len(accepted) != 256:
            raise ValueError(f"accepted has {len(accepted)} entries, not one per gso_type value (256)")
        frames = chains = nbytes = 0
        while True:
            try:
                room = self.reserve(max_frame, most, VNET_HDR_SIZE)
            except QueueError as e:
                return frames, chains, nbytes, e
            if room <= max_frame or self.reserved_head_len() < VNET_HDR_SIZE:
                return frames, chains, nbytes, None
            n = self.readv_reserved(fd)
            if not min_frame <= n <= max_frame:
                return frames, chains, nbytes, n
            header = self.peek_reserved(VNET_HDR_SIZE)
            if not plain_header(header, accepted, csum):
                return frames, chains, nbytes, n
            if not csum:
                header[:NUM_BUFFERS_OFFSET] = bytes(NUM_BUFFERS_OFFSET)
            chosen = self.chains_for(n)
            header[NUM_BUFFERS_OFFSET:NUM_BUFFERS_OFFSET + 2] = chosen.to_bytes(2, "little")
            self.use_reserved(n, header)
            frames += 1
            chains += chosen
            nbytes += n

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
