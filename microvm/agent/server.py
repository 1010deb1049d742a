"""The guest agent: serves exec, call, put, get, kill, refresh and preload over vsock.

Started by the sandbox as the guest's command (`python3 -m microvm_agent`),
it listens on vsock port AGENT_VSOCK (or, for tests on the host, a Unix
socket), says "microvm-agent ready" on stdout once it does, and serves any
number of connections, each with any number of requests at once: every
request runs in its own thread, and replies share the connection under a
lock (protocol.py has the messages).

- exec runs argv in a new session with pipes for stdout and stderr, which
  are streamed as they come; a timeout or a kill ends the whole session.
- call forks: the child unpickles the function (cloudpickle), runs it with
  its stdout and stderr going back as output events, and sends the result,
  or the exception with its traceback (tblib keeps the frames across
  pickling). The agent itself never runs user code, so a call that crashes,
  is killed or calls os._exit leaves the agent serving.
- put writes a file (or unpacks a tar into a directory) from the body's
  chunks; get sends a file, or a directory as a tar, in chunks.
- refresh (after a restore or fork) and preload (before a snapshot): see
  identity.py.

The agent does not trust the host less than the host trusts it: the host
side (sandbox/client.py) treats everything here as untrusted input.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from typing import Any

from . import identity
from .protocol import AGENT_VSOCK, CHUNK, MAX_FRAME, FrameReader, ProtocolError, encode

READY_LINE = "microvm-agent ready"
MAX_FD = 1 << 16  # a forked call closes every fd up to here that is not its own
_END = object()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class Request:
    """One request's state in the agent: its body, and how to stop it."""

    def __init__(self, conn: Connection, rid: int, message: dict[str, Any]):
        self.conn = conn
        self.id = rid
        self.message = message
        self.body: queue.SimpleQueue[Any] = queue.SimpleQueue()  # bytes chunks, then _END
        self.pid: int | None = None  # the child (call) or session leader (exec) to kill
        self.killed = False

    def send(self, **fields: Any) -> None:
        self.conn.send({"id": self.id, **fields})

    def read_body(self) -> bytes:
        parts = []
        while (chunk := self.body.get()) is not _END:
            parts.append(chunk)
        return b"".join(parts)

    def kill(self) -> None:
        self.killed = True
        pid = self.pid
        if pid is not None:
            try:  # exec's command and call's child each lead their own session
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # not yet: the child has not called setsid()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()
        self.requests: dict[int, Request] = {}
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        self.send_many([message])

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        frame = b"".join(encode(m) for m in messages)
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except OSError:
                pass  # the host went away; the reader sees it and ends the connection

    def serve(self) -> None:
        reader = FrameReader(MAX_FRAME)
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                for message in reader.feed(data):
                    self._dispatch(message)
        except (OSError, ProtocolError) as e:
            print(f"microvm-agent: connection ended: {e}", file=sys.stderr, flush=True)
        finally:
            with self._lock:
                requests = list(self.requests.values())
            for r in requests:  # nobody is left to hear about them
                r.kill()
                r.body.put(_END)
            self.sock.close()

    def _dispatch(self, message: dict[str, Any]) -> None:
        rid = message["id"]
        op = message.get("op")
        if op is not None:
            if op == "kill":
                target = self.requests.get(message.get("target", -1))
                if target is not None:
                    target.kill()
                self.send({"id": rid, "ev": "done"})
                return
            handler = HANDLERS.get(op)
            with self._lock:
                known = rid in self.requests
            if handler is None or known:
                why = f"unknown op {op!r}" if handler is None else f"request id {rid} is in use"
                self.send({"id": rid, "ev": "fail", "kind": "bad-request", "message": why})
                return
            request = Request(self, rid, message)
            with self._lock:
                self.requests[rid] = request
            threading.Thread(target=self._run, args=(handler, request), daemon=True,
                             name=f"{op}-{rid}").start()
            return
        with self._lock:
            request_or_none = self.requests.get(rid)
        if request_or_none is None:
            return  # a chunk for a request that is over (killed, failed): drop it
        if "data" in message and isinstance(message["data"], bytes):
            request_or_none.body.put(message["data"])
        elif message.get("end"):
            request_or_none.body.put(_END)

    def _run(self, handler: Any, request: Request) -> None:
        try:
            handler(request)
        except Exception as e:  # the agent's own failure for this request: say so, serve on
            request.send(ev="fail", kind=type(e).__name__, message=str(e),
                         traceback=traceback.format_exc())
        finally:
            with self._lock:
                self.requests.pop(request.id, None)


