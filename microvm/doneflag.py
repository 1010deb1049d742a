"""A "this thread has finished" flag that a waiter may be interrupted on safely.

threading.Event and Thread.join are not safe against an exception raised in
the waiting thread by a signal handler (KeyboardInterrupt): an interrupted
Condition.wait can release a lock another thread holds ("release unlocked
lock" in the thread that set the event), and an interrupted Thread.join
marks a running thread as stopped (CPython 3.11, bpo-45274's fix). A VMM is
waited on from the main thread, where Ctrl-C lands, so its threads signal
their end through an eventfd instead: poll() on it is interrupted with no
state changed anywhere, and the flag, once set, stays readable. (poll, not
select: a process with many VMs has fds past select()'s 1024.)
"""

from __future__ import annotations

import os
import select


class DoneFlag:
    def __init__(self) -> None:
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._set = False

    def set(self) -> None:
        """Called once, by the finishing thread, as its last act."""
        self._set = True
        os.eventfd_write(self._efd, 1)  # never read: stays readable for every later wait

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; False after `timeout` seconds (None: no limit)."""
        if self._set:
            return True
        poller = select.poll()
        poller.register(self._efd, select.POLLIN)
        ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
        return bool(ready) or self._set

    def close(self) -> None:
        """Only once the thread that sets it has finished (or never started)."""
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
