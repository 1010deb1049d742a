"""QEMU's microvm machine as the yardstick: our kernel, our initramfs, KVM.

The one QEMU runner of the benchmarks. QEMU has no control device of ours,
so the guest's command ends the machine itself: its script runs with its
output on the serial console, then `reboot -f` (reboot=t on the command line,
-no-reboot: QEMU exits). Times are from spawning the QEMU process: to MARK on
the console (when the script prints it) and to QEMU's exit.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
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


def run(kernel: Path, initrd: Path, *, mem_mib: int = 128, vcpus: int = 1, cmdline: str = CMDLINE,
        devices: Sequence[str] = (), timeout: float = 120) -> QemuRun:
    """Boot QEMU microvm (KVM; acpi=off, so virtio-mmio devices are on the
    kernel command line) with devices (QEMU arguments) until the guest ends it."""
    argv = [QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-m", str(mem_mib),
            "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline, *devices]
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
