"""What a VMM asks of its host Python process: Ctrl-C held off while a VM
is made or freed, a shorter GIL switch interval, and output sinks."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from microvm.errors import ConfigError

# How long a thread may hold the GIL while another waits (CPython's default
# is 5 ms). A vCPU thread back from KVM_RUN waits that long for the GIL when
# the I/O thread is busy; 0.5 ms bounds the added exit latency.
# MICROVM_SWITCH_INTERVAL=SECONDS sets another value, "keep" leaves it alone.
VMM_SWITCH_INTERVAL = 0.0005
PYTHON_DEFAULT_SWITCH_INTERVAL = 0.005


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold off Ctrl-C (SIGINT) while resources are made or freed.

    A KeyboardInterrupt raised half-way through creating or closing a VM
    would leave fds and threads nobody owns; here it is raised at the end
    instead, once every step is done (or undone). Only in the main thread
    and only over Python's default handler: a program's own handler is left
    alone.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def proc_fields(path: str) -> dict[str, str]:
    """A /proc file of "Key: value" lines (PID/status, PID/io) as a dict, values stripped."""
    with open(path) as f:
        return {key: value.strip() for key, sep, value in (line.partition(":") for line in f) if sep}


def raise_fd_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit (once).

    A VM holds a few dozen fds (KVM's, eventfds per queue and interrupt line,
    its disks, taps and sockets), and this process may run many VMs: the
    usual soft limit of 1024 ends a pool of forty sandboxes with EMFILE. The
    hard limit, the administrator's, is left as it is.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # not ours to insist on


def tune_switch_interval() -> None:
    """Shorten the GIL switch interval, unless the program already chose one."""
    wanted = os.environ.get("MICROVM_SWITCH_INTERVAL", str(VMM_SWITCH_INTERVAL))
    if wanted == "keep" or sys.getswitchinterval() != PYTHON_DEFAULT_SWITCH_INTERVAL:
        return
    try:
        sys.setswitchinterval(float(wanted))
    except ValueError as e:
        raise ConfigError(f"MICROVM_SWITCH_INTERVAL={wanted!r}: expected seconds or 'keep'") from e


def sink(target: BinaryIO | Callable[[bytes], Any] | None) -> Callable[[bytes], None] | None:
    """A callable that takes output bytes: the target itself, or a stream's write (flushed per line)."""
    if target is None:
        return None
    if callable(target):
        return target
    stream = target

    def write(data: bytes) -> None:
        stream.write(data)
        if b"\n" in data:
            stream.flush()

    write.stream = stream  # type: ignore[attr-defined]  # its fd stays open in a jailed VMM (jail/run.py)
    return write
