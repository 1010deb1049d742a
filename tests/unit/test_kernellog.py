"""What the kernel's console lines tell the host (microvm/kernellog.py), fed as
the UART gives them (a byte at a time) or as a virtio console does (buffers
of any size, lines split anywhere)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from microvm.kernellog import MAX_LINE, KernelLog, merge_log

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


LOG = b"[    0.000000] Linux version 6.1\n[    0.100000] one\n[    0.500000] err: two\n[    1.000000] three\n"


def test_a_quiet_console_gets_the_whole_log_in_the_consoles_line_endings() -> None:
    assert merge_log(b"", LOG) == LOG.replace(b"\n", b"\r\n")


def test_lines_printed_live_are_there_once_where_the_log_has_them() -> None:
    merged = merge_log(b"[    0.500000] err: two\r\n", LOG)
    assert merged == LOG.replace(b"\n", b"\r\n")


def test_init_lines_stay_after_the_live_line_before_them() -> None:
    merged = merge_log(b"[    0.500000] err: two\r\nmicrovm: hello\r\n", LOG).splitlines()
    assert merged == [b"[    0.000000] Linux version 6.1", b"[    0.100000] one", b"[    0.500000] err: two",
                      b"microvm: hello", b"[    1.000000] three"]


def test_a_kernel_line_after_the_log_was_taken_comes_after_the_log_lines_before_it() -> None:
    merged = merge_log(b"[    0.700000] reboot: Power down\r\n", LOG).splitlines()
    assert merged[2:] == [b"[    0.500000] err: two", b"[    0.700000] reboot: Power down",
                          b"[    1.000000] three"]


def test_repeated_lines_are_matched_in_order() -> None:
    log = b"[    1.000000] same\n[    2.000000] x\n[    1.000000] same\n"
    assert merge_log(b"[    1.000000] same\r\n[    1.000000] same\r\n", log).splitlines() == [
        b"[    1.000000] same", b"[    2.000000] x", b"[    1.000000] same"]


@given(st.lists(st.integers(0, 3), max_size=12), st.sets(st.integers(0, 11)))
def test_every_log_line_and_every_console_line_survive(lines: list[int], live: set[int]) -> None:
    log = [b"[%5d.000000] msg %d" % (i, n) for i, n in enumerate(lines)]
    console = b"".join(line + b"\r\n" for i, line in enumerate(log) if i in live) + b"init says\r\n"
    merged = merge_log(console, b"".join(line + b"\n" for line in log)).splitlines()
    assert [line for line in merged if line != b"init says"] == log
    assert merged.count(b"init says") == 1
