"""virtio-net over a TAP interface (virtio 1.2, section 5.1).

Queue 0 receives (host to guest), queue 1 transmits. Every frame carries a
struct virtio_net_hdr_v1 (12 bytes) in front; the tap was opened with
IFF_VNET_HDR and the same header size, so the header passes between the
guest and the host kernel as is, and checksum and segmentation offloads
(CSUM, TSO4/6, ECN) need no work here: a 64 KiB TCP segment is one frame.

Transmit gathers a chain's readable buffers into one writev() on the tap,
straight from guest memory (Queue.send_chains). Receive reads each frame
straight into the guest's receive buffers, one readv() over the buffers
the queue keeps for us (Queue.receive_frames; reserve and readv_reserved
one frame at a time under a rate limit), when they hold the largest frame
the tap may give (mergeable receive buffers, 5.1.6.3.2, or one big
buffer): then nothing is copied, and the header's fields are fixed up in
place. The queue's loop gives back every frame whose header needs nothing
but num_buffers (net_abi.plain_header); the first other one (too short or
long, an offload the driver did not negotiate, a read error) it leaves in
the buffers for this device to finish or drop and count. With fewer buffers posted, a frame is read into a host buffer
and spread over as many as it needs once they are there; the tap is not
read again until the guest adds buffers (its notification resumes us).
The per-buffer work (walking chains, the iovecs, the used ring) is the
queue's, in C with the Cython queue; what a frame means stays here.

A guest's mistake never takes the VMM down: a frame that is too short or
too long, a transmit chain with writable buffers, a frame the host kernel
rejects, are dropped and counted in `counters` (stats()); a tap that disappears takes
the link down (the guest sees a config change) and is counted.

Snapshots keep the MAC, MTU and link status; frames in flight are dropped
(a frame read from the tap and waiting for receive buffers), as a lossy
network may, and the restored device runs over a new tap (restore_state).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from microvm.backends.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN
from microvm.checks import parse_mac
from microvm.devices.state import Fields, State
from microvm.devices.virtio import VIRTIO_ID_NET, QueueState, config_read
from microvm.devices.virtio.net_abi import (  # noqa: F401  (the header's names, as net.* too)
    ETH_HLEN,
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR_SIZE,
    gso_accepted,
    plain_header,
)
from microvm.devices.virtio.queue import DescriptorChain, Queue
from microvm.devices.virtio.ring import SEND_LONG, SEND_PARTIAL, SEND_SHORT, SEND_WRITABLE, QueueError
from microvm.memory import GuestMemory
from microvm.ratelimit import RateLimit, Throttle

log = logging.getLogger(__name__)

# Feature bits (5.1.3), names from include/uapi/linux/virtio_net.h.
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

VIRTIO_NET_S_LINK_UP = 1

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
MTU = 1500
# The largest frame either way: a 64 KiB GSO segment, its Ethernet header and ours.
MAX_FRAME = VNET_HDR_SIZE + ETH_HLEN + 65535
MAX_RX_CHAINS = QUEUE_SIZE  # receive buffers one frame may take (mergeable)
MAX_READ_ERRORS = 64  # tap read errors in a row before we stop for this wake-up

FEATURES = (
    (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_MTU)
    | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN) | (1 << VIRTIO_NET_F_HOST_TSO4) | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN) | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_NET_F_STATUS)
)


def _frame_bytes(chain: DescriptorChain) -> int:
    """What a frame to send weighs for the rate limit: its buffers."""
    return sum(d.len for d in chain.descriptors)


# _direct_frame's answers besides a count of chains used.
_NO_FRAME, _DROPPED = -1, -2
# Errors from the tap that mean it is gone (deleted, or its netns went away).
TAP_GONE = (errno.EBADFD, errno.EIO, errno.ENXIO, errno.ENODEV)


class NetBackend(Protocol):
    """The host end: a non-blocking, frame-at-a-time fd with virtio-net headers."""

    fd: int

    def set_offload(self, flags: int) -> None: ...


def random_mac() -> str:
    """A locally administered unicast address (02:xx:xx:xx:xx:xx)."""
    return ":".join(f"{b:02x}" for b in bytes([0x02]) + os.urandom(5))


def offload_flags(features: int) -> int:
    """TUN_F_* for the receive offloads the guest negotiated (5.1.6.4)."""
    def has(bit: int) -> bool:
        return bool(features >> bit & 1)

    if not has(VIRTIO_NET_F_GUEST_CSUM):
        return 0  # no partial checksums, so no segments either: the tap finishes every frame
    flags = TUN_F_CSUM
    if has(VIRTIO_NET_F_GUEST_TSO4):
        flags |= TUN_F_TSO4
    if has(VIRTIO_NET_F_GUEST_TSO6):
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and has(VIRTIO_NET_F_GUEST_ECN):
        flags |= TUN_F_TSO_ECN
    return flags


class VirtioNet(QueueState):
    device_type = VIRTIO_ID_NET
    features = FEATURES
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, backend: NetBackend, mac: str | None = None, mtu: int = MTU,
                 rx_rate_limit: RateLimit | None = None, tx_rate_limit: RateLimit | None = None):
        super().__init__()
        self.rx_throttle, self.tx_throttle = Throttle(rx_rate_limit), Throttle(tx_rate_limit)
        self.backend = backend
        self.mac = parse_mac(mac) if mac is not None else parse_mac(random_mac())
        self.mtu = mtu
        self.link_up = True
        self.counters: Counter[str] = Counter()
        self.config_changed: Callable[[], None] | None = None  # set by the transport
        self.mergeable = False
        self.guest_csum = self.guest_tso4 = self.guest_tso6 = self.guest_ecn = False
        self._gso_accepted = gso_accepted(False, False, False)  # the receive offloads negotiated, per gso_type
        self._rx_view = memoryview(bytearray(MAX_FRAME + 1))  # one spare byte shows truncation
        self._pending = 0  # length of a frame read from the tap, waiting for buffers
        self._last_frame = 0  # the length of the frame _receive_direct read last

    # --- config space (5.1.4) ---------------------------------------------------------

    def _config(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        # mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu
        return self.mac + status.to_bytes(2, "little") + (1).to_bytes(2, "little") + self.mtu.to_bytes(2, "little")

    def read_config(self, offset: int, size: int) -> int:
        return config_read(self._config(), offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # the MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR... legacy; ignored (5.1.4.2)

    # --- snapshots (devices/state.py) ----------------------------------------------------

    def chains_held(self) -> dict[int, int]:
        """Receive buffers popped for a frame not delivered yet, and a frame to send
        that the rate limit held back, go back to their rings."""
        reserved = self.queues[RX_QUEUE].reserved if self.queues else 0
        return ({RX_QUEUE: reserved} if reserved else {}) | {q: 1 for q in self.held}

    def throttles(self) -> dict[int, Throttle]:
        """Per queue, for DeviceManager.add_virtio to bind."""
        return {RX_QUEUE: self.rx_throttle, TX_QUEUE: self.tx_throttle}

    def rate_limits(self) -> dict[str, Throttle]:
        """By the name MicroVM.set_rate_limit knows them: "eth0:rx", "eth0:tx"."""
        return {"rx": self.rx_throttle, "tx": self.tx_throttle}

    def snapshot_state(self) -> State:
        """MAC, MTU and link status. Frames in flight are not state: one read from
        the tap and waiting for receive buffers is dropped, as a lossy network may
        (the guest's TCP resends), and the caller opens a new tap."""
        return {"kind": "virtio-net", "features": self.features, "mac": self.mac, "mtu": self.mtu,
                "link_up": self.link_up}

    def restore_state(self, state: State) -> None:
        """The guest keeps its MAC (the saved one, whatever this device was given) and
        link status: a link that was down stays down (nothing brings one back up)."""
        f = Fields(state, "virtio-net")
        f.same("features", self.features)
        f.same("mtu", self.mtu)
        mac = f.blob("mac", 6)
        if len(mac) != 6:
            raise f.error(f"mac {mac.hex(':')} is not 6 bytes")
        self.mac, self.link_up = mac, f.flag("link_up") and self.link_up  # this tap may have failed already
        self._pending = 0  # (the queues' reserved buffers go with their own restore)

    # --- lifecycle ------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, queues: list[Queue], features: int, signal: Callable[[int], None]) -> None:
        super().activate(mem, queues, features, signal)
        self.mergeable = bool(features >> VIRTIO_NET_F_MRG_RXBUF & 1)
        self.guest_csum = bool(features >> VIRTIO_NET_F_GUEST_CSUM & 1)
        self.guest_tso4 = bool(features >> VIRTIO_NET_F_GUEST_TSO4 & 1)
        self.guest_tso6 = bool(features >> VIRTIO_NET_F_GUEST_TSO6 & 1)
        self.guest_ecn = bool(features >> VIRTIO_NET_F_GUEST_ECN & 1)
        self._gso_accepted = gso_accepted(self.guest_tso4, self.guest_tso6, self.guest_ecn)
        self._set_offload(offload_flags(features))

    def stats(self) -> dict[str, int]:
        """Frames, bytes and every kind of drop, and the rate limits', for RunResult.stats."""
        return (dict(self.counters) | {f"rx_{k}": v for k, v in self.rx_throttle.stats().items()}
                | {f"tx_{k}": v for k, v in self.tx_throttle.stats().items()})

    def reset(self) -> None:
        super().reset()
        self._pending = 0
        self._set_offload(0)

    def _set_offload(self, flags: int) -> None:
        if not self.link_up:
            return
        try:
            self.backend.set_offload(flags)
        except OSError as e:
            self._backend_failed("set offloads", e)

    def process(self, queue_index: int) -> None:
        """A queue notification, or (RX) the tap became readable."""
        if self.mem is None or not self.queues:
            return
        if queue_index == TX_QUEUE:
            self._transmit()
        elif queue_index == RX_QUEUE:
            self._receive()

    # --- transmit (5.1.6.2) -------------------------------------------------------------

    def _transmit(self) -> None:
        """Every frame the guest queued, to the tap: the queue's send_chains while the
        link is up and no rate limit applies, chain by chain (drain) otherwise."""
        q = self.queues[TX_QUEUE]
        assert self.signal is not None
        used = 0
        try:
            while self.link_up and self.tx_throttle.limiter is None and TX_QUEUE not in self.held:
                sent, nbytes, failure = q.send_chains(self.backend.fd, VNET_HDR_SIZE + ETH_HLEN, MAX_FRAME)
                used += sent
                if sent:
                    self.counters["tx_frames"] += sent
                    self.counters["tx_bytes"] += nbytes - sent * VNET_HDR_SIZE
                if failure is None:
                    if sent < q.size:
                        return  # (the queue is empty: the finally clause signals)
                    continue
                used += 1
                self._send_failed(*failure)
        finally:
            if used:
                self.signal(TX_QUEUE)
        self.drain(TX_QUEUE, self._send, self.tx_throttle, _frame_bytes)

    def _send_failed(self, length: int, code: int, written: int) -> None:
        """A frame that was not sent (dropped, counted): send_chains' code for why."""
        if code == SEND_WRITABLE:
            self._drop("tx_malformed", "transmit chain has device-writable buffers")
        elif code == SEND_SHORT:
            self._drop("tx_malformed", f"transmit frame of {length} bytes is shorter than its headers")
        elif code == SEND_LONG:
            self._drop("tx_oversized", f"transmit frame of {length} bytes is longer than {MAX_FRAME}")
        elif code == SEND_PARTIAL:
            self._drop("tx_short", f"short write to the tap ({written} of {length})")
        elif code == errno.EAGAIN:
            self.counters["tx_dropped_busy"] += 1
        elif code in TAP_GONE:
            self._backend_failed("write", OSError(code, os.strerror(code)))
        else:  # EINVAL: the host kernel refused the header (bad GSO fields, ...)
            self._drop("tx_rejected", f"the tap refused a frame: {os.strerror(code)}")

    def _send(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        """One frame to the tap, as send_chains sends it (the rate-limited way, and
        with the link down); the device writes nothing into a transmit buffer (0)."""
        readable = [d for d in chain.descriptors if not d.write]
        length = sum(d.len for d in readable)
        code = (SEND_WRITABLE if len(readable) != len(chain.descriptors) else
                SEND_SHORT if length < VNET_HDR_SIZE + ETH_HLEN else SEND_LONG if length > MAX_FRAME else 0)
        if code:
            self._send_failed(length, code, 0)
            return 0
        if not self.link_up:
            self.counters["tx_dropped_link_down"] += 1
            return 0
        views = [mem.view(d.addr, d.len) for d in readable if d.len]
        try:
            n = os.writev(self.backend.fd, views)
        except OSError as e:
            self._send_failed(length, e.errno or errno.EIO, 0)
            return 0
        finally:
            for v in views:
                v.release()
        if n != length:
            self._send_failed(length, SEND_PARTIAL, n)
            return 0
        self.counters["tx_frames"] += 1
        self.counters["tx_bytes"] += length - VNET_HDR_SIZE
        return 0

    # --- receive (5.1.6.3, 5.1.6.4) --------------------------------------------------------

    def _receive(self) -> None:
        """Move frames from the tap into receive buffers until either runs out."""
        q = self.queues[RX_QUEUE]
        assert self.signal is not None
        used = 0
        errors = 0
        try:
            while self.link_up:
                if not self._pending and not self.rx_throttle.ready():
                    break  # the rate limit: the Throttle's retry brings us back
                if not self._pending:
                    if self.rx_throttle.limiter is None:
                        chains, got = self._receive_frames(q)
                        used += chains
                    else:
                        got = self._receive_direct(q)  # one frame: each is charged
                    if got == _NO_FRAME:
                        break
                    if got == _DROPPED:
                        errors += 1
                        if errors >= MAX_READ_ERRORS:
                            break  # errors in a row: leave the rest for the next wake-up
                        continue
                    if got is not None:
                        used += got
                        errors = 0
                        self.rx_throttle.charge(self._last_frame)
                        continue
                    self._pending = self._read_frame()  # too few buffers for the direct path
                    if not self._pending:
                        break
                taken = self._deliver(q, self._rx_view[:self._pending])
                if taken is None:
                    break  # wait for the guest to post buffers; its notify brings us back
                self.rx_throttle.charge(self._pending)
                self._pending = 0
                used += taken
        finally:
            if used:
                self.signal(RX_QUEUE)

    def _receive_frames(self, q: Queue) -> tuple[int, int | None]:
        """Every frame the queue reads and gives back whole (Queue.receive_frames, in
        C with the Cython queue), then the one it stopped at: (chains used by the
        first, _direct_frame's answer for the other)."""
        frames, chains, nbytes, stop = q.receive_frames(
            self.backend.fd, MAX_FRAME, VNET_HDR_SIZE + ETH_HLEN, self._most_rx_chains(q), self._gso_accepted,
            self.guest_csum)
        if frames:
            self.counters["rx_frames"] += frames
            self.counters["rx_bytes"] += nbytes - frames * VNET_HDR_SIZE
        if isinstance(stop, QueueError):
            raise stop
        return chains, (None if stop is None else self._direct_frame(q, stop))

    def _receive_direct(self, q: Queue) -> int | None:
        """Read one frame from the tap straight into the reserved receive buffers:
        _direct_frame's answer."""
        # (more than MAX_FRAME: one spare byte shows a frame that filled them all was cut)
        if (q.reserve(MAX_FRAME, self._most_rx_chains(q), VNET_HDR_SIZE) <= MAX_FRAME
                or q.reserved_head_len() < VNET_HDR_SIZE):
            return None  # too little room, or a header split over descriptors (fixed up in the host buffer)
        return self._direct_frame(q, q.readv_reserved(self.backend.fd))

    def _direct_frame(self, q: Queue, n: int) -> int | None:
        """A readv into the reserved receive buffers (bytes, or -errno), finished: the
        chains used, _NO_FRAME (nothing to read, or the tap is gone), _DROPPED (a bad
        frame: its buffers stay for the next), or None when the buffers posted cannot
        take the largest frame (the copy path's turn)."""
        n = self._tap_result(n)
        if n == -errno.E2BIG:
            return None  # more buffers than one readv takes
        if n < 0:
            return n
        header = q.peek_reserved(VNET_HDR_SIZE)
        if not self._offloads_ok(header):
            return _DROPPED
        chosen = q.chains_for(n)
        header[NUM_BUFFERS_OFFSET:NUM_BUFFERS_OFFSET + 2] = chosen.to_bytes(2, "little")
        q.use_reserved(n, header)
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += n - VNET_HDR_SIZE
        self._last_frame = n
        return chosen

    def _most_rx_chains(self, q: Queue) -> int:
        return min(MAX_RX_CHAINS, q.size) if self.mergeable else 1

    def _tap_readv(self, views: list[memoryview]) -> int:
        """Read one frame from the tap into views (see _tap_result)."""
        try:
            return self._tap_result(os.readv(self.backend.fd, views))
        except OSError as e:
            return self._tap_result(-(e.errno or errno.EIO))

    def _tap_result(self, n: int) -> int:
        """A read from the tap (bytes, or -errno): the frame's length, _NO_FRAME
        (nothing to read, or the tap is gone), _DROPPED (counted, reported), or
        -E2BIG as it came (too many buffers for one read: nothing was read)."""
        if n == -errno.E2BIG:
            return n
        if n < 0:
            code = -n
            if code == errno.EAGAIN:
                return _NO_FRAME
            if code in TAP_GONE:
                self._backend_failed("read", OSError(code, os.strerror(code)))
                return _NO_FRAME
            # EINVAL: the tap could not express a frame in a virtio-net
            # header (and dropped it); the next one may be fine.
            self._drop("rx_error", f"reading the tap failed: {os.strerror(code)}")
            return _DROPPED
        if n == 0:
            self._backend_failed("read", OSError(errno.EIO, "end of file"))
            return _NO_FRAME
        if n > MAX_FRAME:
            self._drop("rx_oversized", "a frame from the tap is longer than the largest we accept")
            return _DROPPED
        if n < VNET_HDR_SIZE + ETH_HLEN:
            self._drop("rx_malformed", f"a {n}-byte frame from the tap")
            return _DROPPED
        return n

    def _read_frame(self) -> int:
        """One frame into the host buffer: its length, or 0 for none."""
        for _ in range(MAX_READ_ERRORS):
            n = self._tap_readv([self._rx_view])
            if n == _NO_FRAME:
                return 0
            if n != _DROPPED:
                return n
        return 0  # errors in a row: leave the rest for the next wake-up

    def _deliver(self, q: Queue, frame: memoryview) -> int | None:
        """Write one frame into receive buffers; the number used, or None if too few."""
        need = len(frame)
        most = self._most_rx_chains(q)
        room = q.reserve(need - 1, most, VNET_HDR_SIZE)  # until they hold the frame
        if room < need:
            if not self.mergeable and q.reserved:
                # One buffer per frame: this one is too small. The frame is
                # dropped; the buffer stays for the next frame.
                self._drop("rx_no_room", f"a {need}-byte frame does not fit a {room}-byte receive buffer")
                return 0
            if q.reserved >= q.size:  # we hold every buffer: it will never fit
                self._drop("rx_no_room", f"a {need}-byte frame is larger than the whole receive ring")
                return 0
            if q.reserved >= most:
                self._drop("rx_no_room", f"a {need}-byte frame needs more than {MAX_RX_CHAINS} buffers")
                return 0
            return None
        if not self._offloads_ok(frame):
            return 0
        chosen = q.chains_for(need)
        frame[NUM_BUFFERS_OFFSET:NUM_BUFFERS_OFFSET + 2] = chosen.to_bytes(2, "little")
        q.use_reserved(need, frame)
        self.counters["rx_frames"] += 1
        self.counters["rx_copied"] += 1  # read into our buffer first (too few posted for the direct path)
        self.counters["rx_bytes"] += need - VNET_HDR_SIZE
        return chosen

    def _offloads_ok(self, frame: memoryview | bytearray) -> bool:
        """5.1.6.4: the device uses only the receive offloads the driver negotiated.

        TUNSETOFFLOAD keeps the tap from producing others, but frames queued
        before a renegotiation, or a persistent tap set up by someone else,
        may still carry them: such a frame is dropped, never passed on.
        """
        if not plain_header(frame, self._gso_accepted, True):
            self._drop("rx_offload", f"a segment (gso_type {frame[1]:#x}) the guest did not negotiate")
            return False
        if not self.guest_csum:
            if frame[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                self._drop("rx_offload", "a frame with a partial checksum for a guest without GUEST_CSUM")
                return False
            frame[0:NUM_BUFFERS_OFFSET] = bytes(NUM_BUFFERS_OFFSET)  # no flags, no offload fields
        return True

    # --- failures -----------------------------------------------------------------------------

    def _drop(self, counter: str, why: str) -> None:
        self.counters[counter] += 1
        if self.counters[counter] <= 10:  # a flood must not flood the log
            log.warning("virtio-net: %s; dropped", why)

    def _backend_failed(self, what: str, e: OSError) -> None:
        """The tap is gone: take the link down and tell the guest (5.1.4: status)."""
        self.counters["backend_errors"] += 1
        if not self.link_up:
            return
        log.warning("virtio-net: tap %s failed (%s); link down", what, e.strerror)
        self.link_up = False
        if self.config_changed is not None:
            self.config_changed()
