"""The virtio-mmio transport and virtio-console against a fake driver (no KVM)."""

from __future__ import annotations

import inspect
import logging

import pytest

from microvm.devices import virtio as v
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio.console import RX_QUEUE, TX_QUEUE, VirtioConsole
from microvm.devices.virtio.queue import Queue
from microvm.memory import GuestMemory
from tests.support.fakes import FakeIrq
from tests.support.virtio_driver import VirtqDriver

pytestmark = pytest.mark.usefixtures("virtqueue")  # every test here runs with both queues

ACK, DRIVER, FEATURES_OK, DRIVER_OK = v.STATUS_ACKNOWLEDGE, v.STATUS_DRIVER, v.STATUS_FEATURES_OK, v.STATUS_DRIVER_OK
FAILED, NEEDS_RESET = v.STATUS_FAILED, v.STATUS_DEVICE_NEEDS_RESET


class Driver:
    """The Linux virtio_mmio probe sequence (4.2.3.1.1 + 3.1.1), by registers."""

    def __init__(self, transport: m.MmioTransport, mem: GuestMemory):
        self.t, self.mem = transport, mem
        self.queues: dict[int, VirtqDriver] = {}

    def r(self, off: int) -> int:
        return self.t.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)

    def features(self) -> int:
        self.w(m.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        low = self.r(m.VIRTIO_MMIO_DEVICE_FEATURES)
        self.w(m.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        return low | self.r(m.VIRTIO_MMIO_DEVICE_FEATURES) << 32

    def add_status(self, bit: int) -> None:
        """virtio_add_status(): read, OR in one bit, write back."""
        self.w(m.VIRTIO_MMIO_STATUS, self.r(m.VIRTIO_MMIO_STATUS) | bit)

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.w(m.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self.w(m.VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)

    def negotiate(self, features: int) -> bool:
        """3.1.1 steps 2-6, from a reset device."""
        self.add_status(v.STATUS_ACKNOWLEDGE)
        self.add_status(v.STATUS_DRIVER)
        self.write_features(features)
        self.add_status(v.STATUS_FEATURES_OK)
        return bool(self.r(m.VIRTIO_MMIO_STATUS) & v.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int, base: int) -> VirtqDriver:
        self.w(m.VIRTIO_MMIO_QUEUE_SEL, index)
        assert self.r(m.VIRTIO_MMIO_QUEUE_READY) == 0
        assert self.r(m.VIRTIO_MMIO_QUEUE_NUM_MAX) >= size
        q = VirtqDriver.create(self.mem, size, base=base)
        self.w(m.VIRTIO_MMIO_QUEUE_NUM, size)
        for low, addr in ((m.VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table), (m.VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_ring),
                          (m.VIRTIO_MMIO_QUEUE_USED_LOW, q.used_ring)):
            self.w(low, addr & 0xFFFFFFFF)
            self.w(low + 4, addr >> 32)
        self.w(m.VIRTIO_MMIO_QUEUE_READY, 1)
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        self.add_status(v.STATUS_DRIVER_OK)

    def reset(self) -> None:
        self.w(m.VIRTIO_MMIO_STATUS, 0)


def console_setup(event_idx: bool = False) -> tuple[Driver, VirtioConsole, bytearray, FakeIrq]:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    out = bytearray()
    dev = VirtioConsole(out.extend)
    irq = FakeIrq()
    t = m.MmioTransport(dev, mem, irq)
    d = Driver(t, mem)
    assert d.r(m.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
    assert d.r(m.VIRTIO_MMIO_VERSION) == 2
    assert d.r(m.VIRTIO_MMIO_DEVICE_ID) == v.VIRTIO_ID_CONSOLE
    feats = d.features()
    assert feats >> v.VIRTIO_F_VERSION_1 & 1
    want = 1 << v.VIRTIO_F_VERSION_1 | (1 << v.VIRTIO_F_EVENT_IDX if event_idx else 0)
    assert d.negotiate(want)
    d.setup_queue(RX_QUEUE, 16, 0x10000)
    d.setup_queue(TX_QUEUE, 16, 0x20000)
    d.driver_ok()
    assert t.active
    return d, dev, out, irq


def test_console_transmit_and_interrupt() -> None:
    d, _dev, out, irq = console_setup()
    tx = d.queues[TX_QUEUE]
    tx.add_chain([(b"hello ", False), (b"world\n", False)])
    tx.add_indirect_chain([(b"indirect\n", False)])
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    assert bytes(out) == b"hello world\nindirect\n"
    assert [h for h, _ in tx.used()] == [0, 2]
    assert irq.count == 1
    assert d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS) & m.VIRTIO_MMIO_INT_VRING
    d.w(m.VIRTIO_MMIO_INTERRUPT_ACK, m.VIRTIO_MMIO_INT_VRING)
    assert d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS) == 0


def test_console_receive() -> None:
    d, dev, _, irq = console_setup(event_idx=True)
    rx = d.queues[RX_QUEUE]
    heads = [rx.add_chain([(4, True)]), rx.add_chain([(8, True)])]
    buffers = [rx.buffers[h][0] for h in heads]
    dev.feed(b"abcdefghij")
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, RX_QUEUE)
    used = rx.used()
    assert used == [(heads[0], 4), (heads[1], 6)]
    got = b"".join(d.mem.read(addr, n) for (addr, _, _), (_, n) in zip(buffers, used, strict=True))
    assert got == b"abcdefghij"
    assert irq.count == 1


def test_console_tells_when_a_driver_that_set_it_up_resets_it() -> None:
    """How the host hears a guest's shutdown (machine.py: the kernel console's reset)."""
    resets: list[str] = []
    dev = VirtioConsole(lambda _: None, on_reset=lambda: resets.append("reset"))
    mem = GuestMemory([(0, bytearray(1 << 20))])
    d = Driver(m.MmioTransport(dev, mem, FakeIrq()), mem)
    d.w(m.VIRTIO_MMIO_STATUS, 0)  # a reset before any setup: nothing to tell
    assert resets == []
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    d.setup_queue(RX_QUEUE, 16, 0x10000)
    d.setup_queue(TX_QUEUE, 16, 0x20000)
    d.driver_ok()
    d.w(m.VIRTIO_MMIO_STATUS, 0)
    assert resets == ["reset"]


def test_broken_ring_sets_needs_reset_and_keeps_running() -> None:
    d, _dev, out, _irq = console_setup()
    tx = d.queues[TX_QUEUE]
    tx.write_desc(0, 0xDEAD_0000_0000, 16)  # outside guest memory
    tx.offer(0)
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    assert d.r(m.VIRTIO_MMIO_STATUS) & v.STATUS_DEVICE_NEEDS_RESET
    assert d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS) & m.VIRTIO_MMIO_INT_CONFIG
    assert "outside guest memory" in d.t.errors[0]
    assert out == b""
    assert d.t.stats()["needs_reset"] == 1
    # Further notifications are ignored until the driver resets the device.
    tx.add_chain([(b"x", False)])
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    assert out == b""
    assert d.t.stats()["needs_reset"] == 1 and d.t.stats()["notifications"] == 2
    d.w(m.VIRTIO_MMIO_STATUS, 0)
    assert d.r(m.VIRTIO_MMIO_STATUS) == 0 and d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    # Brought up again, the next broken ring counts again.
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    tx = d.setup_queue(TX_QUEUE, 16, 0x20000)
    d.driver_ok()
    tx.offer(tx.size + 5)  # a head past the table
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    assert d.r(m.VIRTIO_MMIO_STATUS) & v.STATUS_DEVICE_NEEDS_RESET
    assert d.t.stats()["needs_reset"] == 2 and len(d.t.errors) == 2


