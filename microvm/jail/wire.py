"""What a jailed VMM tells its caller (microvm/jail/run.py): length-prefixed
msgpack maps over a pipe. The VMM runs what a guest may have subverted and
the caller may be root, so these are data only, never pickle, read with
limits and checked field by field; an exception crosses as its class name
(microvm's own, from an allow-list) and its text."""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack

from microvm.errors import GuestTimeoutError, MicroVMError
from microvm.jail import JailError

MAX_MESSAGE = 512 << 20  # bytes: a result's stdout and console, with room
FRAME = struct.Struct("<Q")


def read_exactly(fd: int, n: int, deadline: float | None) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise GuestTimeoutError("no answer from the jailed VMM")
        chunk = os.read(fd, min(n - len(chunks), 1 << 20))
        if not chunk:
            raise EOFError
        chunks += chunk
    return bytes(chunks)


def encode(kind: str, value: Any) -> bytes:
    """A message of the VMM's: "started" (its PID), "result" (a RunResult) or "error" (an exception)."""
    if kind == "started":
        message: dict[str, Any] = {"kind": kind, "pid": int(value)}
    elif kind == "result":
        message = {"kind": kind, "exit_code": value.exit_code, "stdout": bytes(value.stdout),
                   "console": bytes(value.console), "reason": value.reason, "timeline": dict(value.timeline),
                   "stats": {k: dict(v) for k, v in value.stats.items()}}
    else:
        message = {"kind": "error", "type": type(value).__name__, "message": str(value)}
    return msgpack.packb(message, use_bin_type=True)


def decode(body: bytes, result_type: Callable[..., Any]) -> tuple[str, Any]:
    """A message back, checked field by field; an error as one of microvm's
    exception classes (by name, from an allow-list) or a JailError."""
    # Limits: a result is two byte strings and a few dozen keys, never millions of objects.
    m = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE, max_str_len=1 << 20,
                        max_array_len=0, max_map_len=4096, max_ext_len=0)
    if not isinstance(m, dict):
        raise ValueError("not a map")
    kind = m["kind"]
    if kind == "started":
        return kind, _checked(m["pid"], int)
    if kind == "result":
        exit_code = m["exit_code"]
        if exit_code is not None:
            _checked(exit_code, int)
        timeline = {_checked(k, str): float(_checked(v, int | float)) for k, v in _checked(m["timeline"], dict).items()}
        stats = {_checked(k, str): {_checked(a, str): _checked(b, int) for a, b in _checked(v, dict).items()}
                 for k, v in _checked(m["stats"], dict).items()}
        return kind, result_type(exit_code=exit_code, stdout=_checked(m["stdout"], bytes),
                                 console=_checked(m["console"], bytes), reason=_checked(m["reason"], str),
                                 timeline=timeline, stats=stats)
    if kind == "error":
        return kind, _exception(_checked(m["type"], str), _checked(m["message"], str))
    raise ValueError(f"unknown kind {kind!r}")


def _checked(value: Any, kind: Any) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TypeError(f"{value!r:.60} is not {kind}")
    return value


def _exception(name: str, message: str) -> BaseException:
    """The VMM's exception, rebuilt here: microvm's own classes by name, KeyboardInterrupt; else a JailError."""
    from microvm import errors
    from microvm.jail import cgroups

    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    cls = getattr(errors, name, None) or getattr(cgroups, name, None) or (JailError if name == "JailError" else None)
    if isinstance(cls, type) and issubclass(cls, MicroVMError):
        try:
            return cls(message)
        except TypeError:
            pass
    return JailError(f"{name}: {message}")


def write_message(fd: int, kind: str, value: object) -> None:
    body = encode(kind, value)
    data = memoryview(FRAME.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data):]
