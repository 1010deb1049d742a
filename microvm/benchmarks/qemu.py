"""QEMU's microvm machine as the yardstick: our kernel, our initramfs, KVM.

The one QEMU runner of the benchmarks, in two kinds:
  - run(): QEMU has no control device of ours, so the guest's command ends
    the machine itself: its script runs with its output on the serial
    console, then `reboot -f` (reboot=t on the command line, -no-reboot:
    QEMU exits). Times are from spawning the QEMU process: to MARK on the
    console (when the script prints it) and to QEMU's exit.
  - start(): a guest that serves (the sandbox agent) until we kill it; its
    console is kept for the error that names a failure.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from microvm.errors import MicroVMError

QEMU = "qemu-system-x86_64"
MARK = "microvm-bench-mark"
# Our default command line, but reboot by triple fault: QEMU microvm has no
# i8042 reset line for reboot=k.
CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1"
# The script's end. stty drains the serial port first (TCSADRAIN: a reboot
# does not wait for it); reboot is busybox's from our initramfs (/proc/1/root),
# as a Debian root has none.
END = "stty -F /dev/console -opost; /proc/1/root/bin/busybox reboot -f"


class QemuBenchError(MicroVMError):
    """QEMU did not run the benchmark's guest to the end."""


@dataclass
class QemuRun:
    marker_s: float | None  # process start -> MARK on the console (None: never printed)
    exit_s: float  # process start -> QEMU exited
    console: bytes

    def text(self) -> str:
        """The console as text with LF line ends (the serial port sends CRLF)."""
        return self.console.decode(errors="replace").replace("\r\n", "\n")


def available() -> bool:
    return shutil.which(QEMU) is not None


@contextlib.contextmanager
def initramfs(script: str = f"echo {MARK}") -> Iterator[Path]:
    """Our initramfs, in a temporary file, running script (sh) and then ending
    the machine: failed or not, since our init would wait forever for a host."""
    from microvm.guestinit import initramfs_for

    with tempfile.TemporaryDirectory(prefix="microvm-bench-") as tmp:
        path = Path(tmp, "initrd.cpio")
        path.write_bytes(initramfs_for(["sh", "-c", f"( {script}\n) >/dev/console 2>&1; {END}"]))
        yield path


def command(kernel: Path, initrd: Path, *, mem_mib: int = 128, vcpus: int = 1, cmdline: str = CMDLINE,
            devices: Sequence[str] = ()) -> list[str]:
    """QEMU microvm's command line (KVM; acpi=off, so virtio-mmio devices are
    on the kernel command line) with devices (QEMU arguments), console on stdout."""
    return [QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-m", str(mem_mib),
            "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline, *devices]


def root_drive(image: Path) -> list[str]:
    """A root image, read-only, as the first virtio-blk device: root=/dev/vda."""
    return ["-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-device,drive=root"]


def run(kernel: Path, initrd: Path, *, mem_mib: int = 128, vcpus: int = 1, cmdline: str = CMDLINE,
        devices: Sequence[str] = (), timeout: float = 120) -> QemuRun:
    """Boot QEMU microvm (command()) until the guest ends it."""
    argv = command(kernel, initrd, mem_mib=mem_mib, vcpus=vcpus, cmdline=cmdline, devices=devices)
    with tempfile.TemporaryFile() as err:  # a file: a full stderr pipe would stall QEMU
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        killer = threading.Timer(timeout, kill)  # a silent hang still ends the read loop
        killer.start()
        marker = None
        buf = bytearray()
        mark = MARK.encode()
        try:
            while chunk := proc.stdout.read1(65536):  # type: ignore[attr-defined]
                buf += chunk
                if marker is None and mark in buf[-len(chunk) - len(mark):]:
                    marker = time.monotonic() - t0
            proc.wait()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        total = time.monotonic() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    tail = bytes(buf[-2000:]).decode(errors="replace")
    if timed_out.is_set():
        raise QemuBenchError(f"QEMU did not finish within {timeout:.0f} s; console tail:\n{tail}")
    if proc.returncode != 0:
        raise QemuBenchError(f"QEMU failed ({proc.returncode}): {stderr[-2000:]}\n{tail}")
    return QemuRun(marker, total, bytes(buf))


class Machine:
    """A QEMU microvm whose guest runs until kill(): the console is read in a
    thread (the last CONSOLE_TAIL bytes kept, wait_for() a line in it),
    stderr goes to a file (a full pipe would stall QEMU)."""

    CONSOLE_TAIL = 1 << 16

    def __init__(self, argv: Sequence[str]):
        self._err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._err, stdin=subprocess.DEVNULL)
        except BaseException:
            self._err.close()
            raise
        self._console: deque[bytes] = deque()
        self._console_bytes = 0
        self._console_changed = threading.Condition()
        self._console_ended = False
        self._reader = threading.Thread(target=self._read, name="qemu-console", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            with self._console_changed:
                self._console.append(chunk)
                self._console_bytes += len(chunk)
                while self._console_bytes - len(self._console[0]) >= self.CONSOLE_TAIL:
                    self._console_bytes -= len(self._console.popleft())
                self._console_changed.notify_all()
        with self._console_changed:
            self._console_ended = True
            self._console_changed.notify_all()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, text: bytes, timeout: float) -> bool:
        """Wait until text shows on the console (within the kept tail); False
        if QEMU ended or the time ran out first."""
        deadline = time.monotonic() + timeout
        with self._console_changed:
            while text not in b"".join(self._console):
                left = deadline - time.monotonic()
                if left <= 0 or self._console_ended:
                    return False
                self._console_changed.wait(left)
        return True

    def console_tail(self, n: int = 2000) -> str:
        with self._console_changed:
            data = b"".join(self._console)
        return data[-n:].decode(errors="replace").replace("\r\n", "\n")

    def failure(self, what: str) -> QemuBenchError:
        """what went wrong, with QEMU's exit status and stderr if it has ended, and the console's tail."""
        status = self.proc.poll()
        stderr = ""
        if not self._err.closed:
            self._err.seek(0)
            stderr = self._err.read().decode(errors="replace").strip()[-2000:]
        ended = f" (QEMU exited {status}: {stderr})" if status is not None else ""
        return QemuBenchError(f"{what}{ended}; console tail:\n{self.console_tail()}")

    def kill(self) -> None:
        """End QEMU (the guest with it) and wait for it; safe more than once."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start(kernel: Path, initrd: Path, *, mem_mib: int = 128, vcpus: int = 1, cmdline: str = CMDLINE,
          devices: Sequence[str] = ()) -> Machine:
    """Boot QEMU microvm (command()) and leave it running: the caller kills it."""
    return Machine(command(kernel, initrd, mem_mib=mem_mib, vcpus=vcpus, cmdline=cmdline, devices=devices))
