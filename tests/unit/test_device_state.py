"""Device snapshots (snapshot_state / restore_state, devices/state.py), no KVM needed.

Each test drives a device part-way with the fake driver, takes its state
through a msgpack round trip, restores it into a freshly built device behind
a new transport on a copy of guest memory, and then gives both the original
and the restored device the same next request: the used ring, the guest
memory, the interrupts and what reaches the host must come out the same.
Malformed or mismatched states are a SnapshotError naming what differs.
"""

from __future__ import annotations

import copy
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from microvm.backends.disk import RawDisk
from microvm.devices import virtio as v
from microvm.devices.control import REG_EXIT, REG_MARK, ControlDevice
from microvm.devices.i8042 import I8042
from microvm.devices.serial import (
    UART_DLL,
    UART_DLM,
    UART_FCR,
    UART_IER,
    UART_IIR,
    UART_LCR,
    UART_LSR,
    UART_MCR,
    UART_RX,
    UART_SCR,
    Serial,
)
from microvm.devices.virtio import blk_abi as b
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio import net as n
from microvm.devices.virtio import rng as r
from microvm.devices.virtio import vsock as vs
from microvm.devices.virtio.block import VirtioBlock
from microvm.devices.virtio.console import RX_QUEUE, TX_QUEUE, VirtioConsole
from microvm.devices.virtio.net import VirtioNet
from microvm.devices.virtio.rng import VirtioRng
from microvm.devices.virtio.vsock import VirtioVsock
from microvm.devices.virtio.vsock_abi import VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
from microvm.errors import SnapshotError
from microvm.memory import GuestMemory
from tests.support.fakes import FakeIrq, FakeTap
from tests.unit.test_virtio_block import hdr, make_image
from tests.unit.test_virtio_mmio import Driver
from tests.unit.test_virtio_net import MAC, frame
from tests.unit.test_virtio_rng import Clock
from tests.unit.test_vsock import CID, Guest, host_connect

pytestmark = pytest.mark.usefixtures("virtqueue")  # every test here runs with both queues

MEM = 4 << 20


# --- helpers ----------------------------------------------------------------------------


def check_plain(value: object, where: str = "state") -> None:
    """Only what the contract allows: no floats, no tuples, no objects; str keys."""
    if value is None or type(value) in (int, bool, str, bytes):
        return
    if type(value) is list:
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            check_plain(item, f"{where}.{key}")
        return
    raise AssertionError(f"{where} is a {type(value).__name__}")


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    check_plain(state)
    out = msgpack.unpackb(msgpack.packb(state), strict_map_key=False)
    assert out == state
    return out


def copy_memory(mem: GuestMemory) -> GuestMemory:
    return GuestMemory([(region.guest_addr, bytearray(region.mv)) for region in mem.regions])


def memory_bytes(mem: GuestMemory) -> list[bytes]:
    return [bytes(region.mv) for region in mem.regions]


def fork(d: Driver, t: m.MmioTransport, mem: GuestMemory) -> Driver:
    """The same guest driver, in the copied memory, talking to the restored transport."""
    out = Driver(t, mem)
    for index, q in d.queues.items():
        c = copy.copy(q)
        c.mem = mem
        c.free = list(q.free)
        c.chains = {head: list(ds) for head, ds in q.chains.items()}
        c.buffers = {head: list(bs) for head, bs in q.buffers.items()}
        out.queues[index] = c
    return out


REGISTERS = (m.VIRTIO_MMIO_STATUS, m.VIRTIO_MMIO_INTERRUPT_STATUS, m.VIRTIO_MMIO_CONFIG_GENERATION,
             m.VIRTIO_MMIO_DEVICE_FEATURES)


def registers(d: Driver) -> list[int]:
    """What the driver reads back, every queue's too (QueueSel is left as it was)."""
    sel = d.t.queue_sel
    out = [d.r(off) for off in REGISTERS]
    for i in range(len(d.t.queues)):
        d.w(m.VIRTIO_MMIO_QUEUE_SEL, i)
        out += [d.r(m.VIRTIO_MMIO_QUEUE_READY), d.r(m.VIRTIO_MMIO_QUEUE_NUM_MAX)]
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, sel)
    return [*out, sel]


