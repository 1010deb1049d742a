"""virtio-vsock (virtio 1.2, 5.10) driven through the MMIO transport by the fake
driver, with real Unix sockets on the host side and an I/O thread stepped by
hand (poll_once), so every edge-triggered event is seen as the VM would see
it, in a fixed order. No KVM needed.

Headers are packed here with `struct` from struct virtio_vsock_hdr in
include/uapi/linux/virtio_vsock.h, independently of vsock.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from microvm.devices import virtio as v
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio import vsock as vs
from microvm.devices.virtio import vsock_abi as abi
from microvm.devices.virtio import vsock_muxer as vsm
from microvm.devices.virtio.vsock import VirtioVsock
from microvm.errors import ConfigError
from microvm.iothread import IoThread
from microvm.memory import GuestMemory
from tests.support.fakes import FakeIrq
from tests.support.virtio_driver import VirtqDriver
from tests.unit.test_virtio_mmio import Driver

pytestmark = pytest.mark.usefixtures("virtqueue")  # every test here runs with both queues

# le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op,
# le32 flags, le32 buf_alloc, le32 fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
SHUT_RCV, SHUT_SEND = 1, 2
STREAM = 1
CID = 42
HOST = 2
MEM = 4 << 20
RXQ, TXQ, EVQ = 0, 1, 2
GUEST_BUF = 1 << 20  # the buf_alloc our guest advertises unless a test says otherwise


class Pkt:
    """One packet the device put in a receive buffer."""

    def __init__(self, raw: bytes):
        (self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op,
         self.flags, self.buf_alloc, self.fwd_cnt) = HDR.unpack(raw[:HDR.size])
        self.payload = raw[HDR.size:]

    def __repr__(self) -> str:
        return f"Pkt(op={self.op}, {self.src_port}->{self.dst_port}, len={self.len}, flags={self.flags})"


class Guest:
    """A VirtioVsock behind a transport, brought up by the fake driver; the host side
    served by an IoThread that the test steps with pump()."""

    def __init__(self, path: str, *, buf_alloc: int = vs.DEFAULT_BUF_ALLOC, max_connections: int = 64,
                 queue_size: int = 32, bring_up: bool = True):
        self.path = path
        self.io = IoThread("vsock-test")
        self.dev = VirtioVsock(CID, path, buf_alloc=buf_alloc, max_connections=max_connections)
        self.mem = GuestMemory([(0, bytearray(MEM))])
        self.irq = FakeIrq()
        self.t = m.MmioTransport(self.dev, self.mem, self.irq)
        self.dev.attach(self.io)
        self.d = Driver(self.t, self.mem)
        self.rx_bufs: dict[int, list[tuple[int, int]]] = {}
        self.queue_size = queue_size
        self.host_sockets: list[socket.socket] = []  # the host programs' ends, closed with us
        if bring_up:
            self.bring_up()

    def bring_up(self) -> None:
        assert self.d.negotiate(1 << v.VIRTIO_F_VERSION_1)
        self.rx = self.setup(RXQ, 0x10000, (0x100000, 0x200000))
        self.tx = self.setup(TXQ, 0x20000, (0x200000, 0x3F0000))
        self.ev = self.setup(EVQ, 0x30000, (0x3F0000, 0x400000))
        self.d.driver_ok()
        assert self.t.active

    def setup(self, index: int, base: int, data: tuple[int, int]) -> VirtqDriver:
        q = self.d.setup_queue(index, self.queue_size, base)
        q.data_start, q.data_end = data
        q._next_data = data[0]
        return q

    # --- the guest's side -------------------------------------------------------------------

    def post_rx(self, sizes: list[int], cut: int | None = None) -> None:
        """Offer receive buffers; `cut` splits each in two descriptors at that offset."""
        for size in sizes:
            parts: list[tuple[bytes | int, bool]] = [(size, True)]
            if cut is not None and 0 < cut < size:
                parts = [(cut, True), (size - cut, True)]
            head = self.rx.add_chain(parts)
            self.rx_bufs[head] = [(addr, length) for addr, length, _ in self.rx.buffers[head]]
        self.t.notify(RXQ)

    def packets(self) -> list[Pkt]:
        """What the device used in the receive queue since the last call."""
        out = []
        for head, length in self.rx.used():
            raw = b""
            for addr, size in self.rx_bufs.pop(head):
                raw += self.mem.read(addr, size)
            assert length <= len(raw)
            if length:
                out.append(Pkt(raw[:length]))
        return out

    def send(self, src_port: int, dst_port: int, op: int, payload: bytes = b"", *, flags: int = 0,
             buf_alloc: int = GUEST_BUF, fwd_cnt: int = 0, src_cid: int = CID, dst_cid: int = HOST,
             type: int = STREAM, length: int | None = None, cut: int | None = None) -> None:
        """One packet on the transmit queue; `cut` splits header and payload at that offset."""
        raw = HDR.pack(src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length, type, op,
                       flags, buf_alloc, fwd_cnt) + payload
        parts: list[tuple[bytes | int, bool]] = [(raw, False)]
        if cut is not None and 0 < cut < len(raw):
            parts = [(raw[:cut], False), (raw[cut:], False)]
        self.send_parts(parts)

    def send_parts(self, parts: list[tuple[bytes | int, bool]]) -> None:
        self.tx.add_chain(parts)
        self.t.notify(TXQ)
        assert [n for _, n in self.tx.used()] == [0]

    def pump(self) -> None:
        """Serve every host socket event, as the I/O thread would."""
        for _ in range(1000):
            if not self.io.poll_once(0):
                return
        raise AssertionError("the host side never settles")

    def stats(self) -> dict[str, int]:
        return self.dev.stats()

    def refill(self, outstanding: int, size: int = 4096) -> None:
        """Top the receive queue up to `outstanding` buffers."""
        self.post_rx([size] * (outstanding - len(self.rx_bufs)))

    def close(self) -> None:
        self.io.close()  # first, as the machine does: then nothing serves the device while it closes
        self.dev.close()
        for s in self.host_sockets:
            s.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Short: sun_path holds 107 bytes, and pytest's tmp_path can be long.
    path = tempfile.mkdtemp(prefix="vsk", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guest(sockdir: str) -> Iterator[Guest]:
    g = Guest(os.path.join(sockdir, "v.sock"))
    g.post_rx([4096] * 16)
    yield g
    g.close()


def host_client(g: Guest) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    g.host_sockets.append(s)
    s.connect(g.path)
    s.settimeout(2)
    return s


def read_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"end of file after {len(out)} of {n} bytes"
        out += chunk
    return out


def read_line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"end of file after {out!r}"
        out += chunk
    return out


def is_closed(s: socket.socket) -> bool:
    """End of file (after whatever data was still on its way), within 2 s."""
    s.settimeout(2)
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def host_connect(g: Guest, port: int, guest_buf: int = GUEST_BUF) -> tuple[socket.socket, int]:
    """A host program connects to guest port `port`; the guest accepts. (socket, host port)."""
    s = host_client(g)
    s.sendall(b"CONNECT %d\n" % port)
    g.pump()
    [req] = g.packets()
    assert (req.op, req.type, req.src_cid, req.dst_cid, req.dst_port) == (REQUEST, STREAM, HOST, CID, port)
    assert req.src_port >= 1 << 30 and req.buf_alloc == g.dev.buf_alloc
    g.send(port, req.src_port, RESPONSE, buf_alloc=guest_buf)
    assert read_line(s) == b"OK %d\n" % req.src_port
    return s, req.src_port


def guest_connect(g: Guest, port: int, src_port: int = 1111, guest_buf: int = GUEST_BUF) -> socket.socket:
    """The guest connects to host port `port`; returns the host program's accepted socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{g.path}_{port}")
    listener.listen(1)
    try:
        g.send(src_port, port, REQUEST, buf_alloc=guest_buf)
        [resp] = g.packets()
        assert (resp.op, resp.src_port, resp.dst_port, resp.src_cid, resp.dst_cid) == (RESPONSE, port, src_port,
                                                                                        HOST, CID)
        s, _ = listener.accept()
        g.host_sockets.append(s)
        s.settimeout(2)
        return s
    finally:
        listener.close()
        os.unlink(f"{g.path}_{port}")


