"""Queue.serve_block_io, virtio-blk's reads and writes served in the queue: the
Cython queue against PyQueue, the reference, on the same requests, and both
against the rules of the device's own path (VirtioBlock._request), which
serves whatever the queue declines.

Requests are built near the edges of what the queue serves: header types
around IN and OUT, sectors at the capacity, lengths off the sector size, a
header split over buffers, buffers of the wrong kind, one data buffer more
than seg_max, a status byte shared with data. Both queues must serve and
decline the same ones, write the same guest memory and the same image."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm.devices.virtio.queue import PyQueue
from microvm.memory import GuestMemory
from tests.support.virtio_driver import VirtqDriver, make_queue

CQueue = pytest.importorskip("microvm._virtq").Queue
OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr (include/uapi/linux/virtio_blk.h)
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
SECTORS = 64
IMAGE = Random("block-io image").randbytes(SECTORS * 512)
Parts = Sequence[tuple[bytes | int, bool]]


def hdr(kind: int, sector: int = 0) -> bytes:
    return OUTHDR.pack(kind, 0, sector)


@pytest.fixture
def image_fd() -> Iterator[int]:
    fd = os.memfd_create("disk", os.MFD_CLOEXEC)
    os.write(fd, IMAGE)
    yield fd
    os.close(fd)


def serve(queue_class: type, chains: Sequence[Parts], *, capacity: int = SECTORS, seg_max: int = 8,
          read_only: bool = False, fd: int | None = None) -> tuple[object, list[tuple[int, int]], bytes, bytes]:
    """Offer `chains` on a fresh ring, one serve_block_io over them: (its result or
    its error, the used elements, guest memory, the image)."""
    own = fd is None
    if fd is None:
        fd = os.memfd_create("disk", os.MFD_CLOEXEC)
        os.write(fd, IMAGE)
    try:
        mem = GuestMemory([(0, bytearray(1 << 18))])
        driver = VirtqDriver.create(mem, 64, data=(0x8000, 0x40000))
        for parts in chains:
            head = driver.add_chain(parts)
            for addr, length, writable in driver.buffers[head]:
                if writable:
                    mem.fill(addr, length, 0xAA)
        queue = make_queue(driver, queue_class=queue_class)
        try:
            result: object = queue.serve_block_io(fd, capacity, seg_max, read_only)
        except Exception as e:  # compared, not judged
            result = (type(e).__name__, str(e))
        return result, driver.used(), mem.read(0, 1 << 18), os.pread(fd, 1 << 16, 0)
    finally:
        if own:
            os.close(fd)


def both(chains: Sequence[Parts], **kwargs: object) -> tuple[object, list[tuple[int, int]], bytes, bytes]:
    py, c = serve(PyQueue, chains, **kwargs), serve(CQueue, chains, **kwargs)  # type: ignore[arg-type]
    for what, a, b in zip(("result", "used", "guest memory", "image"), py, c, strict=True):
        assert a == b, f"the queues differ in {what}"
    return py


def test_reads_and_writes_are_served_with_the_devices_used_lengths() -> None:
    data = bytes(range(256)) * 4
    result, used, mem, image = both([
        [(hdr(T_IN, 2), False), (1024, True), (1, True)],
        [(hdr(T_OUT, 5), False), (data[:300], False), (data[300:], False), (1, True)],
        [(hdr(T_IN, 0), False), (700, True), (325, True)],  # the status byte at the end of the last buffer
    ])
    assert result == (3, 2, 2048, 1, 1024, False)
    assert [n for _, n in used] == [1025, 1, 1025]  # a read: its data and the status byte; a write: the status
    assert IMAGE[:700] in mem and IMAGE[700:1024] + b"\x00" in mem  # the last buffer: data, then the status
    assert image[5 * 512:7 * 512] == data and image[:5 * 512] == IMAGE[:5 * 512]


def test_a_read_lands_in_guest_memory_and_the_status_is_ok(image_fd: int) -> None:
    mem_before = serve(CQueue, [[(hdr(T_IN, 3), False), (512, True), (1, True)]], fd=image_fd)[2]
    assert IMAGE[3 * 512:4 * 512] in mem_before
    assert IMAGE[3 * 512:4 * 512] + b"\x00" in mem_before  # data, then the status byte: OK


@pytest.mark.parametrize("chain", [
    [(hdr(T_FLUSH), False), (1, True)],  # not a read or a write
    [(hdr(T_GET_ID), False), (20, True), (1, True)],
    [(hdr(99), False), (512, True), (1, True)],
    [(hdr(T_IN, SECTORS), False), (512, True), (1, True)],  # past the end
    [(hdr(T_IN, SECTORS - 1), False), (1024, True), (1, True)],
    [(hdr(T_IN, (1 << 64) - 1), False), (512, True), (1, True)],  # a sector that would wrap around
    [(hdr(T_IN), False), (511, True), (1, True)],  # not whole sectors
    [(hdr(T_OUT), False), (bytes(100), False), (1, True)],
    [(hdr(T_IN)[:8], False), (hdr(T_IN)[8:], False), (512, True), (1, True)],  # a split header
    [(hdr(T_IN) + bytes(512), False), (1, True)],  # a read with data to write
    [(hdr(T_OUT), False), (bytes(512), False), (2, True)],  # a write with room for more than its status
    [(hdr(T_OUT), False), (bytes(512), False)],  # no status byte: the device's path raises QueueError
    [(512, True), (1, True)],  # no header
    [(hdr(T_IN)[:15], False), (512, True), (1, True)],  # a header cut short
    [(hdr(T_IN), False), (512, True), (b"x", False)],  # device-readable after device-writable
    [(hdr(T_IN), False)] + [(512, True)] * 9 + [(1, True)],  # one data buffer more than seg_max (8)
])
def test_what_the_device_answers_itself_is_declined(chain: Parts) -> None:
    result, used, _mem, image = both([chain])
    assert result == (0, 0, 0, 0, 0, True) and used == [] and image == IMAGE


def test_a_declined_request_stops_the_batch_and_stays_available() -> None:
    chains: list[Parts] = [[(hdr(T_IN, 1), False), (512, True), (1, True)],
                           [(hdr(T_FLUSH), False), (1, True)],
                           [(hdr(T_IN, 2), False), (512, True), (1, True)]]
    for queue_class in (PyQueue, CQueue):
        mem = GuestMemory([(0, bytearray(1 << 18))])
        driver = VirtqDriver.create(mem, 64, data=(0x8000, 0x40000))
        heads = [driver.add_chain(parts) for parts in chains]
        queue = make_queue(driver, queue_class=queue_class)
        fd = os.memfd_create("disk", os.MFD_CLOEXEC)
        try:
            os.write(fd, IMAGE)
            assert queue.serve_block_io(fd, SECTORS, 8, False) == (1, 1, 512, 0, 0, True)
            chain = queue.pop()  # the declined one, for the device's own path
            assert chain is not None and chain.head == heads[1]
            queue.add_used(chain.head, 1)
            assert queue.serve_block_io(fd, SECTORS, 8, False) == (1, 1, 512, 0, 0, False)
        finally:
            os.close(fd)
        assert [h for h, _ in driver.used()] == heads
        assert queue.chains_popped == 3 and queue.used_added == 3


def test_read_only_declines_writes_and_serves_reads() -> None:
    result, _used, _mem, image = both([[(hdr(T_IN, 1), False), (512, True), (1, True)],
                                      [(hdr(T_OUT, 1), False), (bytes(512), False), (1, True)]], read_only=True)
    assert result == (1, 1, 512, 0, 0, True) and image == IMAGE


def test_a_short_or_failed_transfer_is_declined() -> None:
    # The image is shorter than the capacity says (truncated under us): the read comes up short.
    result, used, _mem, _image = both([[(hdr(T_IN, SECTORS - 1), False), (1024, True), (1, True)]],
                                      capacity=SECTORS + 1)
    assert result == (0, 0, 0, 0, 0, True) and used == []
    # A write to a descriptor that refuses it (opened read-only): EBADF.
    path = f"/proc/self/fd/{os.memfd_create('ro', os.MFD_CLOEXEC)}"
    fd = os.open(path, os.O_RDONLY)
    try:
        result, used, _mem, _image = both([[(hdr(T_OUT), False), (bytes(512), False), (1, True)]], fd=fd)
    finally:
        os.close(fd)
    assert result == (0, 0, 0, 0, 0, True) and used == []


def test_an_empty_read_is_served() -> None:
    """A read of no sectors: the device's path answers OK with the status byte alone."""
    result, used, _mem, _image = both([[(hdr(T_IN, SECTORS), False), (1, True)]])
    assert result == (1, 1, 0, 0, 0, False) and [n for _, n in used] == [1]


