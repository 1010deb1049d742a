"""virtio devices over the MMIO transport (virtio 1.2, sections 2-5).

A device implements VirtioDevice: its type, its feature bits, its queue
sizes, its configuration space, and what to do when a queue is notified.
It never sees a transport register; the transport (mmio.py) owns those and
the device status state machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from microvm.devices.virtio.queue import DescriptorChain, Queue
from microvm.memory import GuestMemory

# Device status bits (2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# Reserved feature bits the transport and queues implement (6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19


class VirtioDevice(Protocol):
    device_type: int
    features: int  # device-specific feature bits offered (bits below 24)
    queue_sizes: tuple[int, ...]

    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, mem: GuestMemory, queues: list[Queue], features: int,
                 signal: Callable[[int], None]) -> None:
        """DRIVER_OK: start using the queues; signal(i) reports used buffers on queue i."""

    def process(self, queue_index: int) -> None:
        """The driver notified queue_index (from the I/O thread). May raise QueueError."""

    def reset(self) -> None: ...


def config_read(data: bytes, offset: int, size: int) -> int:
    """Little-endian read from a device's config bytes; outside reads as 0."""
    if offset < 0 or offset + size > len(data):
        return 0
    return int.from_bytes(data[offset:offset + size], "little")


class QueueState:
    """What every device keeps between DRIVER_OK and reset: the guest memory,
    its queues and the signal callback. Devices inherit activate/reset."""

    def __init__(self) -> None:
        self.mem: GuestMemory | None = None
        self.queues: list[Queue] = []
        self.signal: Callable[[int], None] | None = None

    def activate(self, mem: GuestMemory, queues: list[Queue], features: int,
                 signal: Callable[[int], None]) -> None:
        self.mem, self.queues, self.signal = mem, queues, signal

    def reset(self) -> None:
        self.mem, self.queues, self.signal = None, [], None

    def drain(self, index: int, handle: Callable[[GuestMemory, DescriptorChain], int]) -> None:
        """Serve every available chain of queue `index`: handle() returns the
        bytes it wrote into the chain; one interrupt check for the batch."""
        q, mem = self.queues[index], self.mem
        assert mem is not None and self.signal is not None
        used = False
        while (chain := q.pop()) is not None:
            q.add_used(chain.head, handle(mem, chain))
            used = True
        if used:
            self.signal(index)