# --- configuration ------------------------------------------------------------------------------


def test_config_space_and_features(guest: Guest) -> None:
    assert guest.d.r(m.VIRTIO_MMIO_DEVICE_ID) == v.VIRTIO_ID_VSOCK == 19
    feats = guest.d.features()
    assert feats >> v.VIRTIO_F_VERSION_1 & 1
    assert not feats >> abi.VIRTIO_VSOCK_F_SEQPACKET & 1
    cfg = m.VIRTIO_MMIO_CONFIG
    assert guest.t.read(cfg, 4) | guest.t.read(cfg + 4, 4) << 32 == CID
    assert guest.t.read(cfg, 8) == CID
    guest.t.write(cfg, 4, 7)  # read-only
    assert guest.t.read(cfg, 4) == CID
    assert HDR.size == abi.HDR_SIZE == 44


@pytest.mark.parametrize("cid", [0, 1, 2, (1 << 32) - 1, 1 << 32, -1, True])
def test_bad_guest_cid(sockdir: str, cid: int) -> None:
    with pytest.raises(ConfigError):
        VirtioVsock(cid, os.path.join(sockdir, "v.sock"))
    assert os.listdir(sockdir) == []


def test_bad_sizes(sockdir: str) -> None:
    with pytest.raises(ConfigError):
        VirtioVsock(3, os.path.join(sockdir, "v.sock"), buf_alloc=0)
    with pytest.raises(ConfigError):
        VirtioVsock(3, os.path.join(sockdir, "v.sock"), max_connections=0)
    assert os.listdir(sockdir) == []


def test_without_a_transport(sockdir: str) -> None:
    dev = VirtioVsock(3, os.path.join(sockdir, "v.sock"))
    dev.reset_transport()  # nothing to reset, nobody to tell
    dev.process(vs.RX_QUEUE)
    dev.reset()
    dev.close()
    assert os.listdir(sockdir) == []


