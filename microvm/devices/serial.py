"""A 16550A UART (the PC's COM1 at 0x3f8, IRQ 4).

Register set and bits from the National Semiconductor PC16550D data sheet
(as used by Linux's drivers/tty/serial/8250, include/uapi/linux/serial_reg.h).
Transmission is instantaneous: every byte written to THR goes straight to
the output sink, so THR and the transmitter are always empty again.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from microvm.devices import Irq

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
# Paced host input (Serial.offer, ConsoleInput): at most this much waits in
# the UART at a time; the rest stays with the host until the guest reads.
RX_OFFER_WINDOW = 256

VEOF = 0x04  # ^D: the line discipline's end-of-file character (termios c_cc[VEOF] default)
INPUT_TICK = 0.05  # how often ConsoleInput.pump() wants calling while input is pending
INPUT_HIGH_WATER = 64 * 1024  # held host input beyond which the producer waits (back-pressure)
SETTLE_QUIET = 0.1  # console quiet after the shell started: its prompt is out, it is reading
SETTLE_MAX = 1.0  # ... or give up waiting for that after this long
EOF_QUIET = 0.3  # console quiet, all input read: the guest waits for more; time for VEOF
EOF_REPEAT = 0.5  # VEOF again after this long while the guest runs


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


class ConsoleInput:
    """Host input on its way to a guest's Serial (interactive use): held,
    paced, and ended with an end-of-file; unlike Serial.feed, nothing is lost.

    - Held until the guest is ready (`ready_since` in pump(): its shell is
      starting) and, with `settle`, its console has then gone quiet for
      SETTLE_QUIET s (the prompt is out: the line editor reads, in raw mode,
      so the input is echoed once) or SETTLE_MAX s have passed. Bytes put
      into the UART earlier are lost: the guest's 8250 driver resets the
      receive FIFO when it opens the port.
    - Then handed to the UART as the guest takes it (Serial.offer: a window
      at a time, only while the guest receives, so its flow control holds
      us back too), whatever the size.
    - end(): no more input. A tty has no end, so the guest's line discipline
      gets its VEOF (^D) at the start of a line (a newline ends an
      unterminated last line first), once the guest has read everything
      and its console has been quiet for EOF_QUIET s. ^D is end-of-file for
      a reader in canonical mode and for a line editor (busybox ash,
      readline) on an empty line. One that arrives while a command runs
      that does not read it is lost (canonical mode keeps it as a NUL that a
      line editor ignores), so it comes again every EOF_REPEAT s while the
      guest runs: as at the end of a pipe, every read from then on sees the
      end, until the shell exits (with its own status).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cond = threading.Condition()
        self._held = bytearray()
        self._tail = b"\n"  # the last byte put: end() ends an unterminated line
        self._ended = False
        self._flowing = False  # the guest was ready and settled: input goes to the UART
        self._activity: int | None = None  # the console's size at the last pump()
        self._activity_at = -math.inf  # when pump() saw it change
        self._moved_at = -math.inf  # when input last went into the UART
        self._eof_at: float | None = None
        self.eofs_sent = 0

    @property
    def held(self) -> int:
        """Bytes put that have not gone into the UART yet."""
        return len(self._held)

    def put(self, data: bytes) -> None:
        if not data:
            return
        with self._cond:
            if self._ended:
                raise ValueError("the input has already ended")
            self._held += data
            self._tail = data[-1:]

    def end(self) -> None:
        with self._cond:
            if self._ended:
                return
            self._ended = True
            if self._tail not in (b"\n", b"\r"):
                self._held += b"\n"

    def wait_held(self, limit: int, timeout: float) -> bool:
        """Wait until at most `limit` bytes are held; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._held) <= limit, timeout)

    def pump(self, serial: Serial, ready_since: float | None, activity: int, settle: bool = True) -> None:
        """Move held input into `serial` and send a due VEOF. `ready_since`: since
        when (clock seconds) the guest is ready, None if not yet; `activity`:
        anything that grows with console output (its size). Thread-safe; to be
        called every INPUT_TICK s while input is pending and on serial.on_rx_space."""
        now = self._clock()
        with self._cond:
            if activity != self._activity:
                self._activity, self._activity_at = activity, now
            if ready_since is None:
                return
            if not self._flowing:
                quiet = self._activity_at >= ready_since and now - self._activity_at >= SETTLE_QUIET
                if settle and not quiet and now - ready_since < SETTLE_MAX:
                    return
                self._flowing = True
            if self._held:
                n = serial.offer(bytes(self._held[:RX_OFFER_WINDOW]))
                if n:
                    del self._held[:n]
                    self._moved_at = now
                    self._cond.notify_all()
            if serial.rx_pending:
                self._moved_at = now  # the guest is still reading: not quiet yet
            if not self._ended or self._held or serial.rx_pending:
                return
            if now - max(self._activity_at, self._moved_at) < EOF_QUIET:
                return
            if self._eof_at is not None and now - self._eof_at < EOF_REPEAT:
                return
            if serial.offer(bytes((VEOF,))):
                self._eof_at = now
                self.eofs_sent += 1
