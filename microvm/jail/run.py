"""Running a VM jailed (see microvm/jail/__init__.py): the caller's handle on
its VMM (JailedVmm). The children's side, and the jail itself, are child.py."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack

from microvm import teardown
from microvm.errors import GuestTimeoutError, MicroVMError, VmStoppedError
from microvm.jail import Jail, JailError, logs
from microvm.jail.cgroups import Cgroup
from microvm.jail.child import ChildEnds, MicroVM, intermediate, preload
from microvm.jail.wire import FRAME, MAX_MESSAGE, decode, read_exactly

RunResult = Any  # microvm.machine.RunResult, sent across as msgpack
ROOT_PREFIX = "microvm-jail-"
BASE_NAME = "microvm-jails"  # in the temporary directory: where the roots are made, unless Jail(base=...)
SETUP_TIMEOUT = 300.0  # seconds for the jailed VMM to open and load everything (a boot takes well under 1)
REPLY_GRACE = 30.0  # seconds the caller waits past a run's timeout before killing the VMM itself
_open_pipes: set[int] = set()  # every live jail's pipe ends in this process: a new child closes them
_pipes_lock = threading.Lock()
_names = itertools.count()


class JailedVmm:
    """A VM running jailed in a child process: start, wait, stop, kill, close."""

    def __init__(self, machine: MicroVM, argv: Sequence[str], result_type: Callable[..., Any]):
        from microvm.doctor import check_host

        assert machine.jail is not None
        self.jail = jail = machine.jail
        check_host(machine.force)  # a missing /dev/kvm is the caller's error, before anything forks
        if os.geteuid() != 0:
            raise JailError("a jail is set up by root (namespaces, pivot_root, cgroups, the change of uid); "
                            f"this process runs as uid {os.geteuid()}")
        if machine.vsock is not None and os.path.dirname(os.path.realpath(machine.vsock)) == "/":
            raise JailError("a jailed VM's vsock socket is bound into the jail with its directory: "
                            "give it a directory of its own, not /")
        self.name = f"{os.getpid()}-{next(_names)}"
        self.limits = jail.limits(machine.mem_mib, machine.vcpus,
                                  len(machine.drives) + len(machine.nics) + (machine.vsock is not None))
        base = base_dir(jail)  # here: the teardown thread's seccomp policy lets it make nothing
        teardown.later(lambda: sweep(base, bool(jail.cgroup)), "removing what jails of dead callers left")  # ~1 ms
        kernel = machine._kernel_path()
        if kernel is not None:
            from microvm.loader.elf import share_image

            share_image(kernel)  # once, here: every jailed VMM maps these pages instead of copying its own
        machine._initrd(argv)  # here too, from the caller's caches (a bad initrd is named before any fork)
        preload()  # imported once here, not in every VMM
        self.cgroup = Cgroup.create(self.name, self.limits, jail.cgroup) if jail.cgroup else None
        self.pid: int | None = None  # the intermediate child's (ours to reap)
        self.vmm_pid: int | None = None  # the VMM's, in the caller's PID namespace
        self._pidfd: int | None = None
        self._fds: list[int] = []
        self.result: RunResult | None = None
        self._result_type = result_type  # microvm.machine.RunResult (no import: machine imports us)
        self.vsock = None if machine.vsock is None else os.fspath(machine.vsock)
        self.killed = False
        self._waiter: int | None = None  # the thread in wait(), if one is
        self._logs: logs.Receiver | None = None
        self._finishing = False  # close() has handed the reaping and removals over
        try:
            self.root: str | None = tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{self.name}-", dir=base)
            self._launch(machine, argv)
        except BaseException:
            self.close()
            raise

    def _launch(self, machine: MicroVM, argv: Sequence[str]) -> None:
        results_r, results_w = os.pipe()
        control_r, control_w = os.pipe()
        pid_r, pid_w = os.pipe()  # the intermediate (trusted: no guest code runs there) names the VMM's PID
        log_r, log_w = os.pipe()  # the VMM's log records (logs.py)
        self._fds = [results_r, control_w]
        ends = ChildEnds(results_w, control_r, pid_w, log_w)
        with _pipes_lock:  # every end, before any fork: a jail forked meanwhile by another thread closes them
            _open_pipes.update((results_r, control_w, pid_r, log_r, *ends))
        for stream in (sys.stdout, sys.stderr):  # the child must not write the caller's buffered output again
            with contextlib.suppress(Exception):
                stream.flush()
        machine._times["jail set up"] = time.monotonic_ns()  # the cgroup and root made: the fork is next
        keep = sink_fds(machine)
        frozen = gc.get_freeze_count() > 0  # the caller's own gc.freeze() stays as it was
        gc.freeze()  # the child's collections leave the caller's heap alone: fewer pages copied
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    intermediate(self, machine, argv, ends, keep)
                finally:
                    os._exit(1)  # never back into the caller's code
        except BaseException:
            for fd in (pid_r, log_r):
                os.close(fd)
            raise
        finally:
            if not frozen:
                gc.unfreeze()
            with _pipes_lock:
                _open_pipes.difference_update((pid_r, log_r, *ends))
            for fd in ends:
                os.close(fd)
        self.pid = pid
        try:
            vmm_pid = _read_pid(pid_r)
        finally:
            os.close(pid_r)
        self._logs = logs.Receiver(log_r, vmm_pid or pid)  # closes log_r at the pipe's end
        if vmm_pid is not None:
            self.vmm_pid = vmm_pid
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(vmm_pid)
        try:
            kind, value = self._receive(SETUP_TIMEOUT)
        except GuestTimeoutError:
            self.kill()
            raise JailError(f"the jailed VMM did not set its VM up within {SETUP_TIMEOUT:.0f} s; killed") from None
        if kind == "error":
            self._reap()
            raise value
        if kind != "started" or vmm_pid is None:
            self.kill()
            raise JailError(f"the jailed VMM sent {kind!r} where it reports its start; killed")

    def wait(self, timeout: float | None) -> RunResult:
        if self.result is not None:
            return self.result
        if self.pid is None or self.killed:
            raise VmStoppedError("the VM was stopped by the host before the guest finished")
        self._send("wait none" if timeout is None else f"wait {timeout!r}")
        self._waiter = threading.get_ident()  # close() from another thread meanwhile only kills: we clean up
        try:
            kind, value = self._receive(None if timeout is None else timeout + REPLY_GRACE)
        except GuestTimeoutError:
            self.kill()
            raise GuestTimeoutError(f"guest did not finish within {timeout} s and its jailed VMM did not "
                                    f"answer for {REPLY_GRACE} s more; killed") from None
        finally:
            self._waiter = None
        if kind != "result":  # it ends after its answer; after a result, close() reaps it (off our path)
            self._reap()
        if kind == "result":
            self.result = value
            return value
        if kind == "error":
            raise value
        self.kill()
        raise JailError(f"the jailed VMM sent {kind!r} where it reports its end; killed")

    def stop(self) -> None:
        if self._fds:  # else closed: nothing runs
            with contextlib.suppress(OSError):  # the VMM is gone already
                self._send("stop")

    def kill(self) -> None:
        """SIGKILL the VMM (the PID 1 of its namespace: everything in the jail goes)."""
        self.killed = True
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        elif self.vmm_pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.vmm_pid, signal.SIGKILL)
        elif self.pid is not None:  # still setting up: the intermediate, whose death takes the VMM (PDEATHSIG)
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        """Kill the VMM if it still runs, reap it, remove its cgroup and root; idempotent.
        From another thread than a wait() in progress: only the kill (that wait
        sees the end of its pipe, and its caller closes). After a result the
        VMM has closed its devices and only exits (the kernel destroys its VM
        as it does): the reaping and the removals are then left to a thread
        of their own (microvm/teardown.py), so a run's result does not wait
        for them."""
        if self.pid is not None and self.result is None:
            self.kill()
        waiter = self._waiter
        if waiter is not None and waiter != threading.get_ident():
            return
        for fd in self._fds:
            with _pipes_lock:
                _open_pipes.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        if self.vsock is not None:  # the VMM's listener, which it could not unlink
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.vsock).st_mode):
                    os.unlink(self.vsock)
            self.vsock = None
        if not self._finishing:
            self._finishing = True
            if self.result is None:  # killed, or it failed: gone (its taps, its images) before we return
                self._finish()
            else:  # it closed its VM's devices before it sent its result, and only exits
                teardown.later(self._finish, "jail-cleanup")

    def _finish(self) -> None:
        """After close(): reap the VMM, then its cgroup and root go."""
        self._reap()
        if self._logs is not None:  # ends with the pipe: the VMM and the intermediate are gone
            self._logs.join(5.0)
            self._logs = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.cgroup is not None:
            self.cgroup.kill_all()  # anything left (the VMM, should it have outlived its parent)
            self.cgroup.remove()
            self.cgroup = None
        root = getattr(self, "root", None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
            self.root = None

    def _reap(self) -> int | None:
        """Wait for the intermediate child; its exit status (the VMM's, 128+N for a signal)."""
        if self.pid is None:
            return None
        pid, self.pid = self.pid, None
        try:
            _, status = os.waitpid(pid, 0)  # an interrupted wait is retried by Python (PEP 475)
        except ChildProcessError:
            return None
        self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def _send(self, line: str) -> None:
        os.write(self._fds[1], line.encode() + b"\n")

    def _receive(self, timeout: float | None) -> tuple[str, Any]:
        """The VMM's next message, or a JailError saying how it died. The VMM
        runs what a guest may have subverted and we may be root: its messages
        are msgpack (data only, never pickle), read with limits and checked."""
        fd = self._fds[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            head = read_exactly(fd, FRAME.size, deadline)
            (size,) = FRAME.unpack(head)
            if size > MAX_MESSAGE:
                self.kill()
                return "error", JailError(f"the jailed VMM sent a {size}-byte message (at most {MAX_MESSAGE}); killed")
            body = read_exactly(fd, size, deadline)
        except EOFError:
            return "error", self._death()
        try:
            return decode(body, self._result_type)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            self.kill()
            return "error", JailError(f"the jailed VMM sent a malformed message ({e}); killed")

    def _death(self) -> MicroVMError:
        status = self._reap()
        if self.killed:  # by us: kill(), from another thread, while a wait() read
            return VmStoppedError("the VM was stopped by the host before the guest finished")
        if self.cgroup is not None and self.cgroup.oom_killed():
            return JailError(f"the jailed VMM was killed for going over its memory limit of "
                             f"{self.limits.memory_bytes >> 20} MiB (Jail(memory_mib=...))")
        if status is not None and status > 128:
            name = signal.Signals(status - 128).name if status - 128 in signal.Signals._value2member_map_ else ""
            hint = " (seccomp: a forbidden system call)" if name == "SIGSYS" else ""
            return JailError(f"the jailed VMM died of signal {status - 128} {name}{hint} without a result")
        return JailError(f"the jailed VMM ended (status {status}) without a result")


def base_dir(jail: Jail) -> str:
    """Jail(base=...), else a directory of our own in the temporary one (a
    sweep lists it alone, not all of /tmp). Root's, and only root may write
    there: else another user could have put a link or files where roots go."""
    if jail.base is not None:
        return jail.base
    base = os.path.join(tempfile.gettempdir(), BASE_NAME)
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise JailError(f"{base} is not a directory of root's that only root can write to: remove it, "
                        "or give the jail a directory (Jail(base=...))")
    return base


def sweep(base: str, cgroups: bool) -> None:
    """Remove the root directories under `base` and (if `cgroups`) the cgroups
    of jails whose caller died (SIGKILL) before it could."""
    from microvm.jail.cgroups import sweep_groups

    for path in Path(base).glob(f"{ROOT_PREFIX}*"):
        owner = path.name[len(ROOT_PREFIX):].split("-")[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            shutil.rmtree(path, ignore_errors=True)
    if cgroups:
        sweep_groups(lambda name: name.split("-")[0].isdigit() and not os.path.exists(f"/proc/{name.split('-')[0]}"))


def sink_fds(machine: MicroVM) -> set[int]:
    """The fds of file sinks (console=, stdout= given as files): kept open for the VMM."""
    fds = set()
    for sink in (getattr(machine, "_console_sink", None), getattr(machine, "_stdout_sink", None)):
        target = getattr(sink, "stream", None) or getattr(sink, "__self__", None)  # a stream, a file's write()
        with contextlib.suppress(Exception):
            fds.add(int(target.fileno()))  # type: ignore[union-attr]
    return fds


def _read_pid(fd: int) -> int | None:
    try:
        return int(struct.unpack("<q", read_exactly(fd, 8, None))[0])
    except EOFError:  # the intermediate ended before its fork: its error follows on the results pipe
        return None