def test_bad_paths(sockdir: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        VirtioVsock(3, "")
    with pytest.raises(ConfigError, match="longer"):
        VirtioVsock(3, os.path.join(sockdir, "x" * 120))
    with pytest.raises(ConfigError, match="directory"):
        VirtioVsock(3, os.path.join(sockdir, "missing", "v.sock"))
    plain = Path(sockdir, "file")
    plain.write_text("mine")
    with pytest.raises(ConfigError, match="not a Unix socket"):
        VirtioVsock(3, plain)
    assert plain.read_text() == "mine"


def test_live_socket_refused_stale_one_replaced(sockdir: str) -> None:
    path = os.path.join(sockdir, "v.sock")
    first = VirtioVsock(3, path)
    with pytest.raises(ConfigError, match="live"):
        VirtioVsock(4, path)
    first.close()
    assert not os.path.exists(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the path stays, nobody listens
    second = VirtioVsock(5, Path(path))
    assert second.uds_path == path
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)  # the new listener
    c.close()
    second.close()


# --- host-initiated connections ----------------------------------------------------------------------


def test_host_connect_and_bytes_both_ways(guest: Guest) -> None:
    s, hport = host_connect(guest, 1234)
    s.sendall(b"hello guest")
    guest.pump()
    [pkt] = guest.packets()
    assert (pkt.op, pkt.src_port, pkt.dst_port, pkt.payload) == (RW, hport, 1234, b"hello guest")
    assert pkt.buf_alloc == guest.dev.buf_alloc
    guest.send(1234, hport, RW, b"hello host", fwd_cnt=11)
    assert read_exactly(s, 10) == b"hello host"
    st_ = guest.stats()
    assert st_["host_connects"] == 1 and st_["rx_bytes"] == 11 and st_["tx_bytes"] == 10
    assert st_["connections_open"] == 1
    # Another connection gets another host port.
    s2, hport2 = host_connect(guest, 1234)
    assert hport2 != hport
    s.close()
    s2.close()


def test_short_read_takes_one_buffer_and_later_data_still_comes(guest: Guest) -> None:
    """A read that left room drained the socket (MSG_PEEK says so): no receive
    buffer is taken and held back just to meet EAGAIN, and the next write is a new edge."""
    s, _ = host_connect(guest, 1234)
    rx = guest.t.queues[RXQ]
    for word in (b"one", b"two"):
        s.sendall(word)
        guest.pump()
        assert [(p.op, p.payload) for p in guest.packets()] == [(RW, word)]
        assert rx.chains_popped == rx.used_added  # every buffer taken went back used
    s.close()


def test_connect_line_followed_by_data_in_one_write(guest: Guest) -> None:
    """What the host sends right behind its CONNECT line waits for the guest's
    RESPONSE; no new edge comes for it, so the device must go back and read."""
    s = host_client(guest)
    s.sendall(b"CONNECT 77\nearly bytes")
    guest.pump()
    [req] = guest.packets()
    assert req.op == REQUEST
    guest.send(77, req.src_port, RESPONSE)
    [pkt] = guest.packets()
    assert (pkt.op, pkt.payload) == (RW, b"early bytes")
    assert read_line(s) == b"OK %d\n" % req.src_port
    s.close()


def test_connect_line_across_writes(guest: Guest) -> None:
    s = host_client(guest)
    s.sendall(b"conn")
    guest.pump()
    assert guest.packets() == []
    s.sendall(b"ect 9\n")
    guest.pump()
    [req] = guest.packets()
    assert (req.op, req.dst_port) == (REQUEST, 9)
    s.close()


def test_guest_rst_closes_the_host_socket(guest: Guest) -> None:
    s = host_client(guest)
    s.sendall(b"CONNECT 5\n")
    guest.pump()
    [req] = guest.packets()
    guest.send(5, req.src_port, RST)  # nobody listens on port 5 in the guest
    assert is_closed(s)
    assert guest.stats()["connections_open"] == 0
    assert guest.stats()["rst_received"] == 1


@pytest.mark.parametrize("line", [b"HELLO 5\n", b"CONNECT\n", b"CONNECT x\n", b"CONNECT 99999999999\n",
                                  b"CONNECT 4294967296\n", b"CONNECT 5 6\n", b"CONNECT -5\n", b"A" * 40])
def test_garbled_or_overlong_connect_line_closes(guest: Guest, line: bytes) -> None:
    s = host_client(guest)
    s.sendall(line)
    guest.pump()
    assert is_closed(s)
    assert guest.packets() == []
    assert guest.stats()["bad_connect_line"] == 1
    assert guest.stats()["connections_open"] == 0
    s.close()


def test_host_gives_up_before_the_line(guest: Guest) -> None:
    s = host_client(guest)
    s.close()
    guest.pump()
    assert guest.stats()["connections_open"] == 0
    assert guest.stats()["bad_connect_line"] == 0


def test_host_gives_up_before_the_response(guest: Guest) -> None:
    s = host_client(guest)
    s.sendall(b"CONNECT 8\n")
    guest.pump()
    [req] = guest.packets()
    s.close()
    guest.pump()
    [rst] = guest.packets()
    assert (rst.op, rst.src_port, rst.dst_port) == (RST, req.src_port, 8)
    guest.send(8, req.src_port, RESPONSE)  # too late: the connection is gone
    [rst] = guest.packets()
    assert rst.op == RST


def test_host_gone_when_the_ok_line_goes_out(guest: Guest) -> None:
    s = host_client(guest)
    s.sendall(b"CONNECT 8\n")
    guest.pump()
    [req] = guest.packets()
    s.close()  # its event not served yet: the OK line meets EPIPE
    guest.send(8, req.src_port, RESPONSE)
    [rst] = guest.packets()
    assert (rst.op, rst.dst_port) == (RST, 8)
    assert guest.stats()["host_errors"] == 1


def test_host_gives_up_before_the_request_goes_out(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "v.sock"))  # no receive buffers: the REQUEST waits
    s = host_client(g)
    s.sendall(b"CONNECT 8\n")
    g.pump()
    s.close()
    g.pump()
    assert g.stats()["connections_open"] == 0
    g.post_rx([4096])
    assert g.packets() == []  # the guest never hears of it
    g.close()


@pytest.mark.parametrize("op", [RW, CREDIT_UPDATE, SHUTDOWN, RESPONSE])
def test_only_response_or_rst_before_the_connection_is_up(guest: Guest, op: int) -> None:
    s = host_client(guest)
    s.sendall(b"CONNECT 6\n")
    guest.pump()
    [req] = guest.packets()
    if op == RESPONSE:  # ...and a RESPONSE only once
        guest.send(6, req.src_port, RESPONSE)
        assert read_line(s) == b"OK %d\n" % req.src_port
    guest.send(6, req.src_port, op, b"x" if op == RW else b"")
    [rst] = guest.packets()
    assert (rst.op, rst.src_port, rst.dst_port) == (RST, req.src_port, 6)
    assert guest.stats()["tx_bad_op"] == 1
    assert is_closed(s)
    s.close()


def test_connection_limit(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "v.sock"), max_connections=2)
    g.post_rx([4096] * 8)
    clients = [host_client(g) for _ in range(3)]
    g.pump()
    assert is_closed(clients[2])
    assert g.stats()["connect_refused"] == 1
    g.send(1, 5000, REQUEST)  # over the limit too: RST
    [rst] = g.packets()
    assert rst.op == RST
    for c in clients:
        c.close()
    g.close()


# --- guest-initiated connections ---------------------------------------------------------------------


def test_guest_connect_reaches_the_port_listener(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=1111)
    guest.send(1111, 5000, RW, b"from the guest", cut=50)  # header and payload split oddly
    assert read_exactly(s, 14) == b"from the guest"
    s.sendall(b"from the host")
    guest.pump()
    [pkt] = guest.packets()
    assert (pkt.op, pkt.src_port, pkt.dst_port, pkt.payload) == (RW, 5000, 1111, b"from the host")
    assert guest.stats()["guest_connects"] == 1
    s.close()


