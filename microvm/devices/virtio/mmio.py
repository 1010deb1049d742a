"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

Registers, feature negotiation and the device status state machine live
here; the device behind it only sees queues and its config space. A driver
that breaks the rules gets DEVICE_NEEDS_RESET and a config-change interrupt
(2.1.2), never an exception in the VMM.
"""

from __future__ import annotations

import logging
import threading

from microvm.devices import Irq
from microvm.devices import virtio as v
from microvm.devices.virtio.queue import Queue, QueueError
from microvm.errors import GuestMemoryError
from microvm.memory import GuestMemory

log = logging.getLogger(__name__)

MMIO_SIZE = 0x1000
MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x004D564D  # "MVM"

VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

TRANSPORT_FEATURES = (1 << v.VIRTIO_F_VERSION_1) | (1 << v.VIRTIO_F_EVENT_IDX) | (1 << v.VIRTIO_F_INDIRECT_DESC)


class MmioTransport:
    """One virtio device at one MMIO window (a BusDevice)."""

    def __init__(self, device: v.VirtioDevice, mem: GuestMemory, irq: Irq):
        self.device = device
        self.mem = mem
        self.irq = irq
        self.queues = [Queue(n) for n in device.queue_sizes]
        self.device_features = device.features | TRANSPORT_FEATURES
        # vCPU threads (registers, status changes) vs. the I/O thread (queue
        # processing): a reset never runs in the middle of a batch.
        self._lock = threading.RLock()
        # interrupt_status alone: the guest's interrupt handler reads and
        # acknowledges it while the I/O thread may be deep in a batch, and
        # must not wait for that batch (nor for the GIL hand-offs it takes).
        self._irq_lock = threading.Lock()
        self.errors: list[str] = []
        self._reset_state()
        if hasattr(device, "config_changed"):
            device.config_changed = self.config_changed  # e.g. virtio-net's link status

    def _reset_state(self) -> None:
        self.status = 0
        self.features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        with self._irq_lock:
            self.interrupt_status = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    @property
    def active(self) -> bool:
        return bool(self.status & v.STATUS_DRIVER_OK) and not self.status & v.STATUS_DEVICE_NEEDS_RESET

    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    # --- registers (vCPU threads) ---------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.interrupt_status if size == 4 else 0  # one load of an int: no lock needed
        with self._lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                return self.device.read_config(offset - VIRTIO_MMIO_CONFIG, size)
            if size != 4:
                return 0  # 4.2.2.2: registers are 32-bit; other widths are undefined
            q = self._queue()
            if offset == VIRTIO_MMIO_MAGIC_VALUE:
                return MAGIC_VALUE
            if offset == VIRTIO_MMIO_VERSION:
                return VERSION
            if offset == VIRTIO_MMIO_DEVICE_ID:
                return self.device.device_type
            if offset == VIRTIO_MMIO_VENDOR_ID:
                return VENDOR_ID
            if offset == VIRTIO_MMIO_DEVICE_FEATURES:
                return (self.device_features >> (32 * self.features_sel)) & 0xFFFFFFFF if self.features_sel < 2 else 0
            if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == VIRTIO_MMIO_QUEUE_READY:
                return int(q.ready) if q else 0
            if offset == VIRTIO_MMIO_STATUS:
                return self.status
            if offset == VIRTIO_MMIO_CONFIG_GENERATION:
                return self.config_generation
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == VIRTIO_MMIO_INTERRUPT_ACK:
            if size == 4:
                self._raise_interrupt(0, clear=value)
            return
        with self._lock:
            if offset >= VIRTIO_MMIO_CONFIG:
                self.device.write_config(offset - VIRTIO_MMIO_CONFIG, size, value)
                return
            if size != 4:
                return
            if offset == VIRTIO_MMIO_QUEUE_NOTIFY:
                # Only when no ioeventfd caught the write first (e.g. tests).
                self.notify(value & 0xFFFF)
            elif offset == VIRTIO_MMIO_STATUS:
                self._set_status(value & 0xFF)
            elif offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
                self.features_sel = value
            elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
                self._set_driver_features(value)
            elif offset == VIRTIO_MMIO_QUEUE_SEL:
                self.queue_sel = value
            else:
                self._write_queue_register(offset, value)

    def _set_driver_features(self, value: int) -> None:
        # 3.1.1: features are written after DRIVER and before FEATURES_OK.
        if not self.status & v.STATUS_DRIVER or self.status & v.STATUS_FEATURES_OK:
            return
        if self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._queue()
        # 4.2.2.3: queue registers may change only while the queue is not ready.
        if q is None or q.ready or self.status & v.STATUS_DRIVER_OK:
            return
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            q.size = value
        elif offset == VIRTIO_MMIO_QUEUE_DESC_LOW:
            q.desc_table = (q.desc_table & ~0xFFFFFFFF) | value
        elif offset == VIRTIO_MMIO_QUEUE_DESC_HIGH:
            q.desc_table = (q.desc_table & 0xFFFFFFFF) | (value << 32)
        elif offset == VIRTIO_MMIO_QUEUE_AVAIL_LOW:
            q.avail_ring = (q.avail_ring & ~0xFFFFFFFF) | value
        elif offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
            q.avail_ring = (q.avail_ring & 0xFFFFFFFF) | (value << 32)
        elif offset == VIRTIO_MMIO_QUEUE_USED_LOW:
            q.used_ring = (q.used_ring & ~0xFFFFFFFF) | value
        elif offset == VIRTIO_MMIO_QUEUE_USED_HIGH:
            q.used_ring = (q.used_ring & 0xFFFFFFFF) | (value << 32)
        elif offset == VIRTIO_MMIO_QUEUE_READY and value == 1:
            try:
                q.check_config(self.mem)
            except QueueError as e:
                self._fail(f"queue {self.queue_sel}: {e}")
                return
            q.ready = True

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        new = value | (old & v.STATUS_DEVICE_NEEDS_RESET)
        if new & v.STATUS_FEATURES_OK and not old & v.STATUS_FEATURES_OK:
            # 3.1.1 step 5: refuse a feature set we did not offer, or legacy.
            bad = self.driver_features & ~self.device_features
            if bad or not self.driver_features >> v.VIRTIO_F_VERSION_1 & 1:
                log.warning("virtio %d: driver features %#x refused", self.device.device_type,
                            self.driver_features)
                new &= ~v.STATUS_FEATURES_OK
        if new & v.STATUS_DRIVER_OK and not old & v.STATUS_DRIVER_OK:
            if not new & v.STATUS_FEATURES_OK:
                self.status = new & ~v.STATUS_DRIVER_OK
                return
            self.status = new
            self._activate()
            return
        self.status = new

    def _activate(self) -> None:
        event_idx = bool(self.driver_features >> v.VIRTIO_F_EVENT_IDX & 1)
        try:
            for q in self.queues:
                if q.ready:
                    q.activate(self.mem, event_idx)
            self.device.activate(self.mem, self.queues, self.driver_features, self.signal_used)
        except QueueError as e:
            self._fail(str(e))

    def reset(self) -> None:
        """Device reset (status 0): the device forgets everything (2.4)."""
        self.device.reset()
        self._reset_state()

    # --- queues (I/O thread) ------------------------------------------------------

    def notify(self, index: int) -> None:
        """The driver made buffers available in queue `index`."""
        with self._lock:
            if not self.active or index >= len(self.queues) or not self.queues[index].ready:
                return
            try:
                self.device.process(index)
            except (QueueError, GuestMemoryError) as e:  # the second would be a device bug; same answer
                self._fail(f"queue {index}: {e}")

    def signal_used(self, index: int) -> None:
        """The device used buffers in queue `index`: interrupt if the driver wants it."""
        with self._lock:
            q = self.queues[index]
            try:
                wanted = q.needs_notification()
            except (QueueError, GuestMemoryError) as e:
                self._fail(f"queue {index}: {e}")
                return
            if wanted:
                self._raise_interrupt(VIRTIO_MMIO_INT_VRING)

    def config_changed(self) -> None:
        """The device changed its config space: a configuration change notification (4.2.3.3)."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & v.STATUS_DRIVER_OK:
                self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    def _fail(self, why: str) -> None:
        """A broken driver: DEVICE_NEEDS_RESET and a config interrupt (2.1.2)."""
        msg = f"virtio device {self.device.device_type}: {why}; device needs reset"
        log.warning("%s", msg)
        if len(self.errors) < 100:
            self.errors.append(msg)
        self.status |= v.STATUS_DEVICE_NEEDS_RESET
        self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    def _raise_interrupt(self, bits: int, clear: int = 0) -> None:
        """Set (and trigger) or acknowledge interrupt status bits."""
        with self._irq_lock:
            self.interrupt_status = (self.interrupt_status & ~clear) | bits
        if bits:
            self.irq.trigger()
