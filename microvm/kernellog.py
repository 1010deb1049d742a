"""What the guest kernel's console lines tell the host: a panic (and when
its report is complete), an initrd that would not unpack, a power-down.

Fed the console's bytes as they come (from a vCPU thread), a byte or a
buffer at a time; it keeps one line at a time and calls on_end(reason) when
the guest is finished.
"""

from __future__ import annotations

import bisect
import re
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
# On the kernel command line: init sends the kernel's whole log (dmesg) over
# hvc1 before it reports to the host (MicroVM(full_log=True), merge_log).
FULL_LOG_ARG = "microvm.dmesg=1"
PRINTK_TIME = re.compile(rb"\[\s*(\d+\.\d+)\] ")
MAX_LINE = 512  # a longer "line" is looked at in pieces: a guest cannot grow our memory


class KernelLog:
    def __init__(self, on_end: Callable[[str], None] | None = None):
        self.on_end = on_end  # or feed()'s return: the owner holds us, we hold nothing of it
        self.panicked = False
        self.panic_line = ""  # the panic's reason, as printed
        self.panic_deadline: float | None = None  # time.monotonic() by which the report should be complete
        self.initrd_failure = ""
        self._line = bytearray()

    def feed(self, data: bytes) -> str | None:
        """Bytes as they come: one at a time (the UART) or in pieces of any size
        (a virtio console's buffers), lines split anywhere. The first end
        ("panic", "poweroff") their lines show, if any (on_end gets each)."""
        ended = None
        while data:
            end = data.find(b"\n")
            piece, data = (data, b"") if end < 0 else (data[:end + 1], data[end + 1:])
            self._line += piece
            if end >= 0 or len(self._line) > MAX_LINE:
                line, self._line = bytes(self._line), bytearray()
                reason = self._look_at(line)
                ended = ended or reason
        return ended

    def panic_summary(self) -> str:
        """The first line of a GuestPanicError: what panicked, and why if the log said."""
        if self.initrd_failure:
            return f"guest kernel panicked: the initrd could not be unpacked ({self.initrd_failure})"
        return f"guest kernel panicked: {self.panic_line}" if self.panic_line else "guest kernel panicked"

    def _look_at(self, line: bytes) -> str | None:
        # The end line repeats the marker ("---[ end Kernel panic - not syncing: ..."):
        # looked for first, or the report would only end by PANIC_GRACE.
        if PANIC_END_MARKER in line or PANIC_MARKER in line:
            if not self.panicked:
                self.panicked = True
                self.panic_line = printk_text(line)
                self.panic_deadline = time.monotonic() + PANIC_GRACE
            if PANIC_END_MARKER in line:
                return self._end("panic")
        elif not self.initrd_failure and any(m in line for m in INITRD_FAILURE_MARKERS):
            self.initrd_failure = printk_text(line)
        elif any(m in line for m in POWER_DOWN_MARKERS):
            # `poweroff -f` without ACPI: the kernel halts its CPUs; we end the VM.
            return self._end("poweroff")
        return None

    def _end(self, reason: str) -> str:
        if self.on_end is not None:
            self.on_end(reason)
        return reason


def init_message(console: bytes | bytearray) -> str:
    """Init's own last report on the console ("microvm: ..."), without the prefix."""
    for line in reversed(bytes(console).decode(errors="replace").splitlines()):
        if line.startswith("microvm: "):
            return line.removeprefix("microvm: ").strip()
    return ""


def printk_text(line: bytes) -> str:
    """A console line without its printk timestamp and line ending."""
    text = line.decode(errors="replace").strip()
    if text.startswith("[") and "]" in text:
        text = text[text.index("]") + 1:].strip()
    return text


def merge_log(console: bytes, dmesg: bytes) -> bytes:
    """The console's text with the kernel's whole log (`dmesg`, taken at the
    end) in it: every log line once, in the kernel's order, with the console's
    line endings. A console line that is in the log (one printed live: under
    `quiet`, warnings and worse) stands where the log has it; a kernel line the
    log lacks (printed after it was taken) follows the log's lines printed
    before it; any other line (init's) keeps its place after the lines that
    came before it on the console. What follows the last such line is the rest
    of the log."""
    log = [line.rstrip(b"\r") for line in dmesg.split(b"\n")]
    if log and not log[-1]:
        log.pop()
    where: dict[bytes, list[int]] = {}
    times, t = [], 0.0  # each log line's printk time (a line without one: the last seen)
    for i, line in enumerate(log):
        where.setdefault(line, []).append(i)
        m = PRINTK_TIME.match(line)
        t = float(m.group(1)) if m else t
        times.append(t)
    out, done = bytearray(), 0

    def log_upto(end: int) -> None:
        nonlocal done
        for line in log[done:end]:
            out.extend(line + b"\r\n")
        done = max(done, end)

    for line in console.splitlines(keepends=True):
        key = line.rstrip(b"\r\n")
        hits = where.get(key, ())
        i = bisect.bisect_left(hits, done)
        if i < len(hits):
            log_upto(hits[i] + 1)
            continue
        m = PRINTK_TIME.match(key)
        if m:
            log_upto(bisect.bisect_right(times, float(m.group(1)), lo=done))
        out.extend(line)
    log_upto(len(log))
    return bytes(out)
