"""The MicroVM run path on real /dev/kvm with a tiny PVH "kernel" (tests/kvm/pvh.py).

What a user sees however a run ends: interrupted, stopped, killed, timed
out, or finished; and that nothing (fd, thread, mapping) outlives the VM.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from microvm import _kvm
from microvm.doneflag import DoneFlag
from microvm.errors import ConfigError, LoaderError, MicroVMError
from microvm.machine import GuestTimeoutError, MicroVM, VmStoppedError
from microvm.specs import Drive
from tests.kvm.pvh import tiny_pvh_kernel
from tests.support.resources import open_fds

SPIN = 20_000  # ~50-100 ms of guest kernel-mode loop on a PVM host, far less on hardware


def vm(loops: int = 1, status: int = 0, **kw: object) -> MicroVM:
    return MicroVM(tiny_pvh_kernel(loops, status), force=True, mem_mib=GUEST_MIB, **kw)  # type: ignore[arg-type]


GUEST_MIB = 32


def resources() -> tuple[int, int, tuple[int, int]]:
    """Open fds, threads, and guest-RAM mappings (count, bytes) in this process."""
    me = psutil.Process()
    return open_fds(me), me.num_threads(), _kvm.live_mappings()


def settled(expected: tuple[int, int, tuple[int, int]], within: float = 2.0) -> tuple[int, int, tuple[int, int]]:
    """resources() once they equal `expected`, or as they are after `within` s.

    A joined thread has run its last Python line, but the kernel may list it
    (in /proc/self/task) for a moment more while it exits: the count is
    looked at again rather than taken at that instant.
    """
    deadline = time.monotonic() + within
    while (now := resources()) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return now


def test_tiny_kernel_runs_and_reports_its_status() -> None:
    r = vm(status=7).run(["true"], timeout=30)
    assert (r.exit_code, r.reason, r.stdout, r.console) == (7, "exit", b"", b"")
    assert "init reached" in r.timeline


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1, "5", True])
def test_timeouts_must_be_finite_and_positive(timeout: object) -> None:
    before = resources()
    with pytest.raises(ConfigError, match="timeout"):
        vm().run(["true"], timeout=timeout)  # type: ignore[arg-type]
    assert settled(before) == before  # refused before anything was made


class Interrupter:
    """Sends SIGINT to the main thread `delay` seconds after start().

    Where the interrupt lands must be a place that survives it: never inside
    Thread.start()'s handshake or a Thread.join() (CPython 3.11's locks can
    then raise "release unlocked lock", bpo-45274; doneflag.py). So the
    thread waits to be armed until start() has returned, and wait() is a
    DoneFlag's poll, which an interrupt leaves clean."""

    def __init__(self, delay: float):
        main = threading.main_thread().ident
        assert main is not None
        self.armed, self.fired = DoneFlag(), DoneFlag()

        def fire() -> None:
            self.armed.wait()
            time.sleep(delay)
            signal.pthread_kill(main, signal.SIGINT)
            self.fired.set()

        self.thread = threading.Thread(target=fire)

    def start(self) -> None:
        self.thread.start()
        self.armed.set()

    def wait(self) -> None:
        """Until the signal is sent (it may land in here: call it inside the try)."""
        self.fired.wait()

    def join(self) -> None:
        """After wait(), outside the try: nothing is left to interrupt it."""
        self.fired.wait()
        self.thread.join()
        self.armed.close()
        self.fired.close()


class Later:
    """`action(m)` after `delay` seconds, in a timer thread (no signals: joins are safe)."""

    def __init__(self, delay: float, action: Callable[[MicroVM], None], m: MicroVM):
        self.timer = threading.Timer(delay, action, (m,))
        self.start, self.wait, self.join = self.timer.start, self.timer.join, self.timer.join


def test_ctrl_c_in_wait_frees_everything_and_reraises() -> None:
    vm(SPIN).run(["true"])  # warm up: caches, and thread stacks glibc keeps for reuse
    before = resources()
    with vm(SPIN * 1000) as m:  # minutes of guest time: only the interrupt ends it
        m.start(["true"])
        assert resources() != before
        t = Interrupter(0.2)
        t.start()
        with pytest.raises(KeyboardInterrupt):
            m.wait(None)
        t.join()
        assert m.vm is None
        assert settled(before) == before


def test_stop_from_another_thread_is_a_vm_stopped_error() -> None:
    m = vm(SPIN * 1000)
    threading.Timer(0.2, m.stop).start()
    with pytest.raises(VmStoppedError):
        m.run(["true"], timeout=60)


def test_timeout_kills_and_names_itself() -> None:
    before = resources()
    with pytest.raises(GuestTimeoutError, match=r"within 0\.3 s"):
        vm(SPIN * 1000).run(["true"], timeout=0.3)
    assert settled(before) == before


def test_a_microvm_runs_once() -> None:
    m = vm(status=1)
    assert m.run(["true"]).exit_code == 1
    with pytest.raises(MicroVMError, match="runs once"):
        m.run(["true"])


def test_command_line_limit_is_the_kernels_own() -> None:
    kernel = tiny_pvh_kernel(1, 0, cmdline_size=512)
    with pytest.raises(LoaderError, match="at most 511"):
        MicroVM(kernel, force=True, mem_mib=32, append="x" * 500).run(["true"])


def test_memory_minimum_is_checked_against_the_kernel() -> None:
    with pytest.raises(ConfigError, match=r"mem_mib=16 is too small for kernel .*needs at least \d+ MiB"):
        MicroVM(tiny_pvh_kernel(1, 0, cmdline_size=20 << 20), force=True, mem_mib=16).run(["true"])