def restore(state: dict[str, Any], device: Any, mem: GuestMemory) -> tuple[m.MmioTransport, FakeIrq]:
    irq = FakeIrq()
    t = m.MmioTransport(device, mem, irq)
    t.restore_state(roundtrip(state))
    t.serve_restored()
    return t, irq


def same_next(sides: list[tuple[Driver, FakeIrq]], step: Callable[[Driver], object]) -> list[object]:
    """Run `step` on the original and the restored side; what it returns, the interrupts
    it raised and the guest memory it leaves must be the same."""
    results = []
    for d, irq in sides:
        before = irq.count
        results.append((step(d), irq.count - before, d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS)))
    assert results[0] == results[1]
    assert memory_bytes(sides[0][0].mem) == memory_bytes(sides[1][0].mem)
    return results


# --- virtio-console and the transport ---------------------------------------------------------


def console(event_idx: bool) -> tuple[Driver, VirtioConsole, bytearray, FakeIrq]:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    out = bytearray()
    dev = VirtioConsole(out.extend)
    irq = FakeIrq()
    d = Driver(m.MmioTransport(dev, mem, irq), mem)
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1 | (1 << v.VIRTIO_F_EVENT_IDX if event_idx else 0))
    d.setup_queue(RX_QUEUE, 16, 0x10000)
    d.setup_queue(TX_QUEUE, 16, 0x20000)
    d.driver_ok()
    return d, dev, out, irq


@pytest.mark.parametrize("event_idx", [False, True])
def test_console_continues_where_it_stopped(event_idx: bool) -> None:
    d, dev, out, irq = console(event_idx)
    rx, tx = d.queues[RX_QUEUE], d.queues[TX_QUEUE]
    for text in (b"one\n", b"two\n"):
        tx.add_chain([(text, False)])
        d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    assert len(tx.used()) == 2
    rx.add_chain([(4, True)])
    dev.feed(b"abcdefgh")  # 4 bytes go in, 4 wait for the next buffer
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, RX_QUEUE)
    assert rx.used() == [(0, 4)]
    d.w(m.VIRTIO_MMIO_QUEUE_SEL, 1)
    t = d.t
    t.config_changed()  # config_generation 1, and an interrupt the guest has not acknowledged
    state = t.snapshot_state()
    assert state["kind"] == "virtio-mmio" and state["device"] == {"kind": "virtio-console", "input": b"efgh"}
    assert [q["next_avail"] for q in state["queues"]] == [1, 2]

    out2 = bytearray()
    t2, irq2 = restore(state, VirtioConsole(out2.extend), copy_memory(d.mem))
    d2 = fork(d, t2, t2.mem)
    assert t2.active and irq2.count == 0
    assert registers(d2) == registers(d)
    assert t2.snapshot_state() == state

    def next_requests(x: Driver) -> object:
        x.w(m.VIRTIO_MMIO_INTERRUPT_ACK, m.VIRTIO_MMIO_INT_VRING)  # the config change stays unacknowledged
        x.queues[RX_QUEUE].add_chain([(8, True)])
        x.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, RX_QUEUE)
        x.queues[TX_QUEUE].add_indirect_chain([(b"three\n", False)])
        x.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
        return x.queues[RX_QUEUE].used(), x.queues[TX_QUEUE].used(), x.queues[RX_QUEUE].used_idx()

    [(used, raised, status), _] = same_next([(d, irq), (d2, irq2)], next_requests)
    assert used == ([(1, 4)], [(2, 0)], 2)
    # With EVENT_IDX the driver left used_event at 0: both sides remember they signalled past it.
    assert (raised, status) == ((0, m.VIRTIO_MMIO_INT_CONFIG) if event_idx else
                                (2, m.VIRTIO_MMIO_INT_CONFIG | m.VIRTIO_MMIO_INT_VRING))
    assert bytes(out) == b"one\ntwo\nthree\n" and bytes(out2) == b"three\n"


