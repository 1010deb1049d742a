"""A call into a running sandbox: our virtio-vsock against QEMU's vhost-vsock, same agent.

Both sides boot our kernel (vmlinux) with the same read-only Python root
image and run the guest agent (microvm/agent/) as the guest's command; the
host talks to it through a sandbox Session (sandbox/session.py) over one
connection:
  - microvm: a Sandbox; the connection is our virtio-vsock device's Unix
    socket (`CONNECT 52`), its packets moved by our I/O thread;
  - QEMU's microvm machine: the image as a virtio-blk root, a virtio-rng and
    `vhost-vsock-device`, whose packets the host kernel moves (vhost_vsock);
    once the agent's ready line shows on the serial console (a Sandbox waits
    for it on hvc0), the host connects with AF_VSOCK to (QEMU_CID, 52).
Measured, per side:
  - warm: `calls` no-op calls (`call(noop)`: a pickle each way and a fork in
    the guest) and `calls` `exec(["true"])`, in one running guest, after
    `warmup` of each not counted. The sides take turns call by call (who
    goes first alternates), so a slow spell of the host hits both; p50, p99.
  - cold: create -> first call answered -> closed, `rounds` times, taking
    turns (ab.alternate); p50, and of its parts: create (booted, the agent
    answered a ping) and close (the VMM gone).
Times are wall clock on the host, in seconds in the samples, ms in the table.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from microvm.benchmarks import ab, qemu, report
from microvm.benchmarks.guest import RunFailed
from microvm.errors import ConfigError, MicroVMError

# metric -> (label, the samples it is taken from, percentile)
METRICS: dict[str, tuple[str, str, float]] = {
    "call_p50": ("no-op call(), p50", "call", 50),
    "call_p99": ("no-op call(), p99", "call", 99),
    "exec_p50": ("exec(['true']), p50", "exec", 50),
    "exec_p99": ("exec(['true']), p99", "exec", 99),
    "cold_p50": ("create -> first call -> close, p50", "cold", 50),
    "create_p50": ("  of which create (agent answers), p50", "create", 50),
    "close_p50": ("  of which close, p50", "close", 50),
}
# The agent's own packages (msgpack, cloudpickle, tblib): the image when none is given.
AGENT_REQUIREMENTS = ("msgpack", "cloudpickle", "tblib")
QEMU_CID = 3
VHOST_VSOCK = Path("/dev/vhost-vsock")
BOOT_TIMEOUT = 300.0  # a guest's boot and the agent's start, slow in a busy lane
REQUEST_TIMEOUT = 120.0  # per call or command: a guest that stops answering fails the run, not hangs it
RETRY = 0.01  # seconds between connection attempts (the ready line may come just before the listen)


def noop() -> None:
    """The function called: nothing, so what is timed is the round trip."""


def agent_image(image: Path | None = None, venv: Path | None = None) -> Any:
    """The Python root image both sides boot: the one given, one made from a
    venv, or (default) a venv of the agent's requirements; built once and
    cached. Asked on the host, before the lane (which sees the host's cache)."""
    from microvm.pyimage import PythonImage, python_image

    if image is not None and venv is not None:
        raise ConfigError("give --image or --venv, not both")
    if image is not None:
        return PythonImage.load(image)
    if venv is not None:
        return python_image(venv=venv)
    return python_image(requirements=list(AGENT_REQUIREMENTS))


class Side(Protocol):
    """One VMM with the agent in its guest: open() boots and connects, close() ends it all."""

    def open(self) -> Any: ...  # a sandbox Session

    def close(self) -> None: ...


class MicrovmSide:
    """The agent in a Sandbox: our VMM in this process, virtio-vsock over its Unix socket."""

    def __init__(self, kernel: Path, image: Any, mem_mib: int):
        self.kernel, self.image, self.mem_mib = kernel, image, mem_mib
        self.sandbox: Any = None

    def open(self) -> Any:
        from microvm.sandbox import Sandbox

        self.sandbox = Sandbox(image=self.image, kernel=self.kernel, mem_mib=self.mem_mib, timeout=REQUEST_TIMEOUT,
                               boot_timeout=BOOT_TIMEOUT)
        return self.sandbox.start()  # pings the agent; closes everything if it fails

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()


class QemuSide:
    """The agent under QEMU microvm with vhost-vsock, as a Sandbox starts it:
    the same initramfs (our init, the agent's files, its environment), the
    same command line additions, a ping once connected."""

    def __init__(self, kernel: Path, image: Any, mem_mib: int, cid: int = QEMU_CID, *,
                 initrd: Path | None = None, extra: Sequence[str] = (), wait_ready: bool = True):
        """initrd: one made already (the same boot again: a migration's
        destination needs its source's); extra: more QEMU arguments;
        wait_ready=False: connect at once (an incoming migration's guest
        said it was ready before it was saved)."""
        self.kernel, self.image, self.mem_mib, self.cid = kernel, image, mem_mib, cid
        self.initrd, self.extra, self.wait_ready = initrd, list(extra), wait_ready
        self.machine: qemu.Machine | None = None
        self.session: Any = None
        self._dir: str | None = None

    def open(self) -> Any:
        from microvm.agent.server import READY_LINE

        try:
            initrd = self.initrd or self.make_initrd()
            self.machine = qemu.start(
                self.kernel, initrd, mem_mib=self.mem_mib, cmdline=f"{qemu.CMDLINE} root=/dev/vda random.trust_cpu=on",
                devices=[*qemu.root_drive(self.image.path), "-device", "virtio-rng-device",
                         "-device", f"vhost-vsock-device,guest-cid={self.cid}", *self.extra])
            # As a Sandbox does: connect once the agent says it listens (connecting
            # sooner waits out vsock's connect timeout, or interrupts the guest with RSTs).
            if self.wait_ready and not self.machine.wait_for(READY_LINE.encode(), BOOT_TIMEOUT):
                raise self.machine.failure(f"the guest agent was not ready within {BOOT_TIMEOUT:.0f} s")
            if not self.wait_ready:
                return self.reconnect(BOOT_TIMEOUT)
            self.session = self._connect(time.monotonic() + 10)
            self.session.ping()
        except BaseException:
            self.close()
            raise
        return self.session

    def reconnect(self, timeout: float) -> Any:
        """A new connection whose ping is answered, retried while the guest resets
        the ones made too early: a guest just loaded from a migration resets every
        connection when it handles vhost-vsock's transport-reset event, which may
        come after our connect."""
        from microvm.errors import AgentError

        assert self.machine is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.session is not None and self.session.client is not None:
                self.session.client.close()
            self.session = self._connect(deadline)
            try:
                self.session.ping()
                return self.session
            except AgentError:
                if time.monotonic() > deadline or not self.machine.alive:
                    raise
                time.sleep(RETRY)

    def make_initrd(self, directory: Path | None = None) -> Path:
        """The initramfs a Sandbox would boot (our init, the agent's files, its
        environment), in `directory` (kept) or this side's own (removed at close)."""
        from microvm.guestinit import initramfs_for
        from microvm.sandbox.core import GUEST_LIB, agent_files

        if directory is None:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="microvm-bench-call-")
            directory = Path(self._dir)
        initrd = directory / "initrd.cpio"
        env = {"PYTHONPATH": GUEST_LIB, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
        initrd.write_bytes(initramfs_for([self.image.python, "-m", "microvm_agent"], env=env, files=agent_files()))
        return initrd

    def _connect(self, deadline: float) -> Any:
        from microvm.agent.protocol import AGENT_VSOCK
        from microvm.sandbox.client import AgentClient
        from microvm.sandbox.session import Session

        assert self.machine is not None
        while True:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            try:
                sock.connect((self.cid, AGENT_VSOCK))
            except OSError as e:
                sock.close()
                if not self.machine.alive:
                    raise self.machine.failure("QEMU ended before its agent listened") from e
                if time.monotonic() > deadline:
                    raise self.machine.failure(f"cannot connect to the agent on vsock {self.cid}:{AGENT_VSOCK}: "
                                               f"{e}") from e
                time.sleep(RETRY)
                continue
            return Session(AgentClient(sock, name="qemu-agent"), timeout=REQUEST_TIMEOUT,
                           importable=frozenset(self.image.modules))

    def close(self) -> None:
        if self.session is not None and self.session.client is not None:
            self.session.client.close()
        if self.machine is not None:
            self.machine.kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def vhost_vsock() -> None:
    """/dev/vhost-vsock, for QEMU's side: in the lane, its module is loaded here."""
    if VHOST_VSOCK.exists():
        return
    from microvm.lane import in_lane

    if not in_lane():
        raise ConfigError(f"--qemu needs {VHOST_VSOCK}: modprobe vhost_vsock (or --no-qemu)")
    from microvm.lane.modules import load

    load(["vhost_vsock"])
    if not VHOST_VSOCK.exists():
        raise ConfigError(f"vhost_vsock is loaded but {VHOST_VSOCK} did not appear")


def _exec_true(session: Any) -> None:
    r = session.exec(["true"])
    if r.returncode != 0:
        raise RunFailed(f"`true` exited {r.returncode} in the guest: {r.stderr[-500:]!r}")


def _call_noop(session: Any) -> None:
    session.call(noop)


OPS: dict[str, Callable[[Any], None]] = {"call": _call_noop, "exec": _exec_true}


def warm(sessions: Mapping[str, Any], calls: int, warmup: int, advance: Callable[[str], None]
         ) -> dict[str, dict[str, list[float]]]:
    """side -> "call"/"exec" -> seconds per request, the sides taking turns."""
    names = list(sessions)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for kind, op in OPS.items():
        for _ in range(warmup):
            for name in names:
                op(sessions[name])
        for name in names:
            samples[name][kind] = []
        for i in range(calls):
            for name in names if i % 2 == 0 else reversed(names):
                t0 = time.perf_counter()
                op(sessions[name])
                samples[name][kind].append(time.perf_counter() - t0)
        advance(f"{kind}: " + ", ".join(f"{name} p50 {report.percentile(samples[name][kind], 50) * 1e3:.3g} ms"
                                        for name in names))
    return samples


def cold(make: Callable[[], Side]) -> ab.Metrics:
    """Seconds from nothing to the first call's answer and the guest gone again
    (cold), and its parts: to a session whose agent answered a ping (create),
    and to everything closed (close)."""
    side = make()
    t0 = time.perf_counter()
    try:
        session = side.open()
        t1 = time.perf_counter()
        _call_noop(session)
        t2 = time.perf_counter()
    finally:
        side.close()
    t3 = time.perf_counter()
    return {"cold": t3 - t0, "create": t1 - t0, "close": t3 - t2}


def summarize(samples: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, float | None]]:
    """side -> metric (METRICS) -> ms; None where the side has no samples of that kind."""
    return {side: {metric: (report.percentile(per[kind], q) * 1e3 if per.get(kind) else None)
                   for metric, (_, kind, q) in METRICS.items()} for side, per in samples.items()}


