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

import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from microvm import _kvm, loader
from microvm.arch.x86_64 import cpuid, lapic, mptable, msr, paging, regs
from microvm.backends import Backends
from microvm.devices.control import CONTROL_BASE, CONTROL_SIZE, MARK_COMMAND, MARK_INIT, ControlDevice
from microvm.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from microvm.devices.serial import COM1_BASE, COM1_IRQ, COM1_SIZE, Serial
from microvm.devices.virtio.console import VirtioConsole
from microvm.devices.virtio.mmio import MMIO_SIZE, VIRTIO_MMIO_QUEUE_NOTIFY, MmioTransport
from microvm.errors import ConfigError, GuestCrashError, LoaderError, MicroVMError, VcpuError
from microvm.specs import Drive, Nic
from microvm.vcpu import StopReason
from microvm.vm import Vm

__all__ = ["Drive", "GuestPanicError", "GuestTimeoutError", "MicroVM", "Nic", "RunResult"]

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
POWER_DOWN_MARKERS = (b"reboot: Power down", b"reboot: System halted")


class GuestPanicError(GuestCrashError):
    """The guest kernel panicked."""


class GuestTimeoutError(MicroVMError, TimeoutError):
    """The guest did not finish in time; it was killed."""


class UnsupportedHostError(MicroVMError):
    """This host cannot run an ordinary Linux guest (PVM)."""


@dataclass
class RunResult:
    exit_code: int | None  # the command's status; None if the guest ended otherwise
    stdout: bytes  # what the command wrote to its stdout/stderr
    console: bytes  # everything on the serial console, kernel messages included
    reason: str  # "exit", "poweroff", "reboot", "halt"
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
        if not 16 <= mem_mib <= 256 * 1024:
            raise ConfigError(f"mem_mib must be between 16 and 262144, got {mem_mib}")
        if not 1 <= vcpus <= 254:
            raise ConfigError(f"vcpus must be between 1 and 254, got {vcpus}")
        self.kernel = Path(kernel) if kernel is not None else None
        self.initrd = initrd
        self.mem_mib = mem_mib
        self.vcpus = vcpus
        self.cmdline = (cmdline if cmdline is not None else DEFAULT_CMDLINE) + (f" {append}" if append else "")
        self.env = dict(env or {})
        self.drives = [d if isinstance(d, Drive) else Drive(d) for d in drives]
        if rootfs is not None:
            # The root image is /dev/vda; the command runs chrooted into it.
            self.drives.insert(0, rootfs if isinstance(rootfs, Drive) else Drive(rootfs))
            self.cmdline += " root=/dev/vda"
        self.nics = list(nics)
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
        self.panicked = False
        self.reason: str | None = None
        self._t0 = 0
        self._times: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------

    def start(self, argv: Sequence[str] | None = None) -> MicroVM:
        """Boot the guest and run argv in it (None: an interactive shell)."""
        if self.vm is not None:
            raise MicroVMError("this MicroVM was already started")
        check_host(self.force)  # measured once per process, not part of the boot
        _tune_switch_interval()
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
        except BaseException:
            self.close()
            raise
        return self

    def wait(self, timeout: float | None = None) -> RunResult:
        """Wait for the guest to finish; kills it on timeout."""
        vm = self._require_vm()
        try:
            reason = vm.wait(timeout)
        except GuestCrashError as e:
            self.close()
            raise GuestCrashError(f"{e}\n--- console tail ---\n{self.console_tail()}") from e
        except MicroVMError:
            self.close()
            raise
        except Exception as e:  # a device callback failed in a vCPU thread
            self.close()
            raise VcpuError(f"the VMM failed while running the guest: {e!r}") from e
        if reason is None:
            try:
                self.kill()
            finally:
                raise GuestTimeoutError(f"guest did not finish within {timeout} s; killed\n"
                                        f"--- console tail ---\n{self.console_tail()}")
        self._times["vm ended"] = time.monotonic_ns()
        self.close()
        if self.panicked:
            raise GuestPanicError(f"guest kernel panicked\n--- console tail ---\n{self.console_tail()}")
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

    def run(self, argv: Sequence[str], timeout: float | None = 60.0) -> RunResult:
        """Boot, run argv, return its result; the VM is gone afterwards."""
        if not argv:
            raise ConfigError("run() needs a command; use start(None) for a shell")
        self.start(argv)
        return self.wait(timeout)

    def stop(self) -> None:
        """Ask the vCPUs to stop (the guest gets no say)."""
        if self.vm is not None:
            self.vm.stop()

    def kill(self) -> None:
        """Stop the guest and free everything at once."""
        self.stop()
        self.close()

    def feed_input(self, data: bytes) -> None:
        """Host input for the guest's console (interactive use)."""
        if self.serial is not None:
            self.serial.feed(data)

    def close(self) -> None:
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
        cmdline = " ".join(filter(None, (self.cmdline, self.backends.cmdline(), devices)))
        self.boot = loader.load_linux(vm.mem, kernel, cmdline=cmdline,
                                      initrd=initrd, ram=ram, reserved=reserved)
        mptable.write(vm.mem, self.vcpus, BIOS_START)

    def _wire_devices(self, vm: Vm) -> None:
        self.serial = Serial(vm.irq_line(COM1_IRQ), self._on_console)
        vm.pio.register(COM1_BASE, COM1_SIZE, self.serial)
        i8042 = I8042(lambda: self._end("reboot"))
        vm.pio.register(I8042_DATA_PORT, 1, i8042.data_port)
        vm.pio.register(I8042_COMMAND_PORT, 1, i8042.command_port)
        self.control = ControlDevice(self._on_exit, self._end, self._on_mark)
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
        self.console += data
        if self._console_sink is not None:
            self._console_sink(data)
        if self._in_command and not (self.transports and self.transports[0].active):
            # A kernel without virtio-console: the command writes to ttyS0.
            self._on_command_output(data)
        self._line += data
        if data == b"\n" or len(self._line) > 512:
            line, self._line = bytes(self._line), bytearray()
            if PANIC_MARKER in line:
                self.panicked = True
            elif any(m in line for m in POWER_DOWN_MARKERS):
                # `poweroff -f` without ACPI: the kernel halts its CPUs; we end the VM.
                self._end("poweroff")

    def _on_mark(self, mark: int) -> None:
        now = time.monotonic_ns()
        if mark == MARK_INIT:
            self._times.setdefault("init reached", now)
        elif mark == MARK_COMMAND:
            self._times.setdefault("command started", now)
            self._in_command = True

    def _on_exit(self, status: int) -> None:
        self._times["command done"] = time.monotonic_ns()
        self._in_command = False
        self._end("exit")

    def _end(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
        if self.vm is not None:
            self.vm.request_stop(StopReason.REQUESTED)


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