def test_a_transport_mid_probe_finishes_its_probe_after_restore() -> None:
    mem = GuestMemory([(0, bytearray(1 << 20))])
    d = Driver(m.MmioTransport(VirtioConsole(lambda _: None), mem, FakeIrq()), mem)
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    d.setup_queue(RX_QUEUE, 16, 0x10000)  # the transmit queue and DRIVER_OK still to come
    t2, _ = restore(d.t.snapshot_state(), VirtioConsole(lambda _: None), copy_memory(mem))
    d2 = fork(d, t2, t2.mem)
    assert not t2.active and t2.queues[RX_QUEUE].ready and not t2.queues[TX_QUEUE].ready
    d2.setup_queue(TX_QUEUE, 16, 0x20000)
    d2.driver_ok()
    assert t2.active and not t2.errors


# --- malformed and mismatched states ------------------------------------------------------


def console_state() -> dict[str, Any]:
    d, _, _, _ = console(event_idx=True)
    d.queues[TX_QUEUE].add_chain([(b"x", False)])
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, TX_QUEUE)
    return roundtrip(d.t.snapshot_state())


def restore_console(state: object) -> m.MmioTransport:
    t = m.MmioTransport(VirtioConsole(lambda _: None), GuestMemory([(0, bytearray(1 << 20))]), FakeIrq())
    t.restore_state(state)  # type: ignore[arg-type]
    return t


def edit(path: tuple[Any, ...], value: object = KeyError) -> Callable[[dict[str, Any]], None]:
    """Set (or, by default, delete) the item at `path` in a state."""
    def apply(state: dict[str, Any]) -> None:
        target: Any = state
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return apply


BAD_STATES = [
    (edit(("kind",), "serial"), r"virtio-mmio \(virtio-console\) state: the state is of a 'serial' device"),
    (edit(("kind",)), "has no 'kind'"),
    (edit(("device_type",), v.VIRTIO_ID_BLOCK), "device_type differs: the state has 2, this device 3"),
    (edit(("status",)), "'status' is missing"),
    (edit(("status",), "15"), "status is '15', not an integer"),
    (edit(("device_features",), m.TRANSPORT_FEATURES | 1), "device_features differs"),
    (edit(("driver_features",), 1 << 40 | 1 << v.VIRTIO_F_VERSION_1), "were never offered"),
    (edit(("queues",), []), "0 queues, this device has 2"),
    (edit(("queues", 0, "max_size"), 512), "queue 0: virtqueue state: max_size differs: the state has 512"),
    (edit(("queues", 1, "size"), 12), "queue 1: .*queue size 12 is not a power of 2"),
    (edit(("queues", 1, "desc_table"), 1 << 40), "queue 1: .*descriptor table at 0x10000000000.* outside guest"),
    (edit(("queues", 0, "used_ring"), (1 << 20) - 8), "queue 0: .*used ring .* outside guest memory"),
    (edit(("queues", 0, "avail_ring"), 0x10001), "queue 0: .*not 2-byte aligned"),
    (edit(("queues", 1, "next_used")), "queue 1: virtqueue state: 'next_used' is missing"),
    (edit(("queues", 1, "ready"), 1), "ready is 1, not a bool"),
    (edit(("device",)), "'device' is missing"),
    (edit(("device",), None), "the device state is missing"),
    (edit(("device", "kind"), "virtio-rng"), "virtio-console state: the state is of a 'virtio-rng' device"),
    (edit(("device", "input"), "text"), "virtio-console state: input is not bytes"),
    (edit(("device", "input")), "virtio-console state: 'input' is missing"),
]


