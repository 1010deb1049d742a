"""A session with a guest agent: call, exec, put, get over one AgentClient.

Sandbox (core.py) is a Session with a VM of its own; a Session can also
wrap any connection to an agent (the benchmark talks to the same agent
behind QEMU's vhost-vsock this way). Everything the agent sends is
untrusted: results are unpickled only for a call the host made, output is
bounded per request by the client's queues.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import queue
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from microvm import checks
from microvm.agent.protocol import CHUNK
from microvm.errors import (
    AgentError,
    CallTimeout,
    ConnectionLost,
    MicroVMError,
    RemoteError,
    SandboxError,
)
from microvm.sandbox.client import AgentClient, Channel
from microvm.sandbox.pickling import dumps_call, loads

GRACE = 10.0  # beyond a call's own timeout: how long the host waits for the agent's word


class CallKilled(SandboxError, concurrent.futures.CancelledError):
    """The call was cancelled or killed while it ran; its process in the guest is gone."""


class Session:
    """Requests to one agent. timeout: the default for each call and command (None: none)."""

    def __init__(self, client: AgentClient | None = None, *, timeout: float | None = None,
                 importable: frozenset[str] = frozenset()):
        self.client = client
        self.timeout = checks.timeout(timeout)
        self.importable = importable
        self.grace = GRACE

    def _crashed(self, what: str) -> SandboxError:
        """The error for a connection that ended under a request (Sandbox adds the console)."""
        return AgentError(what)


    def _client(self) -> AgentClient:
        if self.client is None:
            raise SandboxError("not connected to an agent")
        return self.client

    def _request(self, op: str, **fields: Any) -> Channel:
        try:
            return self._client().request(op, **fields)
        except ConnectionLost:
            raise self._crashed("the guest agent's connection has ended") from None

    def _events(self, channel: Channel, timeout: float | None) -> Iterator[dict[str, Any]]:
        """A request's events until its final one; the host's own deadline covers a silent guest."""
        deadline = None if timeout is None else time.monotonic() + timeout + self.grace
        while channel.final is None:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                yield channel.next_event(left if left is None or left > 0 else 0)
            except ConnectionLost:
                raise self._crashed("the guest agent's connection ended during the request") from None
            except queue.Empty:
                with contextlib.suppress(MicroVMError):
                    channel.kill()
                raise CallTimeout(f"the guest did not answer within {timeout} s (+{self.grace} s)") from None

    def _final(self, channel: Channel, timeout: float | None) -> dict[str, Any]:
        for event in self._events(channel, timeout):
            if channel.final is event:
                _raise_for(event)
                return event
        raise AgentError("the request ended without a final event")

    def ping(self) -> dict[str, Any]:
        return self._final(self._request("ping"), self.timeout)

    def refresh(self) -> None:
        """Fresh host entropy and the host's time for the guest, and a call
        process forked after them: what a restored or forked guest needs
        before its first call (agent/identity.py)."""
        self._final(self._request("refresh", entropy=os.urandom(64), time_ns=time.time_ns()), self.timeout)

    def preload(self, modules: Sequence[str]) -> None:
        """Import `modules` into the agent, so every later call starts with them
        (before a snapshot: its restores and forks have them too). A module
        that fails to import raises RemoteError (ImportError)."""
        self._final(self._request("preload", modules=[str(m) for m in modules]), self.timeout)

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in a fresh process in the guest; its value, or its exception raised here."""
        return self.call_with(fn, args, kwargs)

    def call_with(self, fn: Callable[..., Any], args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                  *, timeout: float | None = None, stdout: Callable[[int, bytes], Any] | None = None,
                  on_start: Callable[[Channel], Any] | None = None) -> Any:
        """call() with its options: timeout (default: the sandbox's), where the call's output goes
        (stdout(fd, data); default: this process's stdout and stderr), on_start(channel) to keep
        a handle for kill()."""
        timeout = self.timeout if timeout is None else checks.timeout(timeout)
        payload = dumps_call(fn, args, dict(kwargs or {}), self._importable())
        channel = self._request("call", body=payload, timeout=timeout)
        if on_start is not None:
            on_start(channel)
        data = bytearray()
        for event in self._events(channel, timeout):
            ev = event.get("ev")
            if ev == "out":
                _write_out(stdout, event)
            elif ev == "data" and isinstance(event.get("data"), bytes):
                data += event["data"]
            elif ev == "return":
                return loads(bytes(data), "call's result")
            elif ev == "raise":
                raise _rebuild(event, bytes(data))
            elif channel.final is event:
                _raise_for(event, timeout)
        raise AgentError("the call ended without a result")

    def _importable(self) -> frozenset[str]:
        return self.importable

    def exec(self, argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, check: bool = False
             ) -> subprocess.CompletedProcess[bytes]:
        """Run argv in the guest, like subprocess.run(argv, capture_output=True)."""
        stream = self.exec_stream(argv, input=input, env=env, cwd=cwd, timeout=timeout)
        out, err = bytearray(), bytearray()
        for fd, data in stream:
            (out if fd == 1 else err).extend(data)
        result = subprocess.CompletedProcess(list(argv), stream.returncode if stream.returncode is not None else -1,
                                             bytes(out), bytes(err))
        if check:
            result.check_returncode()
        return result

    def exec_stream(self, argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
                    cwd: str | None = None, timeout: float | None = None) -> ExecStream:
        """Start argv in the guest; iterate the result for (fd, bytes) as the output comes."""
        argv = checks.argv(argv)
        timeout = self.timeout if timeout is None else checks.timeout(timeout)
        channel = self._request("exec", argv=argv, env=checks.env(env), cwd=cwd, timeout=timeout,
                                         stdin=input is not None)
        if input is not None:
            channel.send_data(input)
            channel.end()
        return ExecStream(self, channel, timeout)

    def put(self, source: bytes | str | Path, dest: str, *, mode: int = 0o644) -> None:
        """Copy bytes, a host file, or a host directory (as a tar) to dest in the guest."""
        tar = isinstance(source, str | os.PathLike) and os.path.isdir(source)
        if isinstance(source, str | os.PathLike) and not tar:
            mode = os.stat(source).st_mode & 0o7777
        channel = self._request("put", path=dest, tar=tar, mode=mode)
        if isinstance(source, bytes | bytearray):
            channel.send_data(bytes(source))
        elif tar:
            with _TarWriter(channel) as w, tarfile.open(fileobj=w, mode="w|") as t:
                t.add(source, arcname=".")
        else:
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK):
                    channel.send_data(chunk)
        channel.end()
        self._final(channel, self.timeout)

    def get(self, source: str, dest: str | Path | None = None) -> bytes | None:
        """A guest file's bytes (dest None), or copy a guest file or directory to dest on the host."""
        channel = self._request("get", path=source)
        sink: Any = None
        buf = bytearray()
        tar_r: Any = None
        try:
            for event in self._events(channel, self.timeout):
                ev = event.get("ev")
                if ev == "meta":
                    if event.get("tar"):
                        if dest is None:
                            raise SandboxError(f"{source} is a directory in the guest: give get() a dest")
                        tar_r = _TarReader(Path(dest))
                        sink = tar_r
                    elif dest is not None:
                        sink = open(dest, "wb")
                elif ev == "data" and isinstance(event.get("data"), bytes):
                    if sink is None:
                        buf += event["data"]
                    else:
                        sink.write(event["data"])
                elif channel.final is event:
                    _raise_for(event)
        finally:
            if sink is not None:
                sink.close()
        return bytes(buf) if dest is None else None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> CallFuture:
        """Start fn(*args, **kwargs) in the guest now; a CallFuture whose cancel() kills it."""
        future = CallFuture()
        payload_check = dumps_call(fn, args, kwargs, self._importable())  # refuse the unpicklable now
        del payload_check

        threading.Thread(target=future.run, args=(self, fn, args, kwargs), daemon=True,
                         name="sandbox-call").start()
        return future


