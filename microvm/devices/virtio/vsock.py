"""virtio-vsock with Unix sockets on the host (virtio 1.2, section 5.10), as Firecracker does it.

Queue 0 receives (device to driver), queue 1 transmits, queue 2 carries events;
the config space is one le64, guest_cid. Stream sockets only: we do not offer
VIRTIO_VSOCK_F_SEQPACKET. Every packet is a struct virtio_vsock_hdr
(vsock_abi.VsockHdr) and its payload; the host is CID 2. This module moves
packets between the queues and the muxer (vsock_muxer.py), which owns the
connections, their host sockets, credit and shutdown: the host side is
described there. A host program connects to `uds_path` and writes
``CONNECT <port>\\n``; a guest connecting to host port P reaches ``<uds_path>_P``.

A guest never crashes the VMM nor makes it touch memory outside the guest
(queue.py checks every descriptor; we read and write only through them): a
transmit chain shorter than a header or with device-writable buffers, or a
packet from a CID not the guest's or to one not the host's, is dropped; a len
beyond the chain or MAX_PKT_PAYLOAD, or a type other than stream, is answered
with RST (resetting the connection it names); a receive or event buffer too
small for what goes in it is returned unused. Each is counted in `counters`
(stats(), COUNTERS) and logged sparingly.

Threading: every call runs under the transport's lock, on the VM's shared
I/O thread (queue notifications arrive there by ioeventfd; attach() puts the
host sockets there too, and their events come back in through the
transport's notify, which it gives us as `notify_queue`, as a tap's come
back for virtio-net) or on a vCPU thread (device reset). Wiring:

    dev = VirtioVsock(guest_cid=3, uds_path="/run/vm.vsock")
    devices.add_virtio("vsock", dev)  # the transport sets dev.notify_queue
    dev.attach(vm.io)  # the host sockets, on the same I/O thread

and dev.close() at teardown, once the I/O thread has stopped. reset() (by the
driver, and by DeviceManager.close) closes every connection; close() also the
listener, and unlinks `uds_path`. reset_transport() drops every connection and
posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.6).

Snapshots: connections do not survive one (their host sockets are this
process's). A restored device starts with none and, if the guest's driver was
active, posts that same event, so the guest resets its sockets (restore_state).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from microvm.devices.state import Fields, State
from microvm.devices.virtio import VIRTIO_ID_VSOCK, QueueState, config_read
from microvm.devices.virtio.queue import DescriptorChain, Queue, stream_views
from microvm.devices.virtio.vsock_abi import (
    EVENT_SIZE,
    HDR_SIZE,
    HOST_CID,
    MAX_GUEST_CID,
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    VIRTIO_VSOCK_TYPE_STREAM,
    VsockHdr,
)
from microvm.devices.virtio.vsock_muxer import LOCAL_PORTS, IoLoop, VsockMuxer, count, scatter
from microvm.errors import ConfigError
from microvm.memory import GuestMemory

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZE = 256
DEFAULT_BUF_ALLOC = 256 * 1024  # per connection, as Linux's default buffer and Firecracker's
MAX_CONNECTIONS = 1023  # Firecracker's limit, host and guest initiated together

# Every counter stats() reports, zero until it happens.
COUNTERS = (
    "rx_packets", "rx_bytes",  # packets and payload bytes put in receive buffers
    "tx_packets", "tx_bytes",  # packets and payload bytes taken from the guest
    "host_connects",  # CONNECT lines turned into REQUESTs
    "guest_connects",  # guest REQUESTs connected to <uds_path>_P
    "connect_failed",  # guest REQUESTs nobody listened for (RST)
    "connect_refused",  # connections over max_connections (closed, or RST)
    "bad_connect_line",  # garbled or overlong CONNECT lines (socket closed)
    "rst_sent", "rst_received",
    "rst_dropped",  # RSTs owed past vsock_muxer.MAX_OWED_RSTS while the guest posts no buffers
    "tx_malformed",  # chains with device-writable buffers or shorter than the header (dropped)
    "tx_oversized",  # len larger than MAX_PKT_PAYLOAD (RST)
    "tx_truncated",  # len larger than the chain holds (RST)
    "tx_bad_cid",  # from a CID not the guest's, or to one not the host's (dropped)
    "tx_bad_type",  # not a stream packet (RST)
    "tx_bad_op",  # unknown op, or one the connection's state does not allow (RST)
    "tx_unknown_conn",  # packets for no connection (RST)
    "tx_overrun",  # data past the credit we advertised (RST)
    "rx_bad_buffer", "event_bad_buffer",  # buffers returned unused
    "host_errors",  # host socket errors (RST)
    "transport_resets",
    "connects_held",  # host connections left in the backlog until the guest handled a transport reset
)


class VirtioVsock(QueueState):
    device_type = VIRTIO_ID_VSOCK
    features = 0  # stream only; VIRTIO_F_VERSION_1 is the transport's
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, guest_cid: int, uds_path: str | Path, *, buf_alloc: int = DEFAULT_BUF_ALLOC,
                 max_connections: int = MAX_CONNECTIONS):
        """Listens on `uds_path` at once (a live socket there is a ConfigError, a stale one is replaced)."""
        if isinstance(guest_cid, bool) or not isinstance(guest_cid, int) or not 3 <= guest_cid <= MAX_GUEST_CID:
            raise ConfigError(f"vsock: guest CID {guest_cid!r} is not in 3..{MAX_GUEST_CID} (0-2 are reserved)")
        if not 1 <= buf_alloc <= 0xFFFF_FFFF or max_connections < 1:
            raise ConfigError(f"vsock: buf_alloc {buf_alloc} or max_connections {max_connections} out of range")
        super().__init__()
        self.guest_cid = guest_cid
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.muxer = VsockMuxer(guest_cid, uds_path, buf_alloc, max_connections, self.counters, self._host_kick)
        self.uds_path = self.muxer.uds_path
        self.buf_alloc = buf_alloc
        # Set by the transport (mmio.py): serve a queue as if notified, under its lock.
        self.notify_queue: Callable[[int], None] | None = None
        self._rx_stash: DescriptorChain | None = None  # a receive buffer popped but not filled
        self._event_owed = False
        self._transport_reset = False
        self._reset_on_activate = False  # restore_state: the guest's connections are gone
        # The event queue's avail index when the reset event went out, until the guest
        # has handled it (see _reset_handled); meanwhile nothing goes to its receive queue.
        self._reset_mark: int | None = None
        self._resets_unhandled = 0  # reset events posted since _reset_mark, each to be followed by a refill

    # --- wiring and lifecycle ---------------------------------------------------------------

    def attach(self, io: IoLoop) -> None:
        """Serve the host sockets on `io` (the VM's shared I/O thread), once the
        transport exists: their events re-enter through its notify_queue."""
        self.muxer.attach(io)

    def _host_kick(self) -> None:
        """A host socket event (I/O thread): served like a receive queue notification."""
        if self.notify_queue is not None:
            self.notify_queue(RX_QUEUE)
        else:  # no transport: nothing to serialize with
            self.process(RX_QUEUE)

    def read_config(self, offset: int, size: int) -> int:
        return config_read(self.guest_cid.to_bytes(8, "little"), offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # guest_cid is read-only (5.10.4)

    def activate(self, mem: GuestMemory, queues: list[Queue], features: int, signal: Callable[[int], None]) -> None:
        super().activate(mem, queues, features, signal)
        # A driver just set up has no connections to reset, unless it was restored with some.
        self._transport_reset, self._reset_on_activate = self._reset_on_activate, False
        self.muxer.wake_listener()
        self.process(RX_QUEUE)

    def reset(self) -> None:
        super().reset()
        self.muxer.drop_all()
        self._rx_stash = None
        self._event_owed = self._transport_reset = self._reset_on_activate = False
        self._reset_mark = None
        self._resets_unhandled = 0
        self.muxer.hold_accept(False)

    def close(self) -> None:
        """Teardown, once the I/O thread has stopped: every fd closed, `uds_path` unlinked."""
        self.muxer.close()
        self._rx_stash = None

    def reset_transport(self) -> None:
        """Drop every connection and post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.6):
        the guest resets its sockets and reads guest_cid again."""
        self._transport_reset = True
        if self.notify_queue is not None:
            self.notify_queue(EVENT_QUEUE)  # under the transport's lock
        else:
            self.process(EVENT_QUEUE)

    # --- snapshots (devices/state.py) -------------------------------------------------------------

    def chains_held(self) -> dict[int, int]:
        """A receive buffer popped but not filled goes back to the ring."""
        return {RX_QUEUE: 1} if self._rx_stash is not None else {}

    def snapshot_state(self) -> State:
        """The guest CID, and whether the driver is active. Connections are not state:
        their host sockets belong to this process, so none survives (see restore_state)."""
        return {"kind": "virtio-vsock", "guest_cid": self.guest_cid, "uds_path": self.uds_path,
                "active": self.mem is not None, "next_port": self.muxer.next_port}

    def restore_state(self, state: State) -> None:
        """Same guest CID (a SnapshotError otherwise); `uds_path` is the caller's to compare.

        The restored device has no connections, while the guest's sockets think
        they are still connected. So if the driver was active, the activation the
        transport's restore does next owes VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
        (5.10.6.6), which goes out (as reset_transport() sends it) once the
        transport has served the event queue, restored by then: the guest resets
        every socket, and reads guest_cid again."""
        f = Fields(state, "virtio-vsock")
        f.same("guest_cid", self.guest_cid)
        self._reset_on_activate = f.flag("active")
        # Host ports go on from where they were: the guest's reset sockets stay in
        # its connected table until their programs close them, and a new connection
        # with an old one's ports would reach that socket, and get an RST.
        self.muxer.next_port = f.integer("next_port", LOCAL_PORTS.start, LOCAL_PORTS.stop - 1)
        self.muxer.drop_all()
        self._rx_stash = None

    def stats(self) -> dict[str, int]:
        """COUNTERS, and two gauges: connections_open (host and guest initiated, those
        still connecting too) and host_buffered (guest bytes waiting for host readers)."""
        return {**self.counters, "connections_open": self.muxer.open_count, "host_buffered": self.muxer.buffered}

    # --- queues ------------------------------------------------------------------------------

    def process(self, queue_index: int) -> None:
        if self.mem is None or not self.queues:
            return
        self._check_reset()
        if queue_index == EVENT_QUEUE:
            if self._transport_reset:
                self._transport_reset = False
                self.muxer.drop_all()
                self._event_owed = True
                self.muxer.hold_accept(True)  # from now: even before the guest has a buffer for it
                self.counters["transport_resets"] += 1
            self._post_event()
            self._check_reset()
            if self._reset_mark is None:
                self.muxer.host_events()  # connections that waited for the guest's reset
                self._fill_rx()
            return
        if queue_index == TX_QUEUE:
            self.drain(TX_QUEUE, self._tx_packet)
        self.muxer.host_events()
        self._fill_rx()

    def _tx_packet(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """One packet from the guest, checked, to the muxer; we write nothing into it (used length 0)."""
        readable = chain.readable
        size = sum(d.len for d in readable)
        if len(readable) != len(chain.descriptors) or size < HDR_SIZE:
            count(self.counters, "tx_malformed", f"transmit chain of {size} bytes, or with device-writable buffers")
            return 0
        hdr = VsockHdr.unpack(b"".join(stream_views(mem, readable, 0, HDR_SIZE)))
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != HOST_CID:
            count(self.counters, "tx_bad_cid", f"packet from CID {hdr.src_cid} to CID {hdr.dst_cid} dropped")
        elif hdr.len > MAX_PKT_PAYLOAD:
            self.muxer.refuse(hdr, "tx_oversized", f"packet len {hdr.len} over {MAX_PKT_PAYLOAD}")
        elif hdr.len > size - HDR_SIZE:
            self.muxer.refuse(hdr, "tx_truncated", f"packet len {hdr.len} beyond its {size}-byte chain")
        elif hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
            self.muxer.refuse(hdr, "tx_bad_type", f"socket type {hdr.type}")
        else:
            self.counters["tx_packets"] += 1
            payload = stream_views(mem, readable, HDR_SIZE, HDR_SIZE + hdr.len)
            try:
                self.muxer.send_pkt(hdr, payload)
            finally:
                for view in payload:  # GuestMemory.close() refuses while views are alive
                    view.release()
        return 0

    def _check_reset(self) -> None:
        """Once the guest has handled our last transport-reset event, let host
        connections in again. Linux resets its sockets in the work item that
        then posts a fresh event buffer (virtio_transport_event_work): a buffer
        added after ours was taken says so. A connection request delivered
        before that would be reset with the rest, silently, and the host would
        wait for an answer that never comes; until then they wait in the
        listener's backlog."""
        if self._reset_mark is None or self._event_owed:
            return
        refilled = (self.queues[EVENT_QUEUE].avail_idx() - self._reset_mark) & 0xFFFF
        if refilled >= self._resets_unhandled:  # one fresh buffer per event it handled
            self._reset_mark = None
            self._resets_unhandled = 0
            self.muxer.hold_accept(False)

    def _fill_rx(self) -> None:
        """Fill receive buffers while the muxer has packets for the guest."""
        q, mem = self.queues[RX_QUEUE], self.mem
        assert mem is not None
        if not q.ready or not self.muxer.has_rx():  # most transmit notifications leave nothing to receive
            return

        with self.used_batch(RX_QUEUE) as used:
            while self.muxer.has_rx():
                if self._rx_stash is not None:
                    if n := self.muxer.recv_pkt(mem, self._rx_stash):  # 0: the buffer stays for the next
                        used(self._rx_stash.head, n)
                        self._rx_stash = None
                        self.counters["rx_packets"] += 1
                elif (chain := q.pop()) is None:
                    break
                elif len(chain.writable) != len(chain.descriptors) or chain.writable_len() <= HDR_SIZE:
                    # Linux posts 4 KiB; one that holds no header and payload goes back unused.
                    count(self.counters, "rx_bad_buffer", f"receive buffer of {chain.writable_len()} bytes, "
                          "or device-readable")
                    used(chain.head, 0)
                else:
                    self._rx_stash = chain

    def _post_event(self) -> None:
        q, mem = self.queues[EVENT_QUEUE], self.mem
        assert mem is not None
        if not self._event_owed or not q.ready:
            return
        with self.used_batch(EVENT_QUEUE) as used:
            while self._event_owed and (chain := q.pop()) is not None:
                if len(chain.writable) != len(chain.descriptors) or chain.writable_len() < EVENT_SIZE:
                    count(self.counters, "event_bad_buffer", f"event buffer of {chain.writable_len()} bytes, "
                          "or device-readable")
                    used(chain.head, 0)
                else:
                    event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_bytes(EVENT_SIZE, "little")  # virtio_vsock_event
                    used(chain.head, scatter(mem, chain, event))
                    self._event_owed = False
                    if self._reset_mark is None:
                        self._reset_mark = q.avail_idx()
                    self._resets_unhandled += 1
                    # The guest's refill is our sign: have it notify us of the last one due.
                    q.notify_at(self._reset_mark + self._resets_unhandled - 1)
                    self.muxer.hold_accept(True)
