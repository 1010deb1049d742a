"""virtio-vsock's connections and their host sockets: Firecracker's muxer, for vsock.py.

The host side (backends/vsock.py): we listen on `uds_path`. A host program that
connects there and writes ``CONNECT <port>\\n`` gets a REQUEST sent to that
guest port from a host port picked here (from 2^30 up, as Firecracker); the
guest's RESPONSE makes us write ``OK <host_port>\\n`` and the socket a plain
byte stream; its RST closes the socket. A guest connecting to host port P
reaches the Unix socket ``<uds_path>_P``, or gets an RST if nobody listens.

Flow control (5.10.6.3): every packet we send carries buf_alloc and fwd_cnt.
Host-to-guest data is read from the host socket straight into a receive
buffer, never more than the guest's credit (peer_buf_alloc - (tx_cnt -
peer_fwd_cnt)), so it is never buffered here; with no credit or no buffer we
stop reading, and read again (the fds are edge-triggered) when a credit
update or buffers arrive. Guest-to-host data is written to the host socket at
once; what the socket does not take waits, at most buf_alloc bytes per
connection (the credit we advertise: a guest that sends past it is reset),
and is flushed on EPOLLOUT. CREDIT_UPDATE goes out on CREDIT_REQUEST and when
the guest's view of our free space runs low while we have forwarded more.

Closing (5.10.6.5): end of file from the host is a SHUTDOWN(SEND) to the
guest; a host that closes altogether (POLLHUP), a host socket error, or a
guest SHUTDOWN of both directions once its data is flushed, is an RST. The
guest's SHUTDOWN(SEND) becomes shutdown(SHUT_WR) on the host socket once its
data is out, SHUTDOWN(RCV) shutdown(SHUT_RD). There are no timers: a guest
that never answers a REQUEST leaves the host program waiting for its OK line
(let it time out), and Linux sends its own RST if ours is late.

A packet for no connection, an op that does not fit the connection's state,
or data past the credit, is answered with RST (the connection it names is
reset: its stream would have a hole). Host socket errors reset the one
connection. Everything is counted in the device's counters.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from microvm.backends.vsock import HostStream, Listener, guest_port_path, read_connect_line
from microvm.devices.virtio.queue import DescriptorChain, stream_views
from microvm.devices.virtio.vsock_abi import (
    HDR_SIZE,
    HOST_CID,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VsockHdr,
)
from microvm.memory import GuestMemory

log = logging.getLogger(__name__)

U32 = 0xFFFF_FFFF
MAX_OWED_RSTS = 1024  # RSTs waiting for receive buffers; past this they are dropped (counted)
HOLD_LIMIT = 5.0  # seconds a hold_accept() lasts at most
LOCAL_PORTS = range(1 << 30, 1 << 31)  # host ports for host-initiated connections, as Firecracker

# What a connection owes the guest besides data, sent in this order.
OWE_REQUEST, OWE_RESPONSE, OWE_SHUTDOWN, OWE_CREDIT = 1, 2, 4, 8


def count(counters: Counter[str], counter: str, why: str) -> None:
    """Count a guest's (or host's) mistake; log the first few of each kind, so none floods the log."""
    counters[counter] += 1
    if counters[counter] <= 10:
        log.warning("virtio-vsock: %s", why)


def scatter(mem: GuestMemory, chain: DescriptorChain, data: bytes) -> int:
    """Write `data` at the start of the chain's device-writable stream (checked to fit)."""
    pos = 0
    for view in stream_views(mem, chain.writable, 0, len(data)):
        view[:] = data[pos:pos + len(view)]
        pos += len(view)
        view.release()
    return pos