def ratios(summary: Mapping[str, Mapping[str, float | None]], a: str = "microvm", b: str = "qemu"
           ) -> dict[str, dict[str, float | None]]:
    """{"a / b": metric -> a's value / b's}, None where either lacks it; {} without both sides."""
    if a not in summary or b not in summary:
        return {}

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    return {f"{a} / {b}": {m: ratio(summary[a].get(m), summary[b].get(m)) for m in METRICS}}


def steps(rounds: int, with_qemu: bool) -> int:
    """Progress steps of run(): a boot per side, the calls, the commands, the cold rounds."""
    sides = 1 + with_qemu
    return sides + len(OPS) + rounds * sides


def run(kernel: Path, image: Any, *, calls: int = 200, warmup: int = 10, rounds: int = 5, mem_mib: int = 256,
        with_qemu: bool = True, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    if with_qemu:
        vhost_vsock()
    makers: dict[str, Callable[[], Side]] = {"microvm": lambda: MicrovmSide(kernel, image, mem_mib)}
    if with_qemu:
        makers["qemu"] = lambda: QemuSide(kernel, image, mem_mib)
    # Warm first: its boots (not counted) also bring the image into the page cache for both.
    running: dict[str, Side] = {}
    try:
        sessions = {}
        for name, make in makers.items():
            running[name] = make()
            t0 = time.perf_counter()
            sessions[name] = running[name].open()
            advance(f"{name} up in {time.perf_counter() - t0:.2f} s")
        samples = warm(sessions, calls, warmup, advance)
    except MicroVMError as e:
        # The command shows the first line; what follows (a guest's console tail) is the story.
        print(f"bench call failed: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        for side in running.values():
            side.close()
    records, failures = ab.alternate({name: functools.partial(cold, make) for name, make in makers.items()},
                                     rounds, advance)
    for name in makers:
        samples[name].update({kind: [rec[kind] for rec in records[name]] for kind in ("cold", "create", "close")})
    summary = summarize(samples)
    return {"benchmark": "call", "kernel": str(kernel), "image": str(image.path), "mem_mib": mem_mib,
            "calls": calls, "warmup": warmup, "rounds": rounds, "cpus": os.cpu_count(),
            "samples": samples, "summary_ms": summary, "ratio": ratios(summary),
            "failures": [asdict(f) for f in failures]}


def table(result: Mapping[str, Any]) -> Any:
    """The summary as report.compare_table lays it out: a row per metric, a
    column per side, then the ratio."""
    from microvm.lane import in_lane

    summary, ratio = result["summary_ms"], result["ratio"]
    title = (f"sandbox call latency: {result['calls']} warm requests, {result['rounds']} cold rounds per side, "
             f"{'lane' if in_lane() else 'host'}")
    rows = [[label, "ms", *(summary[side][m] for side in summary), *(r[m] for r in ratio.values())]
            for m, (label, _, _) in METRICS.items()]
    return report.rows_table(title, ["metric", "unit", *summary, *ratio], rows)
