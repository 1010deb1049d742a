"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

Registers, feature negotiation and the device status state machine live
here; the device behind it only sees queues and its config space. A driver
that breaks the rules gets DEVICE_NEEDS_RESET and a config-change interrupt
(2.1.2), never an exception in the VMM. A register write out of order (a
status transition STATUS_SET_RULES forbids, a queue register before
FEATURES_OK or after DRIVER_OK) is refused: the register keeps its value,
and the refusal is counted in stats() and logged (sparingly).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

from microvm._kvm import FAST_ACK, FAST_READ, InterruptStatus
from microvm.devices import Irq
from microvm.devices import virtio as v
from microvm.devices.state import U8, U32, U64, Fields, State
from microvm.devices.virtio import queue as vq
from microvm.devices.virtio.queue import QUEUE_COUNTERS, Queue, QueueError
from microvm.errors import GuestMemoryError, SnapshotError
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

QUEUE_REGISTERS = frozenset({
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH,
})


@dataclass(slots=True)
class TransportCounters:
    """What one transport saw over the whole run (never reset), for stats()."""

    notifications: int = 0  # queue notifications from the driver (QueueNotify or its ioeventfd)
    interrupts: int = 0  # interrupts raised (used buffers or a configuration change)
    config_changes: int = 0  # configuration changes the device reported (4.2.3.3)
    resets: int = 0  # device resets: the driver wrote 0 to Status (2.4)
    status_refused: int = 0  # Status writes STATUS_SET_RULES refuses (2.1.1, 3.1.1): Status kept
    features_refused: int = 0  # FEATURES_OK refused: features we did not offer, or no VERSION_1 (3.1.1)
    register_writes_refused: int = 0  # feature/queue register writes out of their window (3.1.1, 4.2.2.3)
    needs_reset: int = 0  # times the device entered DEVICE_NEEDS_RESET (2.1.2)


def _sparingly(count: int) -> int:
    """Log level for the count-th refusal: a warning at 1, 2, 4, 8, ..., so a
    driver looping on a bad write cannot flood the log; debug otherwise."""
    return logging.WARNING if count & (count - 1) == 0 else logging.DEBUG