# --- handlers -------------------------------------------------------------------------


def do_ping(request: Request) -> None:
    request.send(ev="pong", boot_id=boot_id(), pid=os.getpid(), python=sys.version.split()[0])


def do_refresh(request: Request) -> None:
    """After a restore or fork: fresh entropy and time (identity.py). The spare
    call process, forked before the snapshot, reseeds itself when its call
    comes (_child), from the kernel's pool as it is by then."""
    msg = request.message
    identity.refresh(bytes(msg.get("entropy") or b""), msg.get("time_ns"))
    request.send(ev="done", boot_id=boot_id())


def do_preload(request: Request) -> None:
    """Import modules into the agent, so calls (forked from it) start with them."""
    failed = identity.preload([str(m) for m in request.message.get("modules") or ()])
    Worker.replace_spare()
    if failed:
        raise ImportError("; ".join(failed))
    request.send(ev="done")


def _pump(request: Request, fds: dict[int, int], deadline: float | None,
          into: bytearray | None = None) -> bool:
    """Until every fd is at its end: output fds (-> 1 or 2) go to the host as
    they come, fd -> 0 is gathered into `into`. False if the deadline passed."""
    sel = selectors.DefaultSelector()
    for fd, which in fds.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, which)
    open_fds = len(fds)
    try:
        while open_fds:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = sel.select(wait)
            if not events and deadline is not None and time.monotonic() >= deadline:
                return False
            for key, _ in events:
                try:
                    data = os.read(key.fd, CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                    open_fds -= 1
                elif key.data == 0:
                    assert into is not None
                    into += data
                else:
                    request.send(ev="out", fd=key.data, data=data)
        return True
    finally:
        sel.close()


def _deadline(request: Request) -> float | None:
    timeout = request.message.get("timeout")
    return None if timeout is None else time.monotonic() + float(timeout)


def do_exec(request: Request) -> None:
    m = request.message
    argv = m.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        request.send(ev="fail", kind="bad-request", message="argv must be a non-empty list of strings")
        return
    env = dict(os.environ)
    env.update(m.get("env") or {})
    deadline = _deadline(request)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if m.get("stdin") else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                cwd=m.get("cwd") or None, start_new_session=True)
    except OSError as e:
        request.send(ev="fail", kind=type(e).__name__, message=f"cannot run {argv[0]!r}: {e.strerror or e}")
        return
    request.pid = proc.pid
    if request.killed:
        request.kill()
    if proc.stdin is not None:
        threading.Thread(target=_feed_stdin, args=(request, proc.stdin), daemon=True).start()
    assert proc.stdout is not None and proc.stderr is not None
    finished = _pump(request, {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2}, deadline)
    if not finished:
        request.kill()
    code = proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    if not finished:
        request.send(ev="timeout")
    elif request.killed:
        request.send(ev="killed")
    else:
        request.send(ev="exit", code=code if code >= 0 else None, signal=-code if code < 0 else None)


def _feed_stdin(request: Request, pipe: Any) -> None:
    try:
        while (chunk := request.body.get()) is not _END:
            pipe.write(chunk)
            pipe.flush()
    except OSError:
        pass  # the command closed its stdin or ended
    finally:
        try:
            pipe.close()
        except OSError:
            pass