def test_feature_negotiation_refuses_what_was_not_offered() -> None:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    t = m.MmioTransport(VirtioConsole(lambda b: None), mem, FakeIrq())
    d = Driver(t, mem)
    assert not d.negotiate(1 << v.VIRTIO_F_VERSION_1 | 1 << 5)  # bit 5 not offered
    d.w(m.VIRTIO_MMIO_STATUS, 0)
    assert not d.negotiate(0)  # legacy (no VERSION_1) is refused
    d.w(m.VIRTIO_MMIO_STATUS, 0)
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)


def test_queue_config_checked_and_frozen_once_ready() -> None:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    t = m.MmioTransport(VirtioConsole(lambda b: None), mem, FakeIrq())
    d = Driver(t, mem)
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, 0)
    d.w(m.VIRTIO_MMIO_QUEUE_NUM, 16)
    d.w(m.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x3)  # misaligned
    d.w(m.VIRTIO_MMIO_QUEUE_READY, 1)
    assert d.r(m.VIRTIO_MMIO_QUEUE_READY) == 0
    assert d.r(m.VIRTIO_MMIO_STATUS) & v.STATUS_DEVICE_NEEDS_RESET
    d.w(m.VIRTIO_MMIO_STATUS, 0)
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    q = d.setup_queue(0, 16, 0x10000)
    d.w(m.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x40000)  # refused: the queue is ready
    assert t.queues[0].desc_table == q.desc_table
    assert t.stats()["register_writes_refused"] == 1
    # A queue index the device does not have reads as absent.
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, 7)
    assert d.r(m.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0


def test_driver_ok_without_features_ok_is_refused() -> None:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    t = m.MmioTransport(VirtioConsole(lambda b: None), mem, FakeIrq())
    d = Driver(t, mem)
    d.w(m.VIRTIO_MMIO_STATUS, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER | v.STATUS_DRIVER_OK)
    assert not t.active and t.status == 0 and t.stats()["status_refused"] == 1


@pytest.mark.parametrize("offset", [0x1, 0x3, 0xFF0, 0x100 + 64])
def test_odd_accesses_are_harmless(offset: int) -> None:
    d, _, _, _ = console_setup()
    d.t.read(offset, 1)
    d.t.write(offset, 2, 0xFFFF)
    assert d.t.active


# --- the device status table (2.1.1, 3.1.1) --------------------------------------------------


def fresh() -> tuple[m.MmioTransport, Driver]:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    t = m.MmioTransport(VirtioConsole(lambda b: None), mem, FakeIrq())
    return t, Driver(t, mem)


def reach(d: Driver, status: int) -> None:
    """Bring the device to `status` by allowed writes only (and a broken queue for NEEDS_RESET)."""
    for bit in (ACK, DRIVER, FEATURES_OK, DRIVER_OK):
        if status & bit:
            d.add_status(bit)
            if bit == DRIVER:
                d.write_features(1 << v.VIRTIO_F_VERSION_1)  # so FEATURES_OK, now or in the test, is accepted
    if status & FAILED:
        d.add_status(FAILED)
    if status & NEEDS_RESET:
        d.t._fail("test")
    assert d.r(m.VIRTIO_MMIO_STATUS) == status


STEPS = (ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK)

# (status before, value written): the register becomes the value.
ALLOWED = [
    (0, ACK), (ACK, ACK | DRIVER), (ACK | DRIVER, ACK | DRIVER | FEATURES_OK),
    (ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK),
    *((old, old | FAILED) for old in (0, *STEPS)),  # FAILED at any time
    # ... and FAILED stands beside the sequence: Linux's virtio_device_restore_priv() resets,
    # sets ACKNOWLEDGE, re-adds FAILED if the device had failed, then goes on; a re-probe may too.
    (FAILED, FAILED | ACK),
    (ACK | FAILED, ACK | FAILED | DRIVER),
    (ACK | DRIVER | FAILED, ACK | DRIVER | FAILED | FEATURES_OK),
    (ACK | DRIVER | FEATURES_OK | FAILED, ACK | DRIVER | FEATURES_OK | FAILED | DRIVER_OK),
    (ACK | DRIVER | FEATURES_OK | NEEDS_RESET, ACK | DRIVER | FEATURES_OK | NEEDS_RESET | DRIVER_OK),
    (STEPS[-1] | NEEDS_RESET, STEPS[-1] | NEEDS_RESET | FAILED),
    *((old, old) for old in STEPS),  # writing the same value again changes nothing
]

# (status before, value written, why): the register keeps its value.
REFUSED = [
    (0, DRIVER, "DRIVER without ACKNOWLEDGE"),
    (0, ACK | DRIVER, "two steps in one write"),
    (0, FEATURES_OK, "FEATURES_OK first"),
    (ACK, ACK | FEATURES_OK, "FEATURES_OK without DRIVER"),
    (ACK, ACK | DRIVER_OK, "DRIVER_OK without DRIVER"),
    (ACK | DRIVER, ACK | DRIVER | DRIVER_OK, "DRIVER_OK without FEATURES_OK"),
    (0, ACK | DRIVER | DRIVER_OK, "DRIVER_OK from reset"),
    (ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK | 0x10, "a reserved bit"),
    (ACK, ACK | 0x20, "a reserved bit"),
    (0, NEEDS_RESET, "DEVICE_NEEDS_RESET, the device's bit"),
    (ACK | DRIVER, ACK | DRIVER | NEEDS_RESET, "DEVICE_NEEDS_RESET, the device's bit"),
    (ACK | DRIVER, ACK, "clearing DRIVER"),
    (ACK | DRIVER, DRIVER, "clearing ACKNOWLEDGE"),
    (ACK | DRIVER | FEATURES_OK, ACK | DRIVER, "clearing FEATURES_OK"),
    (ACK | DRIVER | FEATURES_OK | DRIVER_OK, ACK | DRIVER | FEATURES_OK, "clearing DRIVER_OK"),
    (ACK | DRIVER | FEATURES_OK | DRIVER_OK, ACK, "clearing all but ACKNOWLEDGE"),
    (ACK | FAILED, ACK, "clearing FAILED"),
    (ACK | DRIVER | FEATURES_OK, ACK | DRIVER | DRIVER_OK, "clearing FEATURES_OK while setting DRIVER_OK"),
]


@pytest.mark.parametrize("old,new", ALLOWED)
def test_status_transition_allowed(old: int, new: int) -> None:
    t, d = fresh()
    reach(d, old)
    d.w(m.VIRTIO_MMIO_STATUS, new)
    assert d.r(m.VIRTIO_MMIO_STATUS) == new
    assert t.stats()["status_refused"] == 0
    assert t.active == (new & DRIVER_OK and not new & NEEDS_RESET)


@pytest.mark.parametrize("old,new,why", REFUSED)
def test_status_transition_refused(old: int, new: int, why: str) -> None:
    t, d = fresh()
    reach(d, old)
    d.w(m.VIRTIO_MMIO_STATUS, new)
    assert d.r(m.VIRTIO_MMIO_STATUS) == old, why
    assert t.stats()["status_refused"] == 1, why
    assert t.active == bool(old & DRIVER_OK)


def test_needs_reset_stays_when_the_driver_writes_without_it() -> None:
    # The driver may have read the status just before the device set the bit.
    t, d = fresh()
    reach(d, ACK | DRIVER | FEATURES_OK | NEEDS_RESET)
    d.w(m.VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert d.r(m.VIRTIO_MMIO_STATUS) == ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    assert not t.active and t.stats()["status_refused"] == 0


@pytest.mark.parametrize("old", [0, *STEPS, ACK | DRIVER | FAILED, ACK | DRIVER | FEATURES_OK | NEEDS_RESET])
def test_status_zero_resets_from_anywhere(old: int) -> None:
    t, d = fresh()
    reach(d, old)
    d.reset()
    assert d.r(m.VIRTIO_MMIO_STATUS) == 0 and not t.active
    assert t.stats()["resets"] == 1 and t.stats()["status_refused"] == 0


def test_refused_features_keep_todays_answer() -> None:
    # 3.1.1 step 6: the driver reads FEATURES_OK back clear, then sets FAILED.
    t, d = fresh()
    assert not d.negotiate(1 << v.VIRTIO_F_VERSION_1 | 1 << 5)
    assert d.r(m.VIRTIO_MMIO_STATUS) == ACK | DRIVER
    d.add_status(FAILED)
    assert d.r(m.VIRTIO_MMIO_STATUS) == ACK | DRIVER | FAILED
    assert t.stats()["features_refused"] == 1 and t.stats()["status_refused"] == 0


def test_linux_sequences_are_accepted() -> None:
    """The status and queue writes of Linux's virtio.c and virtio_mmio.c: nothing refused."""
    t, d = fresh()
    features = 1 << v.VIRTIO_F_VERSION_1 | 1 << v.VIRTIO_F_EVENT_IDX
    # register_virtio_device(): reset, ACKNOWLEDGE; virtio_dev_probe(): DRIVER, features, FEATURES_OK, read back.
    d.reset()
    assert d.negotiate(features)
    # vm_find_vqs() -> vm_setup_vq(); virtio_device_ready(): DRIVER_OK.
    for index, base in ((RX_QUEUE, 0x10000), (TX_QUEUE, 0x20000)):
        d.setup_queue(index, 16, base)
    d.driver_ok()
    assert t.active
    # virtio_dev_remove(): the driver's remove resets, then vm_del_vqs() stops each queue and
    # reads QueueReady back; then ACKNOWLEDGE again.
    d.reset()
    for index in (RX_QUEUE, TX_QUEUE):
        d.w(m.VIRTIO_MMIO_QUEUE_SEL, index)
        d.w(m.VIRTIO_MMIO_QUEUE_READY, 0)
        assert d.r(m.VIRTIO_MMIO_QUEUE_READY) == 0
    d.add_status(ACK)
    # virtio_device_restore_priv() of a device that had failed: reset, ACKNOWLEDGE, FAILED, DRIVER, ...
    d.reset()
    d.add_status(ACK)
    d.add_status(FAILED)
    d.add_status(DRIVER)
    d.write_features(features)
    d.add_status(FEATURES_OK)
    assert d.r(m.VIRTIO_MMIO_STATUS) & FEATURES_OK
    # vm_find_vqs() failing half-way: vm_del_vqs() stops the queue it set up (before DRIVER_OK).
    d.setup_queue(RX_QUEUE, 16, 0x10000)
    d.w(m.VIRTIO_MMIO_QUEUE_READY, 0)
    assert d.r(m.VIRTIO_MMIO_QUEUE_READY) == 0
    d.add_status(FAILED)
    s = t.stats()
    assert (s["status_refused"], s["register_writes_refused"], s["features_refused"]) == (0, 0, 0)
    assert s["resets"] == 3


# --- queue and feature registers: only in their window (3.1.1 steps 4 and 7) -----------------

QUEUE_WRITES = [
    (m.VIRTIO_MMIO_QUEUE_NUM, 8), (m.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x40000), (m.VIRTIO_MMIO_QUEUE_DESC_HIGH, 1),
    (m.VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x40000), (m.VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 1),
    (m.VIRTIO_MMIO_QUEUE_USED_LOW, 0x40000), (m.VIRTIO_MMIO_QUEUE_USED_HIGH, 1), (m.VIRTIO_MMIO_QUEUE_READY, 1),
]


def queue_registers(q: Queue) -> tuple[int, int, int, int, bool]:
    return q.size, q.desc_table, q.avail_ring, q.used_ring, q.ready


@pytest.mark.parametrize("status", [0, ACK, ACK | DRIVER, ACK | DRIVER | FAILED])
@pytest.mark.parametrize("offset,value", QUEUE_WRITES)
def test_queue_registers_refused_before_features_ok(status: int, offset: int, value: int) -> None:
    t, d = fresh()
    reach(d, status)
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, 0)
    before = queue_registers(t.queues[0])
    d.w(offset, value)
    assert queue_registers(t.queues[0]) == before
    assert t.stats()["register_writes_refused"] == 1
    assert d.r(m.VIRTIO_MMIO_STATUS) == status  # refused, not broken


@pytest.mark.parametrize("offset,value", QUEUE_WRITES)
def test_queue_registers_refused_after_driver_ok(offset: int, value: int) -> None:
    t, d = fresh()
    reach(d, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, 1)  # a queue the driver left unused
    before = queue_registers(t.queues[1])
    d.w(offset, value)
    assert queue_registers(t.queues[1]) == before
    assert t.stats()["register_writes_refused"] == 1


def test_queue_registers_of_an_absent_queue_are_refused() -> None:
    t, d = fresh()
    reach(d, ACK | DRIVER | FEATURES_OK)
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, 7)
    d.w(m.VIRTIO_MMIO_QUEUE_NUM, 8)
    d.w(m.VIRTIO_MMIO_QUEUE_READY, 0)  # stopping it is harmless: not counted
    assert t.stats()["register_writes_refused"] == 1


