"""Host input on its way to a guest's UART, for interactive use: held until
the guest's shell reads, paced by what the UART takes (Serial.offer), and
ended with an end-of-file, so nothing typed or piped is lost.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Uart(Protocol):
    """What ConsoleInput needs of a UART (devices/serial.py's Serial)."""

    def offer(self, data: bytes) -> int: ...

    @property
    def rx_pending(self) -> int: ...

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

    def pump(self, serial: Uart, ready_since: float | None, activity: int, settle: bool = True) -> None:
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
