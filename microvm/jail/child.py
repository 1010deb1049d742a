"""A jailed VM's two children (see microvm/jail/__init__.py): the
intermediate, which joins the cgroup, makes the namespaces and forks the VMM;
the VMM, which sets its VM up, enters the jail (enter()), runs and reports.
The caller's side is run.py."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from microvm.jail import Jail, JailError, logs
from microvm.jail import sys as jsys
from microvm.jail.cgroups import Cgroup
from microvm.jail.wire import write_message


class MicroVM(Protocol):
    """What of a microvm.machine.MicroVM the jail uses (no import: machine imports us)."""

    jail: Jail | None
    force: bool
    mem_mib: int
    vcpus: int
    drives: list[Any]
    nics: list[Any]
    @property
    def vsock(self) -> str | os.PathLike[str] | None: ...
    seccomp: str | None
    _enter_jail: Any
    _jailed: Any
    _times: dict[str, int]

    def _prepare_host(self) -> None: ...
    def _kernel_path(self) -> Any: ...
    def _initrd(self, argv: Sequence[str] | None) -> bytes: ...
    def _start(self, argv: Sequence[str] | None) -> None: ...
    def wait(self, timeout: float | None = None) -> Any: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...


class Handle(Protocol):
    """What of the caller's JailedVmm (run.py) the children use."""

    jail: Jail
    cgroup: Cgroup | None
    root: str | None


class ChildEnds(NamedTuple):
    """The pipe ends a jail's children get: they report on the first, are told on the second."""

    results: int  # the VMM's messages (wire.py)
    control: int  # the caller's "wait T", "stop"
    pid_out: int  # the intermediate names the VMM's PID
    log: int  # the VMM's log records (logs.py)


def intermediate(vmm: Handle, machine: MicroVM, argv: Sequence[str], ends: ChildEnds, keep: set[int]) -> None:
    """In the first child: nothing of the caller's but what the VMM needs, new
    namespaces, fork the VMM, name it, (v2) move it into the cgroup, pass on its status.

    A v1 cgroup the VMM joins by itself, first thing, while it has one thread
    (Cgroup.join_self: no RCU grace period). A v2 cgroup's move, by PID, waits
    for one (5-15 ms): it overlaps the VMM's setup, about as long. The VMM runs
    no guest code and starts no thread before it is told the move is done
    (enter_when_joined), so the guest's memory, its threads and its CPU time
    all count against the limits; what it allocated before (its VM's kernel
    structures, the loaded kernel's pages) counts where the caller's does."""
    status = 1
    results, pid_out = ends.results, ends.pid_out
    joined_r = joined_w = -1
    pid = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the VMM's to report; we wait for its status
        close_inherited({0, 1, 2, *ends, *keep})
        flags = jsys.CLONE_NEWNS | jsys.CLONE_NEWPID | jsys.CLONE_NEWIPC | jsys.CLONE_NEWUTS
        if not machine.nics:
            flags |= jsys.CLONE_NEWNET
        jsys.unshare(flags)
        jsys.mount(None, "/", None, jsys.MS_REC | jsys.MS_PRIVATE)  # nothing we mount reaches the host
        socket.sethostname(vmm.jail.hostname)
        machine._times["jail namespaces made"] = time.monotonic_ns()
        if vmm.cgroup is not None and not vmm.cgroup.self_join_is_cheap:
            joined_r, joined_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                machine._times["vmm forked"] = time.monotonic_ns()
                os.close(pid_out)
                if joined_w >= 0:
                    os.close(joined_w)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                jsys.prctl(jsys.PR_SET_PDEATHSIG, signal.SIGKILL)  # this process gone: the VMM too
                _vmm(vmm, machine, argv, ends, joined_r)
            finally:
                os._exit(1)
        if joined_w >= 0 and vmm.cgroup is not None:
            os.close(joined_r)
            try:
                vmm.cgroup.join(pid)
            except BaseException:
                os.kill(pid, signal.SIGKILL)  # it writes nothing more: ours is the error the caller reads
                os.waitpid(pid, 0)
                raise
            os.write(joined_w, struct.pack("<q", time.monotonic_ns()))
            os.close(joined_w)
        os.write(pid_out, struct.pack("<q", pid))
        for fd in ends:
            os.close(fd)
        _, wstatus = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wstatus)
        status = code if code >= 0 else 128 - code
    except BaseException as e:
        with contextlib.suppress(BaseException):
            write_message(results, "error", JailError(f"setting up the jail failed: {e}"))
    finally:
        os._exit(status)


def enter_when_joined(machine: MicroVM, joined: int, enter_jail: Callable[[], None]) -> None:
    """Wait until the intermediate has moved us into the cgroup (its stamp of
    when, for the timeline), then enter the jail."""
    if joined >= 0:
        try:
            stamp = os.read(joined, 8)
        finally:
            os.close(joined)
        if len(stamp) != 8:
            raise JailError("the jail's cgroup was not joined (its intermediate process ended)")
        machine._times["jail cgroup joined"] = struct.unpack("<q", stamp)[0]
    enter_jail()


def close_inherited(keep: set[int]) -> None:
    """Close every fd but `keep` and the kernel cache's sealed memfds (shared
    with the jailed VMM: read-only kernels): the VMM must hold nothing else of
    its caller's (files, sockets, other VMs' KVM fds and RAM, signal wakeup fds)."""
    from microvm.loader import kernelcache

    top = os.sysconf("SC_OPEN_MAX")
    low = 0
    for fd in [*sorted(keep | kernelcache.fds()), top]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1


