"""The I/O thread's fd bookkeeping (remove, modify (EPOLLOUT), poll_once) and pause/resume. No KVM needed."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from microvm.errors import MicroVMError
from microvm.iothread import IoThread


def test_remove_inside_a_round_skips_the_removed_fd() -> None:
    io = IoThread("t")
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        io.remove(c.fileno())  # the other fd's event is already taken in this round
        io.remove(a.fileno())

    def second() -> None:
        calls.append("second")
        io.remove(c.fileno())
        io.remove(a.fileno())

    io.add(a.fileno(), first, eventfd=False)
    io.add(c.fileno(), second, eventfd=False)
    b.send(b"x")
    d.send(b"x")
    assert io.poll_once(1.0) == 1
    assert len(calls) == 1
    b.send(b"y")
    assert io.poll_once(0) == 0  # nothing watched any more
    io.remove(a.fileno())  # twice is fine
    io.close()
    for s in (a, b, c, d):
        s.close()


def test_modify_waits_for_output_edge_triggered() -> None:
    io = IoThread("t")
    a, b = socket.socketpair()
    a.setblocking(False)
    hits: list[int] = []
    io.add(a.fileno(), lambda: hits.append(1), eventfd=False)
    assert io.poll_once(0) == 0  # writable, but only EPOLLIN is asked for
    io.modify(a.fileno(), select.EPOLLIN | select.EPOLLOUT)
    assert io.poll_once(0) == 1  # re-arming reports what is ready now
    assert io.poll_once(0) == 0  # and, edge-triggered, only once
    io.modify(a.fileno(), select.EPOLLIN)
    b.send(b"x")
    assert io.poll_once(0) == 1
    io.remove(a.fileno())
    io.close()
    a.close()
    b.close()


def test_modify_refuses_an_eventfd() -> None:
    io = IoThread("t")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    io.add(efd, lambda: None)
    with pytest.raises(ValueError):
        io.modify(efd, select.EPOLLOUT)
    io.remove(efd)
    io.close()
    os.close(efd)


def test_poll_once_only_while_not_running_and_remove_after_close() -> None:
    io = IoThread("t")
    a, b = socket.socketpair()
    io.add(a.fileno(), lambda: None, eventfd=False)
    io.start()
    with pytest.raises(MicroVMError):
        io.poll_once(0)
    io.close()
    io.remove(a.fileno())  # after close: only forgotten
    a.close()
    b.close()


def _counting(io: IoThread) -> tuple[int, list[int], threading.Event]:
    """An eventfd added to `io` whose handler counts its calls."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    calls: list[int] = []
    called = threading.Event()

    def handler() -> None:
        calls.append(1)
        called.set()

    io.add(efd, handler)
    return efd, calls, called


def test_a_paused_thread_runs_no_handler_until_resumed() -> None:
    io = IoThread("t-pause")
    efd, calls, called = _counting(io)
    io.start()
    assert io.pause(5.0)
    os.eventfd_write(efd, 1)
    os.eventfd_write(efd, 1)  # two notifications while parked: one eventfd count
    assert not called.wait(0.2)
    assert calls == []
    io.resume()
    assert called.wait(5.0)
    assert io.pause(5.0)  # parks only after a full round: nothing more is pending
    assert calls == [1]
    io.resume()
    io.close()
    os.close(efd)


def test_pause_on_a_thread_never_started() -> None:
    io = IoThread("t-idle")
    assert io.pause(0.1)
    io.resume()
    io.close()


def test_pause_twice_and_resume_twice_are_harmless() -> None:
    io = IoThread("t-twice")
    efd, calls, called = _counting(io)
    io.start()
    assert io.pause(5.0)
    started = time.monotonic()
    assert io.pause(5.0)  # already parked: says so at once
    assert time.monotonic() - started < 1.0
    os.eventfd_write(efd, 1)
    assert not called.wait(0.2)
    io.resume()
    io.resume()
    assert called.wait(5.0)
    called.clear()
    assert io.pause(5.0)  # and another round still works
    os.eventfd_write(efd, 1)
    assert not called.wait(0.2)
    io.resume()
    assert called.wait(5.0)
    assert calls == [1, 1]
    io.close()
    os.close(efd)


def test_close_while_paused_ends_the_thread_promptly() -> None:
    io = IoThread("t-close-paused")
    efd, calls, _ = _counting(io)
    io.start()
    assert io.pause(5.0)
    os.eventfd_write(efd, 1)
    started = time.monotonic()
    io.close()
    assert time.monotonic() - started < 1.0
    assert calls == []  # it ended without another round
    assert not any(t.name == "t-close-paused" for t in threading.enumerate())
    assert io.pause(0.1)  # nothing left to park
    os.close(efd)


def test_a_thread_with_nothing_to_serve_starts_with_its_first_fd() -> None:
    io = IoThread("lazy")
    threads = threading.active_count()
    io.start()
    assert threading.active_count() == threads  # nothing to serve: no thread yet
    assert io.pause(0.1)  # pausing a thread that never started is immediate
    io.resume()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    served = threading.Event()
    try:
        io.add(efd, served.set)
        assert threading.active_count() == threads + 1
        os.eventfd_write(efd, 1)
        assert served.wait(5)
    finally:
        io.close()
        os.close(efd)
    assert threading.active_count() == threads


def test_a_closed_thread_that_never_started_stays_unstarted() -> None:
    io = IoThread("never")
    io.start()
    io.close()
    assert io._thread.ident is None


def test_a_done_flag_past_fd_1024_is_waited_on() -> None:
    # A process with many VMs has fds beyond select()'s limit.
    import resource

    from microvm.doneflag import DoneFlag

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        flag = DoneFlag()
        assert flag._efd >= 1024
        assert not flag.wait(0.01)
        threading.Timer(0.05, flag.set).start()
        assert flag.wait(5)
        flag.close()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class CountingLock:
    """A threading.Lock that counts how often it is taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> bool:
        self.taken += 1
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)


def test_a_loop_without_timers_never_takes_the_timer_lock_and_still_sees_a_late_one() -> None:
    io = IoThread("t")
    lock = CountingLock()
    io._timer_lock = lock  # type: ignore[assignment]
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    served, fired = threading.Event(), threading.Event()
    io.add(efd, served.set)
    io.start()
    try:
        for _ in range(20):  # wakes with no timer set
            served.clear()
            os.eventfd_write(efd, 1)
            assert served.wait(5)
        assert lock.taken == 0
        io.call_later(0, fired.set)  # from another thread, while the loop waits for ever
        assert fired.wait(5)
    finally:
        io.close()
        os.close(efd)