@pytest.mark.parametrize(("change", "message"), BAD_STATES)
def test_bad_states_are_refused(change: Callable[[dict[str, Any]], None], message: str) -> None:
    state = console_state()
    change(state)
    t = m.MmioTransport(VirtioConsole(lambda _: None), GuestMemory([(0, bytearray(1 << 20))]), FakeIrq())
    with pytest.raises(SnapshotError, match=message):
        t.restore_state(state)
    # Left as a fresh transport: nothing half-restored.
    assert t.status == 0 and all(not q.ready and q.next_avail == 0 for q in t.queues)


def test_not_a_dict_is_refused() -> None:
    with pytest.raises(SnapshotError, match="the state is a list, not a dict"):
        restore_console([1, 2])
    with pytest.raises(SnapshotError, match="serial state: the state is of a 'virtio-mmio' device"):
        Serial(FakeIrq()).restore_state(console_state())


def test_queue_count_and_size_are_the_devices() -> None:
    """A state of the console (two queues of 256) does not fit virtio-rng (one queue)."""
    state = console_state()
    state["device_type"] = v.VIRTIO_ID_RNG
    t = m.MmioTransport(VirtioRng(), GuestMemory([(0, bytearray(1 << 20))]), FakeIrq())
    with pytest.raises(SnapshotError, match=r"virtio-mmio \(virtio-rng\) state: 2 queues, this device has 1"):
        t.restore_state(state)


# --- virtio-blk ---------------------------------------------------------------------------------


class Blk:
    """A VirtioBlock over an image, behind a transport, over `mem`."""

    def __init__(self, path: Path, mem: GuestMemory, read_only: bool = False):
        self.raw = RawDisk(path, read_only=read_only)
        self.dev = VirtioBlock(self.raw)
        self.irq = FakeIrq()
        self.t = m.MmioTransport(self.dev, mem, self.irq)
        self.d = Driver(self.t, mem)


def blk_request(d: Driver, parts: list[tuple[bytes | int, bool]]) -> int:
    head = d.queues[0].add_chain(parts)
    for addr, length, writable in d.queues[0].buffers[head]:
        if writable:
            d.mem.fill(addr, length, 0xAA)
    return head


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    a, b_ = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, size=64 * 512)
    return a, b_


def blk_original(path: Path, event_idx: bool) -> Blk:
    x = Blk(path, GuestMemory([(0, bytearray(1 << 20))]))
    feats = x.d.features()
    assert x.d.negotiate(feats if event_idx else feats & ~(1 << v.VIRTIO_F_EVENT_IDX))
    x.d.setup_queue(0, 16, 0x10000)
    x.d.driver_ok()
    # Two requests served: a read and a write.
    blk_request(x.d, [(hdr(b.VIRTIO_BLK_T_IN, 0), False), (1024, True), (1, True)])
    blk_request(x.d, [(hdr(b.VIRTIO_BLK_T_OUT, 3), False), (b"w" * 512, False), (1, True)])
    x.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert [length for _, length in x.d.queues[0].used()] == [1025, 1]
    return x


