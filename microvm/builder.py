"""A MicroVM's devices: the ones every VM has (the UART, the i8042's reset
line, the control device, the virtio console and entropy device) and the
ones its configuration asks for (disks, NICs, vsock), made and placed on
the VM's DeviceManager (devicemanager.py) with the callbacks they hold.

machine.py's MicroVM decides what each callback means (`Callbacks`); this
module decides which devices exist and in which order: the guest names its
virtio devices in probe order (hvc0, hvc1, then vda..., eth0..., vsock).
(Firecracker's builder.rs plays the same part.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from microvm.arch.x86_64 import layout
from microvm.backends import Backends
from microvm.devicemanager import DeviceManager
from microvm.devices.control import ControlDevice
from microvm.devices.i8042 import I8042
from microvm.devices.serial import Serial
from microvm.devices.virtio.console import VirtioConsole
from microvm.devices.virtio.rng import IoWakeup, VirtioRng
from microvm.printk import FullLog
from microvm.specs import Drive, Nic, disk_name

if TYPE_CHECKING:  # the user's devices are imported when a VM has them: `microvm run` starts faster
    from microvm.devices.virtio.vsock import VirtioVsock


@dataclass(frozen=True)
class Callbacks:
    """What the devices tell their machine (called from vCPU and I/O threads)."""

    console: Callable[[bytes], None]  # the UART's output
    command_output: Callable[[bytes], None]  # hvc0: the command's stdout and stderr
    log: Callable[[bytes], None]  # hvc1 as the kernel's console
    kernel_console_reset: Callable[[], None]  # hvc1 reset: the kernel shuts its devices down
    end: Callable[[str], None]  # the VM is over, for this reason ("reboot": the i8042's reset line)
    exit: Callable[[int], None]  # init reports the command's status
    mark: Callable[[int], None]  # init reports a step
    fail: Callable[[int], None]  # init reports a failure (FAIL_* code)


@dataclass(frozen=True)
class Wanted:
    """The devices a MicroVM's configuration asks for."""

    kernel: Path
    kernel_console: bool  # console=hvc1 on the command line: the kernel's messages on a second console
    full_log: FullLog | None
    backends: Backends  # open: the disks' images and the NICs' taps
    drives: Sequence[Drive]
    nics: Sequence[Nic]
    vsock: str | Path | None  # the host's Unix socket
    vsock_cid: int


@dataclass
class Board:
    """The devices the machine keeps a handle on."""

    serial: Serial
    control: ControlDevice
    hvc: VirtioConsole
    vsock: VirtioVsock | None = None


def build(devices: DeviceManager, wanted: Wanted, on: Callbacks, hooks: list[tuple[object, str]]) -> Board:
    """Make the devices of `wanted` on `devices` (before the kernel is loaded:
    the virtio devices go on its command line). `hooks` gets (device,
    attribute) of each callback a device holds into the machine or into the
    device graph, as it is made: the machine drops them once the VM is closed,
    so no reference cycle keeps a finished VM for the garbage collector. Should
    a device fail to be made, those made before it are on `devices` and in
    `hooks` already, for the machine's close() to free."""
    vm = devices.vm
    serial = Serial(vm.irq_line(layout.COM1_IRQ), on.console)
    devices.add_pio("com1", serial, layout.COM1_PORT, layout.COM1_PORTS, layout.COM1_IRQ)
    i8042 = I8042(functools.partial(on.end, "reboot"))
    i8042_data, i8042_command = i8042.ports()
    devices.add_pio("i8042-data", i8042_data, layout.I8042_DATA_PORT, 1)
    devices.add_pio("i8042-command", i8042_command, layout.I8042_COMMAND_PORT, 1)
    control = ControlDevice(on.exit, on.end, on.mark, on.fail)
    devices.add_mmio("control", control, layout.CONTROL_BASE, layout.CONTROL_SIZE)
    # The command's stdout and stderr travel over virtio-console (hvc0):
    # whole buffers per notification instead of an exit per byte.
    hvc = VirtioConsole(on.command_output)
    board = Board(serial, control, hvc)
    hooks += [(serial, "output"), (i8042, "on_reset"), (hvc, "output")]
    hooks += [(control, hook) for hook in ("on_exit", "on_power", "on_mark", "on_fail")]
    # No ioeventfd for the console: Linux's hvc busy-waits in the kernel
    # until the host has taken each buffer, so the notify is served right
    # in the vCPU's exit, never waiting for the I/O thread to be scheduled.
    devices.add_virtio("hvc0", hvc, ioeventfd=False)
    # The kernel's messages (console=hvc1), or init's copy of them (full_log):
    # the second virtio console the guest probes is hvc1 (the virtio-mmio
    # devices probe in this order).
    if wanted.kernel_console:
        hvc1 = VirtioConsole(on.log, on.kernel_console_reset)
        hooks += [(hvc1, "output"), (hvc1, "on_reset")]
        devices.add_virtio("hvc1", hvc1, ioeventfd=False, share_line_of="hvc0")
    elif wanted.full_log is not None and not wanted.full_log.plan(wanted.kernel):
        devices.add_virtio("hvc1", VirtioConsole(wanted.full_log.dmesg.extend), ioeventfd=False,
                           share_line_of="hvc0")
    # Entropy from the host (/dev/hwrng), so the guest's getrandom() never
    # waits for its own pool (slow to fill in a quiet VM).
    rng = VirtioRng()
    rng.wakeup = IoWakeup(vm.io, devices.add_virtio("rng", rng).notify)  # work left for later: a timer
    hooks.append((rng, "wakeup"))
    # Disks first (vda, vdb, ...: the kernel names them in probe order),
    # each with its own I/O thread; then eth0, ...
    if wanted.backends.disks:
        from microvm.devices.virtio.block import VirtioBlock
    for i, disk in enumerate(wanted.backends.disks):
        devices.add_virtio(disk_name(i), VirtioBlock(disk, rate_limit=wanted.drives[i].rate_limit), own_thread=True)
    if wanted.backends.taps:
        from microvm.devices.virtio.net import RX_QUEUE, VirtioNet
    for i, tap in enumerate(wanted.backends.taps):
        nic = wanted.nics[i]
        transport = devices.add_virtio(f"eth{i}", VirtioNet(tap, mac=nic.mac, rx_rate_limit=nic.rx_rate_limit,
                                                            tx_rate_limit=nic.tx_rate_limit))
        # A frame waiting on the tap is like a receive-queue notification.
        devices.watch_fd(f"eth{i}", tap.fd, functools.partial(transport.notify, RX_QUEUE))
    if wanted.vsock is not None:
        from microvm.devices.virtio.vsock import VirtioVsock

        board.vsock = VirtioVsock(wanted.vsock_cid, wanted.vsock)
        devices.add_virtio("vsock", board.vsock)
        board.vsock.attach(vm.io)  # its host sockets are served by the same I/O thread
    return board