@pytest.mark.parametrize("stale", [False, True])
def test_guest_connect_without_listener_gets_rst(guest: Guest, stale: bool) -> None:
    if stale:  # a socket file whose listener is gone: refused
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(f"{guest.path}_6000")
        dead.close()
    guest.send(2222, 6000, REQUEST)
    [rst] = guest.packets()
    assert (rst.op, rst.src_port, rst.dst_port, rst.src_cid, rst.dst_cid) == (RST, 6000, 2222, HOST, CID)
    assert guest.stats()["connect_failed"] == 1
    assert guest.stats()["connections_open"] == 0


def test_packets_for_unknown_connections(guest: Guest) -> None:
    for op in (RW, RESPONSE, SHUTDOWN, CREDIT_UPDATE, CREDIT_REQUEST):
        guest.send(3333, 7000, op, b"x" if op == RW else b"")
        [rst] = guest.packets()
        assert (rst.op, rst.src_port, rst.dst_port) == (RST, 7000, 3333)
    guest.send(3333, 7000, RST)  # an RST is never answered
    assert guest.packets() == []
    assert guest.stats()["tx_unknown_conn"] == 5


def test_duplicate_request_resets(guest: Guest) -> None:
    s = guest_connect(guest, 5001, src_port=1)
    guest.send(1, 5001, REQUEST)
    [rst] = guest.packets()
    assert rst.op == RST
    assert is_closed(s)


def test_owed_rsts_are_bounded(sockdir: str) -> None:
    """A guest that sends and never posts receive buffers cannot make the RSTs we owe it pile up."""
    g = Guest(os.path.join(sockdir, "v.sock"))
    for port in range(vsm.MAX_OWED_RSTS + 10):
        g.send(port, 9, RW, b"?")
    assert g.stats()["rst_dropped"] == 10
    g.post_rx([64] * g.queue_size)  # a ring's worth in one go
    assert [p.op for p in g.packets()] == [RST] * g.queue_size
    g.close()


def test_host_write_error_resets(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=14)
    s.close()  # gone before its event was served
    guest.send(14, 5000, RW, b"into the void")
    [rst] = guest.packets()
    assert rst.op == RST
    assert guest.stats()["host_errors"] == 1


def test_host_read_error_resets(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=15)
    guest.send(15, 5000, RW, b"never read")
    s.close()  # with unread data: our end reads ECONNRESET
    guest.pump()
    [rst] = guest.packets()
    assert rst.op == RST
    assert guest.stats()["host_errors"] == 1


def test_queues_the_driver_never_readied(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "v.sock"), bring_up=False)
    assert g.d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    g.tx = g.setup(TXQ, 0x20000, (0x200000, 0x3F0000))  # no receive or event queue
    g.d.driver_ok()
    g.send(1, 2, RW, b"x")  # an RST owed, nowhere to put it
    g.dev.reset_transport()
    assert g.t.active and not g.t.errors
    g.close()


# --- flow control -------------------------------------------------------------------------------------


def test_slow_host_reader_bounds_what_waits(sockdir: str) -> None:
    """The guest sends much more than buf_alloc while the host reads nothing: the
    device keeps at most buf_alloc; once the host reads, credit comes back and
    everything arrives in order."""
    buf_alloc = 16384
    g = Guest(os.path.join(sockdir, "v.sock"), buf_alloc=buf_alloc)
    g.refill(16)
    s = guest_connect(g, 5000, src_port=10)
    stream = bytes(range(256)) * 4096  # 1 MiB, more than the socket and the device hold together
    sent = 0
    fwd = 0  # the device's fwd_cnt as last heard

    def hear() -> int:
        nonlocal fwd
        pkts = g.packets()
        for p in pkts:
            assert (p.op, p.buf_alloc) == (CREDIT_UPDATE, buf_alloc)
            fwd = p.fwd_cnt
        g.refill(16)
        return len(pkts)

    def send_within_credit() -> None:
        nonlocal sent
        while (credit := buf_alloc - (sent - fwd)) > 0 and sent < len(stream):
            assert credit <= buf_alloc
            n = min(credit, 4096, len(stream) - sent)
            g.send(10, 5000, RW, stream[sent:sent + n])
            sent += n
            hear()

    for _ in range(1000):
        send_within_credit()
        g.pump()
        if not hear():
            break  # stalled: nothing moves until the host reads
    assert 0 < sent < len(stream)
    assert 0 < g.stats()["host_buffered"] <= buf_alloc
    assert g.stats()["tx_overrun"] == 0
    # The host reads slowly; the guest keeps within the credit it hears of.
    got = b""
    s.settimeout(2)
    while len(got) < len(stream):
        got += s.recv(50000)
        g.pump()
        hear()
        send_within_credit()
        assert g.stats()["host_buffered"] <= buf_alloc
    assert got == stream
    assert g.stats()["tx_overrun"] == 0
    s.close()
    g.close()


def test_data_past_our_credit_resets(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "v.sock"), buf_alloc=8192)
    g.post_rx([4096] * 8)
    s = guest_connect(g, 5000, src_port=10)
    # A guest that ignores credit: fine while the host socket takes everything at once...
    for _ in range(1000):
        g.send(10, 5000, RW, b"z" * 8192)
        assert {p.op for p in g.packets()} <= {CREDIT_UPDATE}
        g.refill(8)
        if g.stats()["host_buffered"]:
            break
    assert g.stats()["tx_overrun"] == 0
    # ...but once bytes wait in the device, the next full buffer is past the credit.
    g.send(10, 5000, RW, b"z" * 8192)
    [rst] = [p for p in g.packets() if p.op == RST]
    assert (rst.src_port, rst.dst_port) == (5000, 10)
    assert g.stats()["tx_overrun"] == 1
    assert g.stats()["connections_open"] == 0
    s.close()
    g.close()


