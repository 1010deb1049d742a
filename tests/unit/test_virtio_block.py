"""virtio-blk (virtio 1.2, 5.2) over a RawDisk on a real image file, driven through the
MMIO transport by the fake driver: no KVM needed. RawDisk alone is tested in test_disk.py.

Requests are packed here with `struct` from the C declarations in
include/uapi/linux/virtio_blk.h, not with block.py's ctypes structures, so
the two cross-check. What a test asserts is what a user sees: the bytes of
the image file, the status byte and the data in guest memory.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm.backends import disk as rawdisk
from microvm.backends.disk import RawDisk
from microvm.devices import virtio as v
from microvm.devices.virtio import blk_abi as b
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio.block import BlockCounters, VirtioBlock
from microvm.devices.virtio.queue import QueueError
from microvm.errors import ConfigError
from microvm.memory import GuestMemory
from tests.support.fakes import FakeIrq
from tests.support.virtio_driver import VirtqDriver, make_queue, used_ring_size
from tests.unit.test_virtio_mmio import Driver

pytestmark = pytest.mark.usefixtures("virtqueue", "blk_path")  # every test: both queues, both paths


@pytest.fixture(params=["queue", "device"])
def blk_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Reads and writes served in the queue (serve_block_io), or each by the device's _request."""
    monkeypatch.setattr(VirtioBlock, "serve_in_queue", request.param == "queue")
    return str(request.param)


