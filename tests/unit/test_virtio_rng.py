"""virtio-rng (virtio 1.2, 5.4) driven through the MMIO transport by the fake
driver: random bytes land in the guest's buffers, the used length says how
many, hostile rings end in DEVICE_NEEDS_RESET, and the rate limit delays
requests without dropping them. No KVM needed.
"""

from __future__ import annotations

import os
import time
from random import Random
from typing import Any

import pytest

from microvm.devices import virtio as v
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio import queue as vq
from microvm.devices.virtio import rng as r
from microvm.devices.virtio.queue import DescriptorChain, Queue, QueueError
from microvm.devices.virtio.rng import IoWakeup, VirtioRng
from microvm.errors import ConfigError
from microvm.iothread import IoThread
from microvm.memory import GuestMemory
from tests.support.fakes import FakeIrq
from tests.support.virtio_driver import (
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_ELEM,
    HostileRing,
    RandomPicker,
    VirtqDriver,
    hostile_ring,
)
from tests.unit.test_virtio_mmio import Driver

pytestmark = pytest.mark.usefixtures("virtqueue")  # every test here runs with both queues

MEM = 4 << 20
DATA = (0x100000, MEM)
SENTINEL = 0xA5


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rng:
    """A VirtioRng behind a transport, brought up by the fake driver."""

    def __init__(self, dev: VirtioRng | None = None, queue_size: int = 256, event_idx: bool = False):
        self.dev = dev or VirtioRng()
        self.mem = GuestMemory([(0, bytearray(MEM))])
        self.irq = FakeIrq()
        self.t = m.MmioTransport(self.dev, self.mem, self.irq)
        self.d = Driver(self.t, self.mem)
        self.event_idx = event_idx
        self.bufs: dict[int, list[tuple[int, int, bool]]] = {}  # head -> (addr, len, writable)
        self.q = self.bring_up(queue_size)

    def bring_up(self, queue_size: int) -> VirtqDriver:
        want = 1 << v.VIRTIO_F_VERSION_1 | (1 << v.VIRTIO_F_EVENT_IDX if self.event_idx else 0)
        assert self.d.negotiate(want)
        q = self.d.setup_queue(r.REQUEST_QUEUE, queue_size, 0x10000)
        q.data_start, q.data_end = DATA
        q._next_data = DATA[0]
        self.d.driver_ok()
        assert self.t.active
        return q

    def post(self, parts: list[tuple[bytes | int, bool]]) -> int:
        """Offer one chain; its writable buffers start out as SENTINEL bytes."""
        head = self.q.add_chain(parts)
        self.bufs[head] = list(self.q.buffers[head])  # used() forgets them
        for addr, length, writable in self.bufs[head]:
            if writable:
                self.mem.fill(addr, length, SENTINEL)
        return head

    def serve(self, chains: list[list[tuple[bytes | int, bool]]]) -> list[tuple[int, list[bytes]]]:
        """Post chains, notify once: (used length or -1, writable buffers' contents) per chain."""
        heads = [self.post(parts) for parts in chains]
        self.t.notify(r.REQUEST_QUEUE)
        used = dict(self.q.used())
        return [(used.get(h, -1), [self.mem.read(a, n) for a, n, w in self.bufs[h] if w]) for h in heads]

    def needs_reset(self) -> bool:
        return bool(self.t.read(m.VIRTIO_MMIO_STATUS, 4) & v.STATUS_DEVICE_NEEDS_RESET)


def looks_random(data: bytes) -> bool:
    """Neither the sentinel nor one repeated byte (a false alarm for n random bytes: about 2^(-8(n-1)))."""
    return len(data) >= 8 and len(set(data)) > 1


# --- identity ------------------------------------------------------------------------------------


def test_identity_one_queue_no_features_no_config() -> None:
    x = Rng()
    assert x.t.read(m.VIRTIO_MMIO_DEVICE_ID, 4) == v.VIRTIO_ID_RNG == 4
    x.d.w(m.VIRTIO_MMIO_QUEUE_SEL, 0)
    assert x.t.read(m.VIRTIO_MMIO_QUEUE_NUM_MAX, 4) == 256
    x.d.w(m.VIRTIO_MMIO_QUEUE_SEL, 1)
    assert x.t.read(m.VIRTIO_MMIO_QUEUE_NUM_MAX, 4) == 0  # 5.4.2: requestq only
    assert x.d.features() == m.TRANSPORT_FEATURES  # 5.4.3: no device feature bits
    assert all(x.t.read(m.VIRTIO_MMIO_CONFIG + off, 4) == 0 for off in range(0, 64, 4))  # 5.4.4


