"""The agent's wire protocol: msgpack maps in length-prefixed frames.

A frame is a 4-byte big-endian length and that many bytes of one msgpack
map. Every map carries "id", the request it belongs to (a non-negative
integer the host picks); many requests share one connection and interleave.

Host to guest:
    {"id", "op": "ping" | "exec" | "call" | "put" | "get" | "kill" | "refresh" | "preload", ...fields}
    {"id", "data": bytes}   a chunk of the request's body (stdin, a file, a pickled call)
    {"id", "end": true}     the body is complete (for exec: stdin is closed)
Guest to host:
    {"id", "ev": "out", "fd": 1 | 2, "data": bytes}   output, as it comes
    {"id", "ev": "data", "data": bytes}               a chunk of a result or a file
    {"id", "ev": <final>, ...}                        the request is over
Final events: "pong", "exit" (exec: code, signal, timed_out), "return"
(call: the value is the "data" chunks, pickled), "raise" (call: type,
message, traceback, and the pickled exception in the data chunks),
"done" (put, get, kill, refresh, preload), "timeout", "killed", "fail" (kind, message: the
agent could not do what was asked).

Limits: a frame is at most MAX_FRAME bytes (a larger length, a map that
is not one, a missing id: ProtocolError, and the connection is over); big
things travel as chunks of at most CHUNK bytes, so neither side ever holds
more than one frame it has not parsed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import msgpack

MAX_FRAME = 1 << 20
CHUNK = 256 << 10
HEADER = struct.Struct(">I")
AGENT_VSOCK = 52  # the vsock port the agent listens on
FINAL_EVENTS = frozenset({"pong", "exit", "return", "raise", "done", "timeout", "killed", "fail"})
OPS = frozenset({"ping", "exec", "call", "put", "get", "kill", "refresh", "preload"})


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol; the connection is over."""


def encode(message: dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise ProtocolError(f"frame of {len(body)} bytes is over the limit of {max_frame}")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Bytes in, messages out; holds at most one frame's worth of bytes."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Add bytes and yield every complete message they finish."""
        self._buf += data
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes announced; the limit is {self.max_frame}")
            end = HEADER.size + length
            if len(self._buf) < end:
                return
            body = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            yield decode(body)


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for garbage: all of them are ours to name
        raise ProtocolError(f"frame is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"frame holds a {type(message).__name__}, not a map")
    rid = message.get("id")
    if type(rid) is not int or rid < 0:
        raise ProtocolError(f"frame without a valid id: {rid!r}")
    return message
