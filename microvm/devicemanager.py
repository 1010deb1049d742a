"""The host side of a VM's disks and network cards.

Opened before the VM exists (a bad image, a busy tap, a missing namespace
is an error before anything starts), wired to virtio-mmio transports, and
closed after the VM's I/O thread is gone. Closing a tap microvm created
removes it (the kernel deletes a non-persistent tap with its last fd).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

from microvm.devices.virtio.block import VirtioBlock
from microvm.devices.virtio.mmio import MmioTransport
from microvm.devices.virtio.net import RX_QUEUE, VirtioNet
from microvm.errors import ConfigError
from microvm.specs import Drive, Nic
from microvm.backends.tap import HostConfig, Tap
from microvm.vm import Vm

AddVirtio = Callable[[Vm, Any], MmioTransport]


class Backends:
    def __init__(self, drives: Sequence[Drive], nics: Sequence[Nic]):
        self.drives = list(drives)
        self.nic_specs = list(nics)
        self.disks: list[VirtioBlock] = []
        self.taps: list[Tap] = []
        self.nics: list[VirtioNet] = []

    def open(self) -> None:
        self.close()  # a second start() after a failed one begins afresh
        self._check_distinct()
        try:
            for d in self.drives:
                self.disks.append(VirtioBlock(d.path, read_only=d.read_only, direct=d.direct))
            for n in self.nic_specs:
                tap = Tap(n.tap, HostConfig(address=n.host_interface, bridge=n.bridge, netns=n.netns))
                self.taps.append(tap)
                self.nics.append(VirtioNet(tap, mac=n.mac))
        except BaseException:
            self.close()
            raise

    def _check_distinct(self) -> None:
        """One image given twice is a mistake unless every use is read-only
        (two writers would corrupt it; the lock would call it "in use elsewhere")."""
        seen: dict[tuple[int, int], int] = {}
        for i, d in enumerate(self.drives):
            try:
                st = os.stat(d.path)
            except OSError:
                continue  # VirtioBlock names the problem
            key = (st.st_dev, st.st_ino)
            if key in seen:
                first = self.drives[seen[key]]
                if not (d.read_only and first.read_only):
                    raise ConfigError(f"disk image {d.path} is given twice (drives {seen[key]} and {i}); "
                                      f"only read-only drives may share an image")
            seen[key] = i

    def wire(self, vm: Vm, add_virtio: AddVirtio) -> None:
        """Put every device on the VM's MMIO bus (disks first: vda, vdb, ...; then eth0, ...)."""
        for disk in self.disks:
            add_virtio(vm, disk)
        for net, tap in zip(self.nics, self.taps, strict=True):
            transport = add_virtio(vm, net)
            # A frame waiting on the tap is like a receive-queue notification.
            vm.io.add(tap.fd, functools.partial(transport.notify, RX_QUEUE), eventfd=False)

    def cmdline(self) -> str:
        """Guest addresses: the kernel's ip= for the first addressed NIC, the rest for our init."""
        args: list[str] = []
        for i, n in enumerate(self.nic_specs):
            if n.guest_interface is None:
                continue
            if not args:
                args.append(n.kernel_ip_arg(f"eth{i}"))
            else:
                args.append(f"microvm.ip=eth{i},{n.guest_interface}")
        return " ".join(args)

    def stats(self) -> dict[str, dict[str, int]]:
        return {f"eth{i}": dict(net.stats) for i, net in enumerate(self.nics)}

    def close(self) -> None:
        for disk in self.disks:
            disk.close()
        for tap in self.taps:
            tap.close()
        self.disks, self.taps = [], []  # the NICs stay: their counters outlive the VM
