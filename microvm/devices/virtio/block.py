"""virtio-blk over a raw disk (virtio 1.2, section 5.2).

One request queue. A request (5.2.6) is a 16-byte header the device reads,
data, and one status byte the device writes last. Per 2.7.4 the device makes
no assumption about how the driver splits these over descriptors: the
device-readable bytes form one stream (header, then OUT data or discard
segments) and the device-writable bytes another (IN data, then the status
byte at its very end). Data moves between the disk and guest memory with
preadv/pwritev on views of guest RAM, without copies.

A driver's mistake is answered with VIRTIO_BLK_S_IOERR; only a chain with no
device-writable byte for the status is a QueueError (the device needs a
reset). A host failure (an OSError from the disk: EIO, ENOSPC) is an IOERR
too: the guest sees a disk error, the VMM keeps running, and the counters
and last_error say what happened.

The used length of a request counts the bytes the device wrote into the
chain: IN data and the status byte, GET_ID's id and the status byte,
otherwise the status byte alone (see VirtioBlock._request).

The disk (microvm/backends/disk.py) is borrowed, not owned: whoever opened
the RawDisk closes it, once the device serves no more requests (after the
I/O thread that serves its queue is gone). VirtioBlock has no close(). A request that still
arrives after the disk was closed is answered IOERR, like any host failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from microvm.backends.disk import RawDisk
from microvm.devices.state import Fields, State
from microvm.devices.virtio import VIRTIO_ID_BLOCK, QueueState, config_read
from microvm.devices.virtio.blk_abi import (
    DISCARD_SECTOR_ALIGNMENT,
    HEADER_SIZE,
    MAX_DISCARD_SECTORS,
    MAX_WRITE_ZEROES_SECTORS,
    QUEUE_SIZE,
    REQUEST_QUEUE,
    SECTOR_SIZE,
    SEG_MAX,
    SEGMENT_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VirtioBlkConfig,
    VirtioBlkDiscardWriteZeroes,
    VirtioBlkOuthdr,
)
from microvm.devices.virtio.queue import Descriptor, DescriptorChain, QueueError, stream_views
from microvm.errors import ConfigError, GuestMemoryError
from microvm.memory import GuestMemory
from microvm.ratelimit import RateLimit, Throttle

log = logging.getLogger(__name__)
T = TypeVar("T")

_OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector


def _data_bytes(chain: DescriptorChain) -> int:
    """What a request moves, for the rate limit: its buffers less header and status."""
    return max(0, sum(d.len for d in chain.descriptors) - HEADER_SIZE - 1)


@dataclass
class BlockCounters:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0  # requests answered VIRTIO_BLK_S_IOERR (driver mistakes and host failures)
    host_errors: int = 0  # of which an OSError from the disk
    unsupported: int = 0  # requests answered VIRTIO_BLK_S_UNSUPP


class _Reply(Exception):
    """Ends a request early with a status other than OK."""

    def __init__(self, status: int, why: str):
        super().__init__(why)
        self.status = status


class VirtioBlock(QueueState):
    """A virtio-blk device over one RawDisk, which it borrows (see the module docstring)."""

    device_type = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    # Reads and writes served in the queue (Queue.serve_block_io: in C, one
    # preadv/pwritev each), the rest here. False: every request through
    # _request and Python's os calls (where tests inject host failures).
    serve_in_queue = True

    def __init__(self, disk: RawDisk, *, serial: str | None = None, rate_limit: RateLimit | None = None):
        self.disk = disk
        self.throttle = Throttle(rate_limit)
        self.serial = self._id_bytes(serial)
        self.capacity = disk.size // SECTOR_SIZE
        self.counters = BlockCounters()
        self.last_error: str | None = None
        self.features = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        config = VirtioBlkConfig(capacity=self.capacity, seg_max=SEG_MAX, blk_size=SECTOR_SIZE)
        if disk.read_only:
            self.features |= 1 << VIRTIO_BLK_F_RO
        else:
            self.features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            config.max_discard_sectors = MAX_DISCARD_SECTORS
            config.max_discard_seg = 1
            config.discard_sector_alignment = DISCARD_SECTOR_ALIGNMENT
            config.max_write_zeroes_sectors = MAX_WRITE_ZEROES_SECTORS
            config.max_write_zeroes_seg = 1
            config.write_zeroes_may_unmap = 1
        self._config = bytes(config)
        super().__init__()

    @property
    def path(self) -> str:
        return self.disk.path

    @property
    def read_only(self) -> bool:
        return self.disk.read_only

    def stats(self) -> dict[str, int]:
        """The counters by name (BlockCounters' fields), and the rate limit's."""
        return dataclasses.asdict(self.counters) | self.throttle.stats()

    def throttles(self) -> dict[int, Throttle]:
        """Per queue, for DeviceManager.add_virtio to bind."""
        return {REQUEST_QUEUE: self.throttle}

    def rate_limits(self) -> dict[str, Throttle]:
        """By the name MicroVM.set_rate_limit knows them: "vda" (no suffix)."""
        return {"": self.throttle}

    def chains_held(self) -> dict[int, int]:
        return {q: 1 for q in self.held}

    def _id_bytes(self, serial: str | None) -> bytes:
        """The GET_ID string: NUL-padded ASCII, at most 20 bytes (5.2.6)."""
        if serial is None:
            # Stable per image, so /dev/disk/by-id/virtio-<serial> is too.
            return hashlib.sha256(os.fsencode(os.path.abspath(self.path))).hexdigest()[:VIRTIO_BLK_ID_BYTES].encode()
        if not (serial.isascii() and serial.isprintable() and len(serial) <= VIRTIO_BLK_ID_BYTES):
            raise ConfigError(f"disk image {self.path}: serial {serial!r} is not printable ASCII "
                              f"of at most {VIRTIO_BLK_ID_BYTES} characters")
        return serial.encode()

    # --- snapshots (devices/state.py) ----------------------------------------------------

    def snapshot_state(self) -> State:
        """The disk as the guest knows it. The caller re-opens the image and checks it
        is unchanged: path, size and read_only are here for that."""
        return {"kind": "virtio-blk", "path": self.path, "size": self.disk.size, "read_only": self.read_only,
                "features": self.features, "serial": self.serial}

    def restore_state(self, state: State) -> None:
        """The disk must have the size and mode the guest knows (a SnapshotError
        otherwise); the GET_ID serial is the saved one, wherever the image is now."""
        f = Fields(state, "virtio-blk")
        f.same("size", self.disk.size)
        f.same("read_only", self.read_only)
        f.same("features", self.features)
        serial = f.blob("serial", VIRTIO_BLK_ID_BYTES)
        if not (serial.isascii() and serial.decode().isprintable()):
            raise f.error(f"serial {serial!r} is not printable ASCII")
        self.serial = serial

    # --- VirtioDevice -------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        return config_read(self._config, offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # only `writeback` is writable, with VIRTIO_BLK_F_CONFIG_WCE, which we do not offer

    def process(self, queue_index: int) -> None:
        if queue_index != REQUEST_QUEUE:
            return
        mem = self.mem
        assert mem is not None and self.signal is not None
        fd = self._direct_fd()
        if fd < 0:
            with self.used_batch(REQUEST_QUEUE) as used:
                while (chain := self.next_chain(REQUEST_QUEUE, self.throttle, _data_bytes)) is not None:
                    used(chain.head, self._request(mem, chain))
            return
        # Reads and writes in the queue (Queue.serve_block_io: in C), each request
        # it declines here, one at a time (a flush, GET_ID, a discard, an error).
        q, counters, served = self.queues[REQUEST_QUEUE], self.counters, 0
        try:
            while True:
                n, reads, nread, writes, nwritten, declined = q.serve_block_io(
                    fd, self.capacity, SEG_MAX, self.read_only)
                served += n
                counters.reads += reads
                counters.bytes_read += nread
                counters.writes += writes
                counters.bytes_written += nwritten
                if not declined:
                    if n < q.size:
                        return  # the queue is empty (the finally clause signals)
                    continue
                chain = q.pop()  # the one declined
                if chain is None:
                    return
                q.add_used(chain.head, self._request(mem, chain))
                served += 1
        finally:
            if served:
                self.signal(REQUEST_QUEUE)

    def _direct_fd(self) -> int:
        """The disk's fd for the queue's reads and writes (serve_block_io), or -1:
        a rate limit counts each request, and a disk that does its own I/O (a
        RawDisk subclass, as the recording one) must see each; neither while
        the disk is closed."""
        disk = type(self.disk)
        if (not self.serve_in_queue or self.throttle.limiter is not None or REQUEST_QUEUE in self.held
                or disk.preadv is not RawDisk.preadv or disk.pwritev is not RawDisk.pwritev):
            return -1
        return self.disk.fd

    # --- requests -----------------------------------------------------------------------

    def _request(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """Serve one request; returns the used length.

        The used length is the number of bytes the device wrote into the
        chain (2.7.8): a driver may trust only the first `len` bytes of its
        device-writable buffers (2.7.8.2), and one that hands buffers on
        unzeroed (to user space, say) relies on `len` not to expose what the
        device never wrote. So: a successful IN counts its data and the
        status byte, GET_ID the id it wrote and the status byte; anything
        else (OUT, FLUSH, DISCARD, WRITE_ZEROES, every IOERR and UNSUPP,
        even after part of a read landed) counts the status byte alone,
        since after an error the data part is undefined (5.2.6). The status
        byte itself is always the last device-writable byte, where drivers
        look for it (Linux's virtblk_done never reads `len`)."""
        descs = [d for d in chain.descriptors if d.len]  # empty buffers carry nothing (and may point anywhere)
        readable = [d for d in descs if not d.write]
        writable = [d for d in descs if d.write]
        if not writable:
            raise QueueError("virtio-blk request has no device-writable byte for its status")
        last = writable[-1]
        status_addr = last.addr + last.len - 1
        in_len = sum(d.len for d in writable) - 1
        try:
            # 2.7.4.2: device-readable descriptors come before device-writable ones.
            first_writable = next(i for i, d in enumerate(descs) if d.write)
            if any(not d.write for d in descs[first_writable:]):
                raise _Reply(VIRTIO_BLK_S_IOERR, "device-readable buffer after a device-writable one")
            out_len = sum(d.len for d in readable) - HEADER_SIZE
            if out_len < 0:
                raise _Reply(VIRTIO_BLK_S_IOERR, "request header shorter than 16 bytes")
            first = readable[0]
            if first.len >= HEADER_SIZE:  # the usual case: the header in one buffer
                kind, _ioprio, sector = _OUTHDR.unpack(mem.view(first.addr, HEADER_SIZE))
            else:
                header = VirtioBlkOuthdr.from_buffer_copy(b"".join(stream_views(mem, readable, 0, HEADER_SIZE)))
                kind, sector = header.type, header.sector
            written = self._dispatch(mem, kind, sector, readable, out_len, writable, in_len)
            status = VIRTIO_BLK_S_OK
        except _Reply as r:
            status, written = r.status, 0
            self._count(r)
        except GuestMemoryError as e:  # the queue checked every buffer; this would be our bug
            raise QueueError(f"virtio-blk: {e}") from e
        mem.write_int(status_addr, 1, status)
        return written + 1

    def _count(self, reply: _Reply) -> None:
        if reply.status == VIRTIO_BLK_S_UNSUPP:
            self.counters.unsupported += 1
        else:
            self.counters.errors += 1
        self.last_error = str(reply)

    def _dispatch(self, mem: GuestMemory, kind: int, sector: int, readable: list[Descriptor], out_len: int,
                  writable: list[Descriptor], in_len: int) -> int:
        """Run one request whose header was read; returns the data bytes written into
        the chain (all before the status byte). _Reply ends it with an error."""
        if kind == VIRTIO_BLK_T_IN:
            if out_len:
                raise _Reply(VIRTIO_BLK_S_IOERR, "read request with device-readable data")
            views = self._data(mem, writable, 0, in_len, sector)
            n = self._io(self.disk.preadv, views, sector)
            self.counters.reads += 1
            self.counters.bytes_read += n
            return n
        if kind == VIRTIO_BLK_T_OUT:
            if self.read_only:  # 5.2.6.2: IOERR and no data written
                raise _Reply(VIRTIO_BLK_S_IOERR, "write to a read-only disk")
            if in_len:
                raise _Reply(VIRTIO_BLK_S_IOERR, "write request with device-writable data")
            views = self._data(mem, readable, HEADER_SIZE, HEADER_SIZE + out_len, sector)
            n = self._io(self.disk.pwritev, views, sector)
            self.counters.writes += 1
            self.counters.bytes_written += n
            return 0
        if kind == VIRTIO_BLK_T_FLUSH:
            # 5.2.6.2: a write is stable once a flush after it completes.
            self._host(self.disk.flush)
            self.counters.flushes += 1
            return 0
        if kind == VIRTIO_BLK_T_GET_ID:
            if out_len or in_len < VIRTIO_BLK_ID_BYTES:
                raise _Reply(VIRTIO_BLK_S_IOERR, f"GET_ID needs a {VIRTIO_BLK_ID_BYTES}-byte writable buffer")
            # NUL-padded over the whole data part (Linux's is exactly 20 bytes), so
            # every byte before the status is written and the used length says so.
            ident = self.serial.ljust(in_len, b"\0")
            pos = 0
            for view in stream_views(mem, writable, 0, in_len):
                view[:] = ident[pos:pos + len(view)]
                pos += len(view)
            self.counters.get_ids += 1
            return in_len
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            self._discard_or_zero(mem, kind, readable, out_len, in_len)
            return 0
        raise _Reply(VIRTIO_BLK_S_UNSUPP, f"request type {kind} is not supported")

    def _data(self, mem: GuestMemory, descs: list[Descriptor], start: int, end: int,
              sector: int) -> list[memoryview]:
        length = end - start
        if length % SECTOR_SIZE:
            raise _Reply(VIRTIO_BLK_S_IOERR, f"data length {length} is not a multiple of {SECTOR_SIZE}")
        self._check_range(sector, length // SECTOR_SIZE)
        views = stream_views(mem, descs, start, end)
        if len(views) > SEG_MAX:
            for view in views:
                view.release()
            raise _Reply(VIRTIO_BLK_S_IOERR, f"{len(views)} data segments, more than seg_max {SEG_MAX}")
        return views

    def _check_range(self, sector: int, count: int) -> None:
        if sector + count > self.capacity:  # 5.2.6.1; Python ints cannot wrap around
            raise _Reply(VIRTIO_BLK_S_IOERR, f"sectors {sector}+{count} beyond capacity {self.capacity}")

    def _io(self, io: Callable[[list[memoryview], int], int], views: list[memoryview], sector: int) -> int:
        try:
            return self._host(io, views, sector * SECTOR_SIZE)
        finally:
            for view in views:  # GuestMemory.close() refuses while views are alive
                view.release()

    def _host(self, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        """A call on the disk; an OSError becomes IOERR for the guest."""
        try:
            return call(*args, **kwargs)
        except OSError as e:
            self.counters.host_errors += 1
            if self.counters.host_errors & (self.counters.host_errors - 1) == 0:  # 1, 2, 4, ...: no flood
                log.warning("disk image %s: %s (%d host errors so far)", self.path, e, self.counters.host_errors)
            raise _Reply(VIRTIO_BLK_S_IOERR, f"host I/O error: {e}") from None

    def _discard_or_zero(self, mem: GuestMemory, kind: int, readable: list[Descriptor], out_len: int,
                         in_len: int) -> None:
        discard = kind == VIRTIO_BLK_T_DISCARD
        if self.read_only:
            raise _Reply(VIRTIO_BLK_S_IOERR, "discard or write zeroes on a read-only disk")
        # 5.2.6.1: whole segments, at most max_discard_seg / max_write_zeroes_seg (both 1) of them.
        if in_len or out_len != SEGMENT_SIZE:
            raise _Reply(VIRTIO_BLK_S_IOERR, f"expected one {SEGMENT_SIZE}-byte segment, got {out_len} bytes")
        seg = VirtioBlkDiscardWriteZeroes.from_buffer_copy(
            b"".join(stream_views(mem, readable, HEADER_SIZE, HEADER_SIZE + SEGMENT_SIZE)))
        unmap = bool(seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        # 5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP.
        if seg.flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and unmap):
            raise _Reply(VIRTIO_BLK_S_UNSUPP, f"segment flags {seg.flags:#x} not supported")
        if seg.num_sectors > (MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS):
            raise _Reply(VIRTIO_BLK_S_IOERR, f"segment of {seg.num_sectors} sectors is too long")
        self._check_range(seg.sector, seg.num_sectors)
        offset, length = seg.sector * SECTOR_SIZE, seg.num_sectors * SECTOR_SIZE
        if discard:
            # A discard may deallocate (5.2.6.2); where holes are unsupported it is a no-op.
            self._host(self.disk.discard, offset, length)
            self.counters.discards += 1
            return
        # Reads must return zeroes afterwards (5.2.6.2); unmap lets the disk punch a hole
        # (we offer write_zeroes_may_unmap = 1).
        self._host(self.disk.write_zeroes, offset, length, unmap=unmap)
        self.counters.write_zeroes += 1
