"""What the kernel's console lines tell the host (microvm/kernellog.py), fed as
the UART gives them (a byte at a time) or as a virtio console does (buffers
of any size, lines split anywhere)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from microvm.kernellog import MAX_LINE, KernelLog

POWER_DOWN = b"[    1.796176] reboot: System halted\r\n"
PANIC = (b"[    0.639998] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n"
         b"[    0.667104] Kernel Offset: disabled\r\n"
         b"[    0.667200] ---[ end Kernel panic - not syncing: VFS: Unable to mount root fs ]---\r\n")
BOOT = b"[    0.000000] Linux version 6.1.0\r\n[    0.100000] Run /init as init process\r\n"


def fed(data: bytes, cuts: list[int]) -> tuple[list[str], KernelLog]:
    ended: list[str] = []
    log = KernelLog(ended.append)
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if start < cut <= len(data):
            log.feed(data[start:cut])
            start = cut
    return ended, log


def test_a_byte_at_a_time_like_the_uart() -> None:
    ended, _ = fed(BOOT + POWER_DOWN, list(range(len(BOOT + POWER_DOWN))))
    assert ended == ["poweroff"]


@given(st.lists(st.integers(0, len(BOOT + PANIC + POWER_DOWN)), max_size=40))
def test_pieces_of_any_size_tell_the_same(cuts: list[int]) -> None:
    ended, log = fed(BOOT + PANIC, cuts)
    assert ended == ["panic"] and log.panicked
    assert log.panic_line == "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
    ended, _ = fed(BOOT + POWER_DOWN, cuts)
    assert ended == ["poweroff"]


def test_a_whole_buffer_with_many_lines() -> None:
    ended, _ = fed(BOOT + POWER_DOWN, [])
    assert ended == ["poweroff"]


def test_an_endless_line_is_looked_at_in_pieces() -> None:
    ended, log = fed(b"x" * (3 * MAX_LINE) + b"reboot: Power down\n", [])
    assert ended == ["poweroff"] and len(log._line) == 0
