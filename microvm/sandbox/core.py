"""Sandbox: a VM that stays up and runs Python calls and commands for you.

    with Sandbox(mem_mib=256) as sb:
        sb.call(sum, [1, 2, 3])                    # 6, computed in the guest
        sb.exec(["uname", "-r"]).stdout            # b'6.1...\\n'
        sb.put(b"data", "/tmp/x"); sb.get("/tmp/x")

The guest boots our kernel with a read-only root image holding the host's
own Python (pyimage.py; a tmpfs takes writes under /tmp and /run), and
runs the agent (microvm/agent/) as its command, shipped in this boot's
initramfs so it always matches this microvm. The host reaches the agent
over virtio-vsock: the VM's Unix socket, `CONNECT 52`, then the framed
protocol (agent/protocol.py), one connection for every request.

Each call runs in a fresh process forked from the agent, so calls do not
see each other's state, and a call that crashes or is killed leaves the
sandbox usable. A call's timeout kills that call (CallTimeout, a
TimeoutError); the sandbox stays usable. If the guest itself ends (a
panic, out of memory, the agent killed), every call in flight and every
later one raises SandboxCrashed with the console's tail; make a new
Sandbox (SandboxPool does that for you).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

from microvm import checks
from microvm.agent.protocol import AGENT_VSOCK
from microvm.agent.server import READY_LINE
from microvm.errors import AgentError, ConfigError, SandboxCrashed, SandboxError, SnapshotError
from microvm.sandbox.client import AgentClient
from microvm.sandbox.session import GRACE, Session
from microvm.snapshot import Snapshot
from microvm.specs import Drive, Nic

DEFAULT_MEM_MIB = 256
BOOT_TIMEOUT = 120.0
AGENT_FILES = ("__init__.py", "__main__.py", "identity.py", "protocol.py", "server.py")
GUEST_LIB = "/run/microvm/lib"  # where init puts this boot's files (guestinit.py)


def agent_files() -> dict[str, bytes]:
    """The agent package, as this boot's files (lib/microvm_agent/...)."""
    pkg = resources.files("microvm.agent")
    return {f"lib/microvm_agent/{name}": pkg.joinpath(name).read_bytes() for name in AGENT_FILES}


