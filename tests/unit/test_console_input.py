"""Interactive console input on the host: the UART's paced path (Serial.offer),
ConsoleInput (held until the shell is up, never dropped, ended with VEOF),
and MicroVM.feed_input/end_input driven by microvm.console's pump thread,
against a fake guest that reads the UART like Linux's 8250 driver. No KVM."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import pytest

from microvm import console
from microvm.devices import serial
from microvm.devices.console_input import (
    EOF_QUIET,
    EOF_REPEAT,
    RX_OFFER_WINDOW,
    SETTLE_MAX,
    SETTLE_QUIET,
    VEOF,
    ConsoleInput,
)
from microvm.devices.serial import (
    RX_FIFO_LIMIT,
    UART_FCR,
    UART_IER,
    UART_IER_RDI,
    UART_LSR,
    UART_LSR_DR,
    UART_MCR,
    UART_MCR_DTR,
    UART_MCR_LOOP,
    UART_MCR_OUT2,
    UART_MCR_RTS,
    UART_RX,
    Serial,
)
from microvm.machine import MicroVM, RunResult
from tests.support.fakes import FakeIrq

OPEN_MCR = UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2  # what Linux writes when it opens the port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def opened_uart() -> tuple[Serial, FakeIrq]:
    irq = FakeIrq()
    uart = Serial(irq)
    uart.write(UART_MCR, 1, OPEN_MCR)
    uart.write(UART_IER, 1, UART_IER_RDI)
    return uart, irq


def drain(uart: Serial) -> bytes:
    out = bytearray()
    while uart.read(UART_LSR, 1) & UART_LSR_DR:
        out.append(uart.read(UART_RX, 1))
    return bytes(out)


# --- Serial.offer ------------------------------------------------------------------


def test_offer_takes_nothing_until_the_guest_receives() -> None:
    uart = Serial(FakeIrq())
    assert uart.offer(b"abc") == 0  # reset state: no receive interrupts, RTS low
    uart.write(UART_IER, 1, UART_IER_RDI)
    assert uart.offer(b"abc") == 0  # RTS still low
    uart.write(UART_MCR, 1, OPEN_MCR | UART_MCR_LOOP)
    assert uart.offer(b"abc") == 0  # loopback: the line is not ours
    uart.write(UART_MCR, 1, OPEN_MCR)
    assert uart.offer(b"abc") == 3
    assert drain(uart) == b"abc"


def test_offer_keeps_a_window_and_kicks_once() -> None:
    uart, irq = opened_uart()
    data = bytes(range(256)) * 4
    assert uart.offer(data) == RX_OFFER_WINDOW
    assert uart.offer(data[RX_OFFER_WINDOW:]) == 0  # the window is full: nothing dropped, nothing taken
    assert irq.count == 1  # the interrupt rose with the first byte only
    assert uart.dropped_input == 0
    assert drain(uart) == data[:RX_OFFER_WINDOW]


def test_rts_dropped_by_flow_control_stops_the_offers() -> None:
    uart, _ = opened_uart()
    calls: list[int] = []
    uart.on_rx_space = lambda: calls.append(1)
    uart.write(UART_MCR, 1, OPEN_MCR & ~UART_MCR_RTS)  # tty throttled (CRTSCTS)
    assert uart.offer(b"x") == 0
    assert calls == []
    uart.write(UART_MCR, 1, OPEN_MCR)  # unthrottled: the host hears at once
    assert calls == [1]
    assert uart.offer(b"x") == 1


def test_guest_reading_the_last_byte_asks_for_more_without_an_extra_interrupt() -> None:
    uart, irq = opened_uart()
    more = [b"cd"]

    def refill() -> None:
        if more:
            uart.offer(more.pop())

    uart.on_rx_space = refill
    uart.offer(b"ab")
    assert irq.count == 1
    assert drain(uart) == b"abcd"  # refilled from within the read; the driver's LSR loop finds it
    assert irq.count == 1


def test_fifo_reset_clears_the_offered_window() -> None:
    # Why input must wait for the guest: its driver resets the FIFO when it opens the port.
    uart, _ = opened_uart()
    uart.offer(b"lost")
    uart.write(UART_FCR, 1, serial.UART_FCR_ENABLE_FIFO | serial.UART_FCR_CLEAR_RCVR)
    assert uart.rx_pending == 0


# --- ConsoleInput ----------------------------------------------------------------------


def test_input_is_held_until_the_shell_is_up_and_its_prompt_is_out() -> None:
    clock = Clock()
    uart, _ = opened_uart()
    held = ConsoleInput(clock)
    held.put(b"echo hi\n")
    held.pump(uart, None, 100)  # booting
    assert uart.rx_pending == 0 and held.held == 8
    ready = clock.now = 1001.0
    held.pump(uart, ready, 100)  # the shell is starting, no prompt yet
    clock.now += 0.02
    held.pump(uart, ready, 110)  # prompt printed
    assert uart.rx_pending == 0
    clock.now += SETTLE_QUIET + 0.01
    held.pump(uart, ready, 110)  # quiet since: it reads
    assert drain(uart) == b"echo hi\n"


def test_input_goes_after_settle_max_even_without_a_prompt() -> None:
    clock = Clock()
    uart, _ = opened_uart()
    held = ConsoleInput(clock)
    held.put(b"x\n")
    held.pump(uart, clock.now, 5)
    clock.now += SETTLE_MAX
    held.pump(uart, clock.now - SETTLE_MAX, 5)
    assert drain(uart) == b"x\n"


def test_more_than_the_uart_buffer_arrives_whole_and_in_order() -> None:
    clock = Clock()
    uart, _ = opened_uart()
    held = ConsoleInput(clock)
    uart.on_rx_space = lambda: held.pump(uart, 0.0, 0, settle=False)
    data = os.urandom(RX_FIFO_LIMIT * 3 + 123)
    held.put(data)
    got = bytearray()
    throttled = False
    while len(got) < len(data):
        held.pump(uart, 0.0, 0, settle=False)  # the pump thread's tick
        got += drain(uart)
        if len(got) > RX_FIFO_LIMIT and not throttled:
            # The guest's tty buffer is full: RTS drops, nothing more comes in.
            throttled = True
            uart.write(UART_MCR, 1, OPEN_MCR & ~UART_MCR_RTS)
            held.pump(uart, 0.0, 0, settle=False)
            assert uart.rx_pending == 0
            uart.write(UART_MCR, 1, OPEN_MCR)
    assert bytes(got) == data
    assert uart.dropped_input == 0 and held.held == 0


def test_end_sends_veof_at_a_line_start_once_all_is_read_and_quiet() -> None:
    clock = Clock()
    uart, _ = opened_uart()
    held = ConsoleInput(clock)
    held.put(b"echo hi")  # no newline at the end
    held.end()
    held.pump(uart, 0.0, 0, settle=False)
    assert uart.rx_pending == 8  # the line, ended for it
    clock.now += 5
    held.pump(uart, 0.0, 0, settle=False)
    assert held.eofs_sent == 0  # the guest has not read it yet
    assert drain(uart) == b"echo hi\n"
    held.pump(uart, 0.0, 0, settle=False)
    assert held.eofs_sent == 0  # read just now: give the shell time
    clock.now += EOF_QUIET / 2
    held.pump(uart, 0.0, 9, settle=False)  # it echoes, runs the command
    clock.now += EOF_QUIET / 2
    held.pump(uart, 0.0, 9, settle=False)
    assert held.eofs_sent == 0  # output only EOF_QUIET/2 ago
    clock.now += EOF_QUIET / 2 + 0.01
    held.pump(uart, 0.0, 9, settle=False)
    assert held.eofs_sent == 1
    assert drain(uart) == bytes((VEOF,))
    # Again while the guest runs (the first may have landed where nobody read it).
    held.pump(uart, 0.0, 9, settle=False)
    assert held.eofs_sent == 1
    clock.now += EOF_REPEAT + 0.01
    held.pump(uart, 0.0, 9, settle=False)
    assert held.eofs_sent == 2


def test_end_adds_no_newline_after_a_complete_line_or_no_input() -> None:
    for data in (b"exit 3\n", b"exit 3\r", b""):
        clock = Clock()
        uart, _ = opened_uart()
        held = ConsoleInput(clock)
        held.put(data)
        held.end()
        held.pump(uart, 0.0, 0, settle=False)
        assert drain(uart) == data
        clock.now += EOF_QUIET + 0.01
        held.pump(uart, 0.0, 0, settle=False)
        assert drain(uart) == bytes((VEOF,))
    with pytest.raises(ValueError):
        held.put(b"late")


# --- MicroVM + microvm.console against a fake guest --------------------------------------


class FakeShellVM(MicroVM):
    """MicroVM without KVM: start() wires a real Serial and runs a fake guest
    that opens the port, marks the shell's start (after `boot_delay`, input
    that arrives earlier is lost as on Linux), and reads the UART like a
    canonical tty with a small buffer (RTS flow control) under a shell that
    knows `echo` and `exit`; ^D on an empty line ends it with the last status."""

    def __init__(self, boot_delay: float = 0.3, tty_buffer: int = 4096, line_delay: float = 0.0):
        super().__init__()
        self.boot_delay = boot_delay
        self.tty_buffer = tty_buffer
        self.line_delay = line_delay
        self.lines: list[bytes] = []
        self.status = 0
        self.eofs = 0
        self._guest: threading.Thread | None = None
        self._exited = threading.Event()

    def start(self, argv: Any = None) -> MicroVM:
        self.vm = object()  # type: ignore[assignment]
        self.serial = Serial(FakeIrq(), self._on_console)
        self._guest = threading.Thread(target=self._run_guest, daemon=True)
        self._guest.start()
        return self

    def wait(self, timeout: float | None = None) -> RunResult:
        assert self._guest is not None
        self._guest.join(timeout)
        ended = not self._guest.is_alive()
        self._exited.set()
        self._guest.join()
        self.serial, self.vm = None, None
        if not ended:
            raise TimeoutError("fake guest did not finish")
        return RunResult(exit_code=self.status, stdout=bytes(self.stdout), console=bytes(self.console),
                         reason="exit")

    def _run_guest(self) -> None:
        uart = self.serial
        assert uart is not None
        uart.write(UART_MCR, 1, OPEN_MCR)
        uart.write(UART_IER, 1, UART_IER_RDI)
        time.sleep(self.boot_delay)
        uart.write(UART_FCR, 1, serial.UART_FCR_ENABLE_FIFO | serial.UART_FCR_CLEAR_RCVR)
        self._times["command started"] = time.monotonic_ns()
        self._on_console(b"~ # ")
        buffered = bytearray()
        line = bytearray()
        while not self._exited.is_set():
            while uart.read(UART_LSR, 1) & UART_LSR_DR:
                buffered.append(uart.read(UART_RX, 1))
                if len(buffered) >= self.tty_buffer:
                    uart.write(UART_MCR, 1, OPEN_MCR & ~UART_MCR_RTS)  # throttle
                    break
            if not buffered:
                time.sleep(0.005)
                continue
            c = buffered.pop(0)
            if len(buffered) < self.tty_buffer // 2:
                uart.write(UART_MCR, 1, OPEN_MCR)  # unthrottle
            if c == VEOF:
                self.eofs += 1
                if not line:
                    return
            elif c in b"\r\n":
                if self._execute(bytes(line)):
                    return
                line.clear()
                self._on_console(b"~ # ")
            else:
                line.append(c)

    def _execute(self, line: bytes) -> bool:
        self.lines.append(line)
        time.sleep(self.line_delay)
        for cmd in line.split(b";"):
            word, _, arg = cmd.strip().partition(b" ")
            if word == b"echo":
                self._on_console(arg + b"\n")
                self.status = 0
            elif word == b"exit":
                self.status = int(arg or b"0")
                return True
            elif word == b"false":
                self.status = 1
        return False


def run_piped(vm: FakeShellVM, data: bytes, monkeypatch: pytest.MonkeyPatch) -> RunResult:
    """`printf DATA | microvm run`: the whole input is there before the guest boots."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    with os.fdopen(r, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        before = threading.active_count()
        result = console.interactive(vm, timeout=30)
        assert threading.active_count() == before  # the pump thread (and our fake guest) joined
    return result