def test_guest_out_of_credit_host_data_waits(guest: Guest) -> None:
    s, hport = host_connect(guest, 100, guest_buf=100)
    s.sendall(bytes(range(250)))
    guest.pump()
    [p] = guest.packets()
    assert p.payload == bytes(range(100))  # its whole credit, not a byte more
    guest.pump()
    assert guest.packets() == []
    # The guest reads 60 bytes and says so: 60 more may come, with no new host event.
    guest.send(100, hport, CREDIT_UPDATE, buf_alloc=100, fwd_cnt=60)
    [p] = guest.packets()
    assert p.payload == bytes(range(100, 160))
    # A bigger buffer takes the rest.
    guest.send(100, hport, CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=160)
    [p] = guest.packets()
    assert p.payload == bytes(range(160, 250))
    s.close()


def test_credit_request_is_answered(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=3)
    guest.send(3, 5000, RW, b"abc")
    assert read_exactly(s, 3) == b"abc"
    guest.send(3, 5000, CREDIT_REQUEST)
    [p] = guest.packets()
    assert (p.op, p.buf_alloc, p.fwd_cnt) == (CREDIT_UPDATE, guest.dev.buf_alloc, 3)
    s.close()


def test_receive_buffers_exhausted_then_replenished(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "v.sock"))
    g.post_rx([4096])
    s = guest_connect(g, 5000, src_port=4)  # the RESPONSE takes the only buffer
    data = os.urandom(20000)
    s.sendall(data)
    g.pump()
    assert g.packets() == []  # no buffer: the data waits in the socket
    g.post_rx([1000, 3000])  # the device goes back to the socket without a new event
    got = [p.payload for p in g.packets()]
    assert [len(x) for x in got] == [1000 - 44, 3000 - 44]
    g.post_rx([8192] * 4, cut=20)  # header split over two descriptors
    got += [p.payload for p in g.packets()]
    assert b"".join(got) == data
    s.close()
    g.close()


# --- shutdown ----------------------------------------------------------------------------------------


def test_host_eof_then_close(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=5)
    s.sendall(b"last words")
    s.shutdown(socket.SHUT_WR)
    guest.pump()
    pkts = guest.packets()
    assert [(p.op, p.payload) for p in pkts] == [(RW, b"last words"), (SHUTDOWN, b"")]
    assert pkts[1].flags == SHUT_SEND
    guest.send(5, 5000, RW, b"still listening?")  # the other direction still works
    assert read_exactly(s, 16) == b"still listening?"
    s.close()
    guest.pump()
    [rst] = guest.packets()
    assert rst.op == RST
    assert guest.stats()["connections_open"] == 0


def test_host_full_close_after_data_is_rst(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=6)
    s.sendall(b"bye")
    s.close()
    guest.pump()
    assert [(p.op, p.payload) for p in guest.packets()] == [(RW, b"bye"), (RST, b"")]


def test_guest_shutdown_send_then_both(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=7)
    guest.send(7, 5000, RW, b"done")
    guest.send(7, 5000, SHUTDOWN, flags=SHUT_SEND)
    assert read_exactly(s, 4) == b"done"
    assert s.recv(1) == b""  # EOF for the host program
    s.sendall(b"reply")  # the host can still answer
    guest.pump()
    [p] = guest.packets()
    assert p.payload == b"reply"
    guest.send(7, 5000, RW, b"more")  # data after SHUTDOWN(SEND): reset
    [rst] = guest.packets()
    assert rst.op == RST
    assert guest.stats()["tx_bad_op"] == 1
    s.close()


def test_guest_full_shutdown_gets_rst(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=8)
    guest.send(8, 5000, SHUTDOWN, flags=SHUT_RCV | SHUT_SEND)
    [rst] = guest.packets()
    assert (rst.op, rst.dst_port) == (RST, 8)  # 5.10.6.5: the clean close ends with our RST
    assert is_closed(s)


def test_guest_shutdown_rcv_stops_host_writes(guest: Guest) -> None:
    s = guest_connect(guest, 5000, src_port=9)
    guest.send(9, 5000, SHUTDOWN, flags=SHUT_RCV)
    with pytest.raises(BrokenPipeError):
        s.sendall(b"x" * 10)
    guest.pump()
    assert guest.packets() == []
    s.close()
    guest.pump()
    [rst] = guest.packets()
    assert rst.op == RST


def test_guest_full_shutdown_waits_for_the_host_reader(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "v.sock"), buf_alloc=1 << 20)
    g.post_rx([4096] * 8)
    s = guest_connect(g, 5000, src_port=11)
    blob = os.urandom(600_000)  # more than the socket takes at once
    for i in range(0, len(blob), 60000):
        g.send(11, 5000, RW, blob[i:i + 60000])
    g.send(11, 5000, SHUTDOWN, flags=SHUT_RCV | SHUT_SEND)
    assert not [p for p in g.packets() if p.op == RST]  # data still waits for the host
    got = b""
    while len(got) < len(blob):
        got += s.recv(1 << 16)
        g.pump()
    assert got == blob
    assert is_closed(s)
    assert [p.op for p in g.packets()][-1] == RST
    g.close()


# --- a hostile guest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,counter", [
    ({"length": abi.MAX_PKT_PAYLOAD + 1, "payload": b"x" * 100}, "tx_oversized"),
    ({"length": 0xFFFF_FFFF}, "tx_oversized"),
    ({"length": 200, "payload": b"x" * 100}, "tx_truncated"),
    ({"type": 2}, "tx_bad_type"),  # SEQPACKET, not negotiated
    ({"type": 0xFFFF}, "tx_bad_type"),
    ({"op": 0}, "tx_bad_op"),
    ({"op": 99}, "tx_bad_op"),
])
def test_bad_packets_on_a_connection_reset_it(guest: Guest, kwargs: dict, counter: str) -> None:
    s = guest_connect(guest, 5000, src_port=12)
    args = {"op": RW, **kwargs}
    op = args.pop("op")
    guest.send(12, 5000, op, **args)
    [rst] = guest.packets()
    assert (rst.op, rst.src_port, rst.dst_port) == (RST, 5000, 12)
    assert guest.stats()[counter] == 1
    assert is_closed(s)
    assert guest.t.active and not guest.t.errors
    s.close()