def device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request through the device's _request: host failures injected into os.* reach it
    (the queue's path makes its own system calls, in C in the Cython queue)."""
    monkeypatch.setattr(VirtioBlock, "serve_in_queue", False)

# struct virtio_blk_outhdr { __virtio32 type; __virtio32 ioprio; __virtio64 sector; };
OUTHDR = struct.Struct("<IIQ")
# struct virtio_blk_discard_write_zeroes { __le64 sector; __le32 num_sectors; __le32 flags; };
SEGMENT = struct.Struct("<QII")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_UNMAP = 1

SECTORS = 64
SIZE = SECTORS * 512
Parts = Sequence[tuple[bytes | int, bool]]


def hdr(kind: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return OUTHDR.pack(kind, ioprio, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return SEGMENT.pack(sector, num, flags)


def make_image(path: Path, size: int = SIZE, seed: int = 1) -> bytes:
    data = Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


class Disk:
    """An image, a RawDisk and a VirtioBlock over it, and a driver that has brought the device up.
    The test owns the RawDisk, so close() closes it (the device never does)."""

    def __init__(self, path: Path, *, read_only: bool = False, serial: str | None = None,
                 direct: bool = False, backing: bytearray | mmap.mmap | None = None, queue_size: int = 16):
        self.path = path
        self.queue_size = queue_size
        self.raw = RawDisk(path, read_only=read_only, direct=direct)
        try:
            self.dev = VirtioBlock(self.raw, serial=serial)
        except BaseException:
            self.raw.close()
            raise
        self.mem = GuestMemory([(0, backing if backing is not None else bytearray(1 << 20))])
        self.irq = FakeIrq()
        self.t = m.MmioTransport(self.dev, self.mem, self.irq)
        self.d = Driver(self.t, self.mem)
        self.q = self.bring_up()

    def bring_up(self) -> VirtqDriver:
        assert self.d.r(m.VIRTIO_MMIO_DEVICE_ID) == v.VIRTIO_ID_BLOCK
        assert self.d.negotiate(self.d.features() & ~(1 << v.VIRTIO_F_EVENT_IDX))
        q = self.d.setup_queue(0, self.queue_size, 0x10000)
        self.d.driver_ok()
        assert self.t.active
        return q

    def submit(self, parts: Parts, indirect: bool = False) -> tuple[int, list[tuple[int, int, bool]]]:
        head = self.q.add_indirect_chain(parts) if indirect else self.q.add_chain(parts)
        buffers = self.q.buffers[head]
        for addr, length, writable in buffers:
            if writable:
                self.mem.fill(addr, length, 0xAA)  # so an unwritten status shows
        return head, buffers

    def request(self, parts: Parts, indirect: bool = False) -> tuple[int, int, bytes]:
        """Offer one chain, notify, and return (status, used length, the device-writable bytes but the last)."""
        head, buffers = self.submit(parts, indirect)
        self.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        used = self.q.used()
        assert [h for h, _ in used] == [head]
        written = b"".join(self.mem.read(a, n) for a, n, w in buffers if w)
        return written[-1], used[0][1], written[:-1]

    def read(self, sector: int, count: int, split: Sequence[int] = (), indirect: bool = False) -> bytes:
        lengths = [*split, count * 512 - sum(split)]
        status, length, data = self.request([(hdr(T_IN, sector), False), *((n, True) for n in lengths), (1, True)],
                                            indirect)
        assert (status, length) == (S_OK, count * 512 + 1)
        return data

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path)


@pytest.fixture
def disk(image: tuple[Path, bytes]) -> Iterator[Disk]:
    d = Disk(image[0])
    yield d
    d.close()


# --- configuration ----------------------------------------------------------------------


def test_features_and_config(disk: Disk) -> None:
    feats = disk.d.features()
    for bit in (b.VIRTIO_BLK_F_SEG_MAX, b.VIRTIO_BLK_F_BLK_SIZE, b.VIRTIO_BLK_F_FLUSH, b.VIRTIO_BLK_F_DISCARD,
                b.VIRTIO_BLK_F_WRITE_ZEROES, v.VIRTIO_F_VERSION_1):
        assert feats >> bit & 1, bit
    assert not feats >> b.VIRTIO_BLK_F_RO & 1
    cfg = m.VIRTIO_MMIO_CONFIG
    # Offsets from struct virtio_blk_config in the kernel header.
    assert disk.t.read(cfg + 0, 8) == SECTORS
    assert disk.t.read(cfg + 0, 4) == SECTORS and disk.t.read(cfg + 4, 4) == 0
    assert disk.t.read(cfg + 12, 4) == b.SEG_MAX
    assert disk.t.read(cfg + 20, 4) == 512  # blk_size
    assert disk.t.read(cfg + 36, 4) == b.MAX_DISCARD_SECTORS
    assert disk.t.read(cfg + 40, 4) == 1  # max_discard_seg
    assert disk.t.read(cfg + 44, 4) == b.DISCARD_SECTOR_ALIGNMENT
    assert disk.t.read(cfg + 48, 4) == b.MAX_WRITE_ZEROES_SECTORS
    assert disk.t.read(cfg + 52, 4) == 1  # max_write_zeroes_seg
    assert disk.t.read(cfg + 56, 1) == 1  # write_zeroes_may_unmap
    assert disk.t.read(cfg + 0x1000, 4) == 0
    disk.t.write(cfg, 8, 1)  # config space is read-only
    assert disk.t.read(cfg, 8) == SECTORS
    assert disk.dev.capacity == SECTORS


def test_read_only_features(image: tuple[Path, bytes]) -> None:
    with RawDisk(image[0], read_only=True) as raw:
        dev = VirtioBlock(raw)
        assert dev.read_only and dev.path == str(image[0])
        assert dev.features >> b.VIRTIO_BLK_F_RO & 1
        assert not dev.features & (1 << b.VIRTIO_BLK_F_DISCARD | 1 << b.VIRTIO_BLK_F_WRITE_ZEROES)
        assert dev.read_config(36, 4) == 0 and dev.read_config(56, 1) == 0


# --- reads and writes ------------------------------------------------------------------------


def test_read(disk: Disk, image: tuple[Path, bytes]) -> None:
    content = image[1]
    assert disk.read(0, 1) == content[:512]
    assert disk.read(5, 3, split=[100, 1000]) == content[5 * 512:8 * 512]
    assert disk.read(SECTORS - 2, 2, indirect=True) == content[-1024:]
    assert disk.dev.counters.reads == 3 and disk.dev.counters.bytes_read == 6 * 512
    assert disk.irq.count == 3


def test_write_round_trip(disk: Disk, image: tuple[Path, bytes]) -> None:
    path, content = image
    data = Random(2).randbytes(3 * 512)
    # Data over three descriptors of odd lengths, then an indirect table.
    status, length, _ = disk.request([(hdr(T_OUT, 7), False), (data[:1], False), (data[1:1000], False),
                                      (data[1000:], False), (1, True)])
    assert (status, length) == (S_OK, 1)
    status, _, _ = disk.request([(hdr(T_OUT, 20), False), (data[:512], False), (1, True)], indirect=True)
    assert status == S_OK
    expected = bytearray(content)
    expected[7 * 512:10 * 512] = data
    expected[20 * 512:21 * 512] = data[:512]
    assert path.read_bytes() == expected
    assert disk.read(7, 3, split=[512, 512], indirect=True) == data
    c = disk.dev.counters
    assert (c.writes, c.bytes_written, c.errors) == (2, 4 * 512, 0)


def test_header_and_status_split_or_merged(disk: Disk, image: tuple[Path, bytes]) -> None:
    path, content = image
    h = hdr(T_IN, 3)
    # 2.7.4: the header across two descriptors, the status in the same descriptor as the data.
    status, length, data = disk.request([(h[:5], False), (h[5:], False), (513, True)])
    assert (status, length, data) == (S_OK, 513, content[3 * 512:4 * 512])
    # The header and the data of a write in one descriptor.
    new = bytes(range(256)) * 2
    status, _, _ = disk.request([(hdr(T_OUT, 4) + new[:300], False), (new[300:], False), (1, True)])
    assert status == S_OK
    assert path.read_bytes()[4 * 512:5 * 512] == new


def test_many_requests_one_interrupt(disk: Disk) -> None:
    for sector in range(4):
        disk.submit([(hdr(T_IN, sector), False), (512, True), (1, True)])
    disk.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert [n for _, n in disk.q.used()] == [513] * 4
    assert disk.irq.count == 1


def test_seg_max(image: tuple[Path, bytes]) -> None:
    """Up to seg_max data segments (here in one indirect table as long as the queue), IOERR beyond."""
    path, content = image
    disk = Disk(path, queue_size=b.QUEUE_SIZE)
    try:
        assert disk.read(4, 1, split=[2] * (b.SEG_MAX - 1), indirect=True) == content[4 * 512:5 * 512]
        # The header shares its descriptor with data: a chain as long as the queue, one segment too many.
        data = bytes(512)
        parts = [(hdr(T_OUT, 4) + data[:2], False), *((data[:2], False),) * (b.SEG_MAX - 1), (data[:4], False),
                 (1, True)]
        assert len(parts) == b.QUEUE_SIZE
        assert disk.request(parts, indirect=True)[:2] == (S_IOERR, 1)
        assert path.read_bytes() == content
    finally:
        disk.close()


# --- other request types ------------------------------------------------------------------


def test_flush(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    assert disk.request([(hdr(T_FLUSH), False), (1, True)])[:2] == (S_OK, 1)
    assert synced == [disk.raw.fd]
    assert disk.dev.counters.flushes == 1


@pytest.mark.parametrize("serial, expected", [("disk-0", b"disk-0" + bytes(14)), ("x" * 20, b"x" * 20)])
def test_get_id(image: tuple[Path, bytes], serial: str, expected: bytes) -> None:
    disk = Disk(image[0], serial=serial)
    try:
        assert disk.request([(hdr(T_GET_ID), False), (20, True), (1, True)]) == (S_OK, 21, expected)
    finally:
        disk.close()


def test_get_id_default_is_stable_and_short_buffers_fail(disk: Disk, image: tuple[Path, bytes]) -> None:
    status, length, ident = disk.request([(hdr(T_GET_ID), False), (20, True), (1, True)])
    assert (status, length) == (S_OK, 21)
    assert len(ident) == 20 and ident.isascii() and b"\0" not in ident
    assert disk.request([(hdr(T_GET_ID), False), (10, True), (1, True)])[:2] == (S_IOERR, 1)
    disk.close()
    with RawDisk(image[0], read_only=True) as raw:
        assert VirtioBlock(raw).serial == ident


@pytest.mark.parametrize("serial", ["x" * 21, "d\u00e9", "a\nb"])
def test_bad_serial(image: tuple[Path, bytes], serial: str) -> None:
    with RawDisk(image[0]) as raw, pytest.raises(ConfigError, match=r"disk image .*disk\.img: serial"):
        VirtioBlock(raw, serial=serial)


@pytest.mark.parametrize("kind, flags", [(T_DISCARD, 0), (T_WRITE_ZEROES, 0), (T_WRITE_ZEROES, F_UNMAP)])
def test_discard_and_write_zeroes(disk: Disk, image: tuple[Path, bytes], kind: int, flags: int) -> None:
    path, content = image
    status, length, _ = disk.request([(hdr(kind), False), (seg(8, 16, flags), False), (1, True)])
    assert (status, length) == (S_OK, 1)
    expected = bytearray(content)
    expected[8 * 512:24 * 512] = bytes(16 * 512)
    assert path.read_bytes() == expected
    assert disk.read(8, 16) == bytes(16 * 512)


def test_write_zeroes_without_fallocate(disk: Disk, image: tuple[Path, bytes],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system with neither holes nor zero ranges: the zeros are written."""
    modes: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(rawdisk, "fallocate", unsupported)
    monkeypatch.setattr(rawdisk, "ZERO_CHUNK", 4096)  # several chunks
    path, content = image
    assert disk.request([(hdr(T_WRITE_ZEROES), False), (seg(1, 20, F_UNMAP), False), (1, True)])[0] == S_OK
    assert modes == [rawdisk.FALLOC_FL_PUNCH_HOLE | rawdisk.FALLOC_FL_KEEP_SIZE,
                     rawdisk.FALLOC_FL_ZERO_RANGE | rawdisk.FALLOC_FL_KEEP_SIZE]
    assert path.read_bytes() == content[:512] + bytes(20 * 512) + content[21 * 512:]
    # A discard is only a hint: where holes are unsupported it succeeds and changes nothing.
    assert disk.request([(hdr(T_DISCARD), False), (seg(30, 2), False), (1, True)])[0] == S_OK
    assert path.read_bytes()[30 * 512:32 * 512] == content[30 * 512:32 * 512]


@pytest.mark.parametrize("kind, segment, expected", [
    (T_DISCARD, seg(0, 1, F_UNMAP), S_UNSUPP),  # 5.2.6.2: unmap is for write zeroes only
    (T_WRITE_ZEROES, seg(0, 1, 2), S_UNSUPP),  # an unknown flag
    (T_DISCARD, seg(SECTORS - 1, 2), S_IOERR),  # beyond capacity
    (T_WRITE_ZEROES, seg(2**64 - 1, 1), S_IOERR),
    (T_DISCARD, seg(0, 1) + seg(2, 1), S_IOERR),  # more than max_discard_seg
    (T_WRITE_ZEROES, seg(0, 1)[:12], S_IOERR),  # not a whole segment
    (T_DISCARD, b"", S_IOERR),
])
def test_bad_discard_and_write_zeroes(disk: Disk, image: tuple[Path, bytes], kind: int, segment: bytes,
                                      expected: int) -> None:
    parts = [(hdr(kind) + segment, False), (1, True)]
    assert disk.request(parts)[:2] == (expected, 1)
    assert image[0].read_bytes() == image[1]


# --- used lengths (2.7.8, 5.2.6) -----------------------------------------------------------


@pytest.mark.parametrize("parts, status, used", [
    # A read: its data and the status byte, however they are split over descriptors.
    ([(hdr(T_IN, 1), False), (1024, True), (1, True)], S_OK, 1025),
    ([(hdr(T_IN, 1), False), (100, True), (413, True)], S_OK, 513),
    ([(hdr(T_IN, 1), False), (0, True), (513, True)], S_OK, 513),
    # GET_ID: the id NUL-padded over the data part, and the status byte.
    ([(hdr(T_GET_ID), False), (21, True)], S_OK, 21),
    ([(hdr(T_GET_ID), False), (32, True), (1, True)], S_OK, 33),
    # Nothing but the status byte is written for these.
    ([(hdr(T_OUT, 1), False), (bytes(512), False), (1, True)], S_OK, 1),
    ([(hdr(T_FLUSH), False), (1, True)], S_OK, 1),
    ([(hdr(T_DISCARD), False), (seg(0, 8), False), (1, True)], S_OK, 1),
    ([(hdr(T_WRITE_ZEROES), False), (seg(0, 8, F_UNMAP), False), (1, True)], S_OK, 1),
    # An error or UNSUPP leaves the data part alone, however long it is.
    ([(hdr(T_IN, SECTORS), False), (512, True), (1, True)], S_IOERR, 1),
    ([(hdr(T_GET_ID), False), (19, True), (1, True)], S_IOERR, 1),
    ([(hdr(99), False), (4096, True), (1, True)], S_UNSUPP, 1),
])
def test_used_length_counts_the_bytes_written(disk: Disk, parts: Parts, status: int, used: int) -> None:
    got_status, got_used, data = disk.request(parts)
    assert (got_status, got_used) == (status, used)
    if status != S_OK:
        assert data == b"\xaa" * len(data)  # the device wrote none of it
    elif parts[0][0] == hdr(T_GET_ID):
        assert data == disk.dev.serial.ljust(len(data), b"\0")


def test_read_failing_halfway_counts_only_the_status(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some data landed before the host failed: it is undefined (5.2.6), so not counted."""
    device_path(monkeypatch)
    real = os.preadv
    calls: list[int] = []

    def half_then_eio(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.EIO, "I/O error")
        return real(fd, [buffers[0][:512]], offset)

    monkeypatch.setattr(os, "preadv", half_then_eio)
    assert disk.request([(hdr(T_IN), False), (1024, True), (1, True)])[:2] == (S_IOERR, 1)
    assert calls == [0, 512]


# --- driver mistakes ----------------------------------------------------------------------


@pytest.mark.parametrize("parts", [
    [(hdr(T_IN, SECTORS), False), (512, True), (1, True)],  # one past the end
    [(hdr(T_IN, SECTORS - 1), False), (1024, True), (1, True)],  # runs off the end
    [(hdr(T_IN, 2**64 - 1), False), (512, True), (1, True)],
    [(hdr(T_OUT, SECTORS), False), (bytes(512), False), (1, True)],
    [(hdr(T_OUT, 2**63), False), (bytes(512), False), (1, True)],
    [(hdr(T_IN), False), (100, True), (1, True)],  # not a multiple of 512
    [(hdr(T_OUT), False), (bytes(513), False), (1, True)],
    [(hdr(T_OUT), False), (bytes(512), False), (512, True), (1, True)],  # writable data for a write
    [(hdr(T_IN), False), (bytes(512), False), (512, True), (1, True)],  # readable data for a read
    [(hdr(T_IN)[:10], False), (512, True), (1, True)],  # header too short
    [(hdr(T_IN), False), (512, True)],  # no status descriptor: the last data byte is taken for it
    [(hdr(T_IN), False), (1, True), (bytes(512), False), (512, True)],  # readable after writable
])
def test_bad_requests_get_ioerr(disk: Disk, image: tuple[Path, bytes], parts: Parts) -> None:
    status, length, _ = disk.request(parts)
    # After an error the device wrote the status byte and nothing else: the used length is 1.
    assert (status, length) == (S_IOERR, 1)
    assert disk.dev.counters.errors == 1 and disk.dev.counters.host_errors == 0
    assert image[0].read_bytes() == image[1]
    assert disk.t.active
    assert disk.read(0, 1) == image[1][:512]  # and the device goes on


@pytest.mark.parametrize("kind", [2, 10, 14, 0x80000000, 0xFFFFFFFF])
def test_unknown_type_unsupported(disk: Disk, kind: int) -> None:
    assert disk.request([(hdr(kind), False), (512, True), (1, True)])[:2] == (S_UNSUPP, 1)
    assert disk.dev.counters.unsupported == 1


def test_read_only(image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = image
    before = os.stat(path)
    disk = Disk(path, read_only=True)

    def forbidden(*args: object) -> None:
        raise AssertionError("a read-only disk touched its file")

    for name in ("pwritev", "fdatasync"):
        monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(rawdisk, "fallocate", forbidden)
    try:
        for parts in ([(hdr(T_OUT, 1), False), (bytes(512), False), (1, True)],
                      [(hdr(T_DISCARD), False), (seg(0, 8), False), (1, True)],
                      [(hdr(T_WRITE_ZEROES), False), (seg(0, 8, F_UNMAP), False), (1, True)]):
            assert disk.request(parts)[:2] == (S_IOERR, 1)
        assert disk.request([(hdr(T_FLUSH), False), (1, True)])[0] == S_OK
        assert disk.read(1, 2) == content[512:1536]
    finally:
        disk.close()
    assert path.read_bytes() == content
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns


def test_no_status_byte_needs_reset(disk: Disk, image: tuple[Path, bytes]) -> None:
    # A good request first: it is still used and signalled.
    disk.submit([(hdr(T_IN), False), (512, True), (1, True)])
    disk.submit([(hdr(T_OUT), False), (bytes(512), False)])  # nothing device-writable at all
    disk.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert [n for _, n in disk.q.used()] == [513]
    assert disk.d.r(m.VIRTIO_MMIO_STATUS) & v.STATUS_DEVICE_NEEDS_RESET
    assert disk.d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS) == m.VIRTIO_MMIO_INT_VRING | m.VIRTIO_MMIO_INT_CONFIG
    assert "status" in disk.t.errors[0]
    assert image[0].read_bytes() == image[1]
    # Ignored until the driver resets; then the device works again.
    disk.submit([(hdr(T_IN), False), (512, True), (1, True)])
    disk.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert disk.q.used() == []
    disk.d.w(m.VIRTIO_MMIO_STATUS, 0)
    assert disk.dev.mem is None
    disk.q = disk.bring_up()
    assert disk.read(1, 1) == image[1][512:1024]


# --- host failures ------------------------------------------------------------------------


def test_enospc_is_ioerr(disk: Disk, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    device_path(monkeypatch)
    monkeypatch.setattr(os, "pwritev", full)
    assert disk.request([(hdr(T_OUT), False), (bytes(512), False), (1, True)])[:2] == (S_IOERR, 1)
    assert disk.request([(hdr(T_OUT), False), (bytes(512), False), (1, True)])[0] == S_IOERR
    c = disk.dev.counters
    assert (c.errors, c.host_errors, c.writes) == (2, 2, 0)
    assert "No space left" in (disk.dev.last_error or "")
    assert disk.t.active
    monkeypatch.undo()
    assert disk.request([(hdr(T_OUT), False), (bytes(512), False), (1, True)])[0] == S_OK


def test_eio_and_end_of_file_on_read(disk: Disk, image: tuple[Path, bytes],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    device_path(monkeypatch)
    monkeypatch.setattr(os, "preadv", eio)
    assert disk.request([(hdr(T_IN), False), (512, True), (1, True)])[:2] == (S_IOERR, 1)
    monkeypatch.undo()
    # Someone else truncated the image: a read past its new end is an error, not zeros.
    os.truncate(image[0], 1024)
    assert disk.request([(hdr(T_IN, 1), False), (1024, True), (1, True)])[:2] == (S_IOERR, 1)
    assert disk.dev.counters.host_errors == 2


def test_fallocate_failure_is_ioerr(disk: Disk, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(rawdisk, "fallocate", eio)
    for kind in (T_DISCARD, T_WRITE_ZEROES):
        assert disk.request([(hdr(kind), False), (seg(0, 8), False), (1, True)])[:2] == (S_IOERR, 1)
    c = disk.dev.counters
    assert (c.discards, c.write_zeroes, c.errors, c.host_errors) == (0, 0, 2, 2)
    monkeypatch.undo()
    for kind in (T_DISCARD, T_WRITE_ZEROES):
        assert disk.request([(hdr(kind), False), (seg(0, 8), False), (1, True)])[0] == S_OK
    assert (c.discards, c.write_zeroes) == (1, 1)


def test_short_transfers_are_resumed(disk: Disk, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short(real):  # type: ignore[no-untyped-def]
        def io(fd: int, buffers: list[memoryview], offset: int) -> int:
            first = buffers[0]
            return int(real(fd, [first[:max(1, len(first) // 3)]], offset))
        return io

    device_path(monkeypatch)
    monkeypatch.setattr(os, "preadv", short(real_preadv))
    monkeypatch.setattr(os, "pwritev", short(real_pwritev))
    data = Random(3).randbytes(2048)
    assert disk.request([(hdr(T_OUT, 2), False), (data[:700], False), (data[700:], False), (1, True)])[0] == S_OK
    assert disk.read(2, 4, split=[1000, 24]) == data
    assert image[0].read_bytes()[1024:3072] == data


# --- the disk belongs to its owner; counters ----------------------------------------------------


def test_device_does_not_close_its_disk(image: tuple[Path, bytes]) -> None:
    path, content = image
    disk = Disk(path)
    disk.d.w(m.VIRTIO_MMIO_STATUS, 0)  # a reset does not close the disk either
    assert not disk.raw.closed
    disk.q = disk.bring_up()
    assert disk.read(0, 1) == content[:512]
    disk.close()
    assert disk.raw.closed


def test_request_after_the_owner_closed_the_disk(disk: Disk) -> None:
    """The owner closed the disk too early: the guest gets a disk error, the VMM goes on."""
    disk.close()
    for parts in ([(hdr(T_IN), False), (512, True), (1, True)],
                  [(hdr(T_OUT), False), (bytes(512), False), (1, True)],
                  [(hdr(T_FLUSH), False), (1, True)],
                  [(hdr(T_DISCARD), False), (seg(0, 8), False), (1, True)]):
        assert disk.request(parts)[:2] == (S_IOERR, 1)
    assert disk.dev.counters.host_errors == 4
    assert "closed" in (disk.dev.last_error or "")
    assert disk.t.active


def test_stats(disk: Disk) -> None:
    assert disk.dev.stats() == {name: 0 for name in BlockCounters.__dataclass_fields__} | {
        "throttled": 0, "throttled_ms": 0}
    disk.read(0, 2)
    disk.request([(hdr(T_OUT, 4), False), (bytes(512), False), (1, True)])
    disk.request([(hdr(T_FLUSH), False), (1, True)])
    disk.request([(hdr(T_GET_ID), False), (20, True), (1, True)])
    disk.request([(hdr(T_DISCARD), False), (seg(0, 8), False), (1, True)])
    disk.request([(hdr(T_WRITE_ZEROES), False), (seg(0, 8), False), (1, True)])
    disk.request([(hdr(T_IN, SECTORS), False), (512, True), (1, True)])
    disk.request([(hdr(99), False), (1, True)])
    stats = disk.dev.stats()
    assert stats == {"reads": 1, "writes": 1, "flushes": 1, "discards": 1, "write_zeroes": 1, "get_ids": 1,
                     "bytes_read": 1024, "bytes_written": 512, "errors": 1, "host_errors": 0, "unsupported": 1,
                     "throttled": 0, "throttled_ms": 0}
    stats["reads"] = 99  # a copy: the device's counters are not the caller's to change
    assert disk.dev.counters.reads == 1


# --- O_DIRECT -------------------------------------------------------------------------------


def test_direct_io(image: tuple[Path, bytes]) -> None:
    """O_DIRECT wants aligned buffers: page-aligned guest RAM (an mmap) and 512-aligned descriptors."""
    path, content = image
    try:
        disk = Disk(path, direct=True, backing=mmap.mmap(-1, 1 << 20))
    except ConfigError as e:
        pytest.skip(str(e))
    try:
        q = disk.q
        data = Random(4).randbytes(1024)
        h, buf, status = q.alloc(16), q.alloc(1024, align=512), q.alloc(1)
        disk.mem.write(h, hdr(T_OUT, 3))
        disk.mem.write(buf, data)
        q.write_desc(0, h, 16, 1, 1)
        q.write_desc(1, buf, 1024, 1, 2)
        q.write_desc(2, status, 1, 2)
        q.offer(0)
        disk.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        assert disk.mem.read(status, 1) == bytes([S_OK])
        disk.mem.write(h, hdr(T_IN, 2))
        q.write_desc(1, buf, 1024, 3, 2)
        q.offer(0)
        disk.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        assert disk.mem.read(status, 1) == bytes([S_OK])
        assert disk.mem.read(buf, 1024) == content[1024:1536] + data[:512]
    finally:
        disk.close()
    assert path.read_bytes()[1536:2560] == data


# --- property: hostile request streams ------------------------------------------------------

KINDS = [T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 2, 10, 14, 0xFFFFFFFF]
CAP = 16
LENGTHS = [0, 1, 15, 16, 100, 511, 512, 512, 1024, 1536, 4096]
BOGUS = 0xDEAD_BEEF_0000


def _split(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=3)))
    return [stream[a:z] for a, z in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


@st.composite
def requests(draw: st.DrawFn) -> tuple[Parts, bool, list[int]]:
    """(parts, indirect, indices of zero-length parts to point outside guest memory):
    half well-formed requests split at random places (2.7.4), half hostile ones."""
    sector = draw(st.integers(0, CAP + 2) | st.sampled_from([2**64 - 1, 2**63, 2**32]))
    writable: list[int]
    if draw(st.booleans()):
        kind = draw(st.sampled_from(KINDS[:6]))
        sector = min(sector, CAP)
        count = draw(st.integers(0, max(0, min(4, CAP - sector))))
        header = hdr(kind, sector if kind in (T_IN, T_OUT) else 0)
        in_len = {T_IN: count * 512, T_GET_ID: 20}.get(kind, 0)
        payload = b""
        if kind == T_OUT:
            payload = draw(st.binary(min_size=count * 512, max_size=count * 512))
        elif kind in (T_DISCARD, T_WRITE_ZEROES):
            payload = seg(sector, count, draw(st.sampled_from([0, 1])) if kind == T_WRITE_ZEROES else 0)
        writable = [len(p) for p in _split(draw, bytes(in_len + 1))]
    else:
        kind = draw(st.sampled_from(KINDS))
        header = hdr(kind, sector, draw(st.integers(0, 2**32 - 1)))
        header = header[:draw(st.sampled_from([16, 16, 16, 0, 8, 15]))]
        if kind in (T_DISCARD, T_WRITE_ZEROES) and draw(st.booleans()):
            count = draw(st.integers(0, CAP + 1) | st.just(2**32 - 1))
            payload = seg(draw(st.integers(0, CAP + 1)), count, draw(st.sampled_from([0, 0, 1, 2, 0x80000000])))
            payload *= draw(st.sampled_from([1, 1, 1, 2]))
        elif kind == T_OUT and draw(st.booleans()):
            payload = draw(st.binary(min_size=512, max_size=512)) * draw(st.integers(0, 3))
        else:
            payload = bytes(draw(st.sampled_from(LENGTHS)))
        writable = draw(st.lists(st.sampled_from(LENGTHS), max_size=3))
        writable += draw(st.sampled_from([[1], [1], [1], [], [0], [1, 0]]))  # the status, or not
    parts: list[tuple[bytes | int, bool]] = [(r, False) for r in _split(draw, header + payload)]
    parts += [(n, True) for n in writable]
    if draw(st.integers(0, 9)) == 0:  # a readable part after the writable ones
        parts.append(parts.pop(0))
    parts = [p for p in parts if p[0] or draw(st.booleans())] or [(b"", False)]
    bogus = [i for i, (p, _) in enumerate(parts) if p in (b"", 0) and draw(st.booleans())]
    return parts, draw(st.booleans()), bogus


def check_request(dev: VirtioBlock, mem: GuestMemory, model: bytearray,
                  buffers: list[tuple[int, int, bool]], used_len: int) -> None:
    """What the device answered must follow from the request alone; a write must land where asked."""
    out = b"".join(mem.read(a, n) for a, n, w in buffers if not w)
    writable = b"".join(mem.read(a, n) for a, n, w in buffers if w)
    status = writable[-1]
    assert status in (S_OK, S_IOERR, S_UNSUPP)
    if status != S_OK:
        assert used_len == 1  # the status byte alone
        return
    assert len(out) >= 16
    kind, _, sector = OUTHDR.unpack(out[:16])
    # Data and status for a read or GET_ID (all of the writable part), else the status byte alone.
    assert used_len == (len(writable) if kind in (T_IN, T_GET_ID) else 1)
    data = out[16:]
    if kind == T_IN:
        assert not data
        assert writable[:-1] == model[sector * 512:sector * 512 + len(writable) - 1]
        assert (sector * 512 + len(writable) - 1) <= len(model)
    elif kind == T_OUT:
        assert len(data) % 512 == 0 and sector * 512 + len(data) <= len(model)
        model[sector * 512:sector * 512 + len(data)] = data
    elif kind in (T_DISCARD, T_WRITE_ZEROES):
        assert len(data) == 16
        start, count, flags = SEGMENT.unpack(data)
        assert start + count <= CAP and flags in ((0, 1) if kind == T_WRITE_ZEROES else (0,))
        model[start * 512:(start + count) * 512] = bytes(count * 512)
    elif kind == T_GET_ID:
        assert writable[:-1] == dev.serial.ljust(len(writable) - 1, b"\0")
    else:
        assert kind == T_FLUSH


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.lists(requests(), min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_hostile_request_streams(stream: list[tuple[Parts, bool, list[int]]], seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        model = bytearray(make_image(path, CAP * 512, seed))
        backing = bytearray(0x40000)
        mem = GuestMemory([(0, backing)])
        signals: list[int] = []
        with RawDisk(path) as raw:
            dev = VirtioBlock(raw, serial="prop")

            def fresh() -> VirtqDriver:
                q = VirtqDriver.create(mem, 16, base=0x1000, data=(0x2000, 0x40000))
                dev.activate(mem, [make_queue(q)], 0, signals.append)
                return q

            q = fresh()
            for parts, indirect, bogus in stream:
                head = q.add_indirect_chain(parts) if indirect else q.add_chain(parts)
                buffers = q.buffers[head]
                if not indirect:
                    for i in bogus:
                        addr, _, flags, nxt = q.read_desc(q.chains[head][i])
                        q.write_desc(q.chains[head][i], BOGUS, 0, flags, nxt)
                for addr, n, w in buffers:
                    if w:
                        mem.fill(addr, n, 0xAA)
                before = bytearray(backing)
                try:
                    dev.process(0)
                except QueueError:
                    assert not any(n for _, n, w in buffers if w)  # only a chain with no status byte
                    q = fresh()
                    continue
                # Nothing in guest memory changed but the chain's writable buffers and the used ring.
                for addr, n, w in [*buffers, (q.used_ring, used_ring_size(q.size), True)]:
                    if w:
                        before[addr:addr + n] = backing[addr:addr + n]
                assert before == backing
                used = q.used()
                assert [h for h, _ in used] == [head]
                check_request(dev, mem, model, buffers, used[0][1])
                assert os.path.getsize(path) == CAP * 512
                assert path.read_bytes() == model


# --- reads and writes in the queue (Queue.serve_block_io) -----------------------------------


def test_a_mixed_batch_is_served_whole_in_one_notification(image: tuple[Path, bytes]) -> None:
    """Reads and writes go through the queue, the rest through the device's path, in the
    driver's order, all in one notification; each counted once."""
    disk = Disk(image[0], queue_size=32)
    data = Random(5).randbytes(1024)
    parts: list[Parts] = [
        [(hdr(T_IN, 1), False), (512, True), (1, True)],
        [(hdr(T_OUT, 4), False), (data, False), (1, True)],
        [(hdr(T_FLUSH), False), (1, True)],
        [(hdr(T_IN, SECTORS), False), (512, True), (1, True)],  # past the end: IOERR
        [(hdr(T_GET_ID), False), (20, True), (1, True)],
        [(hdr(T_OUT, 8), False), (data[:512], False), (1, True)],
    ]
    heads = [disk.submit(p)[0] for p in parts]
    disk.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    used = disk.q.used()
    assert [h for h, _ in used] == heads
    assert [n for _, n in used] == [513, 1, 1, 1, 21, 1]
    c = disk.dev.counters
    assert (c.reads, c.writes, c.flushes, c.get_ids, c.errors) == (1, 2, 1, 1, 1)
    assert (c.bytes_read, c.bytes_written) == (512, 1536)
    content = image[0].read_bytes()
    assert content[4 * 512:6 * 512] == data and content[8 * 512:9 * 512] == data[:512]
    assert disk.irq.count >= 1 and disk.t.active
    disk.close()


def test_requests_a_rate_limit_or_a_recording_disk_must_see_skip_the_queues_path(
        image: tuple[Path, bytes], tmp_path: Path, blk_path: str) -> None:
    from microvm.backends.recording import RecordingDisk
    from microvm.ratelimit import RateLimit, TokenBucket

    plain = RawDisk(image[0])
    (tmp_path / "copy.img").write_bytes(image[1])
    recording = RecordingDisk(tmp_path / "copy.img", tmp_path / "log")
    try:
        assert VirtioBlock(plain)._direct_fd() == (plain.fd if blk_path == "queue" else -1)
        assert VirtioBlock(recording)._direct_fd() == -1  # it logs each write
        limited = VirtioBlock(plain, rate_limit=RateLimit(ops=TokenBucket(100, 1.0)))
        assert limited._direct_fd() == -1  # each request is counted against the limit
    finally:
        plain.close()
        recording.close()
    assert VirtioBlock(plain)._direct_fd() == -1  # closed
