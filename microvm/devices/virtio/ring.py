"""What both split-virtqueue implementations share (virtio 1.2, section 2.7):
the ring layout's constants, the chain a device is handed, the error a
broken driver gets, and the fence the notification protocol needs.

queue.PyQueue (Python, the reference) and microvm._virtq.Queue (Cython, the
default) both hand out DescriptorChain/Descriptor and raise QueueError.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from microvm.devices.state import U16, Fields, State
from microvm.errors import MicroVMError
from microvm.memory import GuestMemory

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

VIRTQ_DESC_SIZE = 16  # struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
VIRTQ_USED_ELEM_SIZE = 8  # struct virtq_used_elem { le32 id; le32 len; }
MAX_QUEUE_SIZE = 32768  # 2.7: Queue Size is a power of 2, at most 32768
MAX_CHAIN_BYTES = 1 << 32  # total length a chain may describe
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # id, len
U32_MAX = 0xFFFF_FFFF
IOV_MAX = 1024  # the most buffers one readv/writev takes (Linux's UIO_MAXIOV)

# Queue.send_chains(): why it stopped at a chain, besides an errno from writev.
SEND_WRITABLE = -1  # the chain has device-writable buffers
SEND_SHORT = -2  # its buffers hold fewer bytes than min_len
SEND_LONG = -3  # more than max_len
SEND_PARTIAL = -4  # writev wrote only part of it

# Queue counters, summed over a device's queues in MmioTransport.stats().
QUEUE_COUNTERS = ("chains_popped", "used_added", "interrupts_suppressed")


_FENCE = threading.Lock()


def _new_fence() -> None:  # a fork (microvm/jail) while another thread held it: the child's is free
    global _FENCE
    _FENCE = threading.Lock()


os.register_at_fork(after_in_child=_new_fence)


def full_barrier() -> None:
    """A full memory barrier between our stores and later loads.

    The driver runs on another CPU; x86 may let a load pass an earlier store
    (store-buffer forwarding), which is exactly the order virtio's
    notification suppression must not see reordered (2.7.7.2, 2.7.10: write
    used idx / avail_event, then read used_event / avail idx). Taking an
    uncontended lock executes a LOCK-prefixed atomic, which is a full fence
    on x86, and Python has no bare fence.
    """
    _FENCE.acquire()
    _FENCE.release()


class QueueError(MicroVMError):
    """The driver broke the virtqueue rules; the device needs a reset."""


class Descriptor(NamedTuple):
    addr: int
    len: int
    write: bool  # device-writable (VRING_DESC_F_WRITE)


@dataclass(slots=True)
class DescriptorChain:
    """One available buffer: its head index and its descriptors, in order,
    with indirect tables already expanded."""

    head: int
    descriptors: list[Descriptor]

    @property
    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.write]

    @property
    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.write]

    def readable_len(self) -> int:
        return sum(d.len for d in self.descriptors if not d.write)

    def writable_len(self) -> int:
        return sum(d.len for d in self.descriptors if d.write)


def stream_views(mem: GuestMemory, descs: list[Descriptor], start: int, end: int) -> list[memoryview]:
    """Views of bytes [start, end) of the stream the descriptors form, one per descriptor
    touched (2.7.4: a device assumes nothing about how the driver splits a message).
    The descriptors come from pop(), so every view is inside guest memory."""
    out: list[memoryview] = []
    pos = 0
    for d in descs:
        lo, hi = max(start, pos), min(end, pos + d.len)
        if lo < hi:
            out.append(mem.view(d.addr + lo - pos, hi - lo))
        pos += d.len
    return out


class QueueConfig(Protocol):
    """What the transport configures on a queue, and where both sides are in its rings."""

    max_size: int
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    signalled_used: int | None
    event_idx: bool
    mem: GuestMemory | None

    def reset(self) -> None: ...

    def check_config(self, mem: GuestMemory) -> None: ...


def reset_queue(q: QueueConfig) -> None:
    """2.4: what a device reset (or a new queue) leaves: nothing configured, no memory."""
    q.size = q.max_size
    q.ready = False
    q.desc_table = q.avail_ring = q.used_ring = 0
    q.event_idx = False
    q.mem = None
    q.next_avail = q.next_used = 0
    q.signalled_used = None


def check_config(q: QueueConfig, mem: GuestMemory) -> None:
    """What the driver configured, checked before it may set QueueReady."""
    n = q.size
    if not 1 <= n <= q.max_size or n & (n - 1):
        raise QueueError(f"queue size {n} is not a power of 2 up to {q.max_size}")
    # 2.7: alignment 16 for the table, 2 for the available ring, 4 for the used ring.
    for name, addr, align, length in (
        ("descriptor table", q.desc_table, 16, VIRTQ_DESC_SIZE * n),
        ("available ring", q.avail_ring, 2, 6 + 2 * n),
        ("used ring", q.used_ring, 4, 6 + VIRTQ_USED_ELEM_SIZE * n),
    ):
        if addr % align:
            raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
        if not mem.contains(addr, length):
            raise QueueError(f"{name} at {addr:#x}+{length:#x} is outside guest memory")


def queue_state(q: QueueConfig, held: int = 0) -> State:
    """What the driver configured and where both sides are in the rings. `held`:
    chains the device popped but has not used (the newest ones); they are handed
    back to the ring, so the restored device pops them again from the same
    entries, which the driver cannot have reused (it reuses an available slot only
    once `size` later chains were made available, and this one is not used yet).
    The ring memory (and so the event_idx avail_event we published) is the guest's."""
    return {"kind": "virtqueue", "max_size": q.max_size, "size": q.size, "ready": q.ready,
            "desc_table": q.desc_table, "avail_ring": q.avail_ring, "used_ring": q.used_ring,
            "next_avail": (q.next_avail - held) & U16, "next_used": q.next_used,
            "signalled_used": q.signalled_used}


def restore_queue(q: QueueConfig, state: State, mem: GuestMemory) -> None:
    """Take over a queue_state(); a ready queue's rings are checked against `mem`
    as QueueReady checks them. The transport activates it (event_idx, memory)."""
    f = Fields(state, "virtqueue")
    f.same("max_size", q.max_size)
    size, ready = f.integer("size", hi=U32_MAX), f.flag("ready")
    rings = f.integer("desc_table"), f.integer("avail_ring"), f.integer("used_ring")
    next_avail, next_used = f.integer("next_avail", hi=U16), f.integer("next_used", hi=U16)
    signalled_used = f.optional_integer("signalled_used", hi=U16)
    q.reset()
    q.size, (q.desc_table, q.avail_ring, q.used_ring) = size, rings
    if ready:
        try:
            q.check_config(mem)
        except QueueError as e:
            q.reset()
            raise f.error(str(e)) from e
    q.ready = ready
    q.next_avail, q.next_used, q.signalled_used = next_avail, next_used, signalled_used
