"""A closed VM's last steps, off the thread that closes it.

The last close of a VM's fd is where the kernel destroys the VM: its MMU and
memslots, and a grace period of the MMU notifier's SRCU (1-20 ms on this
host, depending on load: most of a tiny VM's whole run). Everything else of
a VM's teardown stays where close() is called: its threads joined, its
devices closed, its guest RAM unmapped, every other fd closed. Only this one
kernel object outlives close(), by those milliseconds.

One thread of the process ("vm-destroy") closes those fds in turn, as they
come. It is started by the first one and ends once none has come for
IDLE_S, so a process that has stopped running VMs keeps no thread for it;
fifty VMs closed at once make one thread, not fifty (each thread would leave
glibc a cached stack and an arena to keep). At most MAX_PENDING VMs wait for
it: a VM closed while that many do is destroyed by the thread closing it,
so VMs closed faster than the kernel destroys them never pile up (0: every
VM destroyed where it is closed). The thread also takes a jail's end after
its result (later(): the VMM's exit, in which the kernel destroys its VM,
reaped; its cgroup and root removed). The thread loads seccomp's "teardown" policy, in "errno" mode (the caller's
process), before its first step: closing, reaping, removing directories,
nothing else.

drain() waits until every fd handed over so far is closed and the thread has
gone (what a test counting fds or threads does first); so does the
interpreter's exit. Where no thread can be started (a pids limit, the
interpreter shutting down) the fd is closed right there; a jailed VMM (whose
main thread is under a filter that lets no thread start) closes its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, Protocol

log = logging.getLogger(__name__)

IDLE_S = 2.0
# VM fds waiting for the thread, at most: past that (VMs closed faster than the
# kernel destroys them, as fifty at once are) the closing thread destroys its
# own: no backlog of VMs the kernel still holds. A tiny VM's run takes 3.3 ms
# with 4, 24 ms with 0 (here, medians of 21). Pending VMs hold no RSS (a round
# of 50 with 18-35 pending: 45.1 MiB before and after drain()); the endurance
# test's RSS failures once blamed on this came with 0 too (CI, stop 24): RSS
# noise, which that test no longer checks finely.
MAX_PENDING = 4


class Closable(Protocol):
    def close(self) -> None: ...


class _Job(NamedTuple):
    work: Callable[[], None]
    what: str  # for the log, should it fail
    fd: Closable | None  # destroy()'s: a forked child closes its copy


class _Destroyer:
    """The queue of steps and the one thread taking them."""

    def __init__(self, confine: Callable[[], None] | None) -> None:
        self.confine = confine
        self.cond = threading.Condition(threading.Lock())
        self.queue: deque[_Job] = deque()
        self.busy = 0  # jobs taken from the queue, not done yet
        self.thread: threading.Thread | None = None
        self.stop = False
        self.inline = 0  # VM fds closed by their own thread: the queue was full

    def put(self, job: _Job) -> None:
        with self.cond:
            behind = job.fd is not None and self.busy + sum(j.fd is not None for j in self.queue) >= MAX_PENDING
            if behind:
                self.inline += 1
            else:
                self.queue.append(job)
                if self.thread is not None:
                    self.cond.notify_all()
                    return
                thread = threading.Thread(target=self._serve, name="vm-destroy", daemon=True)
                self.thread, self.stop = thread, False
        if behind:
            _do(job)
            return
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: here, then
            with self.cond:
                if self.thread is thread:
                    self.thread = None
                taken = list(self.queue)
                self.queue.clear()
                self.cond.notify_all()
            for item in taken:
                _do(item)

    def _serve(self) -> None:
        me = threading.current_thread()
        try:
            if self.confine is not None:
                self.confine()
        except Exception:  # an unfiltered thread that only closes fds still does its job
            log.exception("vm-destroy: the seccomp policy could not be loaded")
        with self.cond:
            while True:
                if self.queue:
                    job = self.queue.popleft()
                    self.busy += 1
                    self.cond.release()
                    try:
                        _do(job)
                    finally:
                        del job
                        self.cond.acquire()
                        self.busy -= 1
                        self.cond.notify_all()
                    continue
                if self.stop or (not self.cond.wait(IDLE_S) and not self.queue):
                    break
            if self.thread is me:
                self.thread = None
            self.cond.notify_all()

    def drain(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.queue or self.busy:
                if not self.cond.wait(_left(deadline)) and _left(deadline) == 0:
                    return False
            thread = self.thread
            if thread is None:
                return True
            self.stop = True
            self.cond.notify_all()
        thread.join(_left(deadline))
        return not thread.is_alive() and _gone(thread, deadline)

    def pending(self) -> int:
        with self.cond:
            return len(self.queue) + self.busy


def _do(job: _Job) -> None:
    try:
        job.work()
    except Exception:  # nothing to raise to: the thread that handed it over has gone on
        log.exception("%s failed", job.what)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _gone(thread: threading.Thread, deadline: float | None) -> bool:
    """A joined thread has run its last line, but the kernel lists it a moment
    more while it exits: True once it does not (a count of this process's
    threads is then right)."""
    task = f"/proc/self/task/{thread.native_id}"
    while os.path.exists(task):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def _policy() -> Callable[[], None] | None:
    from microvm import seccomp

    try:
        seccomp.check_action("errno")
    except Exception:  # no libseccomp extension: nothing to load
        return None
    return seccomp.confiner("teardown", "errno")


_destroyer = _Destroyer(_policy())


def destroy(vm_fd: Closable) -> None:
    """Close `vm_fd` (the VM's last reference) on the vm-destroy thread."""
    _destroyer.put(_Job(vm_fd.close, "destroying a closed VM", vm_fd))


def later(work: Callable[[], None], what: str) -> None:
    """Run `work` on the vm-destroy thread, after what was handed over
    before it (where no thread can start: right here). Not in a forked
    child: work of the parent's left there is dropped."""
    _destroyer.put(_Job(work, what, None))


def drain(timeout: float | None = None) -> bool:
    """Wait until every VM handed to destroy() so far is destroyed and the
    vm-destroy thread has gone; False if `timeout` s passed first."""
    return _destroyer.drain(timeout)


def pending() -> int:
    """Steps handed over and not done yet."""
    return _destroyer.pending()


def _after_fork_in_child() -> None:
    """The parent's thread does not exist here, and may have held the lock.
    The child's copies of the fds still queued are closed (the parent's are
    the last references, so this is quick); the one being closed in the
    parent reads as closed here already (_kvm's _Fd marks itself first).
    The parent's other steps (its jails' ends) are its own: dropped."""
    global _destroyer
    queued = [job for job in _destroyer.queue if job.fd is not None]
    _destroyer = _Destroyer(_destroyer.confine)
    for job in queued:
        _do(job)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(drain, 30.0)
