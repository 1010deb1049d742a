"""A closed VM's fd, closed in a thread of its own (microvm/teardown.py):
with stand-ins for the fd, no KVM needed. A real VM's path is run by every
KVM test (tests/support/resources.open_fds drains first)."""

from __future__ import annotations

import os
import threading

import pytest

from microvm import teardown


class SlowFd:
    """A VM fd whose close takes until `release` is set (a grace period, made long)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed_in: str | None = None
        self.confined_first = False
        self.confined = False

    def confine(self) -> None:
        self.confined = True

    def close(self) -> None:
        self.confined_first = self.confined
        self.closed_in = threading.current_thread().name
        assert self.release.wait(30)


@pytest.fixture(autouse=True)
def nothing_left():
    assert teardown.drain(30)
    yield
    assert teardown.drain(30)


def test_the_fd_is_closed_in_a_thread_of_its_own_confined_first() -> None:
    fd = SlowFd()
    teardown.destroy(fd, fd.confine)
    assert teardown.pending() == 1
    assert not teardown.drain(0.05)  # still closing: drain says so when its time is up
    fd.release.set()
    assert teardown.drain(30)
    assert teardown.pending() == 0
    assert (fd.closed_in, fd.confined_first) == ("vm-destroy", True)


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
    assert teardown.drain(30)
    assert any("destroying a closed VM failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_forked_child_does_not_wait_for_its_parents_vms() -> None:
    """The parent's destroying thread does not exist in a child (nor does the lock it may hold)."""
    fd = SlowFd()
    teardown.destroy(fd)
    try:
        pid = os.fork()
        if pid == 0:
            ok = teardown.pending() == 0 and teardown.drain(1.0)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert teardown.pending() == 1  # ours still closing here
    finally:
        fd.release.set()