# --- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
def test_bytes_arrive_differ_and_used_length_is_what_was_written(event_idx: bool) -> None:
    x = Rng(event_idx=event_idx)
    (n1, b1), (n2, b2) = x.serve([[(64, True)], [(64, True)]])
    assert (n1, n2) == (64, 64)
    assert looks_random(b1[0]) and looks_random(b2[0])
    assert b1 != b2
    (n3, b3), = x.serve([[(64, True)]])
    assert n3 == 64 and b3[0] not in (b1[0], b2[0])
    if not event_idx:  # (with it, the driver's used_event decides: 2.7.10)
        assert x.irq.count == 2  # one interrupt per notification, not per chain
    assert x.dev.stats()["requests"] == 3 and x.dev.stats()["bytes"] == 192


def test_multi_buffer_and_indirect_chains_are_filled_whole() -> None:
    x = Rng()
    (n, bufs), = x.serve([[(16, True), (100, True), (4096, True)]])
    assert n == 16 + 100 + 4096
    assert all(looks_random(b) for b in bufs)
    head = x.q.add_indirect_chain([(32, True), (48, True)])
    addrs = x.q.buffers[head]
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == [(head, 80)]
    assert all(looks_random(x.mem.read(a, n)) for a, n, _ in addrs)


def test_readable_only_chain_is_used_empty_and_counted() -> None:
    """5.4.6.1: the driver MUST NOT post device-readable buffers; we never read or write them."""
    x = Rng()
    (n, _), = x.serve([[(b"do not touch" * 4, False)]])
    assert n == 0
    head = next(iter(x.bufs))
    assert x.mem.read(x.bufs[head][0][0], 48) == b"do not touch" * 4
    assert x.dev.stats()["errors"] == 1
    assert not x.needs_reset()
    (n, bufs), = x.serve([[(32, True)]])  # the device goes on serving
    assert n == 32 and looks_random(bufs[0])


def test_readable_buffers_in_a_chain_are_ignored_the_writable_ones_filled() -> None:
    x = Rng()
    head = x.post([(b"R" * 40, False), (24, True), (b"S" * 8, False), (40, True)])
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == [(head, 64)]
    (ra, _, _), (wa, wn, _), (sa, _, _), (xa, xn, _) = x.bufs[head]
    assert x.mem.read(ra, 40) == b"R" * 40 and x.mem.read(sa, 8) == b"S" * 8
    assert looks_random(x.mem.read(wa, wn)) and looks_random(x.mem.read(xa, xn))
    assert x.dev.stats()["errors"] == 1


def test_a_chain_gets_at_most_64_kib_and_the_rest_is_untouched() -> None:
    """5.4.6.2: the device MAY use less than the whole buffer; the used length says how much."""
    x = Rng()
    big = r.MAX_CHAIN_BYTES + 4096
    (n, bufs), = x.serve([[(1000, True), (big, True)]])
    assert n == r.MAX_CHAIN_BYTES
    served = bufs[0] + bufs[1]
    assert looks_random(served[:n])
    assert served[n:] == bytes([SENTINEL]) * (1000 + big - n)
    assert x.dev.stats()["truncated"] == 1