def test_a_broken_chain_raises_after_publishing_what_was_served() -> None:
    mem = GuestMemory([(0, bytearray(1 << 18))])
    for queue_class in (PyQueue, CQueue):
        driver = VirtqDriver.create(mem, 64, data=(0x8000, 0x40000))
        good = driver.add_chain([(hdr(T_IN), False), (512, True), (1, True)])
        bad = driver.add_chain([(hdr(T_IN), False), (512, True), (1, True)])
        _addr, _len, flags, nxt = driver.read_desc(bad)
        driver.write_desc(bad, 1 << 30, 16, flags, nxt)  # outside guest memory
        queue = make_queue(driver, queue_class=queue_class)
        fd = os.memfd_create("disk", os.MFD_CLOEXEC)
        try:
            os.write(fd, IMAGE)
            with pytest.raises(Exception, match="outside guest memory"):
                queue.serve_block_io(fd, SECTORS, 8, False)
        finally:
            os.close(fd)
        assert [h for h, _ in driver.used()] == [good]


# --- near-valid requests, drawn -----------------------------------------------------------


class Choices:
    """Where a request's choices come from: hypothesis' draw, or a seeded Random."""

    def __init__(self, draw: st.DrawFn | None = None, rng: Random | None = None):
        self.draw, self.rng = draw, rng

    def pick(self, options: Sequence[object]) -> object:
        return self.draw(st.sampled_from(options)) if self.draw else self.rng.choice(options)  # type: ignore[union-attr]

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi)) if self.draw else self.rng.randint(lo, hi)  # type: ignore[union-attr]


