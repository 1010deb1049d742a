"""A jailed VMM's log records on their way to the caller's logging
(microvm/jail/logs.py), over a pipe in one process: the format, its limits,
a full pipe, and what a subverted VMM could send instead."""

from __future__ import annotations

import logging
import os
import time

import msgpack
import pytest

from microvm.jail import logs


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected():
    """The caller's side: records that reach the logger "jailtest" (level DEBUG, not propagated)."""
    logger = logging.getLogger("jailtest")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def received(write: bytes | list[bytes], pid: int = 4242) -> logs.Receiver:
    """Run a Receiver over a pipe holding `write`, to its end."""
    r, w = os.pipe()
    for data in [write] if isinstance(write, bytes) else write:
        os.write(w, data)
    os.close(w)
    receiver = logs.Receiver(r, pid)
    receiver.join(10)
    assert not receiver.thread.is_alive()
    return receiver


def record(msg: str, *args: object, level: int = logging.WARNING, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("from the device")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("jailtest.dev", level, "/src/microvm/dev.py", 42, msg, args, exc_info, func="serve")


def test_a_record_crosses_whole(collected):
    r = record("queue %d refused %s", 3, "twice", exc=True)
    receiver = received(logs.encode(r))
    assert receiver.received == 1 and receiver.malformed == 0
    (got,) = collected
    assert (got.name, got.levelno, got.levelname, got.getMessage()) == ("jailtest.dev", logging.WARNING, "WARNING",
                                                                        "queue 3 refused twice")
    assert (got.pathname, got.filename, got.module, got.lineno, got.funcName) == ("/src/microvm/dev.py", "dev.py",
                                                                                 "dev", 42, "serve")
    assert got.process == got.jailed_vmm == 4242 and got.processName == "jailed VMM"
    assert got.created == r.created and got.args is None
    assert got.exc_text is not None and "ValueError: from the device" in got.exc_text
    assert "ValueError: from the device" in logging.Formatter().format(got)


def test_the_callers_levels_decide(collected):
    logging.getLogger("jailtest").setLevel(logging.ERROR)
    received([logs.encode(record("quiet", level=logging.INFO)), logs.encode(record("loud", level=logging.ERROR))])
    assert [r.getMessage() for r in collected] == ["loud"]


def test_a_long_record_is_cut_to_one_atomic_write(collected):
    data = logs.encode(record("x" * 100_000 + "é" * 5000, exc=True))
    assert len(data) <= logs.MAX_RECORD == 4096
    received(data)
    (got,) = collected
    assert got.getMessage().startswith("xxxx") and got.getMessage().endswith(" [cut]")


def test_an_unformattable_message_still_crosses(collected):
    received(logs.encode(record("%d apples", "not a number")))
    assert "%d apples" in collected[0].getMessage()


def test_a_full_pipe_drops_and_counts_never_blocks(collected):
    r, w = os.pipe()
    forwarder = logs.Forwarder(w)
    logger = logging.getLogger("jailtest.full")
    logger.handlers = [forwarder]
    logger.propagate = False
    sent = 0
    t = time.monotonic()
    while forwarder.dropped < 3:  # the pipe fills (64 KiB): the next records are dropped at once
        logger.warning("record %d", sent)
        sent += 1
    assert time.monotonic() - t < 5
    drained = b""
    while len(drained) < 1 << 16:
        try:
            os.set_blocking(r, False)
            drained += os.read(r, 1 << 16)
        except BlockingIOError:
            break
    logger.warning("after the drain")
    os.close(w)
    logger.handlers = []  # the caller's side: its records go to "jailtest"
    logger.propagate = True
    receiver = logs.Receiver(r, 1)
    receiver.join(10)
    last = collected[-1].getMessage()
    assert last == "after the drain (after 3 record(s) the jailed VMM dropped: pipe full)"


def test_a_record_through_two_loggers_goes_once(collected):
    r, w = os.pipe()
    forwarder = logs.Forwarder(w)
    parent, child = logging.getLogger("jailtest.two"), logging.getLogger("jailtest.two.dev")
    parent.handlers = child.handlers = [forwarder]
    parent.propagate = False
    try:
        child.warning("once")
    finally:
        parent.handlers = child.handlers = []
        parent.propagate = True
    os.close(w)
    logs.Receiver(r, 1).join(10)
    assert [r.getMessage() for r in collected] == ["once"]


@pytest.mark.parametrize("bad", [
    msgpack.packb([1, 2]),
    msgpack.packb({"name": "jailtest", "levelno": "30"}),
    msgpack.packb({**dict.fromkeys(logs.TEXT_FIELDS, ""), "levelno": 30, "lineno": 1, "dropped": 0,
                   "created": 1.0}),  # no logger name
    msgpack.packb({**dict.fromkeys(logs.TEXT_FIELDS, "jailtest"), "levelno": True, "lineno": 1, "dropped": 0,
                   "created": 1.0}),
    b"\xc1" * 10,  # not msgpack
    msgpack.packb({"name": "x" * 10_000}),  # over the size limit
])
def test_what_a_subverted_vmm_sends_is_refused_and_said_once(bad, collected, caplog):
    good = logs.encode(record("before"))
    receiver = received([good, bad, logs.encode(record("after"))])
    assert receiver.malformed == 1
    assert [r.getMessage() for r in collected] == ["before"]
    assert any("malformed log record" in r.getMessage() for r in caplog.records)
