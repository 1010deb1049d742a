"""A 16550A UART (the PC's COM1 at 0x3f8, IRQ 4).

Register set and bits from the National Semiconductor PC16550D data sheet
(as used by Linux's drivers/tty/serial/8250, include/uapi/linux/serial_reg.h).
Transmission is instantaneous: every byte written to THR goes straight to
the output sink, so THR and the transmitter are always empty again.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from microvm.devices import Irq
from microvm.devices.console_input import RX_OFFER_WINDOW, ConsoleInput
from microvm.devices.state import U8, Fields, State

# Register offsets (DLAB=0 unless noted).
UART_RX = 0  # read: receive buffer
UART_TX = 0  # write: transmit holding
UART_DLL = 0  # DLAB=1: divisor latch low
UART_IER = 1
UART_DLM = 1  # DLAB=1: divisor latch high
UART_IIR = 2  # read
UART_FCR = 2  # write
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_IER_RDI = 0x01  # receive data interrupt
UART_IER_THRI = 0x02  # transmitter holding register empty interrupt

UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_FIFO_ENABLED = 0xC0  # both bits: a 16550A with working FIFOs

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10

UART_LSR_DR = 0x01  # data ready
UART_LSR_THRE = 0x20  # transmit holding register empty
UART_LSR_TEMT = 0x40  # transmitter empty

UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80

RX_FIFO_LIMIT = 64 * 1024  # host input waiting for the guest, beyond which we drop



class Serial:
    """16550A UART. `output` receives each transmitted chunk of bytes."""

    def __init__(self, irq: Irq, output: Callable[[bytes], None] | None = None):
        self.irq = irq
        self.output = output
        self._lock = threading.Lock()  # host input arrives from another thread
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = UART_MCR_OUT2
        self.scr = 0
        self.dll = 0x0C  # 9600 baud: irrelevant to us, but read back faithfully
        self.dlm = 0
        self.fifo_enabled = False
        self.thri_pending = False
        self.rx: deque[int] = deque()
        self.dropped_input = 0
        # Called (without our lock) when the guest has read the last queued
        # byte or has just become ready to receive: time to offer() more.
        self.on_rx_space: Callable[[], None] | None = None
        self._reader: int | None = None  # the vCPU thread inside on_rx_space after an RX read
        self.host_input = ConsoleInput()  # paced host input for this UART (interactive use)

    # --- host side ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Queue host input (e.g. stdin) for the guest to read."""
        with self._lock:
            room = RX_FIFO_LIMIT - len(self.rx)
            self.rx.extend(data[:room])
            self.dropped_input += max(0, len(data) - room)
            raise_irq = bool(self.rx) and self.ier & UART_IER_RDI
        if raise_irq:
            self.irq.trigger()

    def offer(self, data: bytes) -> int:
        """Paced host input: queue as much of `data` as the guest is ready for
        (nothing while it does not receive: receive interrupts off, RTS
        dropped by flow control, loopback), keeping at most RX_OFFER_WINDOW
        bytes in the UART; returns how many bytes were taken. The rest is
        the caller's to offer again (on_rx_space says when): never dropped."""
        with self._lock:
            if not self._accepting():
                return 0
            was_empty = not self.rx
            n = max(0, min(len(data), RX_OFFER_WINDOW - len(self.rx)))
            self.rx.extend(data[:n])
            # The receive interrupt rises with the first byte (a level that
            # goes up). A guest reading RX right now checks LSR next and takes
            # what we add without another interrupt.
            kick = (n > 0 and was_empty and bool(self.ier & UART_IER_RDI)
                    and self._reader != threading.get_ident())
        if kick:
            self.irq.trigger()
        return n

    @property
    def rx_pending(self) -> int:
        """Bytes queued that the guest has not read yet."""
        return len(self.rx)

    def report_state(self) -> str:
        """For a timed-out guest's report (hangreport.py): the interrupts it has
        on, whether its THRE interrupt waits for the guest to read IIR, and the
        input the guest has not read."""
        return (f"IER {self.ier:#x}, THRE interrupt {'pending' if self.thri_pending else 'not pending'}, "
                f"{self.rx_pending} input bytes unread")

    # --- snapshots (devices/state.py) ----------------------------------------------

    def snapshot_state(self) -> State:
        """The registers, the interrupt the guest has not acknowledged (THRE; a
        receive interrupt follows from IER and the FIFO) and the bytes it has not read.
        Host input still held by `host_input` (interactive use) is not the UART's."""
        with self._lock:
            return {"kind": "serial", "ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "scr": self.scr,
                    "dll": self.dll, "dlm": self.dlm, "fifo_enabled": self.fifo_enabled,
                    "thri_pending": self.thri_pending, "rx": bytes(self.rx)}

    def restore_state(self, state: State) -> None:
        f = Fields(state, "serial")
        ier, lcr, mcr = f.integer("ier", hi=0x0F), f.integer("lcr", hi=U8), f.integer("mcr", hi=0x1F)
        scr, dll, dlm = f.integer("scr", hi=U8), f.integer("dll", hi=U8), f.integer("dlm", hi=U8)
        fifo_enabled, thri_pending = f.flag("fifo_enabled"), f.flag("thri_pending")
        rx = f.blob("rx", RX_FIFO_LIMIT)
        with self._lock:
            self.ier, self.lcr, self.mcr, self.scr, self.dll, self.dlm = ier, lcr, mcr, scr, dll, dlm
            self.fifo_enabled, self.thri_pending = fifo_enabled, thri_pending
            self.rx = deque(rx)

    # --- guest side (BusDevice) -------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            had_input = bool(self.rx)
            value = self._read(offset)
            drained = had_input and not self.rx
        callback = self.on_rx_space
        if drained and callback is not None:
            self._reader = threading.get_ident()
            try:
                callback()
            finally:
                self._reader = None
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            was_accepting = self._accepting()
            fire = self._write(offset, value & 0xFF)
            opened = not was_accepting and self._accepting()
        if fire:
            self.irq.trigger()
        callback = self.on_rx_space
        if opened and callback is not None:
            callback()

    def _accepting(self) -> bool:
        """The guest receives: RX interrupts on, RTS raised (Linux drops it to
        throttle under CRTSCTS, and raises it when it opens the port), no loopback."""
        return bool(self.ier & UART_IER_RDI and self.mcr & UART_MCR_RTS and not self.mcr & UART_MCR_LOOP)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_RX:
            if dlab:
                return self.dll
            return self.rx.popleft() if self.rx else 0
        if offset == UART_IER:
            return self.dlm if dlab else self.ier
        if offset == UART_IIR:
            iir = self._iir()
            if iir & 0x0F == UART_IIR_THRI:
                self.thri_pending = False  # reading IIR clears a THRE interrupt
            return iir | (UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == UART_LCR:
            return self.lcr
        if offset == UART_MCR:
            return self.mcr
        if offset == UART_LSR:
            return UART_LSR_THRE | UART_LSR_TEMT | (UART_LSR_DR if self.rx else 0)
        if offset == UART_MSR:
            return self._msr()
        return self.scr

    def _write(self, offset: int, value: int) -> bool:
        """Apply a register write; True if the interrupt line must fire."""
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_TX:
            if dlab:
                self.dll = value
                return False
            if self.mcr & UART_MCR_LOOP:
                # Loopback: what we send we receive (dropped once the FIFO is full).
                if len(self.rx) < RX_FIFO_LIMIT:
                    self.rx.append(value)
                else:
                    self.dropped_input += 1
            elif self.output is not None:
                self.output(bytes((value,)))
            # The byte left at once, so THR is empty again. The line is edge
            # triggered (ISA IRQ 4 on the I/O APIC): while an earlier THRE
            # interrupt is still unacknowledged, another edge adds nothing
            # but an exit per byte.
            if self.thri_pending:
                return False
            self.thri_pending = True
            return self._irq_asserted()
        if offset == UART_IER:
            if dlab:
                self.dlm = value
                return False
            was = self.ier
            self.ier = value & 0x0F
            # Enabling THRI while THR is empty raises the interrupt at once.
            if self.ier & UART_IER_THRI and not was & UART_IER_THRI:
                self.thri_pending = True
            return self._irq_asserted()
        if offset == UART_FCR:
            self.fifo_enabled = bool(value & UART_FCR_ENABLE_FIFO)
            if value & UART_FCR_CLEAR_RCVR:
                self.rx.clear()
            return False
        if offset == UART_LCR:
            self.lcr = value
        elif offset == UART_MCR:
            self.mcr = value & 0x1F
        elif offset == UART_SCR:
            self.scr = value
        return False

    def _iir(self) -> int:
        # Priority (data sheet table 4): receive data before THR empty.
        if self.ier & UART_IER_RDI and self.rx:
            return UART_IIR_RDI
        if self.ier & UART_IER_THRI and self.thri_pending:
            return UART_IIR_THRI
        return UART_IIR_NO_INT

    def _irq_asserted(self) -> bool:
        return self._iir() != UART_IIR_NO_INT

    def _msr(self) -> int:
        if self.mcr & UART_MCR_LOOP:
            # Loopback wires the modem outputs to the inputs; Linux's 8250
            # autoconfig checks exactly this (MCR 0x1a must read MSR 0x90).
            msr = 0
            if self.mcr & UART_MCR_RTS:
                msr |= UART_MSR_CTS
            if self.mcr & UART_MCR_DTR:
                msr |= UART_MSR_DSR
            if self.mcr & UART_MCR_OUT1:
                msr |= UART_MSR_RI
            if self.mcr & UART_MCR_OUT2:
                msr |= UART_MSR_DCD
            return msr
        # A terminal is always there: carrier, data set ready, clear to send.
        return UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
