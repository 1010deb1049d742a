"""Device models against a fake interrupt line: no KVM needed."""

from __future__ import annotations

from microvm.devices import control, serial
from microvm.devices.i8042 import I8042
from microvm.devices.serial import (
    UART_FCR,
    UART_IER,
    UART_IIR,
    UART_LCR,
    UART_LSR,
    UART_MCR,
    UART_MSR,
    UART_RX,
    UART_SCR,
    UART_TX,
    Serial,
)
from tests.support.fakes import FakeIrq


def make() -> tuple[Serial, FakeIrq, bytearray]:
    irq, out = FakeIrq(), bytearray()
    return Serial(irq, out.extend), irq, out


def test_transmit_goes_to_output_in_order() -> None:
    uart, irq, out = make()
    for b in b"hello\n":
        uart.write(UART_TX, 1, b)
    assert out == b"hello\n"
    assert uart.read(UART_LSR, 1) & 0x60 == 0x60  # THR and transmitter empty
    assert irq.count == 0  # interrupts not enabled


def test_thre_interrupt_raised_and_cleared_by_iir_read() -> None:
    uart, irq, _ = make()
    uart.write(UART_IER, 1, serial.UART_IER_THRI)
    assert irq.count == 1  # enabling THRI with THR empty fires at once
    assert uart.read(UART_IIR, 1) & 0x0F == serial.UART_IIR_THRI
    assert uart.read(UART_IIR, 1) & 0x0F == serial.UART_IIR_NO_INT  # cleared by the read
    uart.write(UART_TX, 1, ord("x"))
    assert irq.count == 2


def test_receive_interrupt_and_data() -> None:
    uart, irq, _ = make()
    uart.write(UART_IER, 1, serial.UART_IER_RDI)
    uart.feed(b"ab")
    assert irq.count == 1
    assert uart.read(UART_LSR, 1) & serial.UART_LSR_DR
    assert uart.read(UART_IIR, 1) & 0x0F == serial.UART_IIR_RDI
    assert uart.read(UART_RX, 1) == ord("a")
    assert uart.read(UART_RX, 1) == ord("b")
    assert not uart.read(UART_LSR, 1) & serial.UART_LSR_DR
    assert uart.read(UART_IIR, 1) & 0x0F == serial.UART_IIR_NO_INT


def test_linux_autoconfig_probe_sees_a_16550a() -> None:
    uart, _, _ = make()
    # Scratch register and IER read back (8250 autoconfig).
    uart.write(UART_SCR, 1, 0xA5)
    assert uart.read(UART_SCR, 1) == 0xA5
    uart.write(UART_IER, 1, 0x0F)
    assert uart.read(UART_IER, 1) == 0x0F
    uart.write(UART_IER, 1, 0)
    # Loopback: MCR 0x1a must read back as MSR 0x90.
    uart.write(UART_MCR, 1, 0x1A)
    assert uart.read(UART_MSR, 1) & 0xF0 == 0x90
    uart.write(UART_MCR, 1, 0)
    # FIFO enabled: IIR bits 7:6 both set.
    uart.write(UART_FCR, 1, 0x01)
    assert uart.read(UART_IIR, 1) & 0xC0 == 0xC0


def test_divisor_latch_does_not_transmit() -> None:
    uart, _, out = make()
    uart.write(UART_LCR, 1, 0x83)
    uart.write(UART_TX, 1, 0x01)  # DLL
    uart.write(UART_IER, 1, 0x00)  # DLM
    assert uart.read(UART_RX, 1) == 0x01
    uart.write(UART_LCR, 1, 0x03)
    assert out == b""


def test_loopback_returns_what_is_sent() -> None:
    uart, _, out = make()
    uart.write(UART_MCR, 1, serial.UART_MCR_LOOP)
    uart.write(UART_TX, 1, 0x42)
    assert out == b"" and uart.read(UART_RX, 1) == 0x42


def test_input_overflow_is_counted_not_fatal() -> None:
    uart, _, _ = make()
    uart.feed(b"x" * (serial.RX_FIFO_LIMIT + 10))
    assert uart.dropped_input == 10


def test_i8042_reset_line() -> None:
    resets: list[int] = []
    dev = I8042(lambda: resets.append(1))
    data_port, command_port = dev.ports()
    assert command_port.read(0, 1) & 0x02 == 0  # input buffer empty: Linux's kb_wait ends
    data_port.write(0, 1, 0xFE)  # data port: not a command
    command_port.write(0, 1, 0xAA)  # other commands ignored
    assert resets == []
    command_port.write(0, 1, 0xFE)
    assert resets == [1] and dev.resets == 1
    dev.on_reset = None  # dropped by a closed MicroVM: a reset then only counts
    command_port.write(0, 1, 0xFE)
    assert resets == [1] and dev.resets == 2


def test_control_device_marks_and_exit() -> None:
    exits: list[int] = []
    powers: list[str] = []
    marks: list[int] = []
    dev = control.ControlDevice(exits.append, powers.append, marks.append)
    dev.write(control.REG_MARK, 4, control.MARK_INIT)
    dev.write(control.REG_EXIT, 4, 0x103)  # status is 8 bits, like a shell's $?
    dev.write(control.REG_EXIT, 4, 7)  # only the first exit counts
    dev.write(control.REG_POWER, 4, 2)
    assert marks == [control.MARK_INIT]
    assert exits == [3] and dev.read(control.REG_EXIT, 4) == 3
    assert powers == ["reboot"]