class MmioTransport:
    """One virtio device at one MMIO window (a BusDevice)."""

    def __init__(self, device: v.VirtioDevice, mem: GuestMemory, irq: Irq):
        self.device = device
        self.mem = mem
        self.irq = irq
        self.queues = [vq.Queue(n) for n in device.queue_sizes]  # looked up now: the one in use
        self.device_features = device.features | TRANSPORT_FEATURES
        # vCPU threads (registers, status changes) vs. the I/O thread (queue
        # processing): a reset never runs in the middle of a batch.
        self._lock = threading.RLock()
        # InterruptStatus (and ACK): an atomic word, not under the lock: the
        # guest's interrupt handler reads and acknowledges it while the I/O
        # thread may be deep in a batch, and must not wait for that batch. A
        # vCPU answers both in C, without the GIL (fast_registers, bus.MmioBus.fast).
        self.isr = InterruptStatus()
        self.errors: list[str] = []  # why the device needed a reset, the first 100 times
        self.counters = TransportCounters()
        self._reset_state()
        if hasattr(device, "config_changed"):
            device.config_changed = self.config_changed  # e.g. virtio-net's link status
        if hasattr(device, "notify_queue"):
            # e.g. vsock's host sockets: their events are served like a queue
            # notification, under our lock, never beside a reset.
            device.notify_queue = self.notify

    def _reset_state(self) -> None:
        self.status = 0
        self.features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.isr.value = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    @property
    def active(self) -> bool:
        return bool(self.status & v.STATUS_DRIVER_OK) and not self.status & v.STATUS_DEVICE_NEEDS_RESET

    def _queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def stats(self) -> dict[str, int]:
        """Transport counters (TransportCounters) and queue counters
        (queue.QUEUE_COUNTERS, summed over the queues), for the run's results."""
        out = dataclasses.asdict(self.counters)
        for name in QUEUE_COUNTERS:
            out[name] = sum(getattr(q, name) for q in self.queues)
        return out

    # --- registers (vCPU threads) ---------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.isr.value if size == 4 else 0  # an atomic load: no lock needed
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
                self.isr.ack(value)
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
            elif offset in QUEUE_REGISTERS:
                self._write_queue_register(offset, value)
            # Anything else is read-only or absent: ignored (4.2.2.3).

    def _refuse_write(self, what: str) -> None:
        c = self.counters
        c.register_writes_refused += 1
        log.log(_sparingly(c.register_writes_refused), "virtio %d: %s refused (%d register writes refused so far)",
                self.device.device_type, what, c.register_writes_refused)

    def _set_driver_features(self, value: int) -> None:
        # 3.1.1: features are written after DRIVER (step 3) and before FEATURES_OK (step 5).
        if not self.status & v.STATUS_DRIVER or self.status & v.STATUS_FEATURES_OK:
            self._refuse_write(f"driver features {value:#x} with status {v.status_name(self.status)}")
            return
        if self.driver_features_sel > 1:
            return  # no feature bits up there: nothing to accept
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._queue()
        if offset == VIRTIO_MMIO_QUEUE_READY and value == 0 and (q is None or not q.ready):
            # Already stopped: Linux's vm_del_vq() writes this after its reset,
            # then reads it back (4.2.2.3).
            return
        status = self.status
        if q is None:
            self._refuse_write(f"register {offset:#x} of absent queue {self.queue_sel}")
        elif not status & v.STATUS_FEATURES_OK or status & v.STATUS_DRIVER_OK:
            # 3.1.1: the queues are set up (step 7) after FEATURES_OK (5) and before DRIVER_OK (8).
            self._refuse_write(f"register {offset:#x} of queue {self.queue_sel} with status {v.status_name(status)}")
        elif offset == VIRTIO_MMIO_QUEUE_READY:
            self._set_queue_ready(q, value)
        elif q.ready:
            # 4.2.2.3: "When QueueReady is not zero, the driver MUST NOT access QueueNum, QueueDesc..."
            self._refuse_write(f"register {offset:#x} of queue {self.queue_sel} while it is ready")
        elif offset == VIRTIO_MMIO_QUEUE_NUM:
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

    def _set_queue_ready(self, q: Queue, value: int) -> None:
        if value == 0:
            q.ready = False  # 4.2.2.3: "To stop using the queue the driver MUST write zero (0x0)"
        elif value != 1:
            self._refuse_write(f"QueueReady {value:#x} for queue {self.queue_sel}")
        elif not q.ready:
            try:
                q.check_config(self.mem)
            except QueueError as e:
                self._fail(f"queue {self.queue_sel}: {e}")
                return
            q.ready = True

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()  # 2.4: the only write that clears status bits
            return
        old = self.status
        new = value | (old & v.STATUS_DEVICE_NEEDS_RESET)  # the device's bit: see v.STATUS_SIDE_BITS
        if new == old:
            return
        why = v.status_refusal(old, new)
        if why is not None:
            c = self.counters
            c.status_refused += 1
            log.log(_sparingly(c.status_refused), "virtio %d: status %s -> %s refused: driver %s (%d so far)",
                    self.device.device_type, v.status_name(old), v.status_name(new), why, c.status_refused)
            return
        if new & ~old & v.STATUS_FEATURES_OK:
            # 3.1.1 step 5: refuse a feature set we did not offer, or legacy;
            # the driver sees FEATURES_OK clear when it reads back (step 6).
            bad = self.driver_features & ~self.device_features
            if bad or not self.driver_features >> v.VIRTIO_F_VERSION_1 & 1:
                c = self.counters
                c.features_refused += 1
                log.log(_sparingly(c.features_refused), "virtio %d: driver features %#x refused",
                        self.device.device_type, self.driver_features)
                new &= ~v.STATUS_FEATURES_OK
        self.status = new
        if new & ~old & v.STATUS_DRIVER_OK:
            self._activate()

    def _activate(self) -> None:
        try:
            self._start_device()
        except QueueError as e:
            self._fail(str(e))

    def _start_device(self) -> None:
        """DRIVER_OK (3.1.1 step 8): the ready queues and the device go live. May raise QueueError."""
        event_idx = bool(self.driver_features >> v.VIRTIO_F_EVENT_IDX & 1)
        for q in self.queues:
            if q.ready:
                q.activate(self.mem, event_idx)
        self.device.activate(self.mem, self.queues, self.driver_features, self.signal_used)

    def reset(self) -> None:
        """Device reset (status 0): the device forgets everything (2.4)."""
        self.counters.resets += 1
        self.device.reset()
        self._reset_state()

    def release_memory(self) -> None:
        """The VM is closing: every queue lets go of guest memory (no thread serves them now)."""
        with self._lock:
            for q in self.queues:
                q.release()
            # Views into guest memory a device keeps itself (a user's device: ours
            # keep none, their queues hold the buffers).
            release = getattr(self.device, "release_memory", None)
            if release is not None:
                release()

    def detach(self) -> None:
        """The VM is closed: the device lets go of what we gave it (our bound
        methods: a reference cycle with it), and its rate limits of their way
        back to us. Nothing calls either any more."""
        for hook in ("config_changed", "notify_queue"):
            if getattr(self.device, hook, None) is not None:
                setattr(self.device, hook, None)
        for throttle in getattr(self.device, "throttles", dict)().values():
            throttle.unbind()

    # --- queues (I/O thread) ------------------------------------------------------

    def notify(self, index: int) -> None:
        """The driver made buffers available in queue `index`."""
        with self._lock:
            self.counters.notifications += 1
            self._process(index)

    def _process(self, index: int) -> None:
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
            self.counters.config_changes += 1
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & v.STATUS_DRIVER_OK:
                self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    # --- snapshots (devices/state.py) -------------------------------------------------

    def _label(self) -> str:
        return f"virtio-mmio ({v.VIRTIO_NAMES.get(self.device.device_type, self.device.device_type)})"

    def snapshot_state(self) -> State:
        """Registers, status, negotiated features, every queue, and the device's own
        state under "device" (None for a device without snapshot_state). Chains a
        device holds popped but unused (its chains_held()) go back to their rings."""
        with self._lock:
            held_by = getattr(self.device, "chains_held", None)
            held: dict[int, int] = held_by() if callable(held_by) else {}
            device_state = getattr(self.device, "snapshot_state", None)
            return {
                "kind": "virtio-mmio", "device_type": self.device.device_type,
                "device_features": self.device_features, "status": self.status,
                "features_sel": self.features_sel, "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features, "queue_sel": self.queue_sel,
                "interrupt_status": self.isr.value, "config_generation": self.config_generation,
                "queues": [q.snapshot_state(held.get(i, 0)) for i, q in enumerate(self.queues)],
                "device": device_state() if callable(device_state) else None,
            }

    def restore_state(self, state: State) -> None:
        """Take over a snapshot_state() on a fresh transport (with its new guest memory).

        The device takes its own state first (its checks name what differs: a
        disk's size, a CID). Queues are checked against the new memory as
        QueueReady checks them. With DRIVER_OK the queues and the device go live
        as at DRIVER_OK, at the saved ring positions. Nothing is served yet:
        serve_restored() does that once every device of the VM has taken its
        state. After a SnapshotError the transport is reset and the device is
        not to be used.
        """
        with self._lock:
            try:
                self._restore(state)
            except SnapshotError:
                self.device.reset()
                self._reset_state()
                raise

    def _restore(self, state: State) -> None:
        label = self._label()
        f = Fields(state, "virtio-mmio", label)
        f.same("device_type", self.device.device_type)
        status, driver_features = f.integer("status", hi=U8), f.integer("driver_features", hi=U64)
        registers = {key: f.integer(key, hi=U32) for key in ("features_sel", "driver_features_sel", "queue_sel",
                                                             "interrupt_status", "config_generation")}
        queues = f.sequence("queues")
        if len(queues) != len(self.queues):
            raise f.error(f"{len(queues)} queues, this device has {len(self.queues)}")
        device_state = f.value("device")
        restore = getattr(self.device, "restore_state", None)
        if (device_state is None) == callable(restore):
            raise f.error("the device state is missing" if device_state is None else "a device state for a "
                          "device that keeps none")
        if callable(restore):
            restore(device_state)
        f.same("device_features", self.device_features)
        if status & v.STATUS_FEATURES_OK and driver_features & ~self.device_features:
            raise f.error(f"driver features {driver_features:#x} were never offered ({self.device_features:#x})")
        if status & v.STATUS_DRIVER_OK and not status & v.STATUS_FEATURES_OK:
            raise f.error(f"status {v.status_name(status)} has DRIVER_OK without FEATURES_OK")
        for i, (q, qs) in enumerate(zip(self.queues, queues, strict=True)):
            try:
                q.restore_state(qs, self.mem)
            except SnapshotError as e:
                raise SnapshotError(f"{label} state: queue {i}: {e}") from e
        self.status, self.driver_features = status, driver_features
        self.features_sel, self.driver_features_sel = registers["features_sel"], registers["driver_features_sel"]
        self.queue_sel, self.config_generation = registers["queue_sel"], registers["config_generation"]
        self.isr.value = registers["interrupt_status"]
        if status & v.STATUS_DRIVER_OK:
            try:
                self._start_device()  # as _activate did; the queues keep their positions
            except QueueError as e:  # the queues were checked above: this would be our bug
                raise f.error(str(e)) from e

    def serve_restored(self) -> None:
        """After restore_state: serve every ready queue once, as if notified. A
        notification the paused I/O thread had not taken yet (an ioeventfd's
        count) died with the old process. This may write guest memory and
        trigger the interrupt line: the interrupt controller is restored first,
        and every other device's state has passed its checks."""
        with self._lock:
            for i in range(len(self.queues)):
                self._process(i)

    def _fail(self, why: str) -> None:
        """A broken driver: DEVICE_NEEDS_RESET and a config interrupt (2.1.2)."""
        msg = f"virtio device {self.device.device_type}: {why}; device needs reset"
        log.warning("%s", msg)
        if len(self.errors) < 100:
            self.errors.append(msg)
        if not self.status & v.STATUS_DEVICE_NEEDS_RESET:
            self.counters.needs_reset += 1
        self.status |= v.STATUS_DEVICE_NEEDS_RESET
        self._raise_interrupt(VIRTIO_MMIO_INT_CONFIG)

    def _raise_interrupt(self, bits: int) -> None:
        """Set interrupt status bits and trigger the line (under self._lock, which
        guards the counter)."""
        self.isr.raise_bits(bits)
        self.counters.interrupts += 1
        self.irq.trigger()

    def fast_registers(self) -> list[tuple[int, int, InterruptStatus]]:
        """The registers a vCPU may answer without us (bus.MmioBus.fast):
        InterruptStatus reads and InterruptACK writes, 4 bytes each."""
        return [(VIRTIO_MMIO_INTERRUPT_STATUS, FAST_READ, self.isr), (VIRTIO_MMIO_INTERRUPT_ACK, FAST_ACK, self.isr)]