@pytest.mark.parametrize("kwargs", [{"src_cid": CID + 1}, {"dst_cid": 3}, {"dst_cid": CID},
                                    {"src_cid": CID | 1 << 40}])
def test_wrong_cids_are_dropped(guest: Guest, kwargs: dict) -> None:
    s = guest_connect(guest, 5000, src_port=13)
    guest.send(13, 5000, RW, b"spoofed", **kwargs)
    assert guest.packets() == []
    assert guest.stats()["tx_bad_cid"] == 1
    guest.send(13, 5000, RW, b"real")
    assert read_exactly(s, 4) == b"real"  # the spoofed bytes never reached the host
    s.close()


def test_malformed_chains(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "v.sock"))
    g.send_parts([(b"\0" * 43, False)])  # shorter than the header
    g.send_parts([(HDR.pack(CID, HOST, 1, 2, 0, STREAM, REQUEST, 0, 0, 0), False), (64, True)])
    assert g.stats()["tx_malformed"] == 2
    # Receive buffers the device cannot use go back unused.
    for parts in ([(b"x" * 100, False), (4096, True)], [(44, True)]):  # device-readable; no room for data
        head = g.rx.add_chain(parts)
        g.rx_bufs[head] = [(addr, length) for addr, length, _ in g.rx.buffers[head]]
    g.send(1, 2, RW, b"for nobody")  # an RST to send
    assert g.packets() == [] and g.stats()["rx_bad_buffer"] == 2
    g.post_rx([4096])
    [rst] = g.packets()
    assert rst.op == RST
    assert g.t.active and not g.t.errors
    g.close()


def test_event_buffer_too_small(guest: Guest) -> None:
    guest.ev.add_chain([(2, True)])
    guest.ev.add_chain([(4, True)])
    guest.dev.reset_transport()
    assert [n for _, n in guest.ev.used()] == [0, 4]
    assert guest.stats()["event_bad_buffer"] == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(min_size=0, max_size=300), cut=st.integers(0, 300),
       fields=st.tuples(st.sampled_from([CID, CID + 1, HOST]), st.sampled_from([HOST, CID, 0]),
                        st.integers(0, 3), st.integers(0, 3), st.one_of(st.integers(0, 400), st.just(1 << 31)),
                        st.integers(0, 3), st.integers(0, 9), st.integers(0, 7), st.integers(0, (1 << 32) - 1),
                        st.integers(0, (1 << 32) - 1)))
def test_random_packets_never_raise(guest: Guest, raw: bytes, cut: int, fields: tuple) -> None:
    """Any header, any payload, any split: the device answers or drops, never raises,
    never needs a reset, and every receive buffer it fills holds a well-formed header."""
    payload = HDR.pack(*fields) + raw
    parts: list[tuple[bytes | int, bool]] = [(payload[:cut], False), (payload[cut:], False)]
    guest.send_parts([p for p in parts if p[0]] or [(b"\0", False)])
    guest.pump()
    for p in guest.packets():
        assert (p.src_cid, p.dst_cid, p.type) == (HOST, CID, STREAM)
        assert p.len == len(p.payload) <= abi.MAX_PKT_PAYLOAD
    guest.post_rx([4096] * (16 - len(guest.rx_bufs)))
    assert guest.t.active and not guest.t.errors


# --- transport reset, device reset, teardown -------------------------------------------------------


def test_reset_transport_drops_connections_and_posts_the_event(guest: Guest) -> None:
    s1 = guest_connect(guest, 5000, src_port=20)
    s2, _ = host_connect(guest, 21)
    guest.dev.reset_transport()  # no event buffer yet: the event waits
    assert is_closed(s1) and is_closed(s2)
    assert guest.stats()["connections_open"] == 0
    assert guest.ev.used() == []
    head = guest.ev.add_chain([(4, True)])
    addr = guest.ev.buffers[head][0][0]
    guest.mem.write(addr, b"\xff" * 4)
    guest.t.notify(EVQ)
    assert guest.ev.used() == [(head, 4)]
    assert guest.mem.read(addr, 4) == abi.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_bytes(4, "little")
    assert guest.stats()["transport_resets"] == 1
    guest.send(20, 5000, RW, b"old")  # the old connection is gone
    [rst] = guest.packets()
    assert rst.op == RST
    s1.close()
    s2.close()


def refill_then_connected(guest: Guest, s: socket.socket, port: int) -> None:
    """The guest handled the reset event and refilled: the held connection goes on."""
    guest.ev.add_chain([(4, True)])
    guest.t.notify(EVQ)
    guest.pump()
    [req] = guest.packets()
    assert (req.op, req.dst_port) == (REQUEST, port)
    s.close()


def test_host_connections_wait_until_the_guest_has_handled_the_reset(guest: Guest) -> None:
    # Linux resets its sockets, then posts a fresh event buffer: a connection
    # request delivered in between would be reset silently, and its host
    # program would wait for ever. So requests wait for that buffer.
    head = guest.ev.add_chain([(4, True)])
    guest.ev.add_chain([(4, True)])  # a second one, posted before: not the sign
    guest.dev.reset_transport()
    assert guest.ev.used() == [(head, 4)]
    s = host_client(guest)
    s.sendall(b"CONNECT 40\n")
    guest.pump()
    assert guest.packets() == []
    assert guest.stats()["connects_held"] >= 1
    guest.send(20, 5000, RW, b"old")  # meanwhile an old connection's packet is still answered
    [rst] = guest.packets()
    assert rst.op == RST
    refill_then_connected(guest, s, 40)


def test_connections_wait_from_the_reset_even_before_the_guest_has_an_event_buffer(guest: Guest) -> None:
    guest.dev.reset_transport()  # no event buffer: the event waits, and so do connections
    s = host_client(guest)
    s.sendall(b"CONNECT 41\n")
    guest.pump()
    assert guest.packets() == []
    head = guest.ev.add_chain([(4, True)])
    guest.t.notify(EVQ)
    assert guest.ev.used() == [(head, 4)]
    guest.pump()
    assert guest.packets() == []  # delivered, not yet handled
    refill_then_connected(guest, s, 41)


