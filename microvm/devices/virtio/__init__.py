"""virtio devices over the MMIO transport (virtio 1.2, sections 2-5).

A device implements VirtioDevice: its type, its feature bits, its queue
sizes, its configuration space, and what to do when a queue is notified.
It never sees a transport register; the transport (mmio.py) owns those and
runs the device status state machine, whose rules (STATUS_SET_RULES, from
2.1.1 and 3.1.1) are the spec's, not the transport's, and so live here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from microvm.devices.virtio.queue import DescriptorChain, Queue
from microvm.memory import GuestMemory

if TYPE_CHECKING:
    from microvm.ratelimit import Throttle

# Device status bits (2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128
STATUS_NAMES = {STATUS_ACKNOWLEDGE: "ACKNOWLEDGE", STATUS_DRIVER: "DRIVER", STATUS_DRIVER_OK: "DRIVER_OK",
                STATUS_FEATURES_OK: "FEATURES_OK", STATUS_DEVICE_NEEDS_RESET: "DEVICE_NEEDS_RESET",
                STATUS_FAILED: "FAILED"}

# Reserved feature bits the transport and queues implement (6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19
VIRTIO_NAMES = {VIRTIO_ID_NET: "virtio-net", VIRTIO_ID_BLOCK: "virtio-blk", VIRTIO_ID_CONSOLE: "virtio-console",
                VIRTIO_ID_RNG: "virtio-rng", VIRTIO_ID_VSOCK: "virtio-vsock"}

# Which status bits the driver may set, and from where (2.1.1, 3.1.1). The
# initialization steps are one bit each, in order; a step's bit may be set
# only when exactly the steps before it are set, so one write sets at most
# one step. FAILED and DEVICE_NEEDS_RESET stand beside the sequence: they
# neither count as a step nor block one (drivers/virtio/virtio.c: virtio_device_restore_priv()
# resets, then re-adds FAILED "for debugging", then goes on with DRIVER).
# A bit missing here (DEVICE_NEEDS_RESET, reserved bits) the driver never sets.
STATUS_ANY = -1
STATUS_SET_RULES: dict[int, int] = {
    STATUS_ACKNOWLEDGE: 0,  # step 2: the guest noticed the device (right after a reset)
    STATUS_DRIVER: STATUS_ACKNOWLEDGE,  # step 3: it knows how to drive it
    STATUS_FEATURES_OK: STATUS_ACKNOWLEDGE | STATUS_DRIVER,  # step 5: after writing features (4)
    STATUS_DRIVER_OK: STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,  # step 8: after the queues (7)
    STATUS_FAILED: STATUS_ANY,  # 3.1.1: "if any of these steps go irrecoverably wrong", at any time
}
# Clearing: "The driver MUST NOT clear a device status bit" (2.1.1); only a
# write of 0, the reset, clears them, all at once. DEVICE_NEEDS_RESET is the
# device's: a write without it leaves it set (the driver may have read the
# status just before the device set it).
STATUS_SIDE_BITS = STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET


def status_refusal(old: int, new: int) -> str | None:
    """Why the driver may not change the device status from `old` to `new`
    (new != 0, DEVICE_NEEDS_RESET already carried over), or None if it may."""
    cleared = old & ~new
    if cleared:
        return f"clears {status_name(cleared)} without a reset"
    step = old & ~STATUS_SIDE_BITS
    added = new & ~old
    while added:
        bit = added & -added
        added ^= bit
        required = STATUS_SET_RULES.get(bit)
        if required is None:
            return f"sets {status_name(bit)}, which the driver never sets"
        if required != STATUS_ANY and step != required:
            return f"sets {status_name(bit)} from {status_name(step)} (needs {status_name(required)})"
    return None


def status_name(status: int) -> str:
    """'ACKNOWLEDGE|DRIVER', '0', or a reserved bit in hex."""
    names = [STATUS_NAMES.get(1 << i, f"{1 << i:#x}") for i in range(8) if status >> i & 1]
    return "|".join(names) or "0"


class VirtioDevice(Protocol):
    """Optional besides: snapshot_state() / restore_state() (devices/state.py), which the
    transport's own carry under "device", and chains_held() -> {queue: n}, the chains a
    device popped but has not used, which a snapshot hands back to their ring."""

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
        self.held: dict[int, DescriptorChain] = {}  # queue -> a chain its rate limit held back

    def activate(self, mem: GuestMemory, queues: list[Queue], features: int,
                 signal: Callable[[int], None]) -> None:
        self.mem, self.queues, self.signal = mem, queues, signal

    def reset(self) -> None:
        self.mem, self.queues, self.signal = None, [], None
        self.held.clear()

    def next_chain(self, index: int, throttle: Throttle | None = None,
                   size: Callable[[DescriptorChain], int] | None = None) -> DescriptorChain | None:
        """The next chain of queue `index` to serve (one held back before comes
        first), or None: none available, or the rate limit holds it back; it is
        then served first when the Throttle's retry notifies the queue."""
        chain = self.held.pop(index, None)
        if chain is None:
            chain = self.queues[index].pop()
        if chain is not None and throttle is not None and not throttle.admit(size(chain) if size else 0):
            self.held[index] = chain
            return None
        return chain

    @contextmanager
    def used_batch(self, index: int) -> Iterator[Callable[[int, int], None]]:
        """Return chains to queue `index` with used(head, bytes written): published a
        ring's worth at a time (before any slot is reused), with one interrupt check
        each, and at the end; what was used before an exception (a QueueError) still
        reaches the driver."""
        q, signal = self.queues[index], self.signal
        assert signal is not None
        batch: list[tuple[int, int]] = []

        def used(head: int, length: int) -> None:
            batch.append((head, length))
            if len(batch) == q.size:
                q.add_used_many(batch)
                batch.clear()
                signal(index)

        try:
            yield used
        finally:
            if batch:
                q.add_used_many(batch)
                signal(index)

    def drain(self, index: int, handle: Callable[[GuestMemory, DescriptorChain], int],
              throttle: Throttle | None = None, size: Callable[[DescriptorChain], int] | None = None) -> None:
        """Serve every available chain of queue `index` (as far as the rate
        limit lets: next_chain): handle() returns the bytes it wrote into the
        chain; one interrupt check for the batch."""
        q, mem = self.queues[index], self.mem
        assert mem is not None and self.signal is not None
        used = False
        while (chain := self.next_chain(index, throttle, size)) is not None:
            q.add_used(chain.head, handle(mem, chain))
            used = True
        if used:
            self.signal(index)