def _drained(sock: socket.socket) -> bool:
    """Whether a stream socket that just gave a short read would block now (MSG_PEEK
    takes nothing). Data arriving later is a new edge (epoll(7), EPOLLET); an end of
    file or an error (not drained) is met by the next read."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        pass
    return False


class IoLoop(Protocol):
    """What the muxer needs of an IoThread."""

    def add(self, fd: int, handler: Callable[[], None], eventfd: bool = True, name: str = "") -> None: ...

    def modify(self, fd: int, events: int) -> None: ...

    def remove(self, fd: int) -> None: ...


@dataclass(eq=False, slots=True)
class _Conn:
    """One connection, keyed by (local_port, peer_port) as Firecracker's ConnMapKey.
    The byte counters are u32 and wrap, as in the spec."""

    local_port: int  # the host's port
    peer_port: int  # the guest's
    stream: HostStream
    established: bool  # guest-initiated: at once; host-initiated: on the guest's RESPONSE
    owed: int = 0  # OWE_* bits
    request_sent: bool = False
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # payload bytes we sent the guest
    rx_cnt: int = 0  # payload bytes the guest sent us
    fwd_cnt: int = 0  # of which written to the host socket
    announced_fwd: int = 0  # fwd_cnt in our last packet
    readable: bool = True  # the host socket may have data: no EAGAIN since its last event
    host_eof: bool = False
    guest_shut: int = 0  # VIRTIO_VSOCK_SHUTDOWN_* from the guest
    write_shut: bool = False  # we passed the guest's SHUTDOWN(SEND) on
    key: tuple[int, int] = field(init=False)  # (local_port, peer_port), fixed: looked up on every packet

    def __post_init__(self) -> None:
        self.key = self.local_port, self.peer_port

    def credit(self) -> int:
        """What the guest can take now (5.10.6.3.1)."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32))

    def buffered(self) -> int:
        """Guest data taken but not yet written to the host socket."""
        return (self.rx_cnt - self.fwd_cnt) & U32

    def can_read(self) -> bool:
        """Whether to read the host socket for the guest now."""
        return (self.established and self.readable and not self.host_eof
                and not self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV and self.credit() > 0)


def _no_kick() -> None:
    """A closed muxer's kick: nothing left to tell."""


