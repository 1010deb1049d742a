"""QEMU's microvm machine as the yardstick: same kernel, same initramfs.

QEMU has no control device of ours, so the guest's command prints a marker
and ends the machine itself (`reboot -f`; with -no-reboot QEMU then exits).
Times are from spawning the QEMU process: to the marker on the console
(the command has run) and to QEMU's exit.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from microvm.errors import MicroVMError

QEMU = "qemu-system-x86_64"
MARK = "microvm-bench-mark"
# Our default command line, but reboot by triple fault: QEMU microvm has no
# i8042 reset line for reboot=k.
CMDLINE = "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1"


class QemuBenchError(MicroVMError):
    """QEMU did not run the benchmark's guest to the end."""


@dataclass
class QemuRun:
    marker_s: float  # process start -> marker on the console
    exit_s: float  # process start -> QEMU exited
    console: bytes


def available() -> bool:
    return shutil.which(QEMU) is not None


def initramfs(path: Path) -> Path:
    """Write our initramfs with the marker command to path."""
    from microvm.guestinit import initramfs_for

    path.write_bytes(initramfs_for(["sh", "-c", f"echo {MARK}; reboot -f"]))
    return path


def boot(kernel: Path, initrd: Path, *, mem_mib: int = 128, vcpus: int = 1, cmdline: str = CMDLINE,
         timeout: float = 120) -> QemuRun:
    """Boot QEMU microvm (KVM, acpi=off so virtio-mmio would be on the command line)."""
    argv = [
        QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-m", str(mem_mib),
        "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    killer = threading.Timer(timeout, proc.kill)  # a silent hang still ends the read loop
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
    if marker is None or total > timeout:
        raise QemuBenchError(f"QEMU did not run the command within {timeout:.0f} s:\n"
                             f"{bytes(buf[-2000:]).decode(errors='replace')}")
    return QemuRun(marker, total, bytes(buf))