class Worker:
    """A process forked ahead of its call, waiting for the call's bytes.

    The agent keeps one spare (take()): a call starts in a process that
    already exists, and the fork for the next call happens off the call's
    path. The child is the leader of its own session, so a kill reaches
    whatever it started too.
    """

    _spare: Worker | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        pay_r, self.pay_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        self.res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            # Only its own pipes: not the agent's sockets, not another call's pipes
            # (whose ends it would otherwise hold open), not the parent's ends.
            low = 3
            for fd in sorted((pay_r, out_w, err_w, res_w)):
                os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, MAX_FD)
            _child(pay_r, out_w, err_w, res_w)
        self.pid = pid
        for fd in (pay_r, out_w, err_w, res_w):
            os.close(fd)

    @classmethod
    def take(cls) -> Worker:
        with cls._lock:
            worker, cls._spare = cls._spare, None
        return worker if worker is not None else Worker()

    @classmethod
    def refill(cls) -> None:
        """Fork the next spare: after a call has answered, off its path."""
        threading.Thread(target=cls._refill, daemon=True, name="fork-spare").start()

    @classmethod
    def replace_spare(cls) -> None:
        """Kill the spare (forked before a change the calls must see) and fork a new one now."""
        with cls._lock:
            old, cls._spare = cls._spare, None
        if old is not None:
            os.close(old.pay_w)
            try:
                os.kill(old.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            old.close()
        cls._refill()

    @classmethod
    def _refill(cls) -> None:
        with cls._lock:
            if cls._spare is None:
                gc.freeze()  # what exists now is never collected in the children: fewer pages copied
                cls._spare = Worker()

    def give(self, payload: bytes) -> None:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(self.pay_w, view):]
        except OSError:
            pass  # it died waiting (killed): its status says so
        finally:
            os.close(self.pay_w)

    def close(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        for fd in (self.out_r, self.err_r, self.res_r):
            os.close(fd)
        return status


def do_call(request: Request) -> None:
    payload = request.read_body()
    deadline = _deadline(request)
    worker = Worker.take()
    request.pid = worker.pid
    if request.killed:
        request.kill()
    threading.Thread(target=worker.give, args=(payload,), daemon=True).start()
    result = bytearray()
    finished = _pump(request, {worker.out_r: 1, worker.err_r: 2, worker.res_r: 0}, deadline, result)
    if not finished:
        request.kill()
    if finished and result and not request.killed:
        # The child closed its pipes when it was done; the host need not wait for
        # its exit (tearing down a forked Python takes milliseconds).
        _send_result(request, result)
        Worker.refill()
        worker.close()
        return
    status = worker.close()
    Worker.refill()
    if not finished:
        request.send(ev="timeout")
    elif request.killed:
        request.send(ev="killed")
    elif not result:
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.WEXITSTATUS(status)}")
        request.send(ev="fail", kind="call-died", message=f"the call's process {how} before it returned")


def _send_result(request: Request, result: bytearray) -> None:
    """The value's (or exception's) pickle in chunks and the final event, in one write."""
    import msgpack

    kind, blob = result[:1], bytes(result[1:])
    final: dict[str, Any] = {"ev": "return"}
    if kind != b"R":
        info = msgpack.unpackb(blob, raw=False)
        blob = info.pop("pickled") or b""
        final = {"ev": "raise", **info}
    messages = [{"id": request.id, "ev": "data", "data": blob[i:i + CHUNK]} for i in range(0, len(blob), CHUNK)]
    request.conn.send_many([*messages, {"id": request.id, **final}])