class VsockMuxer:
    """The listening socket and every connection; host socket events are served
    in host_events(), from the device, under the transport's lock."""

    def __init__(self, guest_cid: int, uds_path: str | Path, buf_alloc: int, max_connections: int,
                 counters: Counter[str], kick: Callable[[], None]):
        """kick(): a host socket had an event; have host_events() called (the device's RX path)."""
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.counters = counters
        self._kick = kick
        self._listener: Listener | None = Listener(uds_path)
        self.uds_path = self._listener.path
        self._io: IoLoop | None = None
        self._conns: dict[tuple[int, int], _Conn] = {}
        self._by_fd: dict[int, _Conn] = {}
        self._greeting: dict[int, socket.socket] = {}  # accepted, no CONNECT line yet
        self._ready: set[int] = set()  # fds with an event not yet served
        self._rx_wanted: dict[tuple[int, int], None] = {}  # connections with something for the guest, in turn
        self._rsts: dict[tuple[int, int], None] = {}  # (local, peer) owed an RST, for no connection
        self._next_port = LOCAL_PORTS.start
        self._holding = False  # hold_accept(): new host connections wait in the backlog
        self._hold_deadline = 0.0
        self._accept_held = False  # and one came meanwhile

    # --- lifecycle ------------------------------------------------------------------------------

    def attach(self, io: IoLoop) -> None:
        self._io = io
        if self._listener is not None:
            self._watch(self._listener.fd)

    def wake_listener(self) -> None:
        """Look for host connections at the next host_events(): they may have
        waited while the device was inactive, and their edge is gone."""
        if self._listener is not None:
            self._ready.add(self._listener.fd)

    @property
    def open_count(self) -> int:
        return len(self._conns) + len(self._greeting)

    @property
    def buffered(self) -> int:
        return sum(c.stream.pending for c in self._conns.values())

    def drop_all(self) -> None:
        """Close every connection (host sockets and those still greeting); the listener stays."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        for fd, sock in self._greeting.items():
            self._unwatch(fd)
            sock.close()
        self._greeting.clear()
        self._ready.clear()
        self._rx_wanted.clear()
        self._rsts.clear()

    def close(self) -> None:
        self.drop_all()
        if self._listener is not None:
            self._unwatch(self._listener.fd)
            self._listener.close()
            self._listener = None
        # The device's kick and the I/O loop: each leads back to us (a cycle), and nothing calls now.
        self._kick = _no_kick
        self._io = None

    def _watch(self, fd: int) -> None:
        if self._io is not None:
            self._io.add(fd, functools.partial(self._host_ready, fd), eventfd=False, name="vsock")

    def _unwatch(self, fd: int) -> None:
        if self._io is not None:
            self._io.remove(fd)

    def _host_ready(self, fd: int) -> None:
        """A host socket's event, in the I/O thread: remember it, have it served."""
        self._ready.add(fd)
        self._kick()

    # --- host socket events -----------------------------------------------------------------------

    def hold_accept(self, hold: bool) -> None:
        """Leave new host connections in the listener's backlog (hold), or take
        them again, those that came meanwhile first (at the next host_events).
        A hold ends by itself after HOLD_LIMIT seconds (at the next host event):
        a guest that never acknowledges must not keep its host out for ever."""
        self._holding = hold
        self._hold_deadline = time.monotonic() + HOLD_LIMIT if hold else 0.0
        if not hold and self._accept_held and self._listener is not None:
            self._accept_held = False
            self._ready.add(self._listener.fd)

    def host_events(self) -> None:
        while self._ready:
            fd = self._ready.pop()
            if self._listener is not None and fd == self._listener.fd:
                if self._holding and time.monotonic() < self._hold_deadline:
                    self._accept_held = True
                    self.counters["connects_held"] += 1
                    continue
                self._holding = self._accept_held = False
                self._accept()
            elif fd in self._greeting:
                self._greet(fd)
            elif (conn := self._by_fd.get(fd)) is not None:
                self._host_event(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        while (sock := self._listener.accept()) is not None:
            if self.open_count >= self.max_connections:
                count(self.counters, "connect_refused", f"host connection refused: {self.max_connections} open")
                sock.close()
                continue
            fd = sock.fileno()
            self._greeting[fd] = sock
            self._watch(fd)
            self._greet(fd)  # the line may be there already: no new edge would tell us

    def _greet(self, fd: int) -> None:
        sock = self._greeting[fd]
        try:
            port = read_connect_line(sock)
        except (ValueError, EOFError) as e:
            if isinstance(e, ValueError):
                count(self.counters, "bad_connect_line", f"host connection closed: {e}")
            del self._greeting[fd]
            self._unwatch(fd)
            sock.close()
            return
        if port is None:
            return
        del self._greeting[fd]
        conn = _Conn(self._local_port(port), port, HostStream(sock), established=False, owed=OWE_REQUEST)
        self._conns[conn.key] = conn
        self._by_fd[fd] = conn
        self.counters["host_connects"] += 1
        self._want_rx(conn)

    @property
    def next_port(self) -> int:
        """The host port the next host-initiated connection tries first."""
        return self._next_port

    @next_port.setter
    def next_port(self, port: int) -> None:
        if port not in LOCAL_PORTS:
            raise ValueError(f"host port {port} outside {LOCAL_PORTS.start}..{LOCAL_PORTS.stop - 1}")
        self._next_port = port

    def _local_port(self, peer_port: int) -> int:
        # At most len(self._conns) ports can be taken with this peer port.
        while True:
            port = self._next_port
            self._next_port = port + 1 if port + 1 < LOCAL_PORTS.stop else LOCAL_PORTS.start
            if (port, peer_port) not in self._conns:
                return port

    def _host_event(self, conn: _Conn) -> None:
        if conn.stream.pending and not self._flush(conn):
            return
        conn.readable = True
        if not conn.established or conn.host_eof or conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV:
            # Not reading now: only a hang-up matters (the host gave up, or closed for good).
            if conn.stream.hung_up():
                if conn.established or conn.request_sent:
                    self._reset(conn)
                else:
                    self._drop(conn)  # the guest never heard of it
            return
        self._want_rx(conn)

    def _flush(self, conn: _Conn) -> bool:
        """Write what waits for the host; False if that ended the connection."""
        try:
            written = conn.stream.flush()
        except OSError as e:
            count(self.counters, "host_errors", f"writing to a host socket failed: {e.strerror}")
            self._reset(conn)
            return False
        conn.fwd_cnt = (conn.fwd_cnt + written) & U32
        self._watch_output(conn)
        if not conn.stream.pending:
            if conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND and not conn.write_shut:
                conn.stream.shutdown(socket.SHUT_WR)
                conn.write_shut = True
            if conn.guest_shut == VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND:
                self._reset(conn)  # 5.10.6.5: a clean close ends with our RST
                return False
        self._credit_check(conn)
        return True

    def _watch_output(self, conn: _Conn) -> None:
        """EPOLLOUT while bytes wait for the host reader, not otherwise (each read would wake us)."""
        on = bool(conn.stream.pending)
        if conn.stream.watching_output != on and self._io is not None:
            self._io.modify(conn.stream.fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))
            conn.stream.watching_output = on

    def _credit_check(self, conn: _Conn) -> None:
        """Owe a CREDIT_UPDATE once the guest thinks little room is left but we have freed some."""
        if conn.fwd_cnt == conn.announced_fwd:
            return
        free_as_seen = self.buf_alloc - ((conn.rx_cnt - conn.announced_fwd) & U32)
        if free_as_seen < min(MAX_PKT_PAYLOAD, self.buf_alloc // 2 + 1):
            conn.owed |= OWE_CREDIT
            self._want_rx(conn)

    def _drop(self, conn: _Conn) -> None:
        """Forget a connection and close its host socket."""
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._rx_wanted.pop(conn.key, None)
        if self._by_fd.pop(conn.stream.fd, None) is not None:
            self._unwatch(conn.stream.fd)
            conn.stream.close()

    def _reset(self, conn: _Conn) -> None:
        self._drop(conn)
        self._owe_rst(conn.local_port, conn.peer_port)

    def _owe_rst(self, local_port: int, peer_port: int) -> None:
        if len(self._rsts) >= MAX_OWED_RSTS:
            count(self.counters, "rst_dropped", "too many RSTs wait for receive buffers; one dropped")
            return
        self._rsts[local_port, peer_port] = None

    # --- guest to host ------------------------------------------------------------------------------

    def send_pkt(self, hdr: VsockHdr, payload: list[memoryview]) -> None:
        """A packet from the guest whose header the device checked (CIDs, len, type);
        `payload` holds its hdr.len bytes."""
        conn = self._conns.get((hdr.dst_port, hdr.src_port))
        op = hdr.op
        if op == VIRTIO_VSOCK_OP_REQUEST:
            self._guest_connect(hdr, conn)
            return
        if conn is None:
            if op == VIRTIO_VSOCK_OP_RST:
                self.counters["rst_received"] += 1  # never answer an RST
            else:
                self.refuse(hdr, "tx_unknown_conn", f"op {op} for no connection")
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt  # on every packet (5.10.6.3)
        if op == VIRTIO_VSOCK_OP_RST:
            self.counters["rst_received"] += 1
            self._drop(conn)
            return
        if op == VIRTIO_VSOCK_OP_RESPONSE and not conn.established and conn.request_sent:
            conn.established = conn.readable = True  # what the host sent after CONNECT is read now
            conn.stream.send_text(b"OK %d\n" % conn.local_port)
            if not self._flush(conn):
                return
        elif not conn.established or op == VIRTIO_VSOCK_OP_RESPONSE:
            self.refuse(hdr, "tx_bad_op", f"op {op} before the connection is up, or twice")
            return
        elif op == VIRTIO_VSOCK_OP_RW:
            if not self._guest_data(hdr, payload, conn):
                return
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            conn.guest_shut |= hdr.flags & (VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND)
            if hdr.flags & VIRTIO_VSOCK_SHUTDOWN_RCV:
                conn.stream.shutdown(socket.SHUT_RD)  # the host program's writes now fail (EPIPE)
            if not self._flush(conn):
                return
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.owed |= OWE_CREDIT
        elif op != VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            self.refuse(hdr, "tx_bad_op", f"unknown op {op}")
            return
        self._want_rx(conn)  # a packet may have brought credit

    def refuse(self, hdr: VsockHdr, counter: str, why: str) -> None:
        """Count a bad packet and answer RST; the connection it names (if any) is reset."""
        count(self.counters, counter, f"{why}: RST")
        conn = self._conns.get((hdr.dst_port, hdr.src_port))
        if conn is not None:
            self._reset(conn)
        elif hdr.op != VIRTIO_VSOCK_OP_RST:
            self._owe_rst(hdr.dst_port, hdr.src_port)

    def _guest_connect(self, hdr: VsockHdr, conn: _Conn | None) -> None:
        if conn is not None:
            self.refuse(hdr, "tx_bad_op", f"REQUEST for connected port {hdr.dst_port}")
            return
        if self.open_count >= self.max_connections:
            self.refuse(hdr, "connect_refused", f"guest connection refused: {self.max_connections} open")
            return
        try:
            stream = HostStream.connect(guest_port_path(self.uds_path, hdr.dst_port))
        except OSError as e:
            self.counters["connect_failed"] += 1
            log.debug("virtio-vsock: guest connection to port %d: %s", hdr.dst_port, e.strerror)
            self._owe_rst(hdr.dst_port, hdr.src_port)
            return
        conn = _Conn(hdr.dst_port, hdr.src_port, stream, established=True, owed=OWE_RESPONSE,
                     peer_buf_alloc=hdr.buf_alloc, peer_fwd_cnt=hdr.fwd_cnt)
        self._conns[conn.key] = conn
        self._by_fd[stream.fd] = conn
        self._watch(stream.fd)
        self.counters["guest_connects"] += 1
        self._want_rx(conn)

    def _guest_data(self, hdr: VsockHdr, payload: list[memoryview], conn: _Conn) -> bool:
        """Pass RW data on to the host; False if that ended the connection."""
        if conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND:
            self.refuse(hdr, "tx_bad_op", "data after the guest's SHUTDOWN(SEND)")
            return False
        if conn.buffered() + hdr.len > self.buf_alloc:
            self.refuse(hdr, "tx_overrun", f"{hdr.len} bytes past the credit we gave")
            return False
        try:
            written = conn.stream.send(payload)
        except OSError as e:
            count(self.counters, "host_errors", f"writing to a host socket failed: {e.strerror}")
            self._reset(conn)
            return False
        conn.rx_cnt = (conn.rx_cnt + hdr.len) & U32
        conn.fwd_cnt = (conn.fwd_cnt + written) & U32
        self.counters["tx_bytes"] += hdr.len
        self._watch_output(conn)
        self._credit_check(conn)
        return True

    # --- host to guest ------------------------------------------------------------------------------

    def has_rx(self) -> bool:
        return bool(self._rsts or self._rx_wanted)

    def _want_rx(self, conn: _Conn) -> None:
        if self._conns.get(conn.key) is conn and (conn.owed or conn.can_read()):
            self._rx_wanted[conn.key] = None

    def recv_pkt(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """The next packet for the guest into `chain` (device-writable, more than a
        header): its length, or 0 if that turned out to be nothing. RSTs first,
        then the connections in turn."""
        if self._rsts:
            local, peer = next(iter(self._rsts))
            del self._rsts[local, peer]
            self.counters["rst_sent"] += 1
            return scatter(mem, chain, VsockHdr(HOST_CID, self.guest_cid, local, peer, 0, VIRTIO_VSOCK_TYPE_STREAM,
                                                VIRTIO_VSOCK_OP_RST, 0, 0, 0).pack())
        key = next(iter(self._rx_wanted))
        del self._rx_wanted[key]
        conn = self._conns[key]
        n = self._conn_packet(mem, chain, conn)
        self._want_rx(conn)  # to the back of the line
        return n

    def _conn_packet(self, mem: GuestMemory, chain: DescriptorChain, conn: _Conn) -> int:
        if conn.owed & OWE_REQUEST:
            conn.request_sent = True
            return self._send(mem, chain, conn, VIRTIO_VSOCK_OP_REQUEST, OWE_REQUEST)
        if conn.owed & OWE_RESPONSE:
            return self._send(mem, chain, conn, VIRTIO_VSOCK_OP_RESPONSE, OWE_RESPONSE)
        if conn.can_read():
            n = self._read_host(mem, chain, conn)
            if n or self._conns.get(conn.key) is not conn:
                return n
        if conn.owed & OWE_SHUTDOWN:
            return self._send(mem, chain, conn, VIRTIO_VSOCK_OP_SHUTDOWN, OWE_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND)
        if conn.owed & OWE_CREDIT:
            return self._send(mem, chain, conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE, OWE_CREDIT)
        return 0

    def _read_host(self, mem: GuestMemory, chain: DescriptorChain, conn: _Conn) -> int:
        """Host data straight into the buffer, behind the header, up to the guest's credit."""
        room = min(chain.writable_len() - HDR_SIZE, conn.credit(), MAX_PKT_PAYLOAD)
        views = stream_views(mem, chain.writable, HDR_SIZE, HDR_SIZE + room)
        try:
            n = conn.stream.read_into(views)
        except OSError as e:
            count(self.counters, "host_errors", f"reading a host socket failed: {e.strerror}")
            self._reset(conn)
            return 0
        finally:
            for v in views:
                v.release()
        if n is None:
            conn.readable = False  # until its next event
            return 0
        if n == 0:
            conn.host_eof = True
            if conn.stream.hung_up():
                self._reset(conn)  # closed, not just shut for writing: nothing more either way
            else:
                conn.owed |= OWE_SHUTDOWN
            return 0
        conn.tx_cnt = (conn.tx_cnt + n) & U32
        self.counters["rx_bytes"] += n
        if n < room and _drained(conn.stream.sock):
            conn.readable = False  # saves a receive buffer and a read just to meet EAGAIN
        return self._send(mem, chain, conn, VIRTIO_VSOCK_OP_RW, 0, 0, n)

    def _send(self, mem: GuestMemory, chain: DescriptorChain, conn: _Conn, op: int, owed: int,
              flags: int = 0, length: int = 0) -> int:
        """A packet of the connection's, with our credit (every packet carries it: 5.10.6.3)."""
        conn.owed &= ~(owed | OWE_CREDIT)
        conn.announced_fwd = conn.fwd_cnt
        hdr = VsockHdr(HOST_CID, self.guest_cid, conn.local_port, conn.peer_port, length, VIRTIO_VSOCK_TYPE_STREAM,
                       op, flags, self.buf_alloc, conn.fwd_cnt)
        return scatter(mem, chain, hdr.pack()) + length
