"""Queue.receive_frames, virtio-net's receive loop in the queue: the Cython
queue against PyQueue, the reference, on the same receive buffers and the
same frames from a tap (a SOCK_SEQPACKET pair: one record per frame).

Rings and frames are drawn near the edges of what the loop takes: buffers
around the largest frame, a first buffer shorter than the header, a buffer
the device may not write, frames around the shortest and longest, headers
with offloads the driver did or did not negotiate, with and without
GUEST_CSUM. Both queues must take and leave the same frames, write the same
guest memory and leave the same frame for the device to finish."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm.devices.virtio import net_abi
from microvm.devices.virtio.queue import PyQueue, QueueError
from microvm.memory import GuestMemory
from tests.support.virtio_driver import VirtqDriver, make_queue

CQueue = pytest.importorskip("microvm._virtq").Queue
Parts = Sequence[tuple[bytes | int, bool]]
MIN_FRAME = 26  # a header and an Ethernet header, as virtio-net asks
FLAGS = (0, 0, net_abi.VIRTIO_NET_HDR_F_DATA_VALID, net_abi.VIRTIO_NET_HDR_F_NEEDS_CSUM)
GSO = (0, 0, 0, 0, 0, 0, net_abi.VIRTIO_NET_HDR_GSO_TCPV4, net_abi.VIRTIO_NET_HDR_GSO_TCPV6, 0x81, 0x80, 3)


def receive(queue_class: type, chains: Sequence[Parts], frames: Sequence[bytes], max_frame: int, most: int,
            accepted: bytes, csum: bool) -> tuple[object, list[tuple[int, int]], bytes, bytes, int]:
    """Offer `chains`, send `frames`, call receive_frames until it stops short of
    a frame: (its results, the used elements, guest memory, what the reserved
    buffers start with, the frames left unread)."""
    mem = GuestMemory([(0, bytearray(1 << 18))])
    driver = VirtqDriver.create(mem, 64, data=(0x8000, 0x40000))
    for parts in chains:
        driver.add_chain(parts)
    queue = make_queue(driver, queue_class=queue_class)
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        reader.setblocking(False)
        for f in frames:
            writer.send(f)
        results: list[object] = []
        for _ in range(len(frames) + 1):
            frames_, chains_, nbytes, stop = queue.receive_frames(reader.fileno(), max_frame, MIN_FRAME, most,
                                                                  accepted, csum)
            results.append((frames_, chains_, nbytes, str(stop) if isinstance(stop, QueueError) else stop))
            if not isinstance(stop, int) or stop < 0:
                break
            queue.use_reserved(min(stop, queue.reserve(0, 1, 0)))  # the device finishes (or drops) it
        head = bytes(queue.peek_reserved(12)) if queue.reserved else b""
        left = 0
        try:
            while reader.recv(1 << 16):
                left += 1
        except BlockingIOError:
            pass
        return results, driver.used(), mem.read(0, 1 << 18), head, left
    finally:
        reader.close()
        writer.close()


def both(*args: object) -> tuple[object, list[tuple[int, int]], bytes, bytes, int]:
    py, c = receive(PyQueue, *args), receive(CQueue, *args)  # type: ignore[arg-type]
    for what, a, b in zip(("results", "used", "guest memory", "reserved head", "frames left"), py, c, strict=True):
        assert a == b, f"the queues differ in {what}"
    return py


def draw(rng: Random) -> tuple[list[Parts], list[bytes], int, int, bytes, bool]:
    """Receive buffers and frames near the edges (see the module docstring)."""
    max_frame = rng.choice((40, 64, 100, 300))
    chains: list[Parts] = []
    for _ in range(rng.randint(0, 24)):
        first = rng.choice((8, 12, 32, 64, 64, max_frame, max_frame + 1, max_frame + 1))
        parts: list[tuple[bytes | int, bool]] = [(first, True)]
        if rng.random() < 0.3:
            parts.append((rng.randint(1, 80), True))
        if rng.random() < 0.01:
            parts.insert(0, (b"out", False))  # the device may not write it: a broken receive buffer
        chains.append(parts)
    frames = []
    for _ in range(rng.randint(0, 6)):
        length = rng.choice((MIN_FRAME - 1, MIN_FRAME, 60, max_frame - 1, max_frame, max_frame + 1,
                             rng.randint(12, max_frame + 20)))
        header = bytes([rng.choice(FLAGS), rng.choice(GSO)]) + rng.randbytes(10)
        frames.append((header + rng.randbytes(max(length, 12) - 12))[:max(length, 1)])
    accepted = net_abi.gso_accepted(rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5)
    return chains, frames, max_frame, rng.choice((1, 2, 4, 64)), accepted, rng.random() < 0.7


def test_the_queues_agree_on_seeded_rings() -> None:
    took = stopped = 0
    for seed in range(400):
        results, *_ = both(*draw(Random(f"receive:{seed}")))
        assert isinstance(results, list)
        took += sum(r[0] for r in results)
        stopped += sum(isinstance(r[3], int) and r[3] >= 0 for r in results)
    assert took > 150 and stopped > 150, (took, stopped)  # frames taken, and frames left for the device


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(seed=st.integers(0, 1 << 32))
def test_the_queues_agree(seed: int) -> None:
    both(*draw(Random(seed)))


def test_a_frame_is_taken_whole_or_left() -> None:
    """Two buffers of 32 for a 64-byte limit: a 50-byte frame takes both, and
    num_buffers says so; a frame with an offload not negotiated stays."""
    frame = bytes([0, 0]) + bytes(10) + bytes(range(38))
    tso = bytes([0, net_abi.VIRTIO_NET_HDR_GSO_TCPV4]) + bytes(10) + bytes(30)
    results, used, _mem, _head, left = both([[(32, True)]] * 5, [frame, tso], 60, 8,
                                            net_abi.gso_accepted(False, False, False), True)
    # the first frame, then the TSO frame (42 bytes) left for the device (the harness
    # gives it back as the device would), then one buffer: too little room for 60
    assert results == [(1, 2, 50, 42), (0, 0, 0, None)]
    assert used == [(0, 32), (1, 18), (2, 32), (3, 10)] and left == 0
