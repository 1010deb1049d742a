"""The vCPU run loop: one thread per vCPU, exits dispatched to the buses.

A running vCPU is stopped or paused promptly by setting immediate_exit in
its kvm_run page and sending its thread a signal: the signal interrupts a
KVM_RUN in progress, and immediate_exit covers the window just before the
thread enters KVM_RUN (api.rst, "immediate_exit").
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from microvm import _kvm
from microvm.bus import Bus
from microvm.doneflag import DoneFlag
from microvm.errors import GuestCrashError, VcpuError

#: Real-time signal used to kick vCPU threads out of KVM_RUN.
KICK_SIGNAL = signal.SIGRTMIN + 7

_kick_installed = False
_kick_lock = threading.Lock()


def _new_kick_lock() -> None:  # a fork (microvm/jail) while another thread held it: the child's is free
    global _kick_lock
    _kick_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_kick_lock)


def _install_kick() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            _kvm.install_kick_signal(KICK_SIGNAL)
            _kick_installed = True


class StopReason(enum.Enum):
    STOPPED = "stopped"  # stop() was called
    HALTED = "halted"  # HLT with no in-kernel irqchip to wake the vCPU
    SHUTDOWN = "shutdown"  # triple fault
    SYSTEM_EVENT = "system_event"  # KVM_EXIT_SYSTEM_EVENT (reset, shutdown, crash)
    REQUESTED = "requested"  # a device asked the VM to end (reset line, exit device)
    ERROR = "error"  # the loop failed; see Vcpu.error


class Vcpu:
    """One vCPU: its KVM fd, its thread and its run loop."""

    def __init__(self, index: int, fd: _kvm.VcpuFd, pio: Bus, mmio: Bus,
                 on_stop: Callable[[Vcpu], None] | None = None):
        self.index = index
        self.fd = fd
        self.pio = pio
        self.mmio = mmio
        self.on_stop = on_stop
        self.stop_reason: StopReason | None = None
        self.error: BaseException | None = None
        self.last_exit: _kvm.VmExit | None = None
        self._stop = False
        self._pause = False
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._thread: threading.Thread | None = None
        # Set when the thread's last line has run; waited on instead of
        # Thread.join, which an interrupt breaks (see doneflag.py).
        self._exited = DoneFlag()
        self._ident: int | None = None
        self._ident_lock = threading.Lock()  # _ident is cleared when the thread ends
        self.first_entry_ns: int | None = None
        self.on_start: Callable[[], None] | None = None  # the thread's first act (seccomp.confine)

    @property
    def exits(self) -> int:
        """Exits so far (every return from KVM_RUN)."""
        return self.fd.exits

    # --- control, from any thread ------------------------------------------------

    def start(self) -> None:
        _install_kick()
        thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        try:
            thread.start()
        except RuntimeError as e:  # "can't start new thread": out of tasks (a pids limit) or memory
            raise VcpuError(f"cannot start vCPU {self.index}'s thread: {e}") from e
        self._thread = thread  # only a started thread is one close() waits for

    def stop(self) -> None:
        """Make the run loop return as soon as possible."""
        self._stop = True
        self._resume.set()
        self._kick()

    def pause(self, timeout: float = 1.0) -> bool:
        """Park the vCPU outside KVM_RUN; True once it is parked."""
        self._resume.clear()
        self._pause = True
        self._kick()
        return self._paused.wait(timeout)

    def resume(self) -> None:
        self._pause = False
        self._paused.clear()
        self._resume.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True once it has. An interrupt (a
        KeyboardInterrupt in the waiting thread) leaves the vCPU unaffected."""
        if self._thread is None:
            return True
        if not self._exited.wait(timeout):
            return False
        # The thread has passed its last line; the interpreter lets it go at
        # once, so this join does not block.
        self._thread.join()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._exited.is_set()

    def _kick(self) -> None:
        if self.fd.closed:
            return
        self.fd.immediate_exit = True
        # Under the lock the thread cannot finish and free its pthread_t
        # between our check and the signal.
        with self._ident_lock:
            if self._ident is not None:
                signal.pthread_kill(self._ident, KICK_SIGNAL)

    # --- the loop, in the vCPU thread ------------------------------------------

    def _thread_main(self) -> None:
        with self._ident_lock:
            self._ident = threading.get_ident()
        try:
            if self.on_start is not None:
                self.on_start()
            self.stop_reason = self.run_loop()
        except BaseException as e:  # reported through .error, never lost
            self.error = e
            self.stop_reason = StopReason.ERROR
        finally:
            with self._ident_lock:
                self._ident = None
            try:
                if self.on_stop is not None:
                    self.on_stop(self)
            finally:
                self._exited.set()

    def run_loop(self) -> StopReason:
        """Run until the guest stops this vCPU or stop() is called."""
        # Port I/O of one item and MMIO are answered inside run_dispatch (the
        # ext calls the devices' read/write with ints, no exit object); what
        # comes back here is the rest: string I/O, interruptions, the end.
        run, ports, pio = self.fd.run_dispatch, getattr(self.pio, "ports", {}), self.pio
        mmio: Any = self.mmio
        pages = getattr(self.mmio, "pages", None)
        has_fast = hasattr(self.mmio, "fast")  # (a bus's table changes as devices come and go)
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        IoOut, IoIn, MmioRead, MmioWrite, Intr = (
            _kvm.IoOut, _kvm.IoIn, _kvm.MmioRead, _kvm.MmioWrite, _kvm.Intr)
        from_bytes = int.from_bytes
        if self._stop:
            return StopReason.STOPPED
        self.first_entry_ns = time.monotonic_ns()
        while True:
            ex: Any = run(ports, pio, mmio, pages, mmio.fast if has_fast else None)  # dispatched on its type below
            t = type(ex)
            if t is IoOut:  # string (rep) I/O: one write per item
                size, data, port = ex.size, ex.data, ex.port
                for i in range(0, len(data), size):
                    pio_write(port, size, from_bytes(data[i:i + size], "little"))
            elif t is IoIn:
                size = ex.size
                ex.respond(b"".join(pio_read(ex.port, size).to_bytes(size, "little")
                                    for _ in range(ex.count)))
            elif t is MmioWrite:  # an access of a length run_dispatch leaves to us
                data = ex.data
                mmio_write(ex.addr, len(data), from_bytes(data, "little"))
            elif t is MmioRead:
                ex.respond(mmio_read(ex.addr, ex.length).to_bytes(ex.length, "little"))
            elif t is Intr:
                # Clear first, then look at the flags: a kick that lands in
                # between sets immediate_exit again and is not lost.
                self.fd.immediate_exit = False
                if (self._stop or self._pause) and self._control():
                    return StopReason.STOPPED
                continue
            else:
                self.last_exit = ex
                return self._final_exit(ex)
            if self._stop or self._pause:
                # KVM completes an I/O exit's instruction (an IN's register, an
                # MMIO access, the step past it) only at the next KVM_RUN
                # (api.rst, immediate_exit): enter once more, out again at once
                # with Intr, and only then stop or park. A snapshot taken now
                # would otherwise run that instruction, and its I/O, again.
                self.fd.immediate_exit = True

    def _control(self) -> bool:
        """Honour stop/pause requests; True if the loop must end."""
        if self._pause and not self._stop:
            self._paused.set()
            self._resume.wait()
        return self._stop

    def _final_exit(self, ex: _kvm.VmExit) -> StopReason:
        if isinstance(ex, _kvm.Hlt):
            return StopReason.HALTED
        if isinstance(ex, _kvm.Shutdown):
            # Triple fault: on real hardware the CPU would reset; for us the
            # guest has crashed, and whoever waits on the VM hears about it.
            self.error = GuestCrashError(
                f"vcpu{self.index}: triple fault (KVM_EXIT_SHUTDOWN) at {self._where()}")
            return StopReason.SHUTDOWN
        if isinstance(ex, _kvm.SystemEvent):
            return StopReason.SYSTEM_EVENT
        if isinstance(ex, (_kvm.FailEntry, _kvm.InternalError)):
            raise GuestCrashError(f"vcpu{self.index}: {ex!r} at {self._where()}")
        raise VcpuError(f"vcpu{self.index}: unexpected exit {ex!r} at {self._where()}")

    def _where(self) -> str:
        try:
            return f"rip={self.fd.get_regs()['rip']:#x}"
        except OSError:
            return "rip=?"

    def close(self) -> None:
        """Only once the thread has ended (join() returned True) or never started."""
        self.fd.close()
        self._exited.close()
