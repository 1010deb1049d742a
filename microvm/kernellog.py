"""What the guest kernel's console lines tell the host: a panic (and when
its report is complete), an initrd that would not unpack, a power-down.

Fed the console's bytes as they come (from a vCPU thread), a byte or a
buffer at a time; it keeps one line at a time and calls on_end(reason) when
the guest is finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PANIC_MARKER = b"Kernel panic - not syncing"
# panic() prints this last (kernel/panic.c), then reboots, or with panic=0
# spins for ever: either way the run is over once we see it.
PANIC_END_MARKER = b"---[ end Kernel panic"
PANIC_GRACE = 2.0  # seconds for the panic report to reach its end line
# init/initramfs.c, without and with CONFIG_BLK_DEV_RAM.
INITRD_FAILURE_MARKERS = (b"Initramfs unpacking failed", b"rootfs image is not initramfs")
POWER_DOWN_MARKERS = (b"reboot: Power down", b"reboot: System halted")
MAX_LINE = 512  # a longer "line" is looked at in pieces: a guest cannot grow our memory


class KernelLog:
    def __init__(self, on_end: Callable[[str], None]):
        self.on_end = on_end
        self.panicked = False
        self.panic_line = ""  # the panic's reason, as printed
        self.panic_deadline: float | None = None  # time.monotonic() by which the report should be complete
        self.initrd_failure = ""
        self._line = bytearray()

    def feed(self, data: bytes) -> None:
        """Bytes as they come: one at a time (the UART) or in pieces of any size
        (a virtio console's buffers), lines split anywhere."""
        while data:
            end = data.find(b"\n")
            piece, data = (data, b"") if end < 0 else (data[:end + 1], data[end + 1:])
            self._line += piece
            if end >= 0 or len(self._line) > MAX_LINE:
                line, self._line = bytes(self._line), bytearray()
                self._look_at(line)

    def _look_at(self, line: bytes) -> None:
        # The end line repeats the marker ("---[ end Kernel panic - not syncing: ..."):
        # looked for first, or the report would only end by PANIC_GRACE.
        if PANIC_END_MARKER in line or PANIC_MARKER in line:
            if not self.panicked:
                self.panicked = True
                self.panic_line = printk_text(line)
                self.panic_deadline = time.monotonic() + PANIC_GRACE
            if PANIC_END_MARKER in line:
                self.on_end("panic")
        elif not self.initrd_failure and any(m in line for m in INITRD_FAILURE_MARKERS):
            self.initrd_failure = printk_text(line)
        elif any(m in line for m in POWER_DOWN_MARKERS):
            # `poweroff -f` without ACPI: the kernel halts its CPUs; we end the VM.
            self.on_end("poweroff")


def printk_text(line: bytes) -> str:
    """A console line without its printk timestamp and line ending."""
    text = line.decode(errors="replace").strip()
    if text.startswith("[") and "]" in text:
        text = text[text.index("]") + 1:].strip()
    return text