@pytest.mark.parametrize("event_idx", [False, True])
def test_block_continues_where_it_stopped(images: tuple[Path, Path], event_idx: bool) -> None:
    a, b_ = images
    x = blk_original(a, event_idx)
    state = x.t.snapshot_state()
    assert state["device"] == {"kind": "virtio-blk", "path": str(a), "size": 64 * 512, "read_only": False,
                               "features": x.dev.features, "serial": x.dev.serial}
    shutil.copyfile(a, b_)  # the caller's copy of the disk, unchanged since the pause
    y = Blk(b_, copy_memory(x.d.mem))
    y.t.restore_state(roundtrip(state))
    y.t.serve_restored()
    assert y.dev.serial == x.dev.serial  # GET_ID stays the guest's, though the image moved
    d2 = fork(x.d, y.t, y.t.mem)
    assert registers(d2) == registers(x.d)

    def next_requests(d: Driver) -> object:
        d.w(m.VIRTIO_MMIO_INTERRUPT_ACK, m.VIRTIO_MMIO_INT_VRING)
        blk_request(d, [(hdr(b.VIRTIO_BLK_T_OUT, 5), False), (b"z" * 1024, False), (1, True)])
        blk_request(d, [(hdr(b.VIRTIO_BLK_T_IN, 3), False), (1536, True), (1, True)])
        blk_request(d, [(hdr(b.VIRTIO_BLK_T_GET_ID), False), (b.VIRTIO_BLK_ID_BYTES, True), (1, True)])
        d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        return d.queues[0].used(), d.queues[0].used_idx()

    [(result, raised, status), _] = same_next([(x.d, x.irq), (d2, y.irq)], next_requests)
    used, used_idx = result  # type: ignore[misc]
    assert [length for _, length in used] == [1, 1537, b.VIRTIO_BLK_ID_BYTES + 1] and used_idx == 5
    assert (raised, status) == ((0, 0) if event_idx else (1, m.VIRTIO_MMIO_INT_VRING))
    assert a.read_bytes() == b_.read_bytes()
    x.raw.close()
    y.raw.close()


@pytest.mark.parametrize(("size", "read_only", "message"), [
    (63 * 512, False, "virtio-blk state: size differs: the state has 32768, this device 32256"),
    (64 * 512, True, "virtio-blk state: read_only differs: the state has False, this device True"),
])
def test_block_refuses_a_different_disk(images: tuple[Path, Path], size: int, read_only: bool,
                                        message: str) -> None:
    a, b_ = images
    x = blk_original(a, event_idx=False)
    state = roundtrip(x.t.snapshot_state())
    b_.write_bytes(a.read_bytes()[:size])
    y = Blk(b_, copy_memory(x.d.mem), read_only=read_only)
    with pytest.raises(SnapshotError, match=message):
        y.t.restore_state(state)
    x.raw.close()
    y.raw.close()


def test_a_request_waiting_at_the_snapshot_is_served_only_once_every_device_is_restored(
        images: tuple[Path, Path]) -> None:
    """The notification for a request made available just before the pause died
    with the old process: the restore serves it, but not before every device's
    state has passed its checks (a later device's bad state means nothing ran)."""
    from types import SimpleNamespace

    from microvm.snapshot.machine import apply_devices

    a, b_ = images
    x = blk_original(a, event_idx=False)
    blk_request(x.d, [(hdr(b.VIRTIO_BLK_T_GET_ID), False), (b.VIRTIO_BLK_ID_BYTES, True), (1, True)])
    state = roundtrip(x.t.snapshot_state())  # made available, never notified
    shutil.copyfile(a, b_)

    def machine(second_state: object) -> tuple[Blk, Any, list[list[Any]]]:
        y = Blk(b_, copy_memory(x.d.mem))
        control = ControlDevice(on_exit=lambda code: None, on_power=lambda what: None)
        devices = SimpleNamespace(devices=[SimpleNamespace(name="blk", transport=y.t, device=y.dev),
                                           SimpleNamespace(name="control", transport=None, device=control)])
        return y, devices, [["blk", state], ["control", second_state]]

    y, devices, saved = machine({"kind": "serial"})  # the control device's state is wrong
    with pytest.raises(SnapshotError):
        apply_devices(devices, saved)
    assert fork(x.d, y.t, y.t.mem).queues[0].used_idx() == 2 and y.irq.count == 0  # nothing served
    y.raw.close()

    y, devices, saved = machine(ControlDevice(on_exit=lambda code: None, on_power=lambda what: None).snapshot_state())
    apply_devices(devices, saved)
    d2 = fork(x.d, y.t, y.t.mem)
    assert d2.queues[0].used_idx() == 3 and y.irq.count == 1
    x.raw.close()
    y.raw.close()


# --- virtio-net --------------------------------------------------------------------------------------