def test_a_huge_but_valid_length_costs_no_more_than_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3 MiB buffer (all of the data area) is served 64 KiB: no bigger host buffer is ever asked for."""
    asked: list[int] = []
    urandom = r.os.urandom

    def recording_urandom(n: int) -> bytes:
        asked.append(n)
        return urandom(n)

    monkeypatch.setattr(r.os, "urandom", recording_urandom)
    x = Rng()
    addr, length = DATA[0], DATA[1] - DATA[0]
    x.q.write_desc(0, addr, length, VRING_DESC_F_WRITE)
    x.q.free.remove(0)
    x.q.offer(0)
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == [(0, r.MAX_CHAIN_BYTES)]
    assert x.mem.read(addr + r.MAX_CHAIN_BYTES, 64) == bytes(64)
    assert asked == [r.MAX_CHAIN_BYTES]


def test_stats_count_requests_bytes_and_errors_and_agree_with_the_queue() -> None:
    x = Rng()
    assert x.dev.stats() == dict.fromkeys(r.RNG_COUNTERS, 0)  # every key, from the start
    x.serve([[(10, True)], [(20, True), (30, True)], [(b"x", False)]])
    s = x.dev.stats()
    assert (s["requests"], s["bytes"], s["errors"], s["truncated"], s["throttled"]) == (3, 60, 1, 0, 0)
    transport = x.t.stats()
    assert transport["chains_popped"] == 3 and transport["used_added"] == 3


# --- a hostile driver ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["outside", "straddles_the_end", "absurd_length", "loop", "bad_next", "bad_head"])
def test_broken_rings_need_reset_and_leave_memory_alone(case: str) -> None:
    x = Rng(queue_size=8)
    (n, _), = x.serve([[(16, True)]])  # a good request first: the device worked
    assert n == 16
    q = x.q

    def corrupt() -> None:
        if case == "outside":
            q.write_desc(0, MEM + 0x1000, 64, VRING_DESC_F_WRITE)
        elif case == "straddles_the_end":
            q.write_desc(0, MEM - 8, 64, VRING_DESC_F_WRITE)
        elif case == "absurd_length":
            q.write_desc(0, DATA[0], 0xFFFF_FFFF, VRING_DESC_F_WRITE)
        elif case == "loop":
            q.write_desc(0, DATA[0], 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
            q.write_desc(1, DATA[0] + 16, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)
        elif case == "bad_next":
            q.write_desc(0, DATA[0], 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 8)
        q.offer(99 if case == "bad_head" else 0)

    before = x.mem.read(0, MEM)
    corrupt()
    after_driver = x.mem.read(0, MEM)
    x.t.notify(r.REQUEST_QUEUE)  # no exception
    assert x.needs_reset()
    assert x.t.errors and "device needs reset" in x.t.errors[-1]
    assert x.mem.read(0, MEM) == after_driver != before  # the device wrote nothing
    assert x.q.used() == []
    # The driver's way out (2.1.2): reset, set up again, and it works.
    x.d.reset()
    x.q = x.bring_up(8)
    (n, bufs), = x.serve([[(32, True)]])
    assert n == 32 and looks_random(bufs[0])


def recording_queue(max_size: int) -> Queue:
    """A queue of the implementation in use that keeps every chain it pops."""

    class RecordingQueue(vq.Queue):  # type: ignore[valid-type,misc]
        def __init__(self, max_size: int):
            super().__init__(max_size)
            self.popped: list[DescriptorChain] = []

        def pop(self) -> DescriptorChain | None:
            chain = super().pop()
            if chain is not None:
                self.popped.append(chain)
            return chain

    return RecordingQueue(max_size)


def run_device_on(ring: HostileRing) -> None:
    queue: Any = recording_queue(ring.max_size)
    queue.size = ring.size
    queue.desc_table, queue.avail_ring, queue.used_ring = ring.desc_table, ring.avail_ring, ring.used_ring
    queue.ready = True
    try:
        queue.activate(ring.mem, ring.event_idx)
    except QueueError:
        return
    queue.next_avail = queue.next_used = ring.start_idx
    dev = VirtioRng()
    dev.activate(ring.mem, [queue], 0, lambda _: None)
    before = [bytes(b) for b in ring.backings]
    for _ in range(2):
        try:
            dev.process(r.REQUEST_QUEUE)  # QueueError is the one way out
        except QueueError:
            break
    # Writable: the used ring (with avail_event), and the writable buffers of chains handed over.
    allowed = [(ring.used_ring + 2, 2 + VRING_USED_ELEM.size * ring.size + 2)]
    allowed += [(d.addr, d.len) for c in queue.popped for d in c.descriptors if d.write]
    for (base, size), old, new in zip(ring.layout, before, ring.backings, strict=True):
        if old == new:
            continue
        for i in (i for i in range(size) if old[i] != new[i]):
            addr = base + i
            assert any(a <= addr < a + n for a, n in allowed), f"wrote {addr:#x}"
    assert dev.stats()["requests"] <= len(queue.popped)


def test_hostile_rings_only_ever_fill_writable_buffers() -> None:
    """Random, mostly broken rings (tests/support/virtio_driver.py): process() raises nothing
    but QueueError and writes nothing but the used ring and buffers the driver marked writable."""
    for seed in range(150):
        pick = RandomPicker(Random(seed))
        run_device_on(hostile_ring(pick, sizes=[1, 2, 4, 8, 16]))


# --- bounds on one notification ------------------------------------------------------------------


def test_one_call_writes_at_most_its_budget_and_asks_to_be_woken_for_the_rest() -> None:
    x = Rng()
    wakeups: list[float] = []
    x.dev.wakeup = wakeups.append
    count = r.MAX_BYTES_PER_CALL // r.MAX_CHAIN_BYTES + 4
    heads = [x.post([(r.MAX_CHAIN_BYTES, True)]) for _ in range(count)]
    x.t.notify(r.REQUEST_QUEUE)
    first = x.q.used()
    assert len(first) == r.MAX_BYTES_PER_CALL // r.MAX_CHAIN_BYTES
    assert wakeups == [pytest.approx(r.WAKEUP_SLACK)]
    assert x.dev.stats()["deferred"] == 1
    x.t.notify(r.REQUEST_QUEUE)  # what the wakeup does
    rest = x.q.used()
    assert [h for h, _ in first + rest] == heads
    assert all(n == r.MAX_CHAIN_BYTES for _, n in first + rest)


def test_one_call_uses_at_most_its_chain_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(r, "MAX_CHAINS_PER_CALL", 3)
    x = Rng()
    for _ in range(5):
        x.post([(8, True)])
    x.t.notify(r.REQUEST_QUEUE)
    assert len(x.q.used()) == 3
    x.t.notify(r.REQUEST_QUEUE)
    assert len(x.q.used()) == 2


# --- the rate limit ------------------------------------------------------------------------------


def limited(rate: int, burst: int | None = None) -> tuple[Rng, Clock, list[float]]:
    clock = Clock()
    dev = VirtioRng(rate_bytes_per_s=rate, burst_bytes=burst, clock=clock)
    wakeups: list[float] = []
    dev.wakeup = wakeups.append
    return Rng(dev), clock, wakeups


def test_rate_limit_delays_a_request_instead_of_dropping_it() -> None:
    x, clock, wakeups = limited(1000)
    (n, _), = x.serve([[(600, True)]])  # the bucket starts full (1000)
    assert n == 600
    head = x.post([(600, True)])
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == []  # 400 tokens: it waits
    assert wakeups == [pytest.approx(0.2 + r.WAKEUP_SLACK)]
    clock.now += 0.1
    x.t.notify(r.REQUEST_QUEUE)  # the guest notifies again: no second timer, still waiting
    assert x.q.used() == [] and len(wakeups) == 1
    clock.now += 0.1 + r.WAKEUP_SLACK
    x.t.notify(r.REQUEST_QUEUE)  # the wakeup
    assert x.q.used() == [(head, 600)]
    assert looks_random(x.mem.read(x.bufs[head][0][0], 600))
    s = x.dev.stats()
    assert (s["throttled"], s["requests"], s["bytes"], s["wakeups"]) == (1, 2, 1200, 1)


def test_rate_limit_serves_a_request_larger_than_the_burst_short() -> None:
    x, clock, wakeups = limited(100, burst=256)
    (n, _), = x.serve([[(4096, True)]])
    assert n == 256
    head = x.post([(4096, True)])
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == []
    clock.now += wakeups[0]  # 2.56 s and the slack, when the timer fires
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == [(head, 256)]
    assert x.dev.stats()["truncated"] == 2


def test_rate_limit_without_a_wakeup_serves_at_the_next_notification() -> None:
    x, clock, _ = limited(64)
    x.dev.wakeup = None
    assert x.serve([[(64, True)], [(64, True)]])[1][0] == -1  # the second waits
    clock.now += 1
    x.t.notify(r.REQUEST_QUEUE)
    assert [n for _, n in x.q.used()] == [64]


def test_reset_drops_the_held_request_but_not_the_debt() -> None:
    """A driver reset must not refill the bucket (else resetting would buy entropy)."""
    x, clock, _ = limited(100)
    x.serve([[(100, True)]])
    x.post([(100, True)])
    x.t.notify(r.REQUEST_QUEUE)  # held
    x.d.reset()
    x.q = x.bring_up(256)
    x.t.notify(r.REQUEST_QUEUE)  # a stale wakeup: nothing to serve, nothing from the old ring
    assert x.q.used() == []
    head = x.post([(100, True)])
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == []  # the bucket is still empty
    clock.now += 1
    x.t.notify(r.REQUEST_QUEUE)
    assert x.q.used() == [(head, 100)]


def test_a_readable_only_chain_costs_no_tokens() -> None:
    x, _, _ = limited(10)
    x.serve([[(10, True)]])
    (n, _), = x.serve([[(b"r", False)]])
    assert n == 0  # used at once, with 0: there is nothing to wait for


def test_bad_rates_are_refused() -> None:
    for kwargs in ({"rate_bytes_per_s": 0}, {"rate_bytes_per_s": -5}, {"burst_bytes": 10},
                   {"rate_bytes_per_s": 10, "burst_bytes": 0}):
        with pytest.raises(ConfigError):
            VirtioRng(**kwargs)  # type: ignore[arg-type]


def test_io_wakeup_serves_the_held_request() -> None:
    """The real clock and IoWakeup, as the machine wires them: 100 bytes at 10 KB/s wait ~10 ms."""
    dev = VirtioRng(rate_bytes_per_s=10_000, burst_bytes=100)
    x = Rng(dev)
    io = IoThread("rng-test")
    keepalive = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # a thread with nothing to serve never starts
    io.add(keepalive, lambda: None)
    io.start()
    dev.wakeup = IoWakeup(io, x.t.notify)
    try:
        x.serve([[(100, True)]])
        head = x.post([(100, True)])
        x.t.notify(r.REQUEST_QUEUE)
        deadline = time.monotonic() + 5
        used: list[tuple[int, int]] = []
        while not used and time.monotonic() < deadline:
            time.sleep(0.005)
            used = x.q.used()
        assert used == [(head, 100)]
        assert dev.stats()["wakeups"] == 1
    finally:
        io.close()
        os.close(keepalive)
    dev.wakeup(0.0)  # after the thread's close: dropped, no notify
    assert dev.stats()["wakeups"] == 1
