"""MicroVM: a Linux guest as a Python object.

    with MicroVM(mem_mib=128) as vm:
        r = vm.run(["uname", "-a"])
        print(r.stdout, r.exit_code, r.timeline)

Configuration, lifecycle and results: it puts the pieces together (the VM,
vm.py; its devices, made by builder.py on the device manager, devicemanager.py; the
kernel, through the loader; the vCPUs' boot state, arch/x86_64/boot.py) and
turns what the guest does into a result: the command's output and exit
status, or an error naming what went wrong (panic, triple fault, a failed
device, timeout).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from microvm import _kvm, checks, hangreport, loader
from microvm.arch.x86_64 import boot, layout, mptable
from microvm.backends import Backends
from microvm.builder import Callbacks, Wanted
from microvm.builder import build as build_devices
from microvm.devicemanager import MAX_USER_DEVICES, DeviceManager
from microvm.devices.control import (
    FAIL_NAMES,
    MARK_COMMAND,
    MARK_COMMAND_ON_CONSOLE,
    MARK_INIT,
    ControlDevice,
)
from microvm.devices.serial import Serial
from microvm.devices.virtio.console import VirtioConsole
from microvm.doctor import check_host
from microvm.errors import (
    ConfigError,
    DeviceError,
    GuestCrashError,
    GuestError,
    GuestMemoryTooSmallError,
    GuestPanicError,
    GuestTimeoutError,
    LoaderError,
    MicroVMError,
    VcpuError,
    VmStoppedError,
)
from microvm.hostinput import MicroVMInput
from microvm.hostprocess import interrupts_deferred, raise_fd_limit, sink, tune_switch_interval
from microvm.jail import Jail, as_jail
from microvm.kernellog import KernelLog, init_message
from microvm.printk import FullLog
from microvm.ratelimit import RateLimit, as_rate_limit
from microvm.seccomp import check_action as check_seccomp
from microvm.seccomp import confiner
from microvm.snapshot.machine import MicroVMSnapshots
from microvm.specs import Drive, Nic, as_drive, guest_ip_args
from microvm.vcpu import StopReason
from microvm.vm import Vm

if TYPE_CHECKING:  # the user's devices are imported when a VM has them: `microvm run` starts faster
    from microvm.devices.virtio.vsock import VirtioVsock
    from microvm.jail.run import JailedVmm

__all__ = ["Drive", "GuestPanicError", "GuestTimeoutError", "MicroVM", "Nic", "RunResult", "VmStoppedError"]

MIB = layout.MIB
# The kernel's console is the UART (ttyS0): two exits per byte, every line from
# the first. console=hvc1 (a buffer per 16 bytes) loses the early lines on Linux
# 6.1 (virtio_console's port is not findable until hvc_alloc has returned).
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet 8250.nr_uarts=1"
KERNEL_CONSOLE = "console=hvc1"
CONSOLE_TAIL = 4000
WAIT_SLICE = 0.25  # how often wait() looks at a panic or a shutdown in progress
HANG_REPORT_PAUSE = 1.0  # seconds each vCPU gets to park for a timeout's report (hangreport.py)
SHUTDOWN_GRACE = 2.0  # seconds from the kernel console's reset to a power-off (_on_kernel_console_reset)


@dataclass
class RunResult:
    exit_code: int | None  # the command's status; None if the guest ended otherwise
    stdout: bytes  # what the command wrote to its stdout and stderr, and nothing else
    console: bytes  # what the kernel and our init wrote (the serial console), never the command's output
    reason: str  # "exit" (the command ended), "poweroff" (poweroff or halt), "reboot"
    timeline: dict[str, float] = field(default_factory=dict)  # phase -> seconds since start
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> counters (frames, drops, ...)

    @property
    def output(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _default_kernel() -> Path:
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        raise ConfigError("no kernel given and none built yet: run `microvm kernel build` or pass kernel=PATH")
    return art.vmlinux


class MicroVM(MicroVMSnapshots, MicroVMInput):
    """A Linux micro-VM: our kernel, busybox, one command (or a shell)."""

    def __init__(
        self,
        kernel: str | Path | None = None,
        *,
        initrd: str | Path | bytes | None = None,
        mem_mib: int = 128,
        vcpus: int = 1,
        cmdline: str | None = None,
        append: str = "",
        env: Mapping[str, str] | None = None,
        drives: Sequence[Drive | str | Path] = (),
        rootfs: Drive | str | Path | None = None,
        nics: Sequence[Nic] = (),
        console: BinaryIO | Callable[[bytes], Any] | None = None,
        stdout: BinaryIO | Callable[[bytes], Any] | None = None,
        vsock: str | Path | None = None,
        vsock_cid: int = 3,
        files: Mapping[str, bytes] | None = None,
        forkable: bool = False,
        full_log: bool = False,
        seccomp: str | None = "auto",
        jail: Jail | bool | None = None,
        force: bool = False,
    ):
        self.mem_mib = checks.integer("mem_mib", mem_mib, checks.MIN_MEM_MIB, checks.MAX_MEM_MIB)
        self.vcpus = checks.integer("vcpus", vcpus, 1, checks.MAX_VCPUS)
        if kernel is not None and not isinstance(kernel, str | os.PathLike):
            raise ConfigError(f"kernel must be a path, got {kernel!r}")
        if initrd is not None and not isinstance(initrd, str | bytes | os.PathLike):
            raise ConfigError(f"initrd must be a path or bytes, got {initrd!r}")
        self.kernel = Path(kernel) if kernel is not None else None
        self.initrd = initrd
        # The user's part of the kernel command line; ours (devices, root=,
        # ip=) goes first at start, where nothing the user writes can hide it.
        self.cmdline = checks.text("cmdline", cmdline) if cmdline is not None else DEFAULT_CMDLINE
        self.append = checks.kernel_arguments("append", append)
        if cmdline is not None:
            checks.kernel_arguments("cmdline", cmdline)
        self.env = checks.env(env)
        self.drives = [as_drive(d) for d in checks.path_list("drives", drives)]
        if rootfs is not None:
            # The root image is /dev/vda; the command runs chrooted into it.
            self.drives.insert(0, as_drive(rootfs, "rootfs"))
        self.rootfs = rootfs is not None
        self.nics = checks.path_list("nics", nics)
        if not all(isinstance(n, Nic) for n in self.nics):
            raise ConfigError("nics must be Nic(...) values")
        taps = [n.tap for n in self.nics]
        if len(set(taps)) != len(taps):
            raise ConfigError(f"the same tap is given twice: {taps}")
        # vsock: the guest's CID and the host's Unix socket (devices/virtio/vsock.py).
        self.vsock = None if vsock is None else checks.unix_socket_path("vsock", vsock)
        self.vsock_cid = checks.integer("vsock_cid", vsock_cid, 3, (1 << 32) - 2)
        # Extra files for this boot, under /microvm/ in the guest (and /run/microvm/).
        self.files = checks.guest_files("files", files)
        wanted = len(self.drives) + len(self.nics) + (self.vsock is not None)
        if wanted > MAX_USER_DEVICES:
            raise ConfigError(f"{len(self.drives)} drives and {len(self.nics)} NICs{' and vsock' * bool(self.vsock)}"
                              f" are too many: a VM takes at most {MAX_USER_DEVICES} drives, NICs and vsock "
                              f"together (one interrupt line each)")
        self.backends = Backends(self.drives, self.nics)
        self.forkable = bool(forkable)  # RAM in a memfd from boot: fork() shares it (snapshot.fork)
        self.seccomp = check_seccomp(seccomp)  # each VMM thread under a filter (microvm/seccomp.py)
        self.jail = as_jail(jail)  # the VMM in a child process, namespaced, unprivileged (microvm/jail)
        if self.jail is not None and self.forkable:
            raise ConfigError("a jailed VM cannot be forkable: fork() shares RAM within one process")
        self._jailed: JailedVmm | None = None  # the caller's handle on a jailed VMM
        self._initrd_made: tuple[tuple[str, ...] | None, bytes] | None = None  # _initrd()'s, until _start loads it
        self._enter_jail: Callable[[], None] | None = None  # set in the jailed VMM: before the threads start
        self.full_log = FullLog() if full_log else None  # every kernel message, cheaply (printk.py)
        if full_log and KERNEL_CONSOLE in f"{self.cmdline} {self.append}".split():
            raise ConfigError(f"full_log and {KERNEL_CONSOLE} both want hvc1: choose one")
        self.force = force
        self._console_sink = sink(console)
        self._stdout_sink = sink(stdout)
        self.vm: Vm | None = None
        self.serial: Serial | None = None
        self.control: ControlDevice | None = None
        self.hvc: VirtioConsole | None = None
        self.vsock_device: VirtioVsock | None = None
        self.devices: DeviceManager | None = None
        # (device, attribute) of each callback a device holds into this MicroVM
        # or into the device graph: dropped once the VM is closed (close()), so
        # no reference cycle keeps a finished VM for the garbage collector.
        self._hooks: list[tuple[object, str]] = []
        self.console = bytearray()
        self.stdout = bytearray()
        self._in_command = False
        self._shutdown_deadline: float | None = None  # set when the guest shuts its devices down
        self._command_on_console = False  # the command writes to the serial console (no hvc0)
        self.kernel_log = KernelLog()  # feed() says how the log ends the VM: no callback, no cycle
        self._failure: int | None = None  # init's FAIL_* code
        self._started = False
        self._stopped_by_host = False
        self._close_lock = threading.RLock()
        self.reason: str | None = None
        self._t0 = 0
        self._times: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------

    def start(self, argv: Sequence[str] | None = None) -> MicroVM:
        """Boot the guest and run argv in it (None: an interactive shell).

        A MicroVM runs once: its results (stdout, console, timeline, reason)
        belong to that run. Make a new MicroVM for the next command.
        """
        if argv is not None:
            argv = checks.argv(argv)
        if self._started:
            raise MicroVMError("a MicroVM runs once and this one has already been started; "
                               "make a new MicroVM for another run")
        self._started = True
        if self.jail is not None:
            if argv is None:
                raise ConfigError("an interactive shell cannot run jailed yet: give a command")
            from microvm.jail.run import JailedVmm

            self._t0 = time.monotonic_ns()  # the jailed VMM's timeline counts from here too
            self._jailed = JailedVmm(self, argv, RunResult)
            return self
        self._prepare_host()
        try:
            self._start(argv)
        except KeyboardInterrupt:  # held off until the VM was whole; now undo it
            self.close()
            raise
        return self

    def _kernel_path(self) -> Path | None:
        """The kernel this VM boots (the default one if none was given), or None if there is none yet."""
        try:
            return self.kernel or _default_kernel()
        except ConfigError:
            return None

    def _prepare_host(self) -> None:
        check_host(self.force)  # measured once per process, not part of the boot
        tune_switch_interval()
        raise_fd_limit()

    def _start(self, argv: Sequence[str] | None) -> None:
        # Under the close lock: a kill() from another thread waits for a
        # whole VM to close. Interrupts held off: every resource made here
        # is also freed here on failure.
        with self._close_lock, interrupts_deferred():
            self._t0 = self._t0 or time.monotonic_ns()  # a jailed VMM's is its caller's
            kernel = self.kernel = self.kernel or _default_kernel()
            initrd = self._initrd(argv)
            self._initrd_made = None  # loaded next: no copy kept
            self.backends.open()  # a bad image or tap is an error before any VM exists
            slots = layout.ram_ranges(self.mem_mib * MIB)
            try:
                self.vm = vm = Vm(slots, vcpus=self.vcpus, irqchip=True, forkable=self.forkable)
                jailed = self._enter_jail is not None
                vm.confine_threads(confiner("vcpu", self.seccomp, jailed), confiner("io", self.seccomp, jailed))
                if jailed:  # its result goes first; its exit destroys the VM (no thread may start there)
                    vm.destroy = "exit"
            except BaseException:
                self.backends.close()
                raise
            try:
                self._times.update(vm.timestamps)
                self._wire_devices(vm)  # before loading: virtio devices go on the command line
                self._load(vm, kernel, initrd, slots)
                self._times["kernel loaded"] = time.monotonic_ns()
                boot.setup_vcpus(vm.mem, [v.fd for v in vm.vcpus], supported_cpuid=vm.kvm.get_supported_cpuid(),
                                 tsc_deadline=bool(vm.kvm.check_extension(
                                     _kvm.CAPS["KVM_CAP_TSC_DEADLINE_TIMER"])),
                                 protocol=self.boot.protocol, entry=self.boot.entry,
                                 params_addr=self.boot.params_addr)
                if self._enter_jail is not None:  # everything is open: drop privileges, then threads
                    self._enter_jail()
                    self._times["jail entered"] = time.monotonic_ns()
                vm.start()
                if self._stopped_by_host:  # stop() came while we were starting
                    vm.stop()
            except BaseException:
                self.close()
                raise

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for the guest to finish; kills it on timeout (None: wait for ever).

        However the wait ends (the guest's end, an error, a timeout, or an
        interrupt such as Ctrl-C, which is re-raised), the VM is gone
        afterwards: vCPUs stopped, threads joined, fds closed, memory unmapped
        (the kernel's destruction of the VM itself finishes a few ms later:
        teardown.py).
        """
        timeout = checks.timeout(timeout)
        if self._jailed is not None:
            return self._wait_jailed(self._jailed, timeout)
        vm = self._require_vm()
        try:
            reason = self._wait_vm(vm, timeout)
        except (GuestCrashError, DeviceError) as e:
            self.close()
            raise type(e)(f"{e}\n--- console tail ---\n{self.console_tail()}") from e
        except MicroVMError:
            self.close()
            raise
        except Exception as e:  # a device callback failed in a vCPU thread
            self.close()
            raise VcpuError(f"the VMM failed while running the guest: {e!r}") from e
        except BaseException:  # KeyboardInterrupt, SystemExit: free everything, then let it go on
            self.kill()
            raise
        if reason is None:
            report = self._hang_report(vm)
            self.kill()
            raise GuestTimeoutError(f"guest did not finish within {timeout} s; killed\n"
                                    f"--- console tail ---\n{self.console_tail()}\n{report}")
        self._times["vm ended"] = time.monotonic_ns()
        self.close()
        return self._result(reason)

    def _hang_report(self, vm: Vm) -> str:
        """What the guest was doing when its time ran out (hangreport.py): the
        vCPUs are parked for it; the kill that follows ends them."""
        for vcpu in vm.vcpus:
            vcpu.pause(HANG_REPORT_PAUSE)
        attached = self.devices.devices if self.devices is not None else []
        return hangreport.report(vm, attached, self.timeline(), self.kernel)

    def _wait_jailed(self, jailed: JailedVmm, timeout: float | None) -> RunResult:
        try:
            result = jailed.wait(timeout)
        finally:
            jailed.close()
        self.stdout[:], self.console[:] = result.stdout, result.console
        self.reason = result.reason
        return result

    def _wait_vm(self, vm: Vm, timeout: float | None) -> StopReason | None:
        """vm.wait(), in slices, so that a panic ends the run even where the
        guest's panic= setting would keep it spinning."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            deadline_of_panic = self.kernel_log.panic_deadline
            if deadline_of_panic is not None and now >= deadline_of_panic:
                self._end("panic")
            if self._shutdown_deadline is not None and now >= self._shutdown_deadline:
                self._end("poweroff")
            step = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - now)
            reason = vm.wait(max(step, 0.0))
            if reason is not None:
                return reason
            if not any(v.running for v in vm.vcpus):  # ended, though nobody named a reason
                return StopReason.STOPPED
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _result(self, reason: StopReason) -> RunResult:
        if self.kernel_log.panicked:
            raise GuestPanicError(self._panic_message())
        if self._failure is not None:
            what = FAIL_NAMES.get(self._failure, f"init failed (code {self._failure})")
            raise GuestError(f"{init_message(self.console) or what}\n--- console tail ---\n{self.console_tail()}")
        if self._stopped_by_host and self.reason is None:
            raise VmStoppedError("the VM was stopped by the host before the guest finished")
        assert self.control is not None
        if self.reason is None:
            raise GuestCrashError(f"guest stopped ({reason}) without reporting\n{self.console_tail()}")
        return RunResult(
            exit_code=self.control.exit_status if self.reason == "exit" else None,
            stdout=bytes(self.stdout),
            console=self._console(),
            reason=self.reason,
            timeline=self.timeline(),
            stats=self.devices.stats() if self.devices is not None else {},
        )

    def _panic_message(self) -> str:
        return f"{self.kernel_log.panic_summary()}\n--- console tail ---\n{self.console_tail()}"

    def run(self, argv: Sequence[str], timeout: float | None = 60.0) -> RunResult:
        """Boot, run argv, return its result; the VM is gone afterwards."""
        argv = checks.argv(argv)
        timeout = checks.timeout(timeout)
        try:
            self.start(argv)
            return self.wait(timeout)
        except BaseException:
            self.kill()  # already done on every path that could leave a VM; cheap to repeat
            raise

    def set_rate_limit(self, device: str, limit: RateLimit | None) -> None:
        """Change a disk's ("vda") or a NIC's ("eth0:rx", "eth0:tx") rate limit (None: none) while it runs."""
        self._require_vm()
        assert self.devices is not None
        self.devices.throttle(device).set(as_rate_limit("limit", limit))

    def stop(self) -> None:
        """Ask the vCPUs to stop (the guest gets no say); wait() then raises VmStoppedError."""
        self._stopped_by_host = True
        if self._jailed is not None:
            self._jailed.stop()
        vm = self.vm
        if vm is not None:
            vm.stop()

    def kill(self) -> None:
        """Stop the guest and free everything at once."""
        self.stop()
        self.close()

    def close(self) -> None:
        """Free the VM: safe from any thread, more than once, and after a failure."""
        with self._close_lock, interrupts_deferred():
            if self._jailed is not None:
                self._jailed.close()
            vm = self.vm
            if vm is not None:
                self.serial = None  # no more host input into a closing VM
                vm.close()  # may raise if a vCPU is stuck; then self.vm stays for a retry
                self._vm_closed = vm
                self.vm = None
                if self.devices is not None:
                    self.devices.close()
                while self._hooks:  # the VM's threads are gone: no device calls back any more
                    device, hook = self._hooks.pop()
                    setattr(device, hook, None)
            self.backends.close()  # after the I/O thread is gone

    def __enter__(self) -> MicroVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- results ---------------------------------------------------------------

    def timeline(self) -> dict[str, float]:
        t = dict(self._times)
        vm = getattr(self, "_vm_closed", None) or self.vm
        if vm is not None and vm.vcpus and vm.vcpus[0].first_entry_ns:
            t["first vcpu entry"] = vm.vcpus[0].first_entry_ns
        marks = ("jail set up", "jail namespaces made", "vmm forked", "jail cgroup joined", "vm created",
                 "memory mapped", "kernel loaded", "jail entered", "first vcpu entry", "init reached",
                 "command started", "command done", "vm ended")
        # In the order they happened (a jail's cgroup is joined while its VMM makes the VM: jail/child.py)
        return {k: (t[k] - self._t0) / 1e9 for k in sorted((k for k in marks if k in t), key=t.__getitem__)}

    def console_tail(self, n: int = CONSOLE_TAIL) -> str:
        return self._console()[-n:].decode(errors="replace")

    def _console(self) -> bytes:  # with the kernel's whole log in it (full_log)
        return self.full_log.merged(bytes(self.console)) if self.full_log else bytes(self.console)

    # --- setup -------------------------------------------------------------------

    def _require_vm(self) -> Vm:
        if self.vm is None:
            if self._jailed is not None:
                raise MicroVMError("this VM runs jailed, in another process: only wait(), stop() and kill() "
                                   "reach it")
            if self._stopped_by_host:
                raise VmStoppedError("the VM was stopped by the host before the guest finished")
            raise MicroVMError("the VM is not running")
        return self.vm

    def _initrd(self, argv: Sequence[str] | None) -> bytes:
        """The initrd for a run of argv; made once (a jail makes it before its
        fork, where the caller's caches are: the VMM only loads it)."""
        from microvm.guestinit import command_archive, initramfs_for

        key = None if argv is None else tuple(argv)
        if self._initrd_made is not None and self._initrd_made[0] == key:
            return self._initrd_made[1]
        if self.initrd is None:
            data = initramfs_for(argv, self.env, self.files)
        else:
            if isinstance(self.initrd, bytes):
                base = self.initrd
            else:
                try:
                    base = Path(self.initrd).read_bytes()
                except OSError as e:
                    raise LoaderError(f"cannot read initrd {self.initrd}: {e.strerror}") from e
            # A user initrd gets the command appended too; its /init may use it.
            data = base + command_archive(argv, self.env, self.files) if argv or self.files else base
        self._initrd_made = (key, data)
        return data

    def _load(self, vm: Vm, kernel: Path, initrd: bytes, slots: list[tuple[int, int]]) -> None:
        ram, reserved = layout.e820(slots)
        assert self.devices is not None
        # Ours first: the kernel reads left to right, so nothing in the
        # user's text (checked for `--` and open quotes too) can hide it.
        ours = " ".join(filter(None, (self.devices.cmdline(), guest_ip_args(self.nics),
                                      "root=/dev/vda" if self.rootfs else "",
                                      self.full_log.cmdline() if self.full_log else "")))
        cmdline = " ".join(filter(None, (ours, self.cmdline, self.append)))
        try:
            self.boot = loader.load_linux(vm.mem, kernel, cmdline=cmdline, initrd=initrd, ram=ram,
                                          reserved=reserved, zeroed=True)  # a new VM's RAM
        except loader.KernelTooBigError as e:
            need = -(-e.needed // MIB)
            raise GuestMemoryTooSmallError(
                f"mem_mib={self.mem_mib} is too small for kernel {kernel}: with its initrd it needs "
                f"at least {need} MiB of guest memory") from e
        mptable.write(vm.mem, self.vcpus, layout.MPTABLE_START)
        if self.full_log is not None:
            self.full_log.watch(vm, self.boot)

    def _wire_devices(self, vm: Vm) -> None:
        self.devices = DeviceManager(vm)
        wanted = Wanted(kernel=self.kernel or _default_kernel(),
                        kernel_console=KERNEL_CONSOLE in f"{self.cmdline} {self.append}".split(),
                        full_log=self.full_log, backends=self.backends, drives=self.drives, nics=self.nics,
                        vsock=self.vsock, vsock_cid=self.vsock_cid)
        on = Callbacks(console=self._on_console, command_output=self._on_command_output, log=self._on_log,
                       kernel_console_reset=self._on_kernel_console_reset, end=self._end, exit=self._on_exit,
                       mark=self._on_mark, fail=self._on_fail)
        board = build_devices(self.devices, wanted, on, self._hooks)
        self.serial, self.control, self.hvc, self.vsock_device = board.serial, board.control, board.hvc, board.vsock

    # --- device callbacks (vCPU threads) ---------------------------------------------

    def _on_command_output(self, data: bytes) -> None:
        self.stdout += data
        if self._stdout_sink is not None:
            self._stdout_sink(data)

    def _on_console(self, data: bytes) -> None:
        """Serial output: the kernel's and init's messages, or, while a command
        whose output has no hvc0 runs, that command's output."""
        if self._in_command and self._command_on_console:
            self._on_command_output(data)
            self._feed_log(data)
        else:
            self._on_log(data)

    def _on_kernel_console_reset(self) -> None:
        """The kernel shuts its devices down (reboot(2), Debian's virtio_dev_shutdown),
        hvc1 with them: `poweroff -f` and `halt -f` then end with no word the host
        can hear. A reboot ends the VM well within the grace; else it is a power-off."""
        self._shutdown_deadline = time.monotonic() + SHUTDOWN_GRACE

    def _on_log(self, data: bytes) -> None:  # the serial's, or hvc1 as the kernel's console
        self.console += data
        if self._console_sink is not None:
            self._console_sink(data)
        self._feed_log(data)

    def _feed_log(self, data: bytes) -> None:
        ended = self.kernel_log.feed(data)
        if ended is not None:
            self._end(ended)

    def _on_mark(self, mark: int) -> None:
        now = time.monotonic_ns()
        if mark == MARK_INIT:
            self._times.setdefault("init reached", now)
        elif mark in (MARK_COMMAND, MARK_COMMAND_ON_CONSOLE):
            self._times.setdefault("command started", now)
            self._command_on_console = mark == MARK_COMMAND_ON_CONSOLE
            self._in_command = True

    def _on_exit(self, status: int) -> None:
        self._times["command done"] = time.monotonic_ns()
        self._in_command = False
        self._end("exit")

    def _on_fail(self, code: int) -> None:
        self._failure = code
        self._end("failed")

    def _end(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
        if self.vm is not None:
            self.vm.request_stop(StopReason.REQUESTED)
