"""A closed VM's fd, closed on the vm-destroy thread (microvm/teardown.py):
with stand-ins for the fd, no KVM needed. A real VM's path is run by every
KVM test (tests/support/resources.open_fds drains first)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from microvm import teardown


class SlowFd:
    """A VM fd whose close takes until `release` is set (a grace period, made long)."""

    def __init__(self, closes: list[SlowFd] | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()  # set as its close begins
        self.closed_in: str | None = None
        self.closes = closes

    def close(self) -> None:
        self.closed_in = threading.current_thread().name
        if self.closes is not None:
            self.closes.append(self)
        self.started.set()
        assert self.release.wait(30)


def destroyers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "vm-destroy"]


@pytest.fixture(autouse=True)
def nothing_left(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(teardown, "MAX_PENDING", 4)  # the default, whatever a test before set
    assert teardown.drain(30)
    yield
    assert teardown.drain(30)
    assert destroyers() == []


def test_the_fd_is_closed_on_the_destroy_thread() -> None:
    fd = SlowFd()
    teardown.destroy(fd)
    assert teardown.pending() == 1
    assert not teardown.drain(0.05)  # still closing: drain says so when its time is up
    fd.release.set()
    assert teardown.drain(30)
    assert teardown.pending() == 0
    assert fd.closed_in == "vm-destroy"
    assert destroyers() == []  # drain() ends the thread too: a count of threads is right after it


def test_many_at_once_make_one_thread_close_in_order_and_never_pile_up() -> None:
    """MAX_PENDING wait for the one thread; one more, closed meanwhile, is
    destroyed by its own thread (VMs closed faster than the kernel destroys
    them do not pile up)."""
    closes: list[SlowFd] = []
    fds = [SlowFd(closes) for _ in range(teardown.MAX_PENDING)]
    for fd in fds:
        teardown.destroy(fd)
    assert len(destroyers()) == 1
    assert teardown.pending() == teardown.MAX_PENDING
    extra = SlowFd()
    extra.release.set()
    inline = teardown._destroyer.inline
    teardown.destroy(extra)
    assert extra.closed_in == threading.current_thread().name and teardown._destroyer.inline == inline + 1
    teardown.later(lambda: None, "not a VM: always queued")
    assert teardown.pending() == teardown.MAX_PENDING + 1
    for fd in fds:
        fd.release.set()
    assert teardown.drain(30)
    assert closes == fds and {fd.closed_in for fd in fds} == {"vm-destroy"}


def test_the_thread_ends_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teardown, "IDLE_S", 0.05)
    fd = SlowFd()
    fd.release.set()
    teardown.destroy(fd)
    (thread,) = destroyers() or [None]
    assert thread is not None
    thread.join(30)
    assert not thread.is_alive() and fd.closed_in == "vm-destroy"
    again = SlowFd()  # a later VM starts a new one
    again.release.set()
    teardown.destroy(again)
    assert teardown.drain(30) and again.closed_in == "vm-destroy"


def test_the_thread_is_under_the_teardown_seccomp_policy() -> None:
    if teardown._destroyer.confine is None:
        pytest.skip("microvm._seccomp is not built")
    seen: list[BaseException | None] = []

    def probe() -> None:  # the policy allows sockets of AF_UNIX only (seccomp.py)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
            seen.append(None)
        except OSError as e:
            seen.append(e)

    teardown.later(probe, "probe")
    assert teardown.drain(30)
    assert isinstance(seen[0], PermissionError), seen
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()  # this thread: no filter


def test_later_runs_in_order_with_the_closes() -> None:
    order: list[str] = []
    fd = SlowFd()
    fd.release.set()
    teardown.destroy(fd)
    teardown.later(lambda: order.append(f"later after {fd.closed_in}"), "a step")
    assert teardown.drain(30)
    assert order == ["later after vm-destroy"]


def test_without_a_thread_the_fd_is_closed_right_there(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    fd = SlowFd()
    fd.release.set()
    teardown.destroy(fd)
    assert fd.closed_in == threading.current_thread().name and teardown.pending() == 0


def test_a_failing_close_is_logged_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def close(self) -> None:
            raise OSError(9, "Bad file descriptor")

    teardown.destroy(Broken())
    after = SlowFd()
    after.release.set()
    teardown.destroy(after)
    assert teardown.drain(30)
    assert any("destroying a closed VM failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert after.closed_in == "vm-destroy"  # the thread went on


def test_a_forked_child_closes_its_copies_and_does_not_wait_for_its_parents() -> None:
    """The parent's thread does not exist in a child (nor does the lock it may
    hold); the child's copies of fds still queued are closed there."""
    busy, queued = SlowFd(), SlowFd()
    parents: list[int] = []
    teardown.destroy(busy)
    teardown.destroy(queued)
    teardown.later(lambda: parents.append(os.getpid()), "the parent's own step")
    queued.release.set()
    # Fork once the thread is closing `busy`: before, the child would find it
    # queued too and close its copy, waiting the 30 s its release never comes
    # there (a slow thread start under load did so in CI, stop 27).
    assert busy.started.wait(30)
    try:
        pid = os.fork()
        if pid == 0:
            ok = teardown.pending() == 0 and teardown.drain(1.0) and parents == []
            os._exit(0 if ok and queued.closed_in == "MainThread" else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert teardown.pending() == 3  # ours still closing here
    finally:
        busy.release.set()
    assert teardown.drain(30) and parents == [os.getpid()]
