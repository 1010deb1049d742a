"""Hand-made first inputs for the fuzz targets: a well-formed request for each
virtio device (so mutation starts inside request parsing, not at the door)
and a valid kernel for the loader. tests/fuzz/run.py puts them in a corpus
that lacks them (seed-*)."""

from __future__ import annotations

import struct

DATA = 0x8000  # where the seeds' buffers are


def _op(n: int) -> bytes:
    return bytes([n])


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def setup(queues: int) -> bytes:
    """_setup(): every offered feature (then masked by the device), queues of 16."""
    return _op(0) + _u32(0xFFFFFFFF) + _u32(0xFFFFFFFF) + bytes([3]) * queues


def ring_write(queues: int, offset: int, data: bytes) -> bytes:
    """op 1: data at RINGS + offset (at most 16 bytes a step)."""
    out = b""
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        out += _op(1) + _u32(offset + i) + bytes([len(chunk) - 1]) + chunk
    return out


def ram_write(addr: int, data: bytes) -> bytes:
    """op 6: data at addr (at most 64 bytes a step)."""
    out = b""
    for i in range(0, len(data), 64):
        chunk = data[i:i + 64]
        out += _op(6) + _u32(addr + i) + bytes([len(chunk) - 1]) + chunk
    return out


def chain(queues: int, q: int, descs: list[tuple[int, int, int]]) -> bytes:
    """Descriptors (addr, len, flags) chained in order on queue q, and one avail entry for the head."""
    table = b"".join(struct.pack("<QIHH", a, n, f | (1 if i < len(descs) - 1 else 0), i + 1)
                     for i, (a, n, f) in enumerate(descs))
    avail = struct.pack("<HHH", 0, 1, 0)
    return ring_write(queues, q * 0x1000, table) + ring_write(queues, q * 0x1000 + 0x400, avail)


def notify(queues: int, q: int) -> bytes:
    return _op(3) + bytes([q])


WRITE = 2


def virtio_blk() -> list[bytes]:
    header = struct.pack("<IIQ", 0, 0, 1)  # IN, sector 1
    read = (setup(1) + ram_write(DATA, header)
            + chain(1, 0, [(DATA, 16, 0), (DATA + 0x100, 512, WRITE), (DATA + 0x400, 1, WRITE)]) + notify(1, 0))
    write = (setup(1) + ram_write(DATA, struct.pack("<IIQ", 1, 0, 2)) + ram_write(DATA + 0x100, b"x" * 64)
             + chain(1, 0, [(DATA, 16, 0), (DATA + 0x100, 512, 0), (DATA + 0x400, 1, WRITE)]) + notify(1, 0))
    return [read, write]


def virtio_net() -> list[bytes]:
    frame = bytes(12) + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + b"payload!" * 4
    tx = setup(2) + ram_write(DATA, frame) + chain(2, 1, [(DATA, len(frame), 0)]) + notify(2, 1)
    rx = setup(2) + chain(2, 0, [(DATA, 2048, WRITE)]) + _op(7) + _u32(len(frame)) + frame + notify(2, 0)
    return [tx, rx]


def virtio_console() -> list[bytes]:
    out = setup(2) + ram_write(DATA, b"hello") + chain(2, 1, [(DATA, 5, 0)]) + notify(2, 1)
    return [out]


def virtio_rng() -> list[bytes]:
    return [setup(1) + chain(1, 0, [(DATA, 64, WRITE)]) + notify(1, 0)]


def virtio_vsock() -> list[bytes]:
    """A guest's connection request to host port 1234, with receive and event buffers posted."""
    hdr = struct.pack("<QQIIIHHIII", 3, 2, 5000, 1234, 0, 1, 1, 0, 65536, 0)  # REQUEST, stream
    return [setup(3) + chain(3, 0, [(DATA + 0x1000, 4096, WRITE)]) + chain(3, 2, [(DATA + 0x2000, 8, WRITE)])
            + ram_write(DATA, hdr) + chain(3, 1, [(DATA, len(hdr), 0)]) + notify(3, 1) + notify(3, 0)]


def loader() -> list[bytes]:
    from microvm.benchmarks.startup import tiny_kernel

    return [tiny_kernel(), tiny_kernel() + b"\n--initrd--\n" + b"070701" + bytes(104)]


SEEDS = {"virtio_blk": virtio_blk, "virtio_net": virtio_net, "virtio_console": virtio_console,
         "virtio_rng": virtio_rng, "virtio_vsock": virtio_vsock, "loader": loader}