def _child(pay_r: int, out_w: int, err_w: int, res_w: int) -> None:
    status = 0
    try:
        os.setsid()
        parts = []
        while chunk := os.read(pay_r, 1 << 20):
            parts.append(chunk)
        os.close(pay_r)
        payload = b"".join(parts)
        if not payload:  # the agent went away before giving us a call
            os._exit(0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        # Forked before its call, perhaps before a snapshot that clones restore:
        # the random generators start from the kernel's entropy as it is now.
        identity.reseed_process()
        import cloudpickle
        import msgpack

        try:
            # Only for an exception (install(e) below): install() with no argument
            # walks every exception class there is, milliseconds per call.
            from tblib import pickling_support
        except ImportError:
            pickling_support = None
        try:
            fn, args, kwargs = cloudpickle.loads(payload)
            value = fn(*args, **kwargs)
            reply = b"R" + cloudpickle.dumps(value)
        except BaseException as e:  # the function's exception (or an unpicklable result): the host gets it
            if pickling_support is not None:
                pickling_support.install(e)
            try:
                pickled = cloudpickle.dumps(e)
            except Exception:
                pickled = b""
            reply = b"E" + msgpack.packb({
                "type": type(e).__qualname__, "module": type(e).__module__, "message": str(e),
                "traceback": "".join(traceback.format_exception(e)), "pickled": pickled,
            }, use_bin_type=True)
        sys.stdout.flush()
        sys.stderr.flush()
        view = memoryview(reply)
        while view:
            view = view[os.write(res_w, view):]
        for fd in (1, 2, res_w):  # done: the agent answers now, not after our exit
            os.close(fd)
    except BaseException:
        status = 70
        traceback.print_exc()
    finally:
        os._exit(status)


def do_put(request: Request) -> None:
    m = request.message
    path = m.get("path")
    if not isinstance(path, str) or not path:
        request.send(ev="fail", kind="bad-request", message="put needs a path")
        return
    try:
        if m.get("tar"):
            os.makedirs(path, exist_ok=True)
            r, w = os.pipe()
            wf = os.fdopen(w, "wb")
            feeder = threading.Thread(target=_copy_body, args=(request, wf, True), daemon=True)
            feeder.start()
            with os.fdopen(r, "rb") as rf, tarfile.open(fileobj=rf, mode="r|") as tar:
                tar.extractall(path, filter="data")
            feeder.join()
        else:
            tmp = f"{path}.microvm-put"
            with open(tmp, "wb") as f:
                _copy_body(request, f)
            os.chmod(tmp, int(m.get("mode", 0o644)) & 0o7777)
            os.replace(tmp, path)
    except (OSError, tarfile.TarError) as e:
        while request.body.get() is not _END:  # drain, so the host's chunks don't pile up
            pass
        request.send(ev="fail", kind=type(e).__name__, message=f"cannot write {path}: {e}")
        return
    request.send(ev="done")


def _copy_body(request: Request, f: Any, close: bool = False) -> None:
    try:
        while (chunk := request.body.get()) is not _END:
            f.write(chunk)
    except OSError:  # the tar reader gave up: drain, so the host's chunks don't pile up
        while request.body.get() is not _END:
            pass
    finally:
        if close:
            try:
                f.close()
            except OSError:
                pass


def do_get(request: Request) -> None:
    path = request.message.get("path")
    if not isinstance(path, str) or not os.path.exists(path):
        request.send(ev="fail", kind="FileNotFoundError", message=f"no such file or directory: {path!r}")
        return
    try:
        if os.path.isdir(path):
            request.send(ev="meta", tar=True)
            r, w = os.pipe()

            def write_tar() -> None:
                with os.fdopen(w, "wb") as wf, tarfile.open(fileobj=wf, mode="w|") as tar:
                    tar.add(path, arcname=".")

            writer = threading.Thread(target=write_tar, daemon=True)
            writer.start()
            with os.fdopen(r, "rb") as rf:
                while chunk := rf.read(CHUNK):
                    request.send(ev="data", data=chunk)
            writer.join()
        else:
            with open(path, "rb") as f:
                request.send(ev="meta", tar=False, size=os.fstat(f.fileno()).st_size,
                             mode=os.fstat(f.fileno()).st_mode & 0o7777)
                while chunk := f.read(CHUNK):
                    request.send(ev="data", data=chunk)
    except OSError as e:
        request.send(ev="fail", kind=type(e).__name__, message=f"cannot read {path}: {e}")
        return
    request.send(ev="done")


HANDLERS = {"ping": do_ping, "exec": do_exec, "call": do_call, "put": do_put, "get": do_get,
            "refresh": do_refresh, "preload": do_preload}


def listen(port: int | None = None, unix: str | None = None) -> socket.socket:
    if unix is not None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(unix)
    else:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.bind((socket.VMADDR_CID_ANY, AGENT_VSOCK if port is None else port))
    s.listen(64)
    return s


def serve(server: socket.socket) -> None:
    while True:
        sock, _ = server.accept()
        threading.Thread(target=Connection(sock).serve, daemon=True, name="connection").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="microvm_agent")
    parser.add_argument("--port", type=int, default=AGENT_VSOCK, help="vsock port to listen on")
    parser.add_argument("--unix", help="listen on this Unix socket instead (tests on the host)")
    args = parser.parse_args(argv)
    server = listen(args.port, args.unix)
    # Warm what every call needs, once, before the first call forks.
    import cloudpickle  # noqa: F401
    import msgpack  # noqa: F401

    try:
        import tblib.pickling_support  # noqa: F401
    except ImportError:
        pass
    Worker.refill()
    print(READY_LINE, flush=True)
    serve(server)


if __name__ == "__main__":
    main()
