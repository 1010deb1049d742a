"""A closed VM's last step, off the thread that closes it.

The last close of a VM's fd is where the kernel destroys the VM: its MMU and
memslots, and a grace period of the MMU notifier's SRCU (1-20 ms on this
host, depending on load: most of a tiny VM's whole run). Everything else of
a VM's teardown stays where close() is called: its threads joined, its
devices closed, its guest RAM unmapped, every other fd closed. Only this one
kernel object outlives close(), by those milliseconds, in a short thread of
its own that carries the VM's seccomp filter for I/O threads.

drain() waits for all of them (what a test counting fds does first); the
interpreter's exit waits for them too (they are not daemon threads). Where
no thread can be started (a jailed VMM's main thread under seccomp, a pids
limit, the interpreter shutting down), the fd is closed right there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

_lock = threading.Lock()
_pending: set[threading.Thread] = set()


class Closable(Protocol):
    def close(self) -> None: ...


def destroy(vm_fd: Closable, confine: Callable[[], None] | None = None) -> None:
    """Close `vm_fd` (the VM's last reference) in a thread of its own; confine() first there."""
    thread = threading.Thread(target=_destroy, args=(vm_fd, confine), name="vm-destroy")
    with _lock:
        _pending.add(thread)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had: here, then
        with _lock:
            _pending.discard(thread)
        vm_fd.close()


def _destroy(vm_fd: Closable, confine: Callable[[], None] | None) -> None:
    try:
        if confine is not None:
            confine()
        vm_fd.close()
    except Exception:  # nothing to raise to: the closing thread has gone on
        log.exception("destroying a closed VM failed")
    finally:
        with _lock:
            _pending.discard(threading.current_thread())


def drain(timeout: float | None = None) -> bool:
    """Wait for every VM closed so far to be destroyed; False if `timeout` s passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _lock:
            threads = list(_pending)
        if not threads:
            return True
        for thread in threads:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            thread.join(left)
            if thread.is_alive() or not _gone(thread, deadline):
                return False
        with _lock:
            _pending.difference_update(threads)  # a thread of a parent process that forked us: never runs here


def _gone(thread: threading.Thread, deadline: float | None) -> bool:
    """A joined thread has run its last line, but the kernel lists it a moment
    more while it exits: drain() returns once it does not (a count of this
    process's threads is then right)."""
    task = f"/proc/self/task/{thread.native_id}"
    while os.path.exists(task):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def pending() -> int:
    with _lock:
        return len(_pending)


def _after_fork_in_child() -> None:
    """The parent's destroying threads do not exist here, and one of them may have held the lock."""
    global _lock
    _lock = threading.Lock()
    _pending.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
