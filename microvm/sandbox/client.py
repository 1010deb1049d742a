"""The host's end of the agent protocol: one connection, many requests.

A reader thread parses frames (agent/protocol.py) and hands each message to
the queue of the request it names; a request is a `Channel` that sends its
body in chunks and yields its events. Everything from the guest is
untrusted: a frame over the limit or garbled, or an event for no request,
ends the connection (or is dropped) and never grows host memory beyond one
frame per message queued; when the connection ends for any reason, every
open channel gets ConnectionLost.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from microvm.agent.protocol import CHUNK, FINAL_EVENTS, MAX_FRAME, FrameReader, ProtocolError, encode
from microvm.errors import AgentError, ConnectionLost

QUEUED_EVENTS = 64  # per request: at most this many frames (of at most MAX_FRAME) wait in the host
POLL = 0.1


class Channel:
    """One request: send its body, read its events until the final one."""

    def __init__(self, client: AgentClient, rid: int):
        self.client = client
        self.id = rid
        # Bounded: a guest that floods a request nobody reads stalls its own
        # connection (and, through vsock credit, itself), not host memory.
        self.events: queue.Queue[dict[str, Any]] = queue.Queue(QUEUED_EVENTS)
        self.final: dict[str, Any] | None = None
        self.lost: BaseException | None = None

    def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            self.client.send({"id": self.id, "data": bytes(view[i:i + CHUNK])})

    def end(self) -> None:
        self.client.send({"id": self.id, "end": True})

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event; raises ConnectionLost, or queue.Empty after timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self.events.get(timeout=POLL if deadline is None else min(POLL, deadline - time.monotonic()))
                break
            except queue.Empty:
                if self.lost is not None and self.events.empty():
                    raise ConnectionLost(str(self.lost)) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise
        if item.get("ev") in FINAL_EVENTS:
            self.final = item
            self.client.forget(self.id)
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.final is None:
            yield self.next_event()

    def kill(self) -> None:
        """Ask the agent to kill this request's process; its final event says how it ended."""
        if self.final is None:
            self.client.request("kill", target=self.id)


class AgentClient:
    def __init__(self, sock: socket.socket, max_frame: int = MAX_FRAME, name: str = "agent"):
        sock.settimeout(None)
        self.sock = sock
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self._channels: dict[int, Channel] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.error: BaseException | None = None
        self.dropped = 0  # events for requests that are over or never were
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def request(self, op: str, *, body: bytes | None = None, **fields: Any) -> Channel:
        """Start a request; with `body`, its chunks and end go in the same write
        (one vsock packet for a small call, not three)."""
        rid = next(self._ids)
        channel = Channel(self, rid)
        with self._lock:
            if self.error is not None:
                raise ConnectionLost(f"the agent connection is over: {self.error}")
            self._channels[rid] = channel
        messages = [{"id": rid, "op": op, **fields}]
        if body is not None:
            view = memoryview(body)
            messages += [{"id": rid, "data": bytes(view[i:i + CHUNK])} for i in range(0, len(view), CHUNK)]
            messages.append({"id": rid, "end": True})
        self.send(*messages)
        return channel

    def send(self, *messages: dict[str, Any]) -> None:
        frame = b"".join(encode(m, self.max_frame) for m in messages)
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except OSError as e:
                self._lost(e)
                raise ConnectionLost(f"cannot send to the agent: {e}") from e

    def forget(self, rid: int) -> None:
        with self._lock:
            self._channels.pop(rid, None)

    def _read(self) -> None:
        reader = FrameReader(self.max_frame)
        error: BaseException
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    error = ConnectionLost("the agent closed the connection")
                    break
                for message in reader.feed(data):
                    with self._lock:
                        channel = self._channels.get(message["id"])
                    if channel is None:
                        self.dropped += 1
                    else:
                        self._deliver(channel, message)
        except ProtocolError as e:
            error = AgentError(f"the agent broke the protocol: {e}")
        except OSError as e:
            error = ConnectionLost(f"the agent connection failed: {e}")
        self._lost(error)

    def _deliver(self, channel: Channel, message: dict[str, Any]) -> None:
        """Queue for the channel's reader, waiting while it is full (back-pressure),
        unless the channel is given up meanwhile."""
        while True:
            try:
                channel.events.put(message, timeout=POLL)
                return
            except queue.Full:
                with self._lock:
                    if self._channels.get(channel.id) is not channel:
                        self.dropped += 1
                        return

    def _lost(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            channels = list(self._channels.values())
            self._channels.clear()
        for c in channels:
            c.lost = self.error

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5.0)
        self.sock.close()
        self._lost(ConnectionLost("the connection was closed by the host"))