ACTIONS: dict[str, Callable[[MicroVM], None]] = {
    "sigint": lambda m: None,  # sent by an Interrupter
    "stop": MicroVM.stop,
    "kill": MicroVM.kill,
    "none": lambda m: None,
}


def test_random_interrupts_leave_nothing_behind() -> None:
    """200 runs, each hit at a random instant by SIGINT, stop(), kill() or nothing."""
    rng = random.Random(1234)
    vm(SPIN).run(["true"])  # warm caches (initramfs, kernel build) before counting
    before = resources()
    outcomes: dict[str, int] = {}
    for _ in range(200):
        action = rng.choice(list(ACTIONS))
        delay = rng.uniform(0, 0.15)
        m = vm(SPIN)
        t = Interrupter(delay) if action == "sigint" else Later(delay, ACTIONS[action], m)
        t.start()
        try:
            try:
                m.run(["true"], timeout=30)
                outcome = "ok"
            finally:
                t.wait()  # a late signal lands in here, still inside the try
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
        except MicroVMError as e:
            outcome = type(e).__name__
        t.join()
        outcomes[f"{action}:{outcome}"] = outcomes.get(f"{action}:{outcome}", 0) + 1
        assert m.vm is None
    assert settled(before) == before, outcomes
    assert any(k.endswith("KeyboardInterrupt") for k in outcomes), outcomes
    assert any(k.endswith("VmStoppedError") for k in outcomes), outcomes


def test_ctrl_c_in_the_cli_is_one_line_and_exit_130() -> None:
    kernel = tiny_pvh_kernel(SPIN * 1000)
    proc = subprocess.Popen([sys.executable, "-m", "microvm", "run", "--force", "--kernel", str(kernel),
                             "--mem", str(GUEST_MIB), "--", "true"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Once the vCPU and I/O threads exist the VM is running (or nearly: an
    # interrupt held off in start() is raised right after it).
    deadline = time.monotonic() + 60
    while psutil.Process(proc.pid).num_threads() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (130, b"", b"microvm: interrupted\n")


def _default_kernels() -> list[str]:
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        pytest.fail("no guest kernel built: run `microvm kernel build`")
    return [str(art.vmlinux), str(art.bzimage)]


# These stop before the first instruction of Linux runs, so they run here
# on any KVM (force=True past the PVM check): loading is all they need.

@pytest.mark.parametrize("which", [0, 1], ids=["vmlinux", "bzImage"])
def test_append_over_the_kernels_limit_is_refused(which: int, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    before = resources()
    m = MicroVM(_default_kernels()[which], force=True, append="x" * 3000, drives=[Drive(disk)])
    with pytest.raises(LoaderError, match="the kernel accepts at most 2047"):
        m.run(["ls", "/dev/vda"])
    assert settled(before) == before


def test_memory_below_what_our_kernel_needs_names_both() -> None:
    m = MicroVM(_default_kernels()[0], force=True, mem_mib=16)
    with pytest.raises(ConfigError, match=r"mem_mib=16 is too small for kernel .*vmlinux: .*at least \d+ MiB"):
        m.run(["true"])


def test_the_startup_benchmarks_guest_ends_a_microvm_run(tmp_path: Path) -> None:
    """bench startup's tiny guest (microvm.benchmarks.startup) ends `microvm run` at its first
    instructions: the port write for QEMU is ignored here, the control device's EXIT is not."""
    from microvm.benchmarks.startup import tiny_kernel

    kernel = tmp_path / "tiny.elf"
    kernel.write_bytes(tiny_kernel())
    p = subprocess.run([sys.executable, "-m", "microvm", "run", "--kernel", str(kernel), "--force", "--mem", "32",
                        "--timeline", "--timeout", "30", "--", "true"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "first vcpu entry" in p.stderr and "command done" in p.stderr


@pytest.mark.parametrize("devices", ["default", "disk, nic, vsock"])
def test_a_finished_vm_goes_with_its_last_reference(tmp_path: Path, devices: str) -> None:
    """No reference cycle: once run() has returned and the caller lets go, the
    MicroVM and everything it made (devices, transports, queues, threads'
    objects) are freed by reference counting alone, with the cyclic garbage
    collector off, and leave nothing of microvm's for it to find (pyroute2,
    which sets a NIC's tap up, makes cycles of its own). Devices hold
    callbacks into the MicroVM, the VM and their transports; close() drops
    them."""
    import gc
    import os
    import weakref

    from microvm.specs import Nic

    kw: dict[str, object] = {}
    if devices != "default":
        disk = tmp_path / "disk.img"
        disk.write_bytes(b"\0" * (1 << 20))
        kw = {"drives": [Drive(disk)], "nics": [Nic(f"mvc{os.getpid() % 100000}")], "vsock": tmp_path / "v.sock"}
    vm(**kw).run(["true"], timeout=30)  # anything made once per process is made
    gc.collect()
    gc.disable()
    try:
        m = vm(**kw)
        assert m.run(["true"], timeout=30).exit_code == 0
        made = [weakref.ref(o) for o in (m, m.vm or m._vm_closed, m.devices, m.control, m.hvc)]
        del m
        alive = [r() for r in made if r() is not None]
        assert alive == [], f"kept alive by reference cycles: {[type(o).__name__ for o in alive]}"
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            ours = sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("microvm")})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert ours == [], f"microvm's objects in reference cycles: {ours}"
    finally:
        gc.enable()
