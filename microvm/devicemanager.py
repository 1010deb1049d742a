"""The device manager: every device of a VM, where it lives, how it signals.

It hands out virtio-mmio windows and interrupt lines from pools that fail
loudly when empty (a ConfigError naming the limit, before any vCPU runs),
registers bus ranges, ioeventfds and irqfds, writes the kernel
command-line entries that announce the virtio devices, and keeps the
ordered list of devices that stats, teardown and snapshots walk.
(Firecracker's device_manager/mmio.rs plays the same part.)

How many virtio devices fit: one per interrupt line in layout.VIRTIO_IRQS
(19: I/O APIC pins 5-23). The virtio console and the entropy device take
one each, so a VM takes at most MAX_USER_DEVICES drives, NICs and vsock
together. (The kernel's own console, hvc1, shares hvc0's line: Linux's
virtio_mmio asks for its interrupt IRQF_SHARED and reads each device's
interrupt status, so a pulse on a shared line reaches both handlers.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microvm.arch.x86_64.layout import VIRTIO_IRQS, VIRTIO_MMIO_BASE, VIRTIO_MMIO_END, VIRTIO_MMIO_SIZE
from microvm.bus import BusDevice
from microvm.devices.virtio.mmio import VIRTIO_MMIO_QUEUE_NOTIFY, MmioTransport
from microvm.errors import ConfigError
from microvm.ratelimit import Throttle
from microvm.vm import Vm

# The virtio console (hvc0, the command's output) and virtio-rng (the guest's entropy).
BUILTIN_VIRTIO_DEVICES = 2
MAX_USER_DEVICES = len(VIRTIO_IRQS) - BUILTIN_VIRTIO_DEVICES


class Pool:
    """Values handed out in order, once each; empty is a ConfigError naming the limit."""

    def __init__(self, what: str, values: range):
        self.what = what
        self._values = values  # a range: ~190,000 windows cost nothing until taken
        self.limit = len(values)
        self._next = 0

    def take(self) -> int:
        if self._next >= self.limit:
            raise ConfigError(f"no {self.what} left: a VM has {self.limit}")
        value = self._values[self._next]
        self._next += 1
        return value

    @property
    def left(self) -> int:
        return self.limit - self._next


@dataclass
class Attached:
    """One device as the manager placed it."""

    name: str  # hvc0, vda, eth0, com1, ...: what the guest calls it, where it has a name
    device: Any
    bus: str  # "pio" or "mmio"
    base: int
    size: int
    gsi: int | None = None
    transport: MmioTransport | None = None


class DeviceManager:
    def __init__(self, vm: Vm):
        self.vm = vm
        self.windows = Pool("virtio-mmio windows", range(VIRTIO_MMIO_BASE, VIRTIO_MMIO_END, VIRTIO_MMIO_SIZE))
        self.irqs = Pool("interrupt lines for virtio devices (I/O APIC pins "
                         f"{VIRTIO_IRQS.start}-{VIRTIO_IRQS.stop - 1})", VIRTIO_IRQS)
        self.devices: list[Attached] = []
        vm.before_unmap.append(self.release_memory)

    def add_pio(self, name: str, device: BusDevice, base: int, size: int, gsi: int | None = None) -> None:
        self.vm.pio.register(base, size, device, name)
        self.devices.append(Attached(name, device, "pio", base, size, gsi))

    def add_mmio(self, name: str, device: BusDevice, base: int, size: int) -> None:
        self.vm.mmio.register(base, size, device, name)
        self.devices.append(Attached(name, device, "mmio", base, size))

    def add_virtio(self, name: str, device: Any, *, ioeventfd: bool = True,
                   own_thread: bool = False, share_line_of: str | None = None) -> MmioTransport:
        """Put a virtio device behind a transport in the next window, on the next line.

        ioeventfd: queue notifications wake an I/O thread without a vCPU exit
        (else the vCPU serves them in its exit); own_thread: that thread is
        the device's own, so its slow host calls (a disk's fdatasync) never
        hold up another device. share_line_of: the interrupt line of that
        (virtio) device instead of a new one.
        """
        if share_line_of is None:
            gsi = self.irqs.take()
        else:
            shared = next(a.gsi for a in self.devices if a.name == share_line_of and a.transport is not None)
            assert shared is not None  # a virtio device always has its line
            gsi = shared
        base = self.windows.take()
        vm = self.vm
        transport = MmioTransport(device, vm.mem, vm.irq_line(gsi))
        vm.mmio.register(base, VIRTIO_MMIO_SIZE, transport, name)
        thread = vm.io_thread(f"{name}-io") if own_thread and ioeventfd else vm.io
        for q in range(len(device.queue_sizes) if ioeventfd else 0):
            vm.ioeventfd(base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, q, functools.partial(transport.notify, q),
                         thread=thread, name=name)
        # A rate-limited queue is served again, on this thread, once its buckets allow.
        for q, throttle in getattr(device, "throttles", dict)().items():
            throttle.bind(thread.call_later, functools.partial(transport.notify, q))
        self.devices.append(Attached(name, device, "mmio", base, VIRTIO_MMIO_SIZE, gsi, transport))
        return transport

    def throttle(self, name: str) -> Throttle:
        """A device's rate limit by name: "vda" (a disk), "eth0:rx" or "eth0:tx" (a NIC)."""
        device, _, direction = name.partition(":")
        for a in self.devices:
            limits: dict[str, Throttle] = getattr(a.device, "rate_limits", dict)() if a.name == device else {}
            if direction in limits:
                return limits[direction]
        known = [f"{a.name}{':' * bool(d)}{d}" for a in self.devices for d in getattr(a.device, "rate_limits", dict)()]
        raise ConfigError(f"no rate-limited device {name!r} in this VM (it has: {', '.join(known) or 'none'})")

    def watch_fd(self, name: str, fd: int, handler: Callable[[], None]) -> None:
        """Call handler() in the shared I/O thread when `fd` (a tap) has data: edge-triggered."""
        self.vm.io.add(fd, handler, eventfd=False, name=name)

    def cmdline(self) -> str:
        """The virtio devices, announced the way virtio_mmio's cmdline_devices
        parses them (drivers/virtio/virtio_mmio.c): size@base:irq."""
        return " ".join(f"virtio_mmio.device={a.size >> 10}K@{a.base:#x}:{a.gsi}"
                        for a in self.devices if a.transport is not None)

    def release_memory(self) -> None:
        """Once the VM's threads are gone, before its RAM is unmapped (Vm.close):
        every queue lets go of the guest memory it holds."""
        for a in self.devices:
            if a.transport is not None:
                a.transport.release_memory()

    def close(self) -> None:
        """Once the VM's threads are gone: each device lets go of guest memory
        and queue state, and closes what it holds on the host, last added
        first. Counters stay, for stats()."""
        for a in reversed(self.devices):
            if a.transport is not None:
                a.device.reset()
            close = getattr(a.device, "close", None)  # host resources of its own (vsock's sockets)
            if callable(close):
                close()
            if a.transport is not None:
                a.transport.detach()

    def stats(self) -> dict[str, dict[str, int]]:
        """Every virtio device's counters (transport, queues and device together) by name, the
        buses', and the vCPUs' exits ("vcpu0": every return from KVM_RUN, and those answered
        in C without the GIL: an interrupt status read or acknowledgement)."""
        out: dict[str, dict[str, int]] = {}
        # Guest accesses nobody claimed (bus.py): counted there, reported here.
        out["bus"] = {"pio_unhandled": sum(self.vm.pio.unhandled.values()),
                      "mmio_unhandled": sum(self.vm.mmio.unhandled.values())}
        for vcpu in self.vm.vcpus:
            out[f"vcpu{vcpu.index}"] = {"exits": vcpu.fd.exits, "fast_exits": vcpu.fd.fast_exits}
        for a in self.devices:
            if a.transport is None:
                continue
            counters = dict(a.transport.stats())
            device_stats = getattr(a.device, "stats", None)
            if callable(device_stats):
                counters.update(device_stats())
            out[a.name] = counters
        return out