class Sandbox(Session):
    """A running VM with an agent: call(), exec(), put(), get() (session.py). Not reusable after close()."""

    def __init__(
        self,
        *,
        image: Any = None,
        kernel: str | Path | None = None,
        mem_mib: int = DEFAULT_MEM_MIB,
        vcpus: int = 1,
        timeout: float | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        network: bool | Nic = False,
        drives: Sequence[Drive | str | Path] = (),
        env: Mapping[str, str] | None = None,
        console: BinaryIO | Callable[[bytes], Any] | None = None,
        forkable: bool = False,
        force: bool = False,
    ):
        """forkable: guest RAM in a memfd from boot, so fork() shares it instead of copying it."""
        super().__init__(timeout=timeout)
        self.boot_timeout = checks.timeout(boot_timeout) or BOOT_TIMEOUT
        if isinstance(network, Nic):
            self.nics: list[Nic] = [network]
        elif network is False:
            self.nics = []
        else:
            raise ConfigError("network must be False or a Nic(...) (a tap to attach)")
        self.image = image
        self._config: dict[str, Any] = dict(kernel=kernel, mem_mib=mem_mib, vcpus=vcpus, drives=list(checks.path_list(
            "drives", drives)), env=checks.env(env), console=console, forkable=forkable, force=force)
        self.vm: Any = None
        self.boot_id = ""
        self.timeline: dict[str, float] = {}
        self._dir: str | None = None
        self._ready = threading.Event()
        self._ended = threading.Event()
        self._end_error: BaseException | None = None
        self._waiter: threading.Thread | None = None
        self._closed = False
        self._out = bytearray()

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> Sandbox:
        from microvm.machine import MicroVM

        if self.vm is not None or self._closed:
            raise SandboxError("a Sandbox starts once")
        t0 = time.monotonic()
        image = self.image = self._image()
        self.importable = frozenset(getattr(image, "modules", ()) or ())
        uds = self._new_dir()
        env = {"PYTHONPATH": GUEST_LIB, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
               **self._config["env"]}
        try:
            self.vm = MicroVM(
                self._config["kernel"], mem_mib=self._config["mem_mib"], vcpus=self._config["vcpus"],
                rootfs=Drive(image.path, read_only=True), drives=self._config["drives"], nics=self.nics,
                env=env, vsock=uds, files=agent_files(), append="random.trust_cpu=on",
                console=self._config["console"], stdout=self._on_output, force=self._config["force"],
                forkable=self._config["forkable"])
            self.vm.start([image.python, "-m", "microvm_agent"])
            self._watch()
            self._connect(uds, t0 + self.boot_timeout)
        except BaseException:
            self.close()
            raise
        self.timeline = {**self.vm.timeline(), "agent ready": time.monotonic() - t0}
        return self

    # --- snapshots (microvm/snapshot) -------------------------------------------------

    def snapshot(self, path: str | os.PathLike[str], *, checksum: bool = True) -> Snapshot:
        """Write a snapshot of this sandbox to the new directory `path`; the
        sandbox is paused meanwhile, then goes on. A request in flight goes
        on here; a restore of the snapshot starts with no requests (its
        connection is a new one). Sandbox.restore(path) brings it back.
        checksum: as MicroVM.snapshot (False: no RAM hash, a faster snapshot)."""
        vm = self._running_vm()
        try:
            return vm.snapshot(path, meta={"sandbox": {"image": str(self.image.path)}}, checksum=checksum)
        finally:
            vm.resume()

    @classmethod
    def restore(cls, path: str | os.PathLike[str] | Snapshot, *, timeout: float | None = None,
                boot_timeout: float = BOOT_TIMEOUT, console: BinaryIO | Callable[[bytes], Any] | None = None,
                prefetch: bool = False, force: bool = False) -> Sandbox:
        """A running sandbox from a snapshot that Sandbox.snapshot() wrote: the
        guest goes on where it was, with fresh entropy and the current time."""
        from microvm.machine import MicroVM

        snap = path if isinstance(path, Snapshot) else Snapshot.load(path)
        meta = (snap.state.get("meta") or {}).get("sandbox")
        if not isinstance(meta, dict) or not isinstance(meta.get("image"), str):
            raise SnapshotError(f"{snap.path} is not a sandbox's snapshot (no sandbox section)")
        sb = cls(image=meta["image"], timeout=timeout, boot_timeout=boot_timeout, console=console, force=force)
        t0 = time.monotonic()
        try:
            sb.image = sb._image()
            sb.importable = frozenset(getattr(sb.image, "modules", ()) or ())
            uds = sb._new_dir()
            sb.vm = MicroVM.restore(snap, vsock=uds, console=console, stdout=sb._on_output, prefetch=prefetch,
                                    force=force)
            sb._revive(uds, t0)
        except BaseException:
            sb.close()
            raise
        return sb

    def fork(self, n: int, *, resume: bool = True) -> list[Sandbox]:
        """n running copies of this sandbox, sharing its memory copy-on-write
        (Sandbox(forkable=True) makes that free), each with its own vsock,
        fresh entropy and the current time. This one is paused meanwhile,
        and stays paused with resume=False: a template that has not run
        since its last fork forks again without copying anything."""
        vm = self._running_vm()
        clones = [Sandbox(image=self.image, timeout=self.timeout, boot_timeout=self.boot_timeout,
                          force=self._config["force"]) for _ in range(checks.integer("n", n, 1, 1024))]
        t0 = time.monotonic()
        try:
            paths = [c._new_dir() for c in clones]
            try:
                vms = vm.fork(n, vsock=paths, stdout=[c._on_output for c in clones])
            finally:
                if resume:
                    vm.resume()
            for clone, clone_vm in zip(clones, vms, strict=True):
                clone.importable = self.importable
                clone.vm = clone_vm
            for clone, path in zip(clones, paths, strict=True):
                clone._revive(path, t0)
        except BaseException:
            for clone in clones:
                clone.close()
            raise
        return clones

    def record_pages(self, path: str | os.PathLike[str]) -> int:
        """After the first calls of a sandbox restored from `path`: record the
        pages it touched, for restore(path, prefetch=True) (MicroVM.record_pages)."""
        return int(self._running_vm().record_pages(path))

    def _revive(self, uds: str, t0: float) -> None:
        """Serve a restored or forked guest: its agent said it was ready before
        the snapshot; connect anew, then give it its own entropy and time."""
        self._ready.set()
        self._watch()
        self._connect(uds, t0 + self.boot_timeout)
        self.refresh()
        self.timeline = {"agent ready": time.monotonic() - t0}

    def _running_vm(self) -> Any:
        if self.vm is None or self._closed or self._ended.is_set():  # (a paused one counts)
            raise SandboxError("the sandbox is not running")
        return self.vm

    def _new_dir(self) -> str:
        """This sandbox's private directory, and its vsock socket's path in it."""
        self._dir = tempfile.mkdtemp(prefix="microvm-sb-")
        return os.path.join(self._dir, "vsock")

    def _watch(self) -> None:
        self._waiter = threading.Thread(target=self._wait_vm, name="sandbox-wait", daemon=True)
        self._waiter.start()

    def _image(self) -> Any:
        if self.image is not None:
            if isinstance(self.image, str | os.PathLike):
                from microvm.pyimage import PythonImage

                return PythonImage.load(Path(self.image))
            return self.image
        from microvm.pyimage import python_image

        return python_image()

    def _on_output(self, data: bytes) -> None:
        """The agent's own stdout (hvc0): its ready line, and anything it reports."""
        if len(self._out) < 1 << 16:
            self._out += data
        if not self._ready.is_set() and READY_LINE.encode() in self._out:
            self._ready.set()

    def _wait_vm(self) -> None:
        try:
            self.vm.wait(None)
        except BaseException as e:
            self._end_error = e
        finally:
            self._ended.set()
            self._ready.set()
            client = self.client
            if client is not None:
                client.close()

    def _connect(self, uds: str, deadline: float) -> None:
        while not self._ready.wait(0.05):
            if time.monotonic() > deadline:
                raise SandboxError(f"the guest agent was not ready within {self.boot_timeout} s\n"
                                   f"--- agent output ---\n{self._out[-2000:].decode(errors='replace')}\n"
                                   f"--- console tail ---\n{self.console_tail()}")
        if self._ended.is_set():
            raise self._crashed("the guest ended before its agent was ready")
        while True:  # ready said on hvc0; the listening socket is up by then, retry only a race
            try:
                self.client = AgentClient(_vsock_connect(uds, AGENT_VSOCK, deadline - time.monotonic()))
                break
            except OSError as e:
                if time.monotonic() > deadline or self._ended.is_set():
                    raise AgentError(f"cannot connect to the guest agent on vsock port {AGENT_VSOCK}: {e}") from e
                time.sleep(0.02)
        pong = self._final(self.client.request("ping"), deadline - time.monotonic())
        self.boot_id = pong.get("boot_id", "")

    def close(self) -> None:
        """Stop the guest and free everything; safe more than once, from any thread."""
        self._closed = True
        client, self.client = self.client, None
        if client is not None:
            client.close()
        vm = self.vm
        if vm is not None:
            vm.kill()
        waiter = self._waiter
        if waiter is not None and waiter is not threading.current_thread():
            waiter.join(30)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Sandbox:
        if self.vm is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self.client is not None and not self._ended.is_set() and self.client.error is None

    def console_tail(self) -> str:
        return self.vm.console_tail() if self.vm is not None else ""

    def _client(self) -> AgentClient:
        if self.client is None or self.client.error is not None:
            if self._ended.is_set() or self.client is not None:
                raise self._crashed("the sandbox's guest has ended")
            raise SandboxError("the sandbox is not running (use `with Sandbox() as sb:` or sb.start())")
        return self.client

    def _crashed(self, what: str) -> SandboxCrashed:
        self._ended.wait(GRACE)  # the guest's end reaches us just after the connection's
        cause = self._end_error
        why = f": {str(cause).splitlines()[0]}" if cause is not None else ""
        err = SandboxCrashed(f"{what}{why}\n--- console tail ---\n{self.console_tail()}")
        err.__cause__ = cause
        return err

def _vsock_connect(uds: str, port: int, timeout: float) -> socket.socket:
    """Firecracker's hybrid vsock handshake on the VM's Unix socket: CONNECT <port>, OK <host port>."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(max(0.1, min(timeout, 10.0)))
        s.connect(uds)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                raise ConnectionRefusedError(f"nothing listens on vsock port {port} in the guest")
            line += chunk
            if len(line) > 64:
                raise ConnectionError(f"garbled vsock handshake: {line!r}")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"vsock handshake refused: {line!r}")
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise

