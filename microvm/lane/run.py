"""One run in the lane: boot QEMU, run a host command where /dev/kvm is real KVM.

On a PVM host /dev/kvm runs guest user mode natively but emulates guest
kernel mode instruction by instruction, so an unmodified Linux kernel cannot
run there. The lane boots Debian's stock 6.1 kernel in QEMU with TCG and an
emulated AMD-V CPU (`-cpu max,+svm`). A small busybox initramfs loads
kvm-amd and 9p, mounts the host's / read-only over virtio-9p, layers a tmpfs
over it with overlayfs so the command may write anywhere, chroots into it and
runs the command. Inside, /dev/kvm is nested KVM with hardware semantics.

Host <-> guest plumbing, all over virtio-9p:
  host  the host's / (read-only), the overlay's lower layer
  ctl   a private temp dir: config + run.sh in, status out
  out   the caller's output dir, mounted at the same path (or one chosen)

The per-run data lives in ctl, so the initramfs depends only on the kernel and
busybox and is built once per content hash.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from microvm import initramfs
from microvm.errors import LaneError, LaneFrozen, LaneTimeout
from microvm.hostprocess import proc_fields
from microvm.lane.initrd import END_MARK, START_MARK, initrd_path
from microvm.lane.kernel import boot_image, cache_dir, cached_kernel, find_kernel

QEMU = "qemu-system-x86_64"
TAIL_LINES = 60  # console lines quoted in a LaneError

# Host variables worth carrying into the chroot so tools behave the same there
# (MICROVM_CACHE: microvm inside finds the guest kernel and images built outside).
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYENV_ROOT", "PYENV_VERSION", "MICROVM_CACHE")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# One TCG thread: multi-threaded TCG with nested SVM was seen to hang now and
# then; a 1-vCPU lane still runs 2-vCPU guests (their threads time-share).
DEFAULT_SMP = int(os.environ.get("MICROVM_LANE_SMP", "1"))


@dataclass(frozen=True)
class LaneResult:
    returncode: int
    output: str  # the command's console output, "\r\n" folded to "\n"
    wall_s: float


def run_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The shell text the chroot's /bin/sh runs: cd, export, exec argv."""
    if not argv:
        raise ValueError("empty command")
    lines = [f"cd -- {shlex.quote(cwd)} || exit 127"]
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"environment variable name {key!r} cannot be passed to a shell")
        lines.append(f"export {shlex.quote(f'{key}={value}')}")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def lane_env(extra: Mapping[str, str] | None, out_path: str, tty: bool = False) -> dict[str, str]:
    """The command's environment: a few host variables, the lane's, then the caller's."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/root")
    # The command writes to the serial console, a tty; unless our own output is
    # a terminal, TERM=dumb keeps colour codes (pytest, ls, ...) out of logs.
    env["TERM"] = os.environ.get("TERM", "dumb") if tty else "dumb"
    env.update(MICROVM_LANE="1", MICROVM_LANE_OUT=out_path)
    env.update(extra or {})
    return env


def _virtfs(path: Path | str, tag: str, readonly: bool = False) -> list[str]:
    # multidevs=remap keeps inode numbers unique when the share spans filesystems.
    escaped = str(path).replace(",", ",,")  # QEMU's option syntax doubles commas
    opts = f"local,path={escaped},mount_tag={tag},security_model=none,multidevs=remap"
    return ["-virtfs", opts + (",readonly=on" if readonly else "")]


def qemu_command(kernel: Path, initrd: Path, ctl_dir: Path, out_dir: Path, *,
                 smp: int = DEFAULT_SMP, mem_mib: int = 2048, debug: bool = False,
                 monitor: Path | None = None) -> list[str]:
    """QEMU's command line; `monitor`: a unix socket for its human monitor
    (what a frozen lane's report asks: is the guest halted, where is it)."""
    accel = "tcg,thread=multi" if smp > 1 else "tcg"
    # loglevel=3 leaves oopses and panics (crit and above) on the console: rare,
    # and what a failure needs. Errors stay off: KVM logs one per nested guest
    # boot ("Unhandled WRMSR(0xc0010007)", an AMD perf counter it does not emulate).
    # nokaslr: a frozen lane's report gives the guest's RIP, which the kernel's
    # System.map (in the lane's cache) then names.
    append = "console=ttyS0 panic=-1 nokaslr " + ("lane.debug loglevel=7" if debug else "quiet loglevel=3")
    return [
        QEMU, "-name", "lane,debug-threads=on",
        "-M", "q35", "-accel", accel, "-cpu", "max,+svm", "-smp", str(smp), "-m", str(mem_mib),
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        *_virtfs("/", "host", readonly=True), *_virtfs(ctl_dir, "ctl"), *_virtfs(out_dir, "out"),
        *(["-monitor", f"unix:{monitor},server=on,wait=off"] if monitor else []),
    ]


def lane_available() -> str | None:
    """None if the lane can run here, else why not (without downloading anything)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    try:
        initramfs.busybox_path()
    except initramfs.CpioError as e:
        return str(e)
    if cached_kernel(cache_dir()) is None:
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                return f"no cached lane kernel and {tool} is missing to fetch one"
    return None


class _Console:
    """Splits the serial stream into boot noise, the command's output and shutdown noise.

    Works line by line so a marker is never split across reads. The init prints
    a newline before END_MARK in case the output lacked one; one blank line
    just before the mark is that newline and is dropped.
    """

    def __init__(self, stream: bool, passthrough: bool = False) -> None:
        self.stream = stream
        self.passthrough = passthrough  # show boot and shutdown lines too (debug)
        self.state = "boot"  # -> "command" -> "done"
        self.output: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._blank = 0  # blank command lines held back, one may be the marker's
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, chunk: bytes, final: bool = False) -> None:
        self._buf += self._decoder.decode(chunk, final)
        lines = self._buf.split("\n")
        self._buf = lines.pop()
        if final and self._buf:
            lines.append(self._buf)
            self._buf = ""
        for line in lines:
            self._line(line.removesuffix("\r"))

    def _line(self, line: str) -> None:
        self._tail.append(line)
        if self.state == "command":
            if line == END_MARK:
                self.state = "done"
                self._emit("\n" * max(self._blank - 1, 0))
            elif not line:
                self._blank += 1
            else:
                self._emit("\n" * self._blank + line + "\n")
                self._blank = 0
        elif self.state == "boot" and line == START_MARK:
            self.state = "command"
        elif self.passthrough and self.stream:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def _emit(self, text: str) -> None:
        self.output.append(text)
        if self.stream and text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def tail(self) -> str:
        return "\n".join(self._tail)


def run_in_lane(argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                timeout: float = 1800, out_dir: Path | None = None, out_path: str | None = None,
                smp: int | None = None, mem_mib: int = 2048, stream: bool = True,
                debug: bool = False) -> LaneResult:
    """Run argv inside the lane; return its exit status and console output.

    out_dir (default: a fresh temp dir) is shared read-write and mounted at
    out_path inside (default: the same absolute path); the command finds it in
    $MICROVM_LANE_OUT. Raises LaneError if the lane itself fails, LaneTimeout
    after `timeout` seconds.
    """
    reason = lane_available()
    if reason:
        raise LaneError(f"lane unavailable: {reason}")
    t0 = time.monotonic()
    kernel = find_kernel()
    initrd = initrd_path(kernel)
    with tempfile.TemporaryDirectory(prefix="microvm-lane-") as tmp:
        ctl = Path(tmp) / "ctl"
        ctl.mkdir()
        out = Path(out_dir) if out_dir is not None else Path(tmp) / "out"
        out.mkdir(parents=True, exist_ok=True)
        out = out.resolve()
        inside_out = out_path or str(out)
        (ctl / "config").write_text(f"LANE_OUT_PATH={shlex.quote(inside_out)}\n")
        full_env = lane_env(env, inside_out, tty=stream and sys.stdout.isatty())
        (ctl / "run.sh").write_text(run_script(argv, cwd or os.getcwd(), full_env))
        monitor = Path(tmp) / "monitor"  # beside ctl, not in it: ctl is shared with the guest
        cmd = qemu_command(boot_image(kernel), initrd, ctl, out, smp=smp or DEFAULT_SMP,
                           mem_mib=mem_mib, debug=debug, monitor=monitor)
        console = _Console(stream, passthrough=debug)
        qemu_status = _run_qemu(cmd, console, timeout, monitor=monitor)
        try:
            returncode = int((ctl / "status").read_text())
        except (OSError, ValueError) as e:
            raise LaneError(f"the lane stopped before the command finished (QEMU exit {qemu_status}); "
                            f"console tail:\n{console.tail()}") from e
    return LaneResult(returncode, "".join(console.output), time.monotonic() - t0)


# The lane (nested SVM under TCG) now and then freezes outright: QEMU's main
# loop and its vCPU thread both asleep, for good. A running lane, even an idle
# one, uses CPU (its guest's timers tick), so a QEMU that used none for this
# long, did no I/O (reads and writes: 9p, the console) and had no thread
# waiting on the host's disk is frozen: a LaneTimeout now, not at the end of
# the timeout. A guest waiting on a slow host disk through 9p is not frozen.
FREEZE_AFTER = 90.0
FREEZE_CPU = 0.05  # seconds of CPU below which a window counts as none
# Frozen lanes seen in CI had their vCPU halted with interrupts on (HLT=1,
# IF=1), the local APIC's timer vector pending in IRR, and QEMU's CPU with no
# interrupt request raised (read from its memory: a wake-up lost). An NMI did
# not wake them (stop 25): nothing re-reads the APIC. A key pressed on the
# lane's i8042 raises an external interrupt from outside the vCPU, which makes
# QEMU poll the APIC again: after NUDGE_AFTER s idle, the lane gets one (a
# shift key; the lane's serial console never sees it), at most MAX_NUDGES a run.
NUDGE_AFTER = 30.0
MAX_NUDGES = 2
_CHECK_EVERY = 5.0
# Set (to anything), a frozen lane's QEMU is left as it is, for a debugger
# (gdb -p PID: QEMU exports its symbols), until someone kills it.
KEEP_FROZEN_ENV = "MICROVM_LANE_KEEP_FROZEN"


@dataclass(frozen=True)
class _Activity:
    cpu_s: float  # user + system CPU time, all threads
    io: tuple[int, ...]  # /proc/PID/io: rchar, wchar (bytes read and written)
    on_disk: tuple[str, ...]  # threads in uninterruptible sleep (state D): waiting on the host


def _activity(pid: int) -> _Activity | None:
    """What process `pid` has done so far, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (stat(5) 14, 15)
        io = proc_fields(f"/proc/{pid}/io")
        on_disk = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                status = proc_fields(f"/proc/{pid}/task/{tid}/status")
                if status["State"].startswith("D"):
                    on_disk.append(status["Name"])
    except OSError:
        return None
    # Bytes, not calls: a read that finds nothing (QEMU's main loop polling
    # our closed monitor connection, say) moves nothing in a guest.
    return _Activity(cpu, tuple(int(io[k]) for k in ("rchar", "wchar")), tuple(on_disk))


def _threads(pid: int) -> str:
    """QEMU's threads, one line each: name, state, where in the kernel it sleeps;
    and the host's pressure: what a frozen lane's report needs."""
    lines = []
    with contextlib.suppress(OSError):
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with contextlib.suppress(OSError, KeyError):
                status = proc_fields(f"/proc/{pid}/task/{tid}/status")
                with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                    wchan = f.read().strip() or "-"
                lines.append(f"  {tid} {status['Name']}: {status['State']}, in {wchan}")
    for what in ("io", "cpu", "memory"):
        with contextlib.suppress(OSError), open(f"/proc/pressure/{what}") as f:
            lines.append(f"  host {what} pressure: {f.readline().strip()}")
    return "\n".join(lines)


def _ask_monitor(path: Path, commands: Sequence[str], wait: float = 3.0) -> str:
    """QEMU's human monitor's answers to `commands`, or why there are none
    (a QEMU whose main loop is stuck does not answer: that is an answer too)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(wait)
            sock.connect(str(path))
            sock.sendall("".join(c + "\n" for c in commands).encode())
            got, deadline = b"", time.monotonic() + wait
            while commands[-1].encode() not in got.rsplit(b"(qemu)", 1)[0] or not got.endswith(b"(qemu) "):
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
    except OSError as e:  # socket.timeout included
        return f"  the monitor did not answer: {e or type(e).__name__}"
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", got.decode(errors="replace"))
    # The run state, each vCPU's thread, where vCPU 0 is (RIP or EIP, with HLT=), CR0, EFER; and
    # its local APIC: the timer, the interrupts requested (IRR) and in service (ISR), the priorities.
    keep = ("VM status", "* CPU #", "CPU #", "RIP=", "EIP=", "CR0=", "EFER=", "LVTT", "Timer", "ISR", "IRR", "APR")
    return "\n".join("  " + line.strip() for line in text.splitlines() if line.strip().startswith(keep))


def _run_qemu(cmd: list[str], console: _Console, timeout: float, freeze_after: float = FREEZE_AFTER,
              monitor: Path | None = None, nudge_after: float = NUDGE_AFTER) -> int:
    """Run QEMU to its end, its console into `console`; LaneTimeout after
    `timeout` s, LaneFrozen once it has used no CPU and done no I/O for
    `freeze_after` s (the report asks `monitor`, if given, where the guest is).
    Idle `nudge_after` s, it gets a key pressed through `monitor` (see NUDGE_AFTER)."""
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    busy_at, busy = time.monotonic(), _Activity(0.0, (), ())  # when QEMU last did something, and what
    nudged_at: float | None = None  # this idle spell's key press
    nudges = 0
    try:
        while True:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise LaneTimeout(f"no result after {timeout:.0f} s; console tail:\n{console.tail()}")
            act = _activity(proc.pid)
            if act is not None and (act.cpu_s - busy.cpu_s >= FREEZE_CPU or act.io != busy.io or act.on_disk):
                if nudged_at is not None:
                    print(f"lane: QEMU was idle {nudged_at - busy_at:.0f} s; a key pressed through its monitor "
                          f"woke it", file=sys.stderr, flush=True)
                    nudged_at = None
                busy_at, busy = now, act
            elif (monitor is not None and nudged_at is None and nudges < MAX_NUDGES
                    and now - busy_at >= nudge_after):
                _ask_monitor(monitor, ("sendkey shift",))
                nudged_at, nudges = now, nudges + 1
                busy = _activity(proc.pid) or busy  # the monitor's own reads and writes are not the guest's
            elif now - busy_at >= freeze_after:
                guest = (_ask_monitor(monitor, ("info status", "info cpus", "info registers", "info lapic"))
                         if monitor else "")
                tried = (f" (a key pressed through its monitor after {nudged_at - busy_at:.0f} s did not wake it)"
                         if nudged_at is not None else "")
                frozen = LaneFrozen(f"the lane froze: QEMU used no CPU and did no I/O for {now - busy_at:.0f} s"
                                    f"{tried}; its threads:\n{_threads(proc.pid)}\n"
                                    + (f"its guest:\n{guest}\n" if guest else "")
                                    + f"console tail:\n{console.tail()}")
                if os.environ.get(KEEP_FROZEN_ENV):
                    print(f"{frozen}\nlane: QEMU (pid {proc.pid}) kept frozen for a debugger "
                          f"(${KEEP_FROZEN_ENV}); kill it to go on", file=sys.stderr, flush=True)
                    proc.wait()
                raise frozen
            if select.select([fd], [], [], min(left, _CHECK_EVERY, freeze_after / 4))[0]:
                chunk = os.read(fd, 65536)
                console.feed(chunk, final=not chunk)
                if not chunk:
                    break
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()

