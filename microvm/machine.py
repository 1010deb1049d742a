"""MicroVM: a Linux guest as a Python object.

    with MicroVM(mem_mib=128) as vm:
        r = vm.run(["uname", "-a"])
        print(r.stdout, r.exit_code, r.timeline)

Wires the pieces together: the VM (vm.py), the x86 setup (arch/x86_64), the
loader, and the devices (COM1, i8042, the control device), and turns what
the guest does into a result: the command's output and exit status, or an
error naming what went wrong (panic, triple fault, timeout).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from microvm import _kvm, checks, loader
from microvm.arch.x86_64 import cpuid, lapic, mptable, msr, paging, regs
from microvm.devicemanager import Backends
from microvm.devices.control import (
    CONTROL_BASE,
    CONTROL_SIZE,
    FAIL_NAMES,
    MARK_COMMAND,
    MARK_COMMAND_ON_CONSOLE,
    MARK_INIT,
    ControlDevice,
)
from microvm.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from microvm.devices.serial import COM1_BASE, COM1_IRQ, COM1_SIZE, Serial
from microvm.devices.virtio.console import VirtioConsole
from microvm.devices.virtio.mmio import MMIO_SIZE, VIRTIO_MMIO_QUEUE_NOTIFY, MmioTransport
from microvm.errors import (
    ConfigError,
    GuestCrashError,
    GuestError,
    GuestMemoryTooSmallError,
    LoaderError,
    MicroVMError,
    VcpuError,
)
from microvm.specs import Drive, Nic
from microvm.vcpu import StopReason
from microvm.vm import Vm

__all__ = ["Drive", "GuestPanicError", "GuestTimeoutError", "MicroVM", "Nic", "RunResult", "VmStoppedError"]

MIB = 1 << 20
GIB = 1 << 30
# Guest physical layout: RAM from 0, a gap for devices from 3 GiB to 4 GiB
# (control device, virtio-mmio, I/O APIC, local APIC), more RAM above.
MMIO_GAP_START = 3 * GIB
MMIO_GAP_END = 4 * GIB
EBDA_START = 0x9FC00  # last KiB of conventional memory: reserved, as on a PC
BIOS_START = 0xF0000  # the MP table lives here
HIMEM_START = 0x100000
GDT_ADDR = 0x500
PML4_ADDR = 0x9000
VIRTIO_MMIO_BASE = CONTROL_BASE + CONTROL_SIZE  # one 4 KiB window per device from here
VIRTIO_IRQ_BASE = 5  # GSIs 5.. (I/O APIC pins, edge, as the MP table says)

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet 8250.nr_uarts=1"
# How long a thread may hold the GIL while another waits (CPython's default
# is 5 ms). A vCPU thread back from KVM_RUN waits that long for the GIL when
# the I/O thread is busy; 0.5 ms bounds the added exit latency.
# MICROVM_SWITCH_INTERVAL=SECONDS sets another value, "keep" leaves it alone.
VMM_SWITCH_INTERVAL = 0.0005
PYTHON_DEFAULT_SWITCH_INTERVAL = 0.005
CONSOLE_TAIL = 4000
PANIC_MARKER = b"Kernel panic - not syncing"
# panic() prints this last (kernel/panic.c), then reboots, or with panic=0
# spins for ever: either way the run is over once we see it.
PANIC_END_MARKER = b"---[ end Kernel panic"
PANIC_GRACE = 2.0  # seconds for the panic report to reach its end line
# init/initramfs.c, without and with CONFIG_BLK_DEV_RAM.
INITRD_FAILURE_MARKERS = (b"Initramfs unpacking failed", b"rootfs image is not initramfs")
POWER_DOWN_MARKERS = (b"reboot: Power down", b"reboot: System halted")
WAIT_SLICE = 0.25  # how often wait() looks at a panic in progress


class GuestPanicError(GuestCrashError):
    """The guest kernel panicked."""


class GuestTimeoutError(MicroVMError, TimeoutError):
    """The guest did not finish in time; it was killed."""


class UnsupportedHostError(MicroVMError):
    """This host cannot run an ordinary Linux guest (PVM)."""


class VmStoppedError(MicroVMError):
    """The host stopped the VM (stop() or kill()) before the guest finished."""


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


def _memory_layout(mem_bytes: int) -> list[tuple[int, int]]:
    if mem_bytes <= MMIO_GAP_START:
        return [(0, mem_bytes)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]


def _default_kernel() -> Path:
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        raise ConfigError("no kernel given and none built yet: run `microvm kernel build` or pass kernel=PATH")
    return art.vmlinux


def check_host(force: bool = False) -> None:
    """Refuse at once where an ordinary Linux guest cannot run (PVM)."""
    if force or os.environ.get("MICROVM_FORCE") == "1":
        return
    from microvm.doctor import Verdict, host_verdict, plainly_hardware

    if not plainly_hardware() and host_verdict() is Verdict.PVM:
        raise UnsupportedHostError(
            "this host's /dev/kvm is PVM, not hardware virtualization: guest kernel mode is "
            "emulated and an unmodified Linux kernel cannot run here (it needs minutes, then fails). "
            "Use a PVM-enabled guest kernel with --force, or run inside the hardware-virtualization "
            "lane: tests/hwvirt/run microvm run -- CMD"
        )


class MicroVM:
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
        self.drives = [_drive(d) for d in checks.path_list("drives", drives)]
        if rootfs is not None:
            # The root image is /dev/vda; the command runs chrooted into it.
            self.drives.insert(0, _drive(rootfs, "rootfs"))
        self.rootfs = rootfs is not None
        self.nics = checks.path_list("nics", nics)
        if not all(isinstance(n, Nic) for n in self.nics):
            raise ConfigError("nics must be Nic(...) values")
        taps = [n.tap for n in self.nics]
        if len(set(taps)) != len(taps):
            raise ConfigError(f"the same tap is given twice: {taps}")
        self.backends = Backends(self.drives, self.nics)
        self.force = force
        self._console_sink = _sink(console)
        self._stdout_sink = _sink(stdout)
        self.vm: Vm | None = None
        self.serial: Serial | None = None
        self.control: ControlDevice | None = None
        self.hvc: VirtioConsole | None = None
        self.transports: list[MmioTransport] = []
        self.console = bytearray()
        self.stdout = bytearray()
        self._line = bytearray()
        self._in_command = False
        self._command_on_console = False  # the command writes to the serial console (no hvc0)
        self.panicked = False
        self._panic_deadline: float | None = None
        self._panic_line = ""
        self._initrd_failure = ""
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
        check_host(self.force)  # measured once per process, not part of the boot
        _tune_switch_interval()
        try:
            self._start(argv)
        except KeyboardInterrupt:  # held off until the VM was whole; now undo it
            self.close()
            raise
        return self

    def _start(self, argv: Sequence[str] | None) -> None:
        # Under the close lock: a kill() from another thread waits for a
        # whole VM to close. Interrupts held off: every resource made here
        # is also freed here on failure.
        with self._close_lock, _interrupts_deferred():
            self._t0 = time.monotonic_ns()
            kernel = self.kernel or _default_kernel()
            initrd = self._initrd(argv)
            self.backends.open()  # a bad image or tap is an error before any VM exists
            layout = _memory_layout(self.mem_mib * MIB)
            try:
                self.vm = vm = Vm(layout, vcpus=self.vcpus, irqchip=True)
            except BaseException:
                self.backends.close()
                raise
            try:
                self._times.update(vm.timestamps)
                self._wire_devices(vm)  # before loading: virtio devices go on the command line
                self._load(vm, kernel, initrd, layout)
                self._times["kernel loaded"] = time.monotonic_ns()
                self._setup_vcpus(vm)
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
        afterwards: vCPUs stopped, threads joined, fds closed, memory unmapped.
        """
        timeout = checks.timeout(timeout)
        vm = self._require_vm()
        try:
            reason = self._wait_vm(vm, timeout)
        except GuestCrashError as e:
            self.close()
            raise GuestCrashError(f"{e}\n--- console tail ---\n{self.console_tail()}") from e
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
            self.kill()
            raise GuestTimeoutError(f"guest did not finish within {timeout} s; killed\n"
                                    f"--- console tail ---\n{self.console_tail()}")
        self._times["vm ended"] = time.monotonic_ns()
        self.close()
        return self._result(reason)

    def _wait_vm(self, vm: Vm, timeout: float | None) -> StopReason | None:
        """vm.wait(), in slices, so that a panic ends the run even where the
        guest's panic= setting would keep it spinning."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self._panic_deadline is not None and now >= self._panic_deadline:
                self._end("panic")
            step = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - now)
            reason = vm.wait(max(step, 0.0))
            if reason is not None:
                return reason
            if not any(v.running for v in vm.vcpus):  # ended, though nobody named a reason
                return StopReason.STOPPED
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _result(self, reason: StopReason) -> RunResult:
        if self.panicked:
            raise GuestPanicError(self._panic_message())
        if self._failure is not None:
            what = FAIL_NAMES.get(self._failure, f"init failed (code {self._failure})")
            raise GuestError(f"{self._init_message() or what}\n--- console tail ---\n{self.console_tail()}")
        if self._stopped_by_host and self.reason is None:
            raise VmStoppedError("the VM was stopped by the host before the guest finished")
        assert self.control is not None
        if self.reason is None:
            raise GuestCrashError(f"guest stopped ({reason}) without reporting\n{self.console_tail()}")
        return RunResult(
            exit_code=self.control.exit_status if self.reason == "exit" else None,
            stdout=bytes(self.stdout),
            console=bytes(self.console),
            reason=self.reason,
            timeline=self.timeline(),
            stats=self.backends.stats(),
        )

    def _panic_message(self) -> str:
        first = "guest kernel panicked"
        if self._initrd_failure:
            first += f": the initrd could not be unpacked ({self._initrd_failure})"
        elif self._panic_line:
            first += f": {self._panic_line}"
        return f"{first}\n--- console tail ---\n{self.console_tail()}"

    def _init_message(self) -> str:
        """Init's own last report on the console ("microvm: ..."), without the prefix."""
        for line in reversed(bytes(self.console).decode(errors="replace").splitlines()):
            if line.startswith("microvm: "):
                return line.removeprefix("microvm: ").strip()
        return ""

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

    def stop(self) -> None:
        """Ask the vCPUs to stop (the guest gets no say); wait() then raises VmStoppedError."""
        self._stopped_by_host = True
        vm = self.vm
        if vm is not None:
            vm.stop()

    def kill(self) -> None:
        """Stop the guest and free everything at once."""
        self.stop()
        self.close()

    def feed_input(self, data: bytes) -> None:
        """Host input for the guest's console (interactive use, once started).

        Nothing is lost: the input is held until the guest's shell is starting
        (our init's command mark), then goes to the UART as fast as the guest
        reads it (Serial.host_input, devices/serial.py ConsoleInput). Blocks
        while more than INPUT_HIGH_WATER bytes wait (back-pressure), until the
        VM is gone. Whoever feeds calls pump_input() every INPUT_TICK s
        meanwhile (microvm.console does).
        """
        from microvm.devices.serial import INPUT_HIGH_WATER, INPUT_TICK

        serial = self.serial
        if serial is None:
            return
        serial.host_input.put(data)
        self.pump_input()
        while serial.host_input.held > INPUT_HIGH_WATER and self._takes_input():
            serial.host_input.wait_held(INPUT_HIGH_WATER, INPUT_TICK)
            self.pump_input()

    def end_input(self) -> None:
        """The host input is over: once the guest has read the rest, its shell
        gets an end-of-file (VEOF, ^D, repeated until it exits; see
        ConsoleInput), so a piped session ends like `sh < file`, with the
        shell's status. Keep calling pump_input() until the VM ends."""
        serial = self.serial
        if serial is not None:
            serial.host_input.end()
            self.pump_input()

    def pump_input(self) -> None:
        """Move held host input on and send a due end-of-file: cheap, any thread."""
        serial = self.serial
        if serial is None:
            return
        if serial.on_rx_space is None:
            serial.on_rx_space = self.pump_input  # refill as the guest reads
        ready_since: float | None
        if self.initrd is not None:
            # Someone else's init reports nothing: the UART itself says when
            # the guest receives (its driver has opened the port).
            ready_since = 0.0
        else:
            mark = self._times.get("command started")
            ready_since = None if mark is None else mark / 1e9
        serial.host_input.pump(serial, ready_since, len(self.console) + len(self.stdout),
                               settle=self.initrd is None)

    def _takes_input(self) -> bool:
        return self.vm is not None and self.serial is not None and self.reason is None

    def close(self) -> None:
        """Free the VM: safe from any thread, more than once, and after a failure."""
        with self._close_lock, _interrupts_deferred():
            vm = self.vm
            if vm is not None:
                self.serial = None  # no more host input into a closing VM
                vm.close()  # may raise if a vCPU is stuck; then self.vm stays for a retry
                self._vm_closed = vm
                self.vm = None
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
        order = ["vm created", "memory mapped", "kernel loaded", "first vcpu entry", "init reached",
                 "command started", "command done", "vm ended"]
        return {k: (t[k] - self._t0) / 1e9 for k in order if k in t}

    def console_tail(self, n: int = CONSOLE_TAIL) -> str:
        return bytes(self.console[-n:]).decode(errors="replace")

    # --- setup -------------------------------------------------------------------

    def _require_vm(self) -> Vm:
        if self.vm is None:
            if self._stopped_by_host:
                raise VmStoppedError("the VM was stopped by the host before the guest finished")
            raise MicroVMError("the VM is not running")
        return self.vm

    def _initrd(self, argv: Sequence[str] | None) -> bytes:
        from microvm.guestinit import command_archive, initramfs_for

        if self.initrd is None:
            return initramfs_for(argv, self.env)
        if isinstance(self.initrd, bytes):
            base = self.initrd
        else:
            try:
                base = Path(self.initrd).read_bytes()
            except OSError as e:
                raise LoaderError(f"cannot read initrd {self.initrd}: {e.strerror}") from e
        # A user initrd gets the command appended too; its /init may use it.
        return base + command_archive(argv, self.env) if argv else base

    def _load(self, vm: Vm, kernel: Path, initrd: bytes, layout: list[tuple[int, int]]) -> None:
        low_end = layout[0][1]
        ram = [(0, EBDA_START), (HIMEM_START, low_end - HIMEM_START), *layout[1:]]
        reserved = [(EBDA_START, 0xA0000 - EBDA_START), (BIOS_START, HIMEM_START - BIOS_START)]
        # Devices are announced the way virtio_mmio's cmdline_devices expects
        # (drivers/virtio/virtio_mmio.c): size@base:irq.
        devices = " ".join(f"virtio_mmio.device={MMIO_SIZE >> 10}K@{VIRTIO_MMIO_BASE + i * MMIO_SIZE:#x}:"
                           f"{VIRTIO_IRQ_BASE + i}" for i in range(len(self.transports)))
        # Ours first: the kernel reads left to right, so nothing in the
        # user's text (checked for `--` and open quotes too) can hide it.
        ours = " ".join(filter(None, (devices, self.backends.cmdline(), "root=/dev/vda" if self.rootfs else "")))
        cmdline = " ".join(filter(None, (ours, self.cmdline, self.append)))
        try:
            self.boot = loader.load_linux(vm.mem, kernel, cmdline=cmdline,
                                          initrd=initrd, ram=ram, reserved=reserved)
        except loader.KernelTooBigError as e:
            need = -(-e.needed // MIB)
            raise GuestMemoryTooSmallError(
                f"mem_mib={self.mem_mib} is too small for kernel {kernel}: with its initrd it needs "
                f"at least {need} MiB of guest memory") from e
        mptable.write(vm.mem, self.vcpus, BIOS_START)

    def _wire_devices(self, vm: Vm) -> None:
        self.serial = Serial(vm.irq_line(COM1_IRQ), self._on_console)
        vm.pio.register(COM1_BASE, COM1_SIZE, self.serial)
        i8042 = I8042(lambda: self._end("reboot"))
        vm.pio.register(I8042_DATA_PORT, 1, i8042.data_port)
        vm.pio.register(I8042_COMMAND_PORT, 1, i8042.command_port)
        self.control = ControlDevice(self._on_exit, self._end, self._on_mark, self._on_fail)
        vm.mmio.register(CONTROL_BASE, CONTROL_SIZE, self.control)
        # The command's stdout and stderr travel over virtio-console (hvc0):
        # whole buffers per notification instead of an exit per byte.
        self.hvc = VirtioConsole(self._on_command_output)
        # No ioeventfd for the console: Linux's hvc busy-waits in the kernel
        # until the host has taken each buffer, so the notify is served right
        # in the vCPU's exit, never waiting for the I/O thread to be scheduled.
        self._add_virtio(vm, self.hvc, ioeventfd=False)
        self.backends.wire(vm, self._add_virtio)

    def _add_virtio(self, vm: Vm, device: Any, ioeventfd: bool = True) -> MmioTransport:
        index = len(self.transports)
        base = VIRTIO_MMIO_BASE + index * MMIO_SIZE
        transport = MmioTransport(device, vm.mem, vm.irq_line(VIRTIO_IRQ_BASE + index))
        vm.mmio.register(base, MMIO_SIZE, transport)
        for q in range(len(device.queue_sizes) if ioeventfd else 0):
            vm.ioeventfd(base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, q, functools.partial(transport.notify, q))
        self.transports.append(transport)
        return transport

    def _setup_vcpus(self, vm: Vm) -> None:
        supported = vm.kvm.get_supported_cpuid()
        tsc_deadline = bool(vm.kvm.check_extension(_kvm.CAPS["KVM_CAP_TSC_DEADLINE_TIMER"]))
        for vcpu in vm.vcpus:
            fd = vcpu.fd
            fd.set_cpuid2(cpuid.vcpu_cpuid(supported, vcpu.index, self.vcpus, tsc_deadline))
            fd.set_msrs(msr.boot_msrs())
            fd.set_lapic(lapic.wire_lints(fd.get_lapic()))
        # Only the boot CPU gets registers; the others wait for INIT/SIPI
        # from the guest, in the in-kernel local APIC.
        bsp = vm.vcpus[0].fd
        limit = regs.write_gdt(vm.mem, GDT_ADDR)
        sregs = bsp.get_sregs()
        r = bsp.get_regs()
        if self.boot.protocol == "pvh":
            # PVH entry (xen/interface/hvm/start_info.h): 32-bit protected
            # mode, paging off, ebx = physical address of hvm_start_info.
            regs.protected_mode_sregs(sregs, GDT_ADDR, limit)
            r.update(rip=self.boot.entry, rbx=self.boot.params_addr, rflags=2)
        else:
            # 64-bit boot protocol (boot.rst): identity paging, rsi = boot_params.
            paging.identity_map(vm.mem, PML4_ADDR, gib=4)
            regs.long_mode_sregs(sregs, GDT_ADDR, limit, PML4_ADDR)
            r.update(rip=self.boot.entry, rsi=self.boot.params_addr, rflags=2)
        bsp.set_sregs(sregs)
        bsp.set_regs(r)

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
        else:
            self.console += data
            if self._console_sink is not None:
                self._console_sink(data)
        self._line += data
        if data == b"\n" or len(self._line) > 512:
            line, self._line = bytes(self._line), bytearray()
            if PANIC_MARKER in line:
                if not self.panicked:
                    self.panicked = True
                    self._panic_line = _printk_text(line)
                    self._panic_deadline = time.monotonic() + PANIC_GRACE
            elif PANIC_END_MARKER in line and self.panicked:
                self._end("panic")
            elif not self._initrd_failure and any(m in line for m in INITRD_FAILURE_MARKERS):
                self._initrd_failure = _printk_text(line)
            elif any(m in line for m in POWER_DOWN_MARKERS):
                # `poweroff -f` without ACPI: the kernel halts its CPUs; we end the VM.
                self._end("poweroff")

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


def _printk_text(line: bytes) -> str:
    """A console line without its printk timestamp and line ending."""
    text = line.decode(errors="replace").strip()
    if text.startswith("[") and "]" in text:
        text = text[text.index("]") + 1:].strip()
    return text


def _drive(value: Any, field: str = "drives") -> Drive:
    if isinstance(value, Drive):
        return value
    if isinstance(value, str | os.PathLike):
        return Drive(Path(value))
    raise ConfigError(f"{field}: expected a Drive or a path, got {value!r}")


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
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


def _tune_switch_interval() -> None:
    """Shorten the GIL switch interval, unless the program already chose one."""
    wanted = os.environ.get("MICROVM_SWITCH_INTERVAL", str(VMM_SWITCH_INTERVAL))
    if wanted == "keep" or sys.getswitchinterval() != PYTHON_DEFAULT_SWITCH_INTERVAL:
        return
    try:
        sys.setswitchinterval(float(wanted))
    except ValueError as e:
        raise ConfigError(f"MICROVM_SWITCH_INTERVAL={wanted!r}: expected seconds or 'keep'") from e


def _sink(target: BinaryIO | Callable[[bytes], Any] | None) -> Callable[[bytes], None] | None:
    if target is None:
        return None
    if callable(target):
        return target
    stream = target

    def write(data: bytes) -> None:
        stream.write(data)
        if b"\n" in data:
            stream.flush()

    return write