class ExecStream:
    """A command running in the guest: iterate for (fd, data); then returncode."""

    def __init__(self, session: Session, channel: Channel, timeout: float | None):
        self.session = session
        self.channel = channel
        self.timeout = timeout
        self.returncode: int | None = None

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for event in self.session._events(self.channel, self.timeout):
            ev = event.get("ev")
            if ev == "out" and isinstance(event.get("data"), bytes):
                yield (2 if event.get("fd") == 2 else 1), event["data"]
            elif ev == "exit":
                code, sig = event.get("code"), event.get("signal")
                self.returncode = code if isinstance(code, int) else -int(sig or 0)
            elif self.channel.final is event:
                _raise_for(event, self.timeout)

    def wait(self) -> int:
        for _ in self:
            pass
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self.channel.kill()


class CallFuture(concurrent.futures.Future[Any]):
    """A Future for a call in a sandbox: cancel() works while it runs, too.

    The standard Future refuses to cancel a running call; this one asks the
    guest to kill the call's process and returns True; the future then ends
    as cancelled (result() raises CancelledError) once the guest confirms.
    kill() is the same, by another name.
    """

    def __init__(self) -> None:
        super().__init__()
        self._channel: Channel | None = None
        self._kill_asked = False

    def _attach(self, channel: Channel) -> None:
        self._channel = channel
        if self._kill_asked:
            channel.kill()

    def cancel(self) -> bool:
        if super().cancel():
            return True
        with self._condition:
            if self._state != "RUNNING":
                return False
            self._kill_asked = True
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(MicroVMError):
                channel.kill()
        return True

    def kill(self) -> bool:
        return self.cancel()

    def run(self, session: Session, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Run the call in `session` and settle this future with its outcome (a worker's side)."""
        if not self.set_running_or_notify_cancel():
            return
        try:
            value = session.call_with(fn, args, kwargs, on_start=self._attach)
        except CallKilled:
            self._mark_cancelled()
        except BaseException as e:
            self.set_exception(e)
        else:
            self.set_result(value)

    def _mark_cancelled(self) -> None:
        """End as cancelled from the running state (what Future.cancel does for a pending one)."""
        with self._condition:
            self._state = "CANCELLED_AND_NOTIFIED"
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own, as cancel() uses it


def _raise_for(event: dict[str, Any], timeout: float | None = None) -> None:
    ev = event.get("ev")
    if ev == "timeout":
        raise CallTimeout(f"did not finish within {timeout} s; killed in the guest")
    if ev == "killed":
        raise CallKilled("killed in the guest")
    if ev == "fail":
        kind, message = str(event.get("kind", "")), str(event.get("message", ""))
        if kind == "FileNotFoundError":
            raise FileNotFoundError(message)
        raise RemoteError(kind, message, str(event.get("traceback", "")))


def _rebuild(event: dict[str, Any], pickled: bytes) -> BaseException:
    """The guest's exception as its own type (with the guest's traceback), else a RemoteError."""
    type_name = f"{event.get('module', '')}.{event.get('type', '')}".removeprefix("builtins.")
    remote = RemoteError(type_name, str(event.get("message", "")), str(event.get("traceback", "")))
    if pickled:
        try:
            exc = loads(pickled, "guest's exception")
        except MicroVMError:
            return remote
        if isinstance(exc, BaseException):
            exc.__cause__ = exc.__cause__ or None
            with contextlib.suppress(Exception):
                exc.add_note(f"--- guest traceback ---\n{remote.remote_traceback}")
            return exc
    return remote


def _write_out(stdout: Callable[[int, bytes], Any] | None, event: dict[str, Any]) -> None:
    data = event.get("data")
    if not isinstance(data, bytes):
        return
    fd = 2 if event.get("fd") == 2 else 1
    if stdout is not None:
        stdout(fd, data)
        return
    stream = sys.stderr if fd == 2 else sys.stdout
    stream.write(data.decode(errors="replace"))
    stream.flush()


class _TarWriter(io.RawIOBase):
    """A write-only file whose bytes go to a channel as chunks (for tarfile's stream mode)."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.channel.send_data(bytes(b))
        return len(b)


class _TarReader:
    """A directory on the host that a tar stream unpacks into, chunk by chunk."""

    def __init__(self, dest: Path):
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        r, w = os.pipe()
        self._w = os.fdopen(w, "wb")
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._unpack, args=(os.fdopen(r, "rb"),), daemon=True)
        self._thread.start()

    def _unpack(self, f: Any) -> None:
        try:
            with f, tarfile.open(fileobj=f, mode="r|") as tar:
                tar.extractall(self.dest, filter="data")
        except BaseException as e:
            self._error = e
            with contextlib.suppress(OSError):
                while f.read(CHUNK):
                    pass

    def write(self, data: bytes) -> None:
        self._w.write(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._w.close()
        self._thread.join()
        if self._error is not None:
            raise SandboxError(f"cannot unpack the guest's directory into {self.dest}: {self._error}")
