"""A jailed VMM's log records, handled by its caller's logging (microvm/jail/run.py).

The VMM is a fork of its caller: it has the caller's loggers and handlers,
but not the files behind them (it keeps none of the caller's fds but stdio),
so a FileHandler would fail there on every record ("--- Logging error ---"
and a traceback on stderr, each time). Instead the VMM's handlers are
replaced by one that sends each record through a pipe, and the caller hands
it to its own logger of that name: the caller's handlers, levels and filters
decide, as for a VM in its own process. The record's `jailed_vmm` names the
VMM's PID.

What crosses is data: a msgpack map of a few checked fields, the message
already formatted (never a format string with arguments, never an object).
Each record is one write of at most PIPE_BUF bytes, so records never
interleave (longer texts are cut), and the write end does not block: with
the pipe full a record is dropped and counted (the next one that gets
through says how many), so a caller that reads slowly never stalls a vCPU.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import Any

import msgpack

MAX_RECORD = select.PIPE_BUF  # bytes: a pipe write up to this size is atomic
TEXT_FIELDS = ("msg", "exc_text", "pathname", "funcName", "threadName", "name")
_FORWARDED = "_microvm_forwarded"  # set on a record once sent: a propagated one goes once


class Forwarder(logging.Handler):
    """In the jailed VMM: every record to the caller, through the pipe `fd`."""

    def __init__(self, fd: int):
        super().__init__()
        os.set_blocking(fd, False)
        self.fd = fd
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        if getattr(record, _FORWARDED, False):
            return
        setattr(record, _FORWARDED, True)
        try:
            os.write(self.fd, encode(record, self.dropped))
            self.dropped = 0
        except (BlockingIOError, BrokenPipeError):  # full, or the caller is gone
            self.dropped += 1
        except Exception:  # a message that cannot be formatted: logging's own report, on stderr
            self.handleError(record)


def forward(fd: int) -> Forwarder:
    """Send this process's log records to the caller from now on: the root
    logger and every logger with handlers of its own get the forwarder in
    their place (levels, filters and propagation stay as they were)."""
    forwarder = Forwarder(fd)
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for lg in loggers:
        if lg.handlers or lg is logging.getLogger():
            lg.handlers = [forwarder]
    return forwarder


def encode(record: logging.LogRecord, dropped: int = 0) -> bytes:
    """The record as one message of at most MAX_RECORD bytes (its longest text cut until it fits)."""
    try:
        msg = record.getMessage()
    except Exception:  # bad arguments for the format: as logging itself would show it, unformatted
        msg = f"{record.msg!r} % {record.args!r}"
    exc_text = record.exc_text
    if record.exc_info and not exc_text:
        exc_text = logging.Formatter().formatException(record.exc_info)
    if record.stack_info:
        exc_text = f"{exc_text}\n{record.stack_info}" if exc_text else record.stack_info
    m: dict[str, Any] = {"name": record.name, "levelno": int(record.levelno), "msg": msg,
                         "created": float(record.created), "lineno": int(record.lineno or 0),
                         "pathname": record.pathname or "", "funcName": record.funcName or "",
                         "threadName": record.threadName or "", "exc_text": exc_text or "", "dropped": dropped}
    data = msgpack.packb(m, use_bin_type=True)
    while len(data) > MAX_RECORD:
        longest = max(TEXT_FIELDS, key=lambda k: len(m[k]))
        text = m[longest]
        m[longest] = text[:max(len(text) // 2 - 16, 0)] + " [cut]"
        data = msgpack.packb(m, use_bin_type=True)
    return data


def decode(m: object, pid: int) -> logging.LogRecord:
    """A message from the VMM, checked, as a record of the caller's logging."""
    if not isinstance(m, dict):
        raise TypeError("a log record is a map")
    fields: dict[str, Any] = {}
    for key in TEXT_FIELDS:
        value = m[key]
        if not isinstance(value, str):
            raise TypeError(f"log record field {key} is not text")
        fields[key] = value
    for key, kind in (("levelno", int), ("lineno", int), ("dropped", int), ("created", float)):
        value = m[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"log record field {key} is not {kind.__name__}")
        fields[key] = value
    if not fields["name"]:
        raise ValueError("a log record without a logger name")
    if fields["dropped"]:
        fields["msg"] = f"{fields['msg']} (after {fields['dropped']} record(s) the jailed VMM dropped: pipe full)"
    record = logging.makeLogRecord({
        "name": fields["name"], "levelno": fields["levelno"], "levelname": logging.getLevelName(fields["levelno"]),
        "msg": fields["msg"], "args": None, "created": fields["created"], "lineno": fields["lineno"],
        "pathname": fields["pathname"], "filename": os.path.basename(fields["pathname"]),
        "module": os.path.splitext(os.path.basename(fields["pathname"]))[0], "funcName": fields["funcName"],
        "threadName": fields["threadName"], "exc_text": fields["exc_text"] or None, "process": pid,
        "processName": "jailed VMM", "jailed_vmm": pid,
    })
    record.msecs = (record.created - int(record.created)) * 1000
    return record


class Receiver:
    """In the caller: a thread reading the VMM's records until the pipe's end
    and handing each to the caller's logger of its name."""

    def __init__(self, fd: int, pid: int):
        self.fd, self.pid = fd, pid
        self.received = self.malformed = 0
        self.thread = threading.Thread(target=self._run, name=f"jail-log-{pid}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=4 * MAX_RECORD,
                                    max_str_len=MAX_RECORD, max_bin_len=0, max_array_len=0, max_map_len=16,
                                    max_ext_len=0)
        try:
            while chunk := os.read(self.fd, 1 << 16):
                unpacker.feed(chunk)
                for m in unpacker:
                    self._handle(decode(m, self.pid))
        except Exception as e:  # garbage from a VMM its guest subverted: said once, the rest ignored
            self.malformed += 1
            logging.getLogger(__name__).warning("jailed VMM %d sent a malformed log record (%s): its log is "
                                                "ignored from here", self.pid, e)
        finally:  # the VMM's later records meet a closed pipe: dropped there
            os.close(self.fd)

    def _handle(self, record: logging.LogRecord) -> None:
        self.received += 1
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
