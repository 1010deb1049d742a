"""The I/O thread's fd bookkeeping: remove, modify (EPOLLOUT), poll_once. No KVM needed."""

from __future__ import annotations

import os
import select
import socket

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