def test_net_keeps_mac_and_link_and_gives_back_held_buffers() -> None:
    tap = FakeTap()
    dev = VirtioNet(tap, mac=MAC)
    mem = GuestMemory([(0, bytearray(MEM))])
    irq = FakeIrq()
    d = Driver(m.MmioTransport(dev, mem, irq), mem)
    assert d.negotiate(d.features() & ~(1 << v.VIRTIO_F_EVENT_IDX))  # mergeable receive buffers
    rx, tx = d.setup_queue(n.RX_QUEUE, 64, 0x10000), d.setup_queue(n.TX_QUEUE, 64, 0x20000)
    rx.data_start, rx.data_end, rx._next_data = 0x100000, 0x200000, 0x100000
    tx.data_start, tx.data_end, tx._next_data = 0x200000, 0x300000, 0x200000
    d.driver_ok()
    tx.add_chain([(frame(100), False)])
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, n.TX_QUEUE)
    assert tap.peer.recv(4096) == frame(100)
    held = rx.add_chain([(1000, True)])
    tap.peer.send(frame(1500))  # needs two buffers: the one posted waits, popped, for another
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, n.RX_QUEUE)
    assert rx.used() == [] and dev.chains_held() == {n.RX_QUEUE: 1}
    state = d.t.snapshot_state()
    assert state["device"] == {"kind": "virtio-net", "features": n.FEATURES, "mac": bytes.fromhex("021122334455"),
                               "mtu": 1500, "link_up": True}
    assert state["queues"][n.RX_QUEUE]["next_avail"] == 0  # the held buffer goes back to the ring

    tap2 = FakeTap()
    dev2 = VirtioNet(tap2)  # a random MAC: the saved one wins
    t2, irq2 = restore(state, dev2, copy_memory(mem))
    d2 = fork(d, t2, t2.mem)
    assert dev2.mac == dev.mac and bytes(t2.read(m.VIRTIO_MMIO_CONFIG + i, 1) for i in range(6)) == dev.mac
    assert dev2.mergeable and tap2.offloads[-1] == tap.offloads[-1]
    # The frame in flight was dropped; the next one fills the held buffer first.
    d2.queues[n.RX_QUEUE].add_chain([(1000, True)])
    tap2.peer.send(frame(800))
    d2.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, n.RX_QUEUE)
    assert d2.queues[n.RX_QUEUE].used() == [(held, len(frame(800)))]
    got = d2.mem.read(rx.buffers[held][0][0], len(frame(800)))
    assert got[12:] == frame(800)[12:] and irq2.count == 1  # past the header, whose num_buffers we set
    d2.queues[n.TX_QUEUE].add_chain([(frame(60), False)])
    d2.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, n.TX_QUEUE)
    assert tap2.peer.recv(4096) == frame(60) and d2.queues[n.TX_QUEUE].used_idx() == 2

    # A link that was down stays down; another MTU does not fit.
    dev._backend_failed("read", OSError(5, "gone"))
    down = roundtrip(d.t.snapshot_state())
    tap3 = FakeTap()
    t3, _ = restore(down, VirtioNet(tap3), copy_memory(mem))
    assert t3.read(m.VIRTIO_MMIO_CONFIG + 6, 2) == 0
    with pytest.raises(SnapshotError, match="virtio-net state: mtu differs"):
        restore(down, VirtioNet(tap3, mtu=9000), copy_memory(mem))
    for x in (tap, tap2, tap3):
        x.close()


# --- virtio-rng ---------------------------------------------------------------------------------------


