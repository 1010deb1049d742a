"""The virtio-mmio transport and virtio-console against a fake driver (no KVM)."""

from __future__ import annotations

import pytest

from microvm.devices import virtio as v
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio.console import RX_QUEUE, TX_QUEUE, VirtioConsole
from microvm.memory import GuestMemory
from tests.unit.virtio_driver import VirtqDriver


class FakeIrq:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


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

    def negotiate(self, features: int) -> bool:
        self.w(m.VIRTIO_MMIO_STATUS, v.STATUS_ACKNOWLEDGE)
        self.w(m.VIRTIO_MMIO_STATUS, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER)
        for sel in (0, 1):
            self.w(m.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self.w(m.VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(m.VIRTIO_MMIO_STATUS, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER | v.STATUS_FEATURES_OK)
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
        self.w(m.VIRTIO_MMIO_STATUS, self.r(m.VIRTIO_MMIO_STATUS) | v.STATUS_DRIVER_OK)


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
    # Further notifications are ignored until the driver resets the device.
    tx.add_chain([(b"x", False)])
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    assert out == b""
    d.w(m.VIRTIO_MMIO_STATUS, 0)
    assert d.r(m.VIRTIO_MMIO_STATUS) == 0 and d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS) == 0


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
    q = d.setup_queue(0, 16, 0x10000)
    d.w(m.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x40000)  # ignored: the queue is ready
    assert t.queues[0].desc_table == q.desc_table
    # A queue index the device does not have reads as absent.
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, 7)
    assert d.r(m.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0


def test_driver_ok_without_features_ok_is_refused() -> None:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    t = m.MmioTransport(VirtioConsole(lambda b: None), mem, FakeIrq())
    d = Driver(t, mem)
    d.w(m.VIRTIO_MMIO_STATUS, v.STATUS_ACKNOWLEDGE | v.STATUS_DRIVER | v.STATUS_DRIVER_OK)
    assert not t.active


@pytest.mark.parametrize("offset", [0x1, 0x3, 0xFF0, 0x100 + 64])
def test_odd_accesses_are_harmless(offset: int) -> None:
    d, _, _, _ = console_setup()
    d.t.read(offset, 1)
    d.t.write(offset, 2, 0xFFFF)
    assert d.t.active