def test_two_resets_need_two_fresh_event_buffers(guest: Guest) -> None:
    guest.ev.add_chain([(4, True)])
    guest.ev.add_chain([(4, True)])
    guest.dev.reset_transport()
    guest.dev.reset_transport()
    assert len(guest.ev.used()) == 2
    s = host_client(guest)
    s.sendall(b"CONNECT 42\n")
    guest.ev.add_chain([(4, True)])  # the first handled
    guest.t.notify(EVQ)
    guest.pump()
    assert guest.packets() == []
    guest.ev.add_chain([(4, True)])  # and the second
    guest.t.notify(EVQ)
    guest.pump()
    [req] = guest.packets()
    assert (req.op, req.dst_port) == (REQUEST, 42)
    s.close()


def test_a_guest_that_never_handles_the_reset_keeps_its_host_out_only_so_long(
        guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    from microvm.devices.virtio import vsock_muxer

    monkeypatch.setattr(vsock_muxer, "HOLD_LIMIT", 0.05)
    guest.ev.add_chain([(4, True)])
    guest.dev.reset_transport()
    s = host_client(guest)
    s.sendall(b"CONNECT 43\n")
    guest.pump()
    assert guest.packets() == []
    time.sleep(0.1)
    late = host_client(guest)  # any host event after the limit lets them in
    late.sendall(b"CONNECT 44\n")
    guest.pump()
    assert sorted(p.dst_port for p in guest.packets() if p.op == REQUEST) == [43, 44]
    s.close()
    late.close()


def test_device_reset_closes_connections_and_keeps_listening(guest: Guest) -> None:
    s1 = guest_connect(guest, 5000, src_port=30)
    s2, _ = host_connect(guest, 31)
    pending = host_client(guest)  # no CONNECT line yet
    guest.pump()
    guest.d.reset()
    for s in (s1, s2, pending):
        assert is_closed(s)
        s.close()
    assert guest.stats()["connections_open"] == 0
    early = host_client(guest)  # waits in the backlog while the driver is down
    early.sendall(b"CONNECT 32\n")
    guest.pump()
    guest.rx_bufs.clear()
    guest.bring_up()
    guest.post_rx([4096] * 4)
    [req] = guest.packets()
    assert (req.op, req.dst_port) == (REQUEST, 32)
    early.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_teardown_closes_every_fd_and_unlinks(sockdir: str) -> None:
    before = open_fds()
    path = os.path.join(sockdir, "v.sock")
    g = Guest(path)
    g.post_rx([4096] * 8)
    host_side = [guest_connect(g, 5000 + i, src_port=40 + i) for i in range(3)]
    host_side += [host_connect(g, 50 + i)[0] for i in range(3)]
    host_side.append(host_client(g))  # still greeting
    g.pump()
    g.send(40, 5000, RW, b"x" * 1000)
    assert g.stats()["connections_open"] == 7
    g.t.reset()  # as DeviceManager.close does: every connection closed...
    for s in host_side:
        assert is_closed(s)
    g.close()  # ...then the machine closes the device: the listener too
    assert not os.path.exists(path)
    assert open_fds() == before
    g.dev.close()  # twice is fine


def test_close_leaves_a_replaced_path_alone(sockdir: str) -> None:
    path = os.path.join(sockdir, "v.sock")
    dev = VirtioVsock(3, path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)  # someone else's now
    dev.close()
    assert os.path.exists(path)
    other.close()


# --- on a running I/O thread ------------------------------------------------------------------------


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


def test_on_a_running_io_thread(sockdir: str) -> None:
    """The host side served by a started IoThread while the test, like a vCPU,
    notifies queues: the transport's lock keeps them apart."""
    g = Guest(os.path.join(sockdir, "v.sock"))
    g.io.start()
    try:
        g.post_rx([4096] * 16)
        s = host_client(g)
        s.sendall(b"CONNECT 900\n")
        got: list[Pkt] = []

        def more() -> bool:  # like the guest: the used index is published after the elements
            got.extend(g.packets())
            return bool(got)

        wait_for(more)
        [req] = got
        g.send(900, req.src_port, RESPONSE)  # a vCPU's notify: the transport's lock
        assert read_line(s) == b"OK %d\n" % req.src_port
        got.clear()
        s.sendall(b"ping")
        wait_for(more)
        assert got[0].payload == b"ping"
        g.d.reset()  # a vCPU resets the device while the I/O thread serves it
        assert is_closed(s)
        s.close()
    finally:
        g.close()


# --- the property ------------------------------------------------------------------------------------


class Model:
    """One connection seen from both ends, with a guest that keeps to the credit it hears of."""

    def __init__(self, g: Guest, host: socket.socket, gport: int, hport: int, guest_buf: int):
        self.g, self.host = g, host
        self.gport, self.hport = gport, hport
        self.guest_buf = guest_buf
        host.setblocking(False)
        self.host_sent = bytearray()  # host -> guest
        self.guest_got = bytearray()
        self.guest_sent = bytearray()  # guest -> host
        self.host_got = bytearray()
        self.guest_fwd = 0  # bytes the guest consumed, as it last told the device
        self.guest_consumed = 0
        self.dev_buf = 0
        self.dev_fwd = 0
        self.reset = False
        self.host_eof = False
        self.guest_shut = 0
        self.seq = 0

    def collect(self) -> None:
        for p in self.g.packets():
            assert (p.src_cid, p.dst_cid, p.type) == (HOST, CID, STREAM)
            assert (p.src_port, p.dst_port) == (self.hport, self.gport)
            if p.op == RST:
                self.reset = True
                continue
            assert not self.reset, "a packet after RST"
            self.dev_buf, self.dev_fwd = p.buf_alloc, p.fwd_cnt
            if p.op == RW:
                assert p.len == len(p.payload) > 0
                self.guest_got += p.payload
                # The device never sends past the credit the guest gave it.
                assert len(self.guest_got) - self.guest_fwd <= self.guest_buf
            else:
                assert p.op in (CREDIT_UPDATE, SHUTDOWN), p

    def host_write(self, n: int) -> None:
        data = bytes((self.seq + i) * 7 & 0xFF for i in range(n))
        try:
            sent = self.host.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            return
        self.seq += sent
        self.host_sent += data[:sent]

    def host_read(self, n: int) -> None:
        try:
            data = self.host.recv(n)
        except (BlockingIOError, ConnectionResetError):
            return
        if not data:
            self.host_eof = True
        self.host_got += data

    def guest_send(self, n: int, overrun: bool) -> None:
        if self.reset:
            return
        credit = self.dev_buf - (len(self.guest_sent) - self.dev_fwd)
        n = n if overrun else min(n, credit)
        if n <= 0:
            return
        data = os.urandom(n)
        self.g.send(self.gport, self.hport, RW, data, buf_alloc=self.guest_buf, fwd_cnt=self.guest_fwd)
        self.guest_sent += data

    def stray(self, i: int) -> None:
        if self.reset:
            return
        op, flags, payload, length = STRAY[i]
        self.g.send(self.gport, self.hport, op, payload, flags=flags, length=length, buf_alloc=self.guest_buf,
                    fwd_cnt=self.guest_fwd)
        if op == SHUTDOWN:
            self.guest_shut |= flags & (SHUT_RCV | SHUT_SEND)

    def guest_credit(self, n: int) -> None:
        if self.reset:
            return
        self.guest_consumed = min(len(self.guest_got), self.guest_consumed + n)
        self.guest_fwd = self.guest_consumed
        self.g.send(self.gport, self.hport, CREDIT_UPDATE, buf_alloc=self.guest_buf, fwd_cnt=self.guest_fwd)

    def check(self) -> None:
        # Whole and in order, or cut short by a reset: never reordered, duplicated or corrupted.
        assert self.guest_got == self.host_sent[:len(self.guest_got)]
        assert self.host_got == self.guest_sent[:len(self.host_got)]


# What a confused or hostile guest may send on the connection: (op, flags, payload, len).
STRAY = [(0, 0, b"", None), (99, 0, b"", None), (REQUEST, 0, b"", None), (RESPONSE, 0, b"", None),
         (CREDIT_REQUEST, 0, b"", None), (RW, 0, b"ab", 3), (SHUTDOWN, SHUT_SEND, b"", None),
         (SHUTDOWN, SHUT_RCV, b"", None), (SHUTDOWN, 0xFC, b"", None)]

ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("host_write"), st.integers(1, 20000)),
    st.tuples(st.just("host_read"), st.integers(1, 40000)),
    st.tuples(st.just("guest_send"), st.integers(1, 20000)),
    st.tuples(st.just("guest_credit"), st.integers(1, 20000)),
    st.tuples(st.just("post_rx"), st.integers(45, 9000)),
    st.tuples(st.just("pump"), st.just(0)),
    st.tuples(st.just("overrun"), st.integers(1, 20000)),
    st.tuples(st.just("stray"), st.integers(0, len(STRAY) - 1)),
), max_size=40)