def test_piped_input_before_the_shell_is_up_is_delivered_and_exit_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = FakeShellVM()
    result = run_piped(vm, b"echo hi; exit 4\n", monkeypatch)
    assert result.exit_code == 4
    assert b"hi\n" in bytes(vm.console)
    assert vm.lines == [b"echo hi; exit 4"]


def test_end_of_input_ends_the_shell_with_its_status(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = FakeShellVM(line_delay=0.05)
    result = run_piped(vm, b"echo one\necho two\nfalse", monkeypatch)
    assert vm.lines == [b"echo one", b"echo two", b"false"]
    assert result.exit_code == 1  # the last command's, as `sh < file`
    assert vm.eofs >= 1


def test_piped_input_larger_than_the_uart_buffer_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = FakeShellVM(tty_buffer=512)
    lines = [b"echo %06d" % i for i in range(RX_FIFO_LIMIT // 8)]
    data = b"\n".join(lines) + b"\nexit 7\n"
    assert len(data) > RX_FIFO_LIMIT
    r, w = os.pipe()

    def writer() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)  # blocks while the guest catches up: back-pressure

    t = threading.Thread(target=writer)
    t.start()
    try:
        with os.fdopen(r, "rb") as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            result = console.interactive(vm, timeout=60)
    finally:
        t.join()
    assert result.exit_code == 7
    assert vm.lines == [*lines, b"exit 7"]
    assert vm.serial is None


def test_input_after_the_vm_is_gone_is_ignored() -> None:
    vm = MicroVM()
    vm.feed_input(b"nobody listens\n")  # not started: nothing, and no error
    vm.end_input()
    vm.pump_input()