def test_rng_keeps_its_bucket_and_serves_the_held_chain_first() -> None:
    clock = Clock()
    dev = VirtioRng(rate_bytes_per_s=100, burst_bytes=100, clock=clock)
    mem = GuestMemory([(0, bytearray(MEM))])
    d = Driver(m.MmioTransport(dev, mem, FakeIrq()), mem)
    assert d.negotiate(1 << v.VIRTIO_F_VERSION_1)
    q = d.setup_queue(r.REQUEST_QUEUE, 16, 0x10000)
    d.driver_ok()
    q.add_chain([(60, True)])
    second = q.add_chain([(60, True)])  # 40 tokens left: it waits, held
    d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, r.REQUEST_QUEUE)
    assert [length for _, length in q.used()] == [60] and dev.chains_held() == {r.REQUEST_QUEUE: 1}
    clock.now += 0.1  # 10 more tokens
    state = d.t.snapshot_state()
    assert state["device"] == {"kind": "virtio-rng", "tokens": 50}
    assert state["queues"][0]["next_avail"] == 1

    clock2 = Clock()
    dev2 = VirtioRng(rate_bytes_per_s=100, burst_bytes=100, clock=clock2)
    t2, irq2 = restore(state, dev2, copy_memory(mem))
    d2 = fork(d, t2, t2.mem)
    assert d2.queues[0].used() == [] and irq2.count == 0  # restored: still waiting for 10 more
    clock2.now += 0.1
    d2.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, r.REQUEST_QUEUE)
    assert d2.queues[0].used() == [(second, 60)] and irq2.count == 1


# --- virtio-vsock -------------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="vss", dir="/tmp")  # short: sun_path holds 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


EVENT = struct.Struct("<I")  # struct virtio_vsock_event { le32 id; }


@pytest.mark.parametrize("event_buffer_first", [True, False])
def test_vsock_restored_resets_the_guests_connections(sockdir: str, event_buffer_first: bool) -> None:
    g = Guest(os.path.join(sockdir, "a.sock"))
    g.post_rx([4096] * 4)
    s, old_port = host_connect(g, 80)
    assert g.stats()["connections_open"] == 1
    if event_buffer_first:  # Linux keeps event buffers posted
        head = g.ev.add_chain([(b"\xff" * EVENT.size, True)])
        g.t.notify(vs.EVENT_QUEUE)
        assert g.ev.used() == []
    state = g.t.snapshot_state()
    assert state["device"] == {"kind": "virtio-vsock", "guest_cid": CID, "uds_path": g.path, "active": True,
                               "next_port": old_port + 1}

    dev2 = VirtioVsock(CID, os.path.join(sockdir, "b.sock"))
    t2, irq2 = restore(state, dev2, copy_memory(g.mem))
    d2 = fork(g.d, t2, t2.mem)
    ev = d2.queues[vs.EVENT_QUEUE]
    if not event_buffer_first:  # owed until the guest posts a buffer
        assert ev.used() == [] and irq2.count == 0
        head = ev.add_chain([(b"\xff" * EVENT.size, True)])
        t2.notify(vs.EVENT_QUEUE)
    addr = ev.buffers[head][0][0]
    assert ev.used() == [(head, EVENT.size)] and irq2.count == 1
    assert EVENT.unpack(t2.mem.read(addr, EVENT.size)) == (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,)
    assert dev2.stats()["transport_resets"] == 1 and dev2.stats()["connections_open"] == 0
    t2.notify(vs.EVENT_QUEUE)  # sent once
    assert ev.used() == []
    dev2.reset_transport()  # and a restored device still resets on demand
    assert dev2.stats()["transport_resets"] == 2
    # Host ports go on: the guest's reset socket for old_port may not be closed yet.
    assert dev2.muxer.next_port == old_port + 1
    dev2.close()
    s.close()
    g.close()


def test_vsock_not_yet_active_gets_no_reset_and_cid_must_match(sockdir: str) -> None:
    g = Guest(os.path.join(sockdir, "a.sock"), bring_up=False)
    state = roundtrip(g.t.snapshot_state())
    assert state["device"]["active"] is False
    dev2 = VirtioVsock(CID, os.path.join(sockdir, "b.sock"))
    t2, _ = restore(state, dev2, copy_memory(g.mem))
    g2 = fork(g.d, t2, t2.mem)
    assert g2.negotiate(1 << v.VIRTIO_F_VERSION_1)
    ev = g2.setup_queue(vs.EVENT_QUEUE, 8, 0x30000)
    for i in (vs.RX_QUEUE, vs.TX_QUEUE):
        g2.setup_queue(i, 8, 0x10000 * (i + 1))
    ev.add_chain([(EVENT.size, True)])
    g2.driver_ok()
    t2.notify(vs.EVENT_QUEUE)
    assert ev.used() == [] and dev2.stats()["transport_resets"] == 0  # a fresh driver has nothing to reset
    dev3 = VirtioVsock(CID + 1, os.path.join(sockdir, "c.sock"))
    with pytest.raises(SnapshotError, match=f"virtio-vsock state: guest_cid differs: the state has {CID}"):
        restore(state, dev3, copy_memory(g.mem))
    for dev in (dev2, dev3):
        dev.close()
    g.close()


