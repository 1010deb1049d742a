"""Interactive use: the host terminal wired to the guest's serial console."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Iterator

from microvm.devices.console_input import INPUT_TICK
from microvm.machine import MicroVM, RunResult


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def interactive(vm: MicroVM, timeout: float | None = None) -> RunResult:
    """Start a shell in the guest; host stdin goes to it until it exits.

    On a terminal, keys go to the guest as typed (raw mode). From a pipe or
    a file, the input is held until the shell is up, none of it is lost, and
    its end is an end-of-file for the shell (MicroVM.end_input): the session
    ends with the shell's exit status, as `sh < file` would.
    """
    stdin = sys.stdin.fileno()
    done = threading.Event()

    def pump() -> None:
        reading = True
        while not done.is_set():
            if reading:
                data = _read_some(stdin, INPUT_TICK)
                if data is None:
                    pass  # nothing yet
                elif data:
                    vm.feed_input(data)  # may wait while the guest catches up
                else:
                    vm.end_input()
                    reading = False
            else:
                done.wait(INPUT_TICK)
            vm.pump_input()  # held input, a due end-of-file
            _flush_stdout()  # a prompt has no newline to flush it

    with _raw_terminal(stdin):
        vm.start(None)
        reader = threading.Thread(target=pump, name="console-input", daemon=True)
        reader.start()
        try:
            return vm.wait(timeout)
        finally:
            done.set()
            reader.join()


def _flush_stdout() -> None:
    """Show what the guest wrote so far: the session's output goes to our
    stdout (the CLI's sinks), flushed there only at newlines."""
    stream = getattr(sys.stdout, "buffer", sys.stdout)
    try:
        stream.flush()
    except (OSError, ValueError):  # closed, or a reader gone
        pass


def _read_some(fd: int, timeout: float) -> bytes | None:
    """Up to 4 KiB from fd within `timeout` s: None if nothing came, b"" at
    the end (a read error, such as EIO from a hung-up terminal, is an end too)."""
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 4096) if ready else None
    except (OSError, ValueError):
        return b""