def near_valid(c: Choices) -> Parts:
    """A read or a write the queue serves, or (one time in three) one mistake away from it."""
    kind = c.pick([T_IN, T_OUT])
    lengths = [c.pick([512, 1024, 4096]) for _ in range(c.integer(0, 3))]
    sector = c.integer(0, SECTORS - sum(lengths) // 512)
    parts: list[tuple[bytes | int, bool]] = [(hdr(kind, sector), False)]  # type: ignore[arg-type]
    if kind == T_OUT:
        parts += [(bytes([i + 1]) * n, False) for i, n in enumerate(lengths)]
        parts.append((1, True))
    elif lengths and c.integer(0, 1):
        parts += [(n, True) for n in lengths[:-1]] + [(lengths[-1] + 1, True)]  # the status shares a buffer
    else:
        parts += [(n, True) for n in lengths] + [(1, True)]
    mistake = c.integer(0, 2) == 0 and c.pick(["split header", "type", "past the end", "odd length",
                                                "readable after writable", "long status", "segments"])
    if mistake == "split header":
        at = c.integer(1, 15)
        parts[0:1] = [(hdr(kind, sector)[:at], False), (hdr(kind, sector)[at:], False)]
    elif mistake == "type":
        parts[0] = (hdr(c.pick([T_FLUSH, T_GET_ID, 2, 1 << 31]), sector), False)  # type: ignore[arg-type]
    elif mistake == "past the end":
        parts[0] = (hdr(kind, SECTORS - c.integer(0, 1)), False)
    elif mistake == "odd length":
        i = c.integer(1, len(parts) - 1)
        part, writable = parts[i]
        parts[i] = ((part + b"x") if isinstance(part, bytes) else part + 1, writable)
    elif mistake == "readable after writable":
        parts.append((b"r", False))
    elif mistake == "long status":
        parts[-1] = (2, True)
    elif mistake == "segments":
        parts[1:1] = [(512, kind == T_IN) if kind == T_IN else (bytes(512), False)] * 7  # past seg_max
    return parts


@st.composite
def requests(draw: st.DrawFn) -> Parts:
    return near_valid(Choices(draw=draw))


@settings(max_examples=max(300, settings.default.max_examples), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chains=st.lists(requests(), min_size=1, max_size=6), seg_max=st.integers(1, 8), read_only=st.booleans())
def test_both_queues_agree_on_near_valid_requests(chains: list[Parts], seg_max: int, read_only: bool) -> None:
    result, used, _mem, _image = both(chains, seg_max=seg_max, read_only=read_only)
    if isinstance(result, tuple) and len(result) == 6:
        served, reads, _nread, writes, _nwritten, declined = result
        assert served == len(used) == reads + writes
        assert declined or served == len(chains)


def test_near_valid_requests_are_served_and_declined_alike() -> None:
    """The requests drawn above reach both ends: served, and declined after some were served."""
    rng = Random("near-valid")
    results = [both([near_valid(Choices(rng=rng)) for _ in range(rng.randint(1, 6))])[0] for _ in range(300)]
    served = sum(r[0] for r in results)  # type: ignore[index]
    declined_after_some = sum(bool(r[5] and r[0]) for r in results)  # type: ignore[index]
    assert served > 300 and declined_after_some > 30, (served, declined_after_some)