def _vmm(vmm: Handle, machine: MicroVM, argv: Sequence[str], ends: ChildEnds, joined: int) -> None:
    """In the VMM (PID 1 of its namespace): set the VM up, enter the jail, run, report."""
    status = 1
    results, control = ends.results, ends.control
    try:
        try:
            if vmm.cgroup is not None and vmm.cgroup.self_join_is_cheap:
                # First, while we have one thread: everything the VMM allocates counts against the limits.
                vmm.cgroup.join_self()
                machine._times["jail cgroup joined"] = time.monotonic_ns()
            logs.forward(ends.log)
            binds = []
            if machine.vsock is not None:  # guest connections to host ports go to <path>_PORT beside it
                from microvm.backends.vsock import Listener

                Listener.unlink_on_close = False  # this process only: the caller unlinks it
                binds.append(os.path.dirname(os.path.realpath(machine.vsock)))
            root = vmm.root
            assert root is not None
            machine._enter_jail = lambda: enter_when_joined(machine, joined, lambda: enter(vmm.jail, root, binds))
            machine._jailed = None
            machine._prepare_host()
            machine._start(argv)
            timeouts: list[float | str | None] = []
            ready = threading.Event()
            threading.Thread(target=_control_loop, args=(machine, control, timeouts, ready),
                             name="jail-control", daemon=True).start()
            if machine.seccomp is not None:  # after the last thread has started: each has its own
                from microvm.seccomp import confine

                confine("main", machine.seccomp, jailed=True)
        except BaseException as e:
            write_message(results, "error", e)
            return
        write_message(results, "started", 0)  # the PID comes from the intermediate
        ready.wait()
        if timeouts[0] == "eof":  # the caller is gone
            machine.kill()
            return
        try:
            result = machine.wait(timeouts[0])  # type: ignore[arg-type]
        except BaseException as e:
            write_message(results, "error", e)
        else:
            write_message(results, "result", result)
        status = 0
    finally:
        os._exit(status)


def _control_loop(machine: MicroVM, control: int, timeouts: list[float | str | None],
                  ready: threading.Event) -> None:
    """The VMM's ear for the caller: "wait T", "stop"; end of file: the caller is gone, kill."""
    if machine.seccomp is not None:
        from microvm.seccomp import confine

        confine("main", machine.seccomp, jailed=True)
    with os.fdopen(control, "rb", buffering=0) as f:
        for raw in iter(f.readline, b""):
            word, _, arg = raw.decode(errors="replace").strip().partition(" ")
            if word == "wait" and not ready.is_set():
                try:
                    timeouts.append(None if arg == "none" else float(arg))
                except ValueError:
                    timeouts.append(None)
                ready.set()
            elif word == "stop":
                machine.stop()
    if not ready.is_set():
        timeouts.append("eof")
        ready.set()
    else:
        machine.stop()


PRELOAD = ("traceback", "linecache", "msgpack", "queue", "microvm.printk", "microvm.kernellog",
           "encodings.utf_8", "encodings.latin_1", "encodings.ascii")


def preload() -> None:
    for module in PRELOAD:
        __import__(module)


def enter(jail: Jail, root: str, binds: Sequence[str]) -> None:
    """Become the jail: a read-only empty root, no capabilities, the jail's uid
    and gid. A step the host refuses (a container without mount rights, a
    seccomp profile of its own) is a JailError that names it."""
    try:
        _enter(jail, root, binds)
    except OSError as e:
        raise JailError(f"entering the jail failed: {e}") from e


def _enter(jail: Jail, root: str, binds: Sequence[str]) -> None:
    for d in binds:
        if not os.path.isabs(d) or os.path.realpath(d) == "/":
            raise OSError(errno.EINVAL, f"a jailed VM's vsock socket needs a directory of its own, not {d!r}")
    preload()  # nothing can be imported once the root is gone
    last_cap = jsys.last_capability()
    jsys.mount("tmpfs", root, "tmpfs", jsys.MS_NOSUID | jsys.MS_NODEV | jsys.MS_NOEXEC, "size=64k,mode=0755")
    for d in binds:
        inner = os.path.join(root, d.lstrip("/"))
        os.makedirs(inner, exist_ok=True)
        jsys.mount(d, inner, None, jsys.MS_BIND | jsys.MS_REC)
    old = os.path.join(root, ".old")
    os.mkdir(old)
    jsys.pivot_root(root, old)
    os.chdir("/")
    jsys.umount2("/.old", jsys.MNT_DETACH)
    os.rmdir("/.old")
    # Read-only for this mount only (MS_BIND): never a superblock's flags.
    jsys.mount(None, "/", None,
               jsys.MS_REMOUNT | jsys.MS_BIND | jsys.MS_RDONLY | jsys.MS_NOSUID | jsys.MS_NODEV | jsys.MS_NOEXEC)
    jsys.drop_bounding_set(last_cap)
    jsys.prctl(jsys.PR_CAP_AMBIENT, jsys.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setgroups([])
    os.setresgid(jail.gid, jail.gid, jail.gid)
    os.setresuid(jail.uid, jail.uid, jail.uid)
    jsys.prctl(jsys.PR_SET_PDEATHSIG, signal.SIGKILL)  # a change of uid clears it: again
    jsys.clear_capabilities()
    jsys.prctl(jsys.PR_SET_NO_NEW_PRIVS, 1)