def test_queue_ready_takes_only_zero_or_one() -> None:
    t, d = fresh()
    reach(d, ACK | DRIVER | FEATURES_OK)
    d.setup_queue(0, 16, 0x10000)
    d.w(m.VIRTIO_MMIO_QUEUE_READY, 2)
    assert d.r(m.VIRTIO_MMIO_QUEUE_READY) == 1 and t.stats()["register_writes_refused"] == 1
    d.w(m.VIRTIO_MMIO_QUEUE_READY, 1)  # already ready: nothing to do
    d.w(m.VIRTIO_MMIO_QUEUE_READY, 0)
    assert d.r(m.VIRTIO_MMIO_QUEUE_READY) == 0 and t.stats()["register_writes_refused"] == 1


@pytest.mark.parametrize("status", [0, ACK, ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK])
def test_driver_features_refused_outside_their_window(status: int) -> None:
    t, d = fresh()
    reach(d, status)
    before = t.driver_features
    d.w(m.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
    d.w(m.VIRTIO_MMIO_DRIVER_FEATURES, 1 << v.VIRTIO_F_EVENT_IDX)
    assert t.driver_features == before and t.stats()["register_writes_refused"] == 1


def test_refusals_are_logged_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    t, d = fresh()
    with caplog.at_level(logging.DEBUG, logger=m.__name__):
        for _ in range(20):
            d.w(m.VIRTIO_MMIO_STATUS, DRIVER)
    assert t.stats()["status_refused"] == 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5  # the 1st, 2nd, 4th, 8th and 16th
    assert "DRIVER" in warnings[0].getMessage()


# --- used ring ids and counters ----------------------------------------------------------------


class BadHeadDevice(VirtioConsole):
    """A device bug: it returns a head the driver never offered."""

    def process(self, queue_index: int) -> None:
        q = self.queues[queue_index]
        while q.pop() is not None:
            q.add_used(q.size, 0)


def test_device_returning_a_bad_head_needs_reset() -> None:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    t = m.MmioTransport(BadHeadDevice(lambda b: None), mem, FakeIrq())
    d = Driver(t, mem)
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    tx = d.setup_queue(TX_QUEUE, 16, 0x20000)
    d.driver_ok()
    tx.add_chain([(b"x", False)])
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    assert tx.used() == []  # the driver never sees the bad id
    assert d.r(m.VIRTIO_MMIO_STATUS) & NEEDS_RESET
    assert "out of range" in t.errors[0]
    assert t.stats()["needs_reset"] == 1


def test_stats_after_a_small_exchange() -> None:
    d, dev, out, irq = console_setup()
    tx, rx = d.queues[TX_QUEUE], d.queues[RX_QUEUE]
    tx.add_chain([(b"one\n", False)])
    tx.add_chain([(b"two\n", False)])
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    tx.used()
    rx.set_no_interrupt(True)  # the driver polls rx: no interrupt for it
    rx.add_chain([(8, True)])
    dev.feed(b"hi")
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, RX_QUEUE)
    assert rx.used() == [(0, 2)] and out == b"one\ntwo\n"
    d.t.config_changed()  # as a device whose config changed would
    assert irq.count == 2
    assert d.t.stats() == {
        "notifications": 2, "interrupts": 2, "config_changes": 1, "resets": 0, "status_refused": 0,
        "features_refused": 0, "register_writes_refused": 0, "needs_reset": 0,
        "chains_popped": 3, "used_added": 3, "interrupts_suppressed": 1,
    }
    d.reset()
    assert d.t.stats()["resets"] == 1 and d.t.stats()["chains_popped"] == 3  # the run's totals survive a reset


def test_every_counter_is_documented() -> None:
    source = inspect.getsource(m.TransportCounters)
    for name in m.TransportCounters.__dataclass_fields__:
        assert f"{name}: int = 0  # " in source, name
    assert set(fresh()[0].stats()) == {*m.TransportCounters.__dataclass_fields__, *m.QUEUE_COUNTERS}

