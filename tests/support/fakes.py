"""Small stand-ins the unit tests (and the fuzz targets) share."""

from __future__ import annotations

import os
import socket
from collections import deque


class FakeIrq:
    """An interrupt line that counts its triggers."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class FakeTap:
    """A tap for VirtioNet: a SOCK_SEQPACKET socket pair, one record per frame
    like a tap opened with IFF_VNET_HDR. The device reads and writes `fd`
    (`sock`, non-blocking, as a tap is); the host side is `peer`, which waits
    up to peer_timeout seconds for a frame (0: never, for the fuzzer)."""

    def __init__(self, peer_timeout: float = 2) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.peer.settimeout(peer_timeout)
        for s in (self.sock, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.fd = self.sock.fileno()
        self.offloads: deque[int] = deque(maxlen=8)  # the last few: a fuzzer sets them millions of times

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)

    def drain(self) -> None:
        """Throw away the frames the device sent that the host side has not read."""
        _read_all(self.peer.fileno())

    def discard_pending(self) -> None:
        """Throw away the frames the host side sent that the device has not read."""
        _read_all(self.fd)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


def _read_all(fd: int) -> None:
    # os.read, not recv: a socket with a timeout is non-blocking underneath, and
    # recv would first wait out its timeout on an empty queue.
    try:
        while os.read(fd, 1 << 17):
            pass
    except BlockingIOError:
        pass
