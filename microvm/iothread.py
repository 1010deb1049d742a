"""A device I/O thread: eventfds (queue notifications) to device handlers.

KVM signals an ioeventfd when the guest writes a queue's notify register,
without a vCPU exit to userspace; this thread waits on all of them with
epoll and runs the device's queue processing, so notifications never stall
a vCPU in Python. A VM has one shared thread and one per disk (vm.py), so
a disk waiting in fdatasync never holds up the network or another disk.

Errors: a guest's mistakes and host I/O failures are answered inside the
device (DEVICE_NEEDS_RESET, IOERR, link down) and never reach this loop.
Whatever does reach it is unexpected: on_error gets a DeviceError naming
the device, and the VM ends with it (Vm.fail); the run never just hangs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from microvm.doneflag import DoneFlag
from microvm.errors import DeviceError, MicroVMError

log = logging.getLogger(__name__)


class IoThread:
    def __init__(self, name: str = "virtio-io", on_error: Callable[[DeviceError], None] | None = None):
        self.name = name
        self.on_error = on_error
        self._epoll = select.epoll()
        # fd -> (handler, is an eventfd, the device's name)
        self._handlers: dict[int, tuple[Callable[[], None], bool, str]] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._exited = DoneFlag()  # not Thread.join: see doneflag.py
        self._closed = False
        self._start_wanted = False  # start() was called: the first add() starts the thread
        self._start_lock = threading.Lock()
        self._pause = False
        self._paused = threading.Event()
        self._resume = threading.Event()
        self.errors: list[DeviceError] = []
        # call_later's: (when, order, callback, device name), a heap
        self._timers: list[tuple[float, int, Callable[[], None], str]] = []
        self._timer_order = itertools.count()
        self._timer_lock = threading.Lock()
        self.on_start: Callable[[], None] | None = None  # the thread's first act (seccomp.confine)

    def add(self, fd: int, handler: Callable[[], None], eventfd: bool = True, name: str = "") -> None:
        """Call handler() whenever eventfd `fd` is signalled (the fd stays the caller's to close).

        With eventfd=False, `fd` is any pollable fd (a tap): edge-triggered,
        the handler is called when new data arrives and must read until
        EAGAIN or until it chooses to stop; nothing is read for it here.
        """
        self._handlers[fd] = (handler, eventfd, name or getattr(handler, "__qualname__", "a device"))
        self._epoll.register(fd, select.EPOLLIN if eventfd else select.EPOLLIN | select.EPOLLET)
        if self._start_wanted and self._thread.ident is None:
            self._start_thread()

    def modify(self, fd: int, events: int) -> None:
        """Wait for `events` (select.EPOLLIN, EPOLLOUT) on a pollable fd added with
        eventfd=False, still edge-triggered. Re-arming reports what is ready
        now (epoll_ctl(2) EPOLL_CTL_MOD), so no edge is lost in between."""
        if self._handlers[fd][1]:
            raise ValueError(f"fd {fd} is an eventfd: it waits for EPOLLIN only")
        self._epoll.modify(fd, events | select.EPOLLET)

    def remove(self, fd: int) -> None:
        """Stop watching `fd` (before the caller closes it). From any thread: an
        event already taken for it in this round is skipped; after close() it
        only forgets the handler."""
        if self._handlers.pop(fd, None) is None or self._closed:
            return
        try:
            self._epoll.unregister(fd)
        except FileNotFoundError:  # ENOENT: not registered (closed before removed: epoll dropped it)
            pass

    def start(self) -> None:
        """Serve from now on. A thread with nothing to serve yet starts with its
        first add() instead (a VM without such devices never pays for it)."""
        self._start_wanted = True
        if self._handlers:
            self._start_thread()

    def _start_thread(self) -> None:
        with self._start_lock:
            if self._thread.ident is None and self._start_wanted:
                self._thread.start()

    def _run(self) -> None:
        try:
            if self.on_start is not None:
                try:
                    self.on_start()
                except Exception as e:  # no filter, no service: the VM ends with it
                    self._failed(f"{self.name} (its start)", e)
                    return
            self._loop()
        finally:
            self._exited.set()

    def call_later(self, delay: float, callback: Callable[[], None], name: str = "") -> None:
        """Call callback() in this thread `delay` seconds from now (a rate-limited
        device coming back to its queue), from any thread; errors as a handler's."""
        with self._timer_lock:
            if self._closed:
                return  # the VM is gone: nothing is left to come back to
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_order), callback,
                                          name or getattr(callback, "__qualname__", "a timer")))
            if threading.get_ident() != self._thread.ident:
                os.eventfd_write(self._wake, 1)  # the loop's wait is recomputed (close() takes this lock too)

    def _next_timer(self) -> float:
        """epoll's timeout: until the first timer is due, -1 (for ever) without one."""
        # Most loops never set a timer: look without the lock first. Under the
        # GIL a list's truth is read whole; a timer pushed just after this look
        # is not lost, as call_later() from another thread writes the wake
        # eventfd after pushing (this poll returns at once, the next round sees
        # it), and one from this thread (a handler) is pushed before we get here.
        if not self._timers:
            return -1
        with self._timer_lock:
            return -1 if not self._timers else max(0.0, self._timers[0][0] - time.monotonic())

    def _run_timers(self) -> int:
        if not self._timers:  # no lock when there is none (as in _next_timer)
            return 0
        now, due = time.monotonic(), []
        with self._timer_lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers))
        for _, _, callback, name in due:
            try:
                callback()
            except Exception as e:
                self._failed(name, e)
        return len(due)

    def _loop(self) -> None:
        while not self._stop:
            self._dispatch(self._epoll.poll(self._next_timer()))
            self._run_timers()
            if self._pause and not self._stop:
                self._paused.set()
                self._resume.wait()

    def pause(self, timeout: float = 5.0) -> bool:
        """Park the thread between two handlers, so that no device request is
        in flight; True once parked (or if the thread is not running).
        Notifications that arrive meanwhile wait in their eventfds."""
        if self._thread.ident is None or self._exited.is_set():
            return True
        if self._pause:  # asked already: parked, or on its way (clearing _paused would lose that)
            return self._paused.wait(timeout)
        self._resume.clear()
        self._paused.clear()
        self._pause = True
        os.eventfd_write(self._wake, 1)
        return self._paused.wait(timeout)

    def resume(self) -> None:
        self._pause = False
        self._resume.set()

    def poll_once(self, timeout: float = 0) -> int:
        """Serve what is ready within `timeout` seconds on the caller's thread; the
        number of handlers called. Only for a thread never started (tests that
        step a device by hand)."""
        if self._thread.ident is not None:
            raise MicroVMError(f"I/O thread {self.name} is running: it serves its own fds")
        return self._dispatch(self._epoll.poll(timeout)) + self._run_timers()

    def _dispatch(self, events: list[tuple[int, int]]) -> int:
        called = 0
        for fd, _ in events:
            if fd == self._wake:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                continue
            entry = self._handlers.get(fd)
            if entry is None:  # removed by a handler earlier in this round, or by another thread
                continue
            handler, eventfd, name = entry
            if eventfd:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
            called += 1
            try:
                handler()
            except Exception as e:  # unexpected: the VM ends with it (see the docstring)
                self._failed(name, e)
        return called

    def _failed(self, name: str, e: Exception) -> None:
        log.error("device %s failed in I/O thread %s", name, self.name, exc_info=e)
        error = DeviceError(f"device {name} failed in its I/O thread: {type(e).__name__}: {e}")
        error.__cause__ = e
        if len(self.errors) < 100:
            self.errors.append(error)
        if self.on_error is not None:
            self.on_error(error)

    def close(self) -> None:
        """Stop and join the thread, close our own fds; again after a failure, until done."""
        if self._closed:
            return
        self._stop = True
        self._resume.set()  # a paused thread goes on, to see _stop
        os.eventfd_write(self._wake, 1)
        with self._start_lock:  # no add() starts it from here on
            self._start_wanted = False
        if self._thread.ident is not None:  # started
            if not self._exited.wait(5.0):
                raise MicroVMError("the I/O thread did not stop within 5 s (a device handler is stuck)")
            self._thread.join()
        self._epoll.close()
        with self._timer_lock:  # no call_later() writes to the eventfd as it closes
            self._closed = True
            self._timers.clear()
            os.close(self._wake)
        self._exited.close()
        # The devices' handlers and the VM's on_error: each holds what holds
        # us (a reference cycle), and none can run any more.
        self._handlers.clear()
        self.on_error = None