@settings(max_examples=400, deadline=None)
@given(actions=ACTIONS, host_initiated=st.booleans(), guest_buf=st.integers(500, 70000),
       buf_alloc=st.sampled_from([4096, 20000, vs.DEFAULT_BUF_ALLOC]), cut=st.one_of(st.none(), st.integers(1, 60)))
def test_streams_arrive_whole_and_in_order(actions: list[tuple[str, int]], host_initiated: bool, guest_buf: int,
                                            buf_alloc: int, cut: int | None) -> None:
    sockdir = tempfile.mkdtemp(prefix="vsk", dir="/tmp")
    g = Guest(os.path.join(sockdir, "v.sock"), buf_alloc=buf_alloc)
    try:
        g.post_rx([4096] * 2)
        if host_initiated:
            host, hport = host_connect(g, 700, guest_buf=guest_buf)
            gport = 700
        else:
            host, hport, gport = guest_connect(g, 5000, src_port=700, guest_buf=guest_buf), 5000, 700
        # A small send buffer on the device's end, so that a slow host reader
        # shows within a few actions (the device's bound is buf_alloc either way).
        for conn in g.dev.muxer._conns.values():
            conn.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        x = Model(g, host, gport, hport, guest_buf)
        x.dev_buf = buf_alloc
        for action, n in actions:
            if action == "host_write":
                x.host_write(n)
            elif action == "host_read":
                x.host_read(n)
            elif action == "guest_send":
                x.guest_send(n, overrun=False)
            elif action == "overrun":
                x.guest_send(n, overrun=True)
            elif action == "guest_credit":
                x.guest_credit(n)
            elif action == "stray":
                x.stray(n)
            elif action == "post_rx" and len(g.rx.free) >= 2:
                g.post_rx([n], cut=cut)
            g.pump()
            x.collect()
            x.check()
            assert g.stats()["host_buffered"] <= buf_alloc
            if g.stats()["host_buffered"]:
                event("guest bytes waited for the host reader")
            if x.guest_got and len(x.guest_got) - x.guest_fwd == guest_buf:
                event("the guest ran out of credit")
        # Drain: the host reads everything, the guest consumes everything, while that moves anything.
        idle = 0
        while not x.reset and idle < 3:
            before = len(x.guest_got), len(x.host_got)
            x.host_read(1 << 20)
            x.guest_credit(1 << 30)
            if len(g.rx_bufs) < 4:
                g.post_rx([8192] * 4, cut=cut)
            g.pump()
            x.collect()
            idle = idle + 1 if (len(x.guest_got), len(x.host_got)) == before else 0
        x.check()
        event(f"reset: {x.reset}")
        event(f"bytes both ways: {bool(x.guest_got and x.host_got)}")
        if not x.reset:
            if not x.guest_shut & SHUT_RCV:
                assert x.guest_got == x.host_sent
            assert x.host_got == x.guest_sent
        assert g.t.active and not g.t.errors
        host.close()
    finally:
        g.close()
        shutil.rmtree(sockdir, ignore_errors=True)
