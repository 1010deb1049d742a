"""Coverage-guided fuzz targets (atheris): every device's register interface,
each virtio device's request parsing behind its transport, the loader and the
agent protocol. tests/fuzz/run.py runs one; tests/unit/test_fuzz.py runs each
briefly over its corpus (tests/fuzz/corpus/TARGET).

A target takes the fuzzer's bytes and must end without an exception, but for
the errors its interface promises (a LoaderError for a bad kernel, a
ProtocolError for a bad frame). The virtio targets are a guest in bytes: each
step sets the device up as a driver would, writes or reads a register,
scribbles into the rings, notifies a queue, or (net) sends a frame from the
host; guest mistakes must end in the device's own answers (needs-reset, an
I/O error, a drop), never in an exception out of the transport.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microvm.agent.protocol import FrameReader, ProtocolError
from microvm.backends.disk import RawDisk
from microvm.devices.control import ControlDevice
from microvm.devices.i8042 import I8042
from microvm.devices.serial import Serial
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio.block import VirtioBlock
from microvm.devices.virtio.console import VirtioConsole
from microvm.devices.virtio.net import VirtioNet
from microvm.devices.virtio.rng import VirtioRng
from microvm.errors import LoaderError
from microvm.loader import load_linux
from microvm.memory import GuestMemory
from tests.support.fakes import FakeTap

# The devices log a guest's mistakes (sparingly, but a fuzzer makes millions): the fuzzing
# process (run.py) and the replay test turn logging off, never an import of this module:
# that would silence every later test of the same pytest process.

MEM = 1 << 18  # 256 KiB of guest RAM for the virtio targets
RINGS = 0x1000  # queue q's ring: desc at RINGS + q * 0x1000, avail +0x400, used +0x800
MAX_STEPS = 64


class Bytes:
    """The fuzzer's input as a stream of choices (atheris' FuzzedDataProvider, or
    a plain reader of the same shape for replaying a corpus without atheris)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def int(self, nbytes: int) -> int:
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "little")

    def below(self, n: int) -> int:
        return self.int(1 if n <= 256 else 4) % n

    def bytes(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


class Irq:
    def trigger(self) -> None:
        pass


# --- the legacy devices: registers -----------------------------------------------------------


def _registers(device: Any, width: int, data: bytes) -> None:
    b = Bytes(data)
    while b.left() > 0:
        offset, op = b.below(width), b.below(3)
        if op == 0:
            device.read(offset, 1)
        else:
            device.write(offset, 1, b.int(1))


def serial(data: bytes) -> None:
    _registers(Serial(Irq(), lambda _: None), 8, data)


def i8042(data: bytes) -> None:
    data_port, command_port = I8042(lambda: None).ports()
    b = Bytes(data)
    while b.left() > 0:
        port = data_port if b.below(2) else command_port
        if b.below(2):
            port.read(0, 1)
        else:
            port.write(0, 1, b.int(1))


def control(data: bytes) -> None:
    dev = ControlDevice(lambda _: None, lambda _: None, lambda _: None, lambda _: None)
    b = Bytes(data)
    while b.left() > 0:
        offset, size = b.below(0x40) & ~3, (1, 2, 4, 8)[b.below(4)]
        if b.below(2):
            dev.read(offset, size)
        else:
            dev.write(offset, size, b.int(size))


# --- virtio devices behind their transport -------------------------------------------------------


def _setup(t: m.MmioTransport, queues: int, b: Bytes) -> None:
    """What a driver does: status steps, features (a part of what the device
    offers, VERSION_1 kept), each queue in its ring area, DRIVER_OK."""
    w = t.write
    w(m.VIRTIO_MMIO_STATUS, 4, 0)
    w(m.VIRTIO_MMIO_STATUS, 4, 1)
    w(m.VIRTIO_MMIO_STATUS, 4, 3)
    for sel in (0, 1):
        w(m.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 4, sel)
        offered = t.read(m.VIRTIO_MMIO_DEVICE_FEATURES, 4)
        w(m.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 4, sel)
        w(m.VIRTIO_MMIO_DRIVER_FEATURES, 4, offered & (b.int(4) | (1 if sel else 0)))
    w(m.VIRTIO_MMIO_STATUS, 4, 11)
    for q in range(queues):
        base = RINGS + q * 0x1000
        w(m.VIRTIO_MMIO_QUEUE_SEL, 4, q)
        w(m.VIRTIO_MMIO_QUEUE_NUM, 4, 1 << (1 + b.below(6)))  # 2..64
        for reg, addr in ((m.VIRTIO_MMIO_QUEUE_DESC_LOW, base), (m.VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x400),
                          (m.VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x800)):
            w(reg, 4, addr)
            w(reg + 4, 4, 0)
        w(m.VIRTIO_MMIO_QUEUE_READY, 4, 1)
    w(m.VIRTIO_MMIO_STATUS, 4, 15)


def _guest(device: Any, data: bytes, host: Callable[[Bytes, m.MmioTransport], None] | None = None) -> None:
    mem = GuestMemory([(0, bytearray(MEM))])
    t = m.MmioTransport(device, mem, Irq())
    queues = len(device.queue_sizes)
    b = Bytes(data)
    try:
        for _ in range(MAX_STEPS):
            if b.left() <= 0:
                break
            op = b.below(8)
            if op == 0:
                _setup(t, queues, b)
            elif op in (1, 2):  # into the rings: a descriptor, an avail entry or index
                at = RINGS + b.below(queues * 0x1000)
                mem.write(min(at, MEM - 16), b.bytes(1 + b.below(16)))
            elif op == 3:
                t.notify(b.below(queues + 1))  # one past the last: a notify of a queue that is not there
            elif op == 4:
                t.write(b.below(0x110) & ~3, 4, b.int(4))
            elif op == 5:
                t.read(b.below(0x120) & ~3, 4)
            elif op == 6:  # data buffers: somewhere in guest RAM
                mem.write(b.below(MEM - 64), b.bytes(1 + b.below(64)))
            elif host is not None:
                host(b, t)
    finally:
        device.reset()


def virtio_console(data: bytes) -> None:
    _guest(VirtioConsole(lambda _: None), data)


def virtio_rng(data: bytes) -> None:
    _guest(VirtioRng(), data)


_DISK: RawDisk | None = None


def virtio_blk(data: bytes) -> None:
    global _DISK
    if _DISK is None:  # one small scratch image per process
        path = Path(tempfile.mkdtemp(prefix="microvm-fuzz-")) / "disk.img"
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        _DISK = RawDisk(path)
    _guest(VirtioBlock(_DISK), data)


_TAP: FakeTap | None = None


def virtio_net(data: bytes) -> None:
    global _TAP
    if _TAP is None:
        _TAP = FakeTap(peer_timeout=0)
    tap = _TAP
    tap.drain()
    dev = VirtioNet(tap)

    def host(b: Bytes, t: m.MmioTransport) -> None:  # a frame from the host side, served as the tap's wake-up is
        try:
            tap.peer.send(b.bytes(b.below(2048)))
        except (BlockingIOError, OSError):
            tap.drain()
        t.notify(0)

    try:
        _guest(dev, data, host)
    finally:
        tap.drain()
        tap.discard_pending()  # frames the device never took


_VSOCK_DIR: Path | None = None


def virtio_vsock(data: bytes) -> None:
    """With its host side live: a listening Unix socket, served on an I/O thread
    stepped by hand; a host program may connect in between (op 7)."""
    global _VSOCK_DIR
    from microvm.devices.virtio.vsock import VirtioVsock
    from microvm.iothread import IoThread

    if _VSOCK_DIR is None:
        _VSOCK_DIR = Path(tempfile.mkdtemp(prefix="microvm-fuzz-"))
    io = IoThread("fuzz-vsock")
    dev = VirtioVsock(3, _VSOCK_DIR / "v.sock")
    dev.attach(io)
    clients: list[socket.socket] = []

    def host(b: Bytes, t: m.MmioTransport) -> None:
        if b.below(2) and len(clients) < 4:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(str(_VSOCK_DIR / "v.sock"))
                c.send(b"CONNECT %d\n" % b.int(2) + b.bytes(b.below(32)))
            except OSError:
                pass
            clients.append(c)
        io.poll_once(0)

    try:
        _guest(dev, data, host)
    finally:
        for c in clients:
            c.close()
        io.close()
        dev.close()


# --- the loader and the agent's protocol ------------------------------------------------------------

_LOADER_MEM: GuestMemory | None = None


def loader(data: bytes) -> None:
    """A kernel (ELF or bzImage, by its first bytes) and, after a split, an initrd."""
    global _LOADER_MEM
    if _LOADER_MEM is None:
        _LOADER_MEM = GuestMemory([(0, bytearray(16 << 20))])
    cut = data.find(b"\n--initrd--\n")
    kernel, initrd = (data, None) if cut < 0 else (data[:cut], data[cut + 12:] or None)
    try:
        load_linux(_LOADER_MEM, kernel, cmdline="console=ttyS0", initrd=initrd, ram=[(0, 16 << 20)])
    except LoaderError:
        pass


def agent_protocol(data: bytes) -> None:
    reader = FrameReader()
    try:
        for _ in reader.feed(data):
            pass
    except ProtocolError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "serial": serial, "i8042": i8042, "control": control, "virtio_console": virtio_console,
    "virtio_rng": virtio_rng, "virtio_blk": virtio_blk, "virtio_net": virtio_net, "virtio_vsock": virtio_vsock,
    "loader": loader,
    "agent_protocol": agent_protocol,
}
