"""The host end of virtio-vsock: Unix sockets, in Firecracker's "hybrid" model.

One listening socket at `path` takes host-initiated connections: a host
program connects, writes ``CONNECT <port>\\n`` and, once the guest has
accepted on that vsock port, reads ``OK <host_port>\\n``; from then on the
socket is a plain byte stream. A guest that connects to the host (CID 2),
port P, reaches whoever listens on the Unix socket ``<path>_P``.

This module knows Unix sockets and that line protocol, nothing of virtio:
the device (devices/virtio/vsock.py) decides what to read and when, and
never asks a stream to hold more than the credit it advertised.
"""

from __future__ import annotations

import os
import select
import socket
import stat
from pathlib import Path

from microvm.errors import ConfigError

SUN_PATH_MAX = 107  # struct sockaddr_un's sun_path is 108 bytes, with the NUL
# "CONNECT 4294967295\n" is 19 bytes; Firecracker's muxer reads at most 32 too.
CONNECT_LINE_MAX = 32
LISTEN_BACKLOG = 128


def check_uds_path(path: str | Path) -> str:
    """The listening path as a str, or a ConfigError: it must fit sun_path and its directory must exist."""
    text = os.fspath(path)
    if not text:
        raise ConfigError("vsock: the Unix socket path is empty")
    if len(os.fsencode(text)) > SUN_PATH_MAX:
        raise ConfigError(f"vsock: Unix socket path {text!r} is longer than {SUN_PATH_MAX} bytes (sun_path)")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise ConfigError(f"vsock: the directory of Unix socket path {text!r} does not exist")
    return text


def _clear_stale(path: str) -> None:
    """Remove a socket nobody listens on any more; refuse a live one or any other file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"vsock: {path!r} exists and is not a Unix socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)  # a Unix connect completes (or fails) at once
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its listener is gone
        return
    except OSError as e:
        raise ConfigError(f"vsock: cannot tell whether {path!r} is in use: {e.strerror}") from e
    finally:
        probe.close()
    raise ConfigError(f"vsock: {path!r} is a live socket: another VMM listens on it")


class Listener:
    """The non-blocking listening socket at `path` (checked, stale socket replaced)."""

    # False in a jailed VMM (microvm/jail): its uid may not unlink what root
    # made, nor seccomp let it try; its caller unlinks the path after it.
    unlink_on_close = True

    def __init__(self, path: str | Path):
        self.path = check_uds_path(path)
        _clear_stale(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            self.sock.bind(self.path)
            self.sock.listen(LISTEN_BACKLOG)
            st = os.stat(self.path)
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"vsock: cannot listen on {self.path!r}: {e.strerror}") from e
        self.fd = self.sock.fileno()
        self._ident = (st.st_dev, st.st_ino)

    def accept(self) -> socket.socket | None:
        """The next waiting connection (non-blocking), or None."""
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # ECONNABORTED, EMFILE...: nothing to take now
            return None
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        """Close the socket and unlink its path, if the path is still ours."""
        if self.sock.fileno() < 0:
            return
        self.sock.close()
        if not self.unlink_on_close:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or replaced by someone else's: leave it


def guest_port_path(path: str, port: int) -> str:
    """Where a guest connection to host port `port` goes."""
    return f"{path}_{port}"


def read_connect_line(sock: socket.socket) -> int | None:
    """The port of a complete ``CONNECT <port>\\n`` line, consuming exactly that line
    (bytes the host sent after it stay in the socket); None if the line is not
    complete yet. ValueError for a garbled or overlong line, EOFError if the
    host closed before a whole line."""
    try:
        head = sock.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        raise ValueError(f"reading the CONNECT line failed: {e.strerror}") from e
    if not head:
        raise EOFError("end of file before a CONNECT line")
    end = head.find(b"\n")
    if end < 0:
        if len(head) >= CONNECT_LINE_MAX:
            raise ValueError(f"no CONNECT line in the first {CONNECT_LINE_MAX} bytes")
        return None
    try:
        sock.recv(end + 1)  # what MSG_PEEK just saw: it is there
    except OSError as e:
        raise ValueError(f"reading the CONNECT line failed: {e.strerror}") from e
    words = head[:end].split()
    # Firecracker takes the command word in any case; the port is decimal, a u32.
    if len(words) != 2 or words[0].upper() != b"CONNECT" or not words[1].isdigit() or len(words[1]) > 10:
        raise ValueError(f"garbled CONNECT line {head[:end]!r}")
    port = int(words[1])
    if port > 0xFFFF_FFFF:
        raise ValueError(f"port {port} in the CONNECT line is not a u32")
    return port


class HostStream:
    """One connected non-blocking Unix stream socket and the bytes waiting to be written to it.

    Its owner bounds what waits here (the device queues no more than the credit
    it advertised). Text of our own (the ``OK`` line) waits in the same buffer,
    ahead of the data, but is not counted as data in what send() and flush()
    return. OSErrors other than "would block" (EPIPE, ECONNRESET) reach the owner.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self._out = bytearray()
        self._text = 0  # leading bytes of _out that are ours, not data
        self.watching_output = False  # the owner's: whether it waits for EPOLLOUT

    @classmethod
    def connect(cls, path: str) -> HostStream:
        """Connect to a listening Unix socket without blocking. A Unix connect
        completes at once or fails (ENOENT, ECONNREFUSED, EAGAIN when the
        listener's backlog is full): no connection is ever half-open here."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @property
    def pending(self) -> int:
        """Bytes waiting to be written (ours and data)."""
        return len(self._out)

    def send_text(self, text: bytes) -> None:
        """Queue text of our own ahead of any later data; flush() writes it."""
        self._out += text
        self._text += len(text)

    def send(self, views: list[memoryview]) -> int:
        """Write data now as far as the socket takes it and keep the rest;
        returns the data bytes written now."""
        if self._out:
            for v in views:
                self._out += v
            return self.flush()
        try:
            n = self.sock.sendmsg(views, [], socket.MSG_NOSIGNAL) if views else 0
        except (BlockingIOError, InterruptedError):
            n = 0
        skip = n
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            self._out += v[skip:]
            skip = 0
        return n

    def flush(self) -> int:
        """Write what waits until the socket would block; returns the data bytes written."""
        data = 0
        while self._out:
            try:
                n = self.sock.send(self._out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            del self._out[:n]
            text = min(n, self._text)
            self._text -= text
            data += n - text
        return data

    def read_into(self, views: list[memoryview]) -> int | None:
        """Read into the views: the byte count, 0 at end of file, None if nothing is there now."""
        try:
            return self.sock.recvmsg_into(views)[0]
        except (BlockingIOError, InterruptedError):
            return None

    def hung_up(self) -> bool:
        """Both directions are shut (the host closed its end, or each side shut one): POLLHUP."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)  # POLLHUP is always reported
        return any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def shutdown(self, how: int) -> None:
        """shutdown(2); a peer already gone is no error here."""
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