# --- serial, i8042, control -------------------------------------------------------------------------------


def test_serial_keeps_registers_pending_interrupt_and_unread_input() -> None:
    uart = Serial(FakeIrq(), lambda _: None)
    uart.write(UART_LCR, 1, 0x80)  # DLAB: the divisor
    uart.write(UART_DLL, 1, 0x01)
    uart.write(UART_DLM, 1, 0x02)
    uart.write(UART_LCR, 1, 0x1B)  # 8E1, DLAB off
    uart.write(UART_FCR, 1, 0x01)
    uart.write(UART_MCR, 1, 0x0B)
    uart.write(UART_SCR, 1, 0x5A)
    uart.write(UART_IER, 1, 0x03)  # receive and THRE interrupts: THRE pending now
    uart.feed(b"hello")
    assert uart.read(UART_RX, 1) == ord("h")
    state = uart.snapshot_state()
    assert state["rx"] == b"ello" and state["thri_pending"] is True

    irq2 = FakeIrq()
    uart2 = Serial(irq2, lambda _: None)
    uart2.restore_state(roundtrip(state))
    assert irq2.count == 0
    for x in (uart, uart2):
        x.write(UART_LCR, 1, 0x9B)
        assert (x.read(UART_DLL, 1), x.read(UART_DLM, 1)) == (0x01, 0x02)
        x.write(UART_LCR, 1, 0x1B)
    read = [[x.read(off, 1) for off in (UART_IER, UART_LCR, UART_MCR, UART_SCR, UART_LSR)] for x in (uart, uart2)]
    assert read[0] == read[1]
    for x in (uart, uart2):
        assert x.read(UART_IIR, 1) == 0xC4  # receive data first, FIFOs on
        assert bytes(x.read(UART_RX, 1) for _ in range(4)) == b"ello"
        assert x.read(UART_IIR, 1) == 0xC2  # then the THRE interrupt the guest has not taken
        assert x.read(UART_IIR, 1) == 0xC1
    bad = dict(state, ier=0x100)
    with pytest.raises(SnapshotError, match="serial state: ier is 256"):
        Serial(FakeIrq()).restore_state(bad)


def test_i8042_and_control() -> None:
    data_port, command_port = I8042(lambda: None).ports()
    for port in (data_port, command_port):  # what the device manager holds
        state = roundtrip(port.snapshot_state())
        assert state == {"kind": "i8042"}
        I8042(lambda: None).ports()[1].restore_state(state)
    with pytest.raises(SnapshotError, match="i8042 state: the state is of a 'serial' device"):
        data_port.restore_state({"kind": "serial"})

    exits: list[int] = []
    control = ControlDevice(exits.append, lambda _: None)
    control.write(REG_MARK, 4, 1)
    control.write(REG_EXIT, 4, 7)
    state = roundtrip(control.snapshot_state())
    control2 = ControlDevice(exits.append, lambda _: None)
    control2.restore_state(state)
    assert control2.read(REG_EXIT, 4) == 7 and control2.marks == control.marks
    control2.write(REG_EXIT, 4, 9)  # the exit was reported before the snapshot: not again
    assert exits == [7]
    with pytest.raises(SnapshotError, match="control state: marks"):
        control2.restore_state(dict(state, marks=[[1, 2, 3]]))
