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
    """Start a shell in the guest; host stdin goes to it until it exits."""
    stdin = sys.stdin.fileno()
    done = threading.Event()

    def pump() -> None:
        # select() with a timeout so the thread notices the end and can be joined.
        while not done.is_set():
            ready, _, _ = select.select([stdin], [], [], 0.1)
            if ready:
                data = os.read(stdin, 4096)
                if not data:
                    return
                vm.feed_input(data)

    with _raw_terminal(stdin):
        vm.start(None)
        reader = threading.Thread(target=pump, name="console-input", daemon=True)
        reader.start()
        try:
            return vm.wait(timeout)
        finally:
            done.set()
            reader.join()
